"""How a global sequence is split over the ranks of a ring.

A layout maps a rank to the global token positions it holds. Every layout here describes a
rank's shard as a short tuple of :class:`Segment` s — arithmetic progressions of global
positions — concatenated in order. The engine needs nothing else: the causal relation between
two segments of equal stride is a single integer shift (see :mod:`ringattn.masks`).

=============  =======================================  ==========================================
layout         rank ``r`` of ``p`` holds                use it for
=============  =======================================  ==========================================
contiguous     chunk ``r`` of ``p``                     non-causal attention; simplest to reason
zigzag         chunks ``r`` and ``2p-1-r`` of ``2p``    causal training/prefill (balanced work)
striped        tokens ``r, r+p, r+2p, ...``             causal, balanced; every block half masked
=============  =======================================  ==========================================
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

LayoutName = Literal["contiguous", "zigzag", "striped"]


@dataclass(frozen=True)
class Segment:
    """Global positions ``start, start + stride, ..., start + (length - 1) * stride``."""

    start: int
    stride: int
    length: int

    def positions(self) -> range:
        return range(self.start, self.start + self.stride * self.length, self.stride)


def segment_positions(segments: Sequence[Segment]) -> torch.Tensor:
    """Global positions (int64, ``(total length,)``) of ``segments``, concatenated in order."""
    parts = [
        torch.arange(s.start, s.start + s.stride * s.length, s.stride, dtype=torch.long)
        for s in segments
    ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


class Layout(abc.ABC):
    """How the sequence is split over the ranks: the one thing the engine asks of a layout is
    :meth:`segments`, the global positions a rank holds as arithmetic progressions.

    The built-in layouts are in :data:`LAYOUTS`; to define your own, subclass and implement
    :meth:`segments` (and :meth:`local_multiple` when a shard's length must be a multiple of
    something), e.g. ``class Reversed(ringattn.Layout)`` with ``name = "reversed"`` and
    ``segments`` returning ``(Segment((world_size - 1 - rank) * seq_local, 1, seq_local),)``.
    ``segments`` returns a tuple; strides are at least 1. The ranks' segments must together cover
    ``0 .. world_size * seq_local - 1`` exactly once (:func:`ringattn.ring_attention` checks
    this). A layout must be hashable (plain classes are; a dataclass needs ``frozen=True``): plans
    are cached per layout. Causal tiling is arithmetic between segments of
    equal stride; other pairs are classified tile by tile (``tile_size``), so every mask works.
    """

    name: str = "custom"
    """Shown in messages; every rank of a ring must use a layout of the same name and positions."""

    @abc.abstractmethod
    def segments(self, rank: int, world_size: int, seq_local: int) -> tuple[Segment, ...]:
        """The global positions held by ``rank`` (of ``world_size``, ``seq_local`` tokens each),
        in local order."""

    def local_multiple(self, world_size: int) -> int:
        """The per-rank sequence length must be a multiple of this."""
        return 1

    def seq_multiple(self, world_size: int) -> int:
        """The total sequence length must be a multiple of this."""
        return world_size * self.local_multiple(world_size)

    def positions(self, rank: int, world_size: int, seq_local: int) -> torch.Tensor:
        """Global positions (int64, shape ``(seq_local,)``) of the tokens held by ``rank``."""
        return segment_positions(self.segments(rank, world_size, seq_local))

    def check_seq_len(self, seq_len: int, world_size: int) -> None:
        """Raise a ``ValueError`` that says what to do when ``seq_len`` cannot be sharded."""
        multiple = self.seq_multiple(world_size)
        if seq_len % multiple:
            raise ValueError(
                f"sequence length {seq_len} is not divisible by {multiple}, which the "
                f"{self.name!r} layout needs with world size {world_size}; pad the sequence to "
                f"{-(-seq_len // multiple) * multiple} tokens (and mask the padding) or pick "
                f"another length"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _BuiltIn(Layout):
    """A built-in layout: equal to every instance of its class, and unpickled as the one in
    :data:`LAYOUTS`, so that copies made by other processes are recognised as built in."""

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __reduce__(self) -> tuple:
        return get_layout, (self.name,)


class Contiguous(_BuiltIn):
    """Rank ``r`` of ``p`` holds chunk ``r`` of ``p``."""

    name = "contiguous"

    def segments(self, rank: int, world_size: int, seq_local: int) -> tuple[Segment, ...]:
        return (Segment(rank * seq_local, 1, seq_local),)


class Zigzag(_BuiltIn):
    """Rank ``r`` of ``p`` holds chunks ``r`` and ``2p - 1 - r`` of ``2p``: every rank gets the
    same causal work."""

    name = "zigzag"

    def local_multiple(self, world_size: int) -> int:
        return 2 if world_size > 1 else 1

    def segments(self, rank: int, world_size: int, seq_local: int) -> tuple[Segment, ...]:
        if world_size == 1:  # a world of one holds the sequence in order
            return (Segment(0, 1, seq_local),)
        half = seq_local // 2
        return (
            Segment(rank * half, 1, half),
            Segment((2 * world_size - 1 - rank) * half, 1, seq_local - half),
        )


class Striped(_BuiltIn):
    """Rank ``r`` of ``p`` holds tokens ``r, r + p, r + 2p, ...``."""

    name = "striped"

    def segments(self, rank: int, world_size: int, seq_local: int) -> tuple[Segment, ...]:
        return (Segment(rank, world_size, seq_local),)


@dataclass(frozen=True)
class SubBlock:
    """Part ``j`` of ``count`` of a shard: the ``j``-th of ``count`` near-equal pieces of every
    segment, concatenated in segment order.

    ``pieces`` are ``[start, stop)`` ranges of local indices in the shard; ``segments`` are their
    global positions. Cutting every segment (rather than the shard as one range) keeps each
    sub-block a miniature of the shard: under zigzag every sub-block holds early *and* late
    tokens, so the causal work of a sub-block is the same on every rank, as it is for whole shards.
    """

    pieces: tuple[tuple[int, int], ...]
    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(stop - start for start, stop in self.pieces)


@functools.lru_cache(maxsize=4096)
def sub_blocks(segments: tuple[Segment, ...], count: int) -> tuple[SubBlock, ...]:
    """Cut a shard with ``segments`` into at most ``count`` non-empty :class:`SubBlock` s.

    The cut depends only on the segments' lengths, so shards whose segments have equal lengths
    (every rank of a built-in layout) are cut at the same local indices.
    """
    blocks = []
    for j in range(count):
        pieces, parts, offset = [], [], 0
        for seg in segments:
            first, last = j * seg.length // count, (j + 1) * seg.length // count
            if last > first:
                pieces.append((offset + first, offset + last))
                parts.append(Segment(seg.start + seg.stride * first, seg.stride, last - first))
            offset += seg.length
        if pieces:
            blocks.append(SubBlock(tuple(pieces), tuple(parts)))
    return tuple(blocks)


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (Contiguous(), Zigzag(), Striped())}
"""The built-in layouts by name."""


def get_layout(layout: str | Layout) -> Layout:
    """Return the built-in :class:`Layout` named ``layout``, or ``layout`` itself."""
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(
            f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)} or pass a ringattn.Layout"
        )
    return LAYOUTS[layout]


@functools.lru_cache(maxsize=256)
def global_order(layout: Layout, world_size: int, seq_len: int) -> torch.Tensor:
    """Global positions of all ranks' shards concatenated in rank order, shape ``(seq_len,)``."""
    seq_local = seq_len // world_size
    return torch.cat([layout.positions(r, world_size, seq_local) for r in range(world_size)])


@functools.lru_cache(maxsize=256)
def layout_problem(layout: Layout, world_size: int, seq_local: int) -> str | None:
    """What is wrong with ``layout``'s shards of ``seq_local`` tokens on ``world_size`` ranks
    (each rank must hold ``seq_local`` positions, all ranks every position once), or ``None``.
    The built-in layouts are right by construction and not checked."""
    if layout in LAYOUTS.values():
        return None
    name = layout.name
    for rank in range(world_size):
        segments = layout.segments(rank, world_size, seq_local)
        if not isinstance(segments, tuple) or not all(isinstance(s, Segment) for s in segments):
            return f"layout {name!r}: segments() must return a tuple of Segments, got {segments!r}"
        if any(seg.stride < 1 or seg.length < 0 for seg in segments):
            return f"layout {name!r}: segments need stride >= 1 and length >= 0, got {segments!r}"
        held = sum(seg.length for seg in segments)
        if held != seq_local:
            return f"layout {name!r}: rank {rank}'s segments hold {held} positions, not {seq_local}"
    order = global_order(layout, world_size, seq_local * world_size)
    if not torch.equal(order.sort().values, torch.arange(order.numel())):
        return (
            f"layout {layout.name!r}: the ranks' segments must cover positions "
            f"0..{order.numel() - 1} once each"
        )
    return None


def checked_layout(layout: str | Layout, world_size: int, seq_local: int) -> Layout:
    """:func:`get_layout`, raising a ``ValueError`` when :func:`layout_problem` finds one."""
    chosen = get_layout(layout)
    problem = layout_problem(chosen, world_size, seq_local)
    if problem:
        raise ValueError(problem)
    return chosen
