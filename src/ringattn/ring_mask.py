"""A batch's masks, planned once for the ring: :func:`create_ring_mask` and :class:`RingMask`.

The ring's analogue of FlexAttention's ``create_block_mask``. Everything about a mask that costs a
collective or a host sync happens here, once per batch: the check that every rank describes the
same mask, the all-gathers of per-token document ids and padding into global per-position
tensors, and the classification of the tiles of every (query rank, key rank) pair this rank will
compute, under either rotation. A ``ring_attention(..., mask=ring_mask)`` call then only looks
tiles up; cut into the sub-blocks of its :class:`~ringattn.Granularity`, they are cached in the
mask too, so the second layer of a model plans nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .checks import (
    CALL_FIELDS,
    MASK_FIELDS,
    MaskArgs,
    RingInputError,
    backend_problem,
    lengths_problem,
    mask_signature,
)
from .comm import (
    GroupLike,
    RingComm,
    UlyssesGroup,
    gather_sequence,
    group_rank_and_size,
    split_context,
)
from .layout import Layout, LayoutName, Segment, SubBlock, get_layout, segment_positions
from .masks import (
    MaskMod,
    MaskSpec,
    Tile,
    bound_tiles,
    bounded_causal_tiles,
    clip_tiles,
    coalesce,
    one_stride,
)
from .ops import register_mask
from .ulysses import agree_on_mesh, concat_pieces


class RingMask:
    """The masks of one batch for a ring: built once by :func:`create_ring_mask`, passed to every
    :func:`ringattn.ring_attention` call of the batch (every layer, forward and backward).

    Attributes:
        layout: the :class:`~ringattn.Layout` the shards are in.
        q_len, kv_len: global (padded) lengths of the sharded queries and keys.
        seq_q_local, seq_kv_local: tokens of each rank's shard, ``q_len // world_size`` etc.
        batch, heads: the sizes the mask was built for (``None``: any).
        spec: the global per-position masks (:class:`~ringattn.MaskSpec`).
        key: an int64 scalar tensor that names this mask inside compiled graphs
            (:mod:`ringattn.ops`).
        ulysses: the Ulysses dimension of a ``(ulysses, ring)`` mesh (:mod:`ringattn.ulysses`),
            else ``None``; ``group``, ``world_size`` and the local lengths are then the ring's
            (a ring shard is ``ulysses.size`` ranks' pieces).
    """

    def __init__(
        self,
        spec: MaskSpec,
        layout: Layout,
        group: dist.ProcessGroup | None,
        q_len: int,
        kv_len: int,
        batch: int | None,
        heads: int | None,
        signature: Sequence[float],
        ulysses: UlyssesGroup | None = None,
    ):
        self.spec, self.layout, self.group = spec, layout, group
        self.ulysses = ulysses
        self.rank, self.world_size = group_rank_and_size(group)
        self.q_len, self.kv_len = q_len, kv_len
        self.seq_q_local, self.seq_kv_local = q_len // self.world_size, kv_len // self.world_size
        self.batch, self.heads = batch, heads
        self.signature = tuple(signature)
        self.key = register_mask(self)
        self.comm = RingComm(group)
        self.agreed_calls: set[tuple[float, ...]] = set()
        self._pairs: dict[tuple[int, int], tuple[Tile, ...]] = {}
        self._tiles: dict[tuple, tuple[Tile, ...]] = {}
        self._positions: dict[tuple, torch.Tensor] = {}
        self._segments: dict[tuple[int, bool], tuple[Segment, ...]] = {}

    def __repr__(self) -> str:
        spec = self.spec
        parts = [f"q_len={self.q_len}", f"kv_len={self.kv_len}", f"layout={self.layout.name!r}"]
        parts += [f"causal={spec.causal}"]
        if spec.window is not None:
            parts.append(f"window={spec.window}")
        held = ("doc_ids", "valid")
        parts += [f"{name}=True" for name in held if getattr(spec, name) is not None]
        if spec.mask_mod is not None:
            parts.append("mask_mod=True")
        parts.append(f"world_size={self.world_size}")
        if self.ulysses is not None:
            parts.append(f"ulysses={self.ulysses.size}")
        return f"RingMask({', '.join(parts)})"

    @property
    def q_offset(self) -> int:
        """Global position of the first query: queries are the last ``q_len`` key positions."""
        return self.kv_len - self.q_len

    def segments(self, rank: int, queries: bool) -> tuple[Segment, ...]:
        """Global positions of ``rank``'s queries (or keys) as segments (asked every ring
        step, so computed once)."""
        key = (rank, queries)
        if key not in self._segments:
            length = self.seq_q_local if queries else self.seq_kv_local
            offset = self.q_offset if queries else 0
            self._segments[key] = tuple(
                Segment(s.start + offset, s.stride, s.length)
                for s in self.layout.segments(rank, self.world_size, length)
            )
        return self._segments[key]

    @functools.cached_property
    def _tiles_are_arithmetic(self) -> bool:
        """Only causality (or nothing) between segments of one stride: tiles need no
        classification, only the arithmetic of :func:`ringattn.masks.plan_tiles`."""
        spec = self.spec
        if not spec.only_causal:
            return False
        if not spec.causal:
            return True
        return one_stride(*(self.segments(r, q) for r in range(self.world_size) for q in (0, 1)))

    def pair_tiles(self, q_rank: int, k_rank: int) -> tuple[Tile, ...]:
        """Tiles of ``q_rank``'s whole query shard against ``k_rank``'s keys, classified once."""
        key = (q_rank, k_rank)
        if key not in self._pairs:
            q_segments, k_segments = self.segments(q_rank, True), self.segments(k_rank, False)
            self._pairs[key] = self.spec.plan(q_segments, k_segments)
        return self._pairs[key]

    def classify(self) -> None:
        """Classify now every pair this rank can compute, under either rotation: its queries
        against every rank's keys (pass-KV) and every rank's queries against its keys (pass-Q)."""
        if self._tiles_are_arithmetic:
            return
        for other in range(self.world_size):
            self.pair_tiles(self.rank, other)
            self.pair_tiles(other, self.rank)

    def tiles(
        self,
        q_rank: int,
        q_block: SubBlock | None,
        k_rank: int,
        k_block: SubBlock | None,
        max_rows: int,
        max_cols: int,
    ) -> tuple[Tile, ...]:
        """Tiles of a query part against a key part (a rank's whole shard when its block is
        ``None``, else that sub-block), at most ``max_rows x max_cols`` each, in the parts'
        local indices."""
        key = (q_rank, q_block, k_rank, k_block, max_rows, max_cols)
        found = self._tiles.get(key)
        if found is not None:
            return found
        if self._tiles_are_arithmetic:
            q_segments = q_block.segments if q_block else self.segments(q_rank, True)
            k_segments = k_block.segments if k_block else self.segments(k_rank, False)
            found = bounded_causal_tiles(
                q_segments, k_segments, self.spec.causal, max_rows, max_cols
            )
        else:
            q_pieces = q_block.pieces if q_block else ((0, self.seq_q_local),)
            k_pieces = k_block.pieces if k_block else ((0, self.seq_kv_local),)
            clipped = clip_tiles(self.pair_tiles(q_rank, k_rank), q_pieces, k_pieces)
            found = bound_tiles(coalesce(clipped), max_rows, max_cols)
        self._tiles[key] = found
        return found

    def positions(self, segments: tuple[Segment, ...], device: torch.device) -> torch.Tensor:
        """Global positions of ``segments`` on ``device`` (int64), cached."""
        key = (segments, device)
        if key not in self._positions:
            self._positions[key] = segment_positions(segments).to(device)
        return self._positions[key]

    def call_problem(self, q: torch.Tensor, k: torch.Tensor) -> str | None:
        """What keeps this rank's ``q``/``k`` from being used with this mask, or ``None``."""
        world = self.world_size
        for name, t, length, local in (
            ("q", q, self.q_len, self.seq_q_local),
            ("k", k, self.kv_len, self.seq_kv_local),
        ):
            if t.shape[1] != local:
                side = "q_len" if name == "q" else "kv_len"
                return (
                    f"{name} has {t.shape[1]} local tokens but the RingMask was built for "
                    f"{side}={length} over {world} ranks ({local} each)"
                )
        if self.batch is not None and q.shape[0] != self.batch:
            return f"q has batch {q.shape[0]} but the RingMask was built for batch={self.batch}"
        heads = q.shape[2] * (self.ulysses.size if self.ulysses else 1)  # q's, after all-to-all
        if self.heads is not None and heads != self.heads:
            return f"q has {heads} heads but the RingMask was built for heads={self.heads}"
        spec = self.spec
        holds_data = spec.doc_ids is not None or spec.valid is not None or spec.mask_mod
        if holds_data and spec.device != q.device:
            return (
                f"q is on {q.device} but the RingMask's masks are on {spec.device}; pass "
                "device= to create_ring_mask"
            )
        return None

    def agree_call(
        self, problem: str | None, signature: tuple[float, ...] | None, across_ranks: bool
    ) -> None:
        """Raise :class:`RingInputError` on every rank unless every rank's call is valid and
        the same; a call signature agreed before is not checked again (no collective)."""
        agree_call(
            problem,
            signature,
            self.signature,
            self.group,
            self.world_size,
            across_ranks,
            self.agreed_calls,
            self.ulysses,
        )


def agree_call(
    problem: str | None,
    signature: tuple[float, ...] | None,
    mask_signature: Sequence[float] | None,
    group: dist.ProcessGroup | None,
    world_size: int,
    across_ranks: bool,
    agreed: set[tuple[float, ...]],
    ulysses: UlyssesGroup | None = None,
) -> dict[str, list[float]] | None:
    """The check of a ``ring_attention`` call (see :meth:`RingMask.agree_call`); ``agreed``
    holds the signatures agreed before and gains this one. Returns what :func:`agree`
    shares, or ``None`` when no check ran. With ``ulysses`` (a 2-D mesh) the check covers
    the Ulysses peers too (:func:`ringattn.ulysses.agree_on_mesh`)."""
    everyone = world_size * (ulysses.size if ulysses else 1)
    if everyone == 1 or not across_ranks or (problem is None and signature in agreed):
        if problem:
            raise RingInputError(f"ring_attention: {problem}")
        return None
    if problem and agreed:
        # The other ranks may have skipped this check (their calls match an agreed one) and be
        # waiting in the ring, which then ends in its timeout error.
        raise RingInputError(f"ring_attention: {problem} (found on this rank only)")
    full = None if problem else (*signature, *mask_signature)
    fields = CALL_FIELDS + MASK_FIELDS
    shared = agree_on_mesh("ring_attention", problem, fields, full, group, world_size, ulysses)
    agreed.add(signature)
    return shared


def padding_anywhere(shared: dict[str, list[float]] | None, masks: MaskArgs) -> bool:
    """Whether some rank's ``attention_mask`` hides a token (so it must be gathered), from
    what a check shared; without a check, whenever one is given."""
    if shared is None:
        return masks.attention_mask is not None
    return any(shared["padding"])


def create_ring_mask(
    q_len: int,
    kv_len: int | None = None,
    *,
    causal: bool = False,
    window: int | tuple[int | None, int | None] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    seq_len: int | None = None,
    mask_mod: MaskMod | None = None,
    layout: LayoutName | Layout = "zigzag",
    group: GroupLike = None,
    batch: int | None = None,
    heads: int | None = None,
    device: torch.device | str | None = None,
    tile_size: int = 512,
    check_across_ranks: bool = True,
) -> RingMask:
    """Plan a batch's masks for the ring once; pass the result to every layer's
    :func:`ringattn.ring_attention` as ``mask=``.

    Every rank calls it with the same arguments (per-token tensors: its own shard's). It checks
    across ranks (one small all-gather), all-gathers ``document_ids`` / ``attention_mask`` into
    global per-position tensors, and classifies the tiles of every (query rank, key rank) pair
    this rank computes. A ``ring_attention`` call with the mask then runs no collective but the
    ring's own transfers and no host sync; its call arguments (shapes, dtype, scale, rotation,
    whether gradients flow) are checked across ranks once per distinct combination, i.e. once
    per batch for a model whose layers agree.

    Args:
        q_len: global length of the sharded queries, ``world_size`` times the local length (the
            padded length when :func:`ringattn.shard` padded the sequence).
        kv_len: global length of the sharded keys/values; default ``q_len``. Queries are the
            *last* ``q_len`` key positions (bottom-right alignment).
        causal, window, cu_seqlens, document_ids, attention_mask, seq_len, mask_mod: the masks,
            as in :func:`ringattn.ring_attention` (``document_ids`` and ``attention_mask`` of this
            rank's shard, ``(batch, seq_kv_local)``).
        layout: the layout of the shards.
        group: a ProcessGroup, a 1-D DeviceMesh, a ``(ulysses, ring)`` DeviceMesh
            (:func:`ringattn.context_mesh`; per-token tensors are then this rank's piece), or
            ``None`` for the default group.
        batch, heads: the batch size and query heads the mask serves; ``mask_mod`` is called with
            ``b`` in ``range(batch)`` and ``h`` in ``range(heads)``. ``None`` (the default) means
            any: ``mask_mod`` then must not depend on that index (it sees only 0), as with
            FlexAttention's ``B=None`` / ``H=None``. ``batch`` defaults to the rows of a 2-D
            ``attention_mask`` / ``document_ids``.
        device: where the per-position masks live and ``mask_mod`` runs (the device of your
            ``q``); default: that of the tensors passed, else the CPU.
        tile_size: tokens per tile side when masks other than causality are classified;
            partial tiles cost ``O(batch * heads * tile_size**2)`` memory for their dense mask.
        check_across_ranks: compare the mask across ranks before gathering.

    Raises:
        RingInputError: on every rank when any rank's arguments cannot work.
    """
    process_group, ulysses = split_context(group)
    _, world_size = group_rank_and_size(process_group)
    pieces = ulysses.size if ulysses else 1
    masks = MaskArgs(
        causal, window, cu_seqlens, document_ids, attention_mask, seq_len, mask_mod, tile_size
    )
    kv_len = q_len if kv_len is None else kv_len
    for t in (attention_mask, document_ids):
        if batch is None and isinstance(t, torch.Tensor) and t.dim() == 2:
            batch = t.shape[0]
    if device is None:
        tensors = (attention_mask, document_ids, cu_seqlens)
        device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    try:
        chosen = get_layout(layout)
        where = resolved_device(device)
    except (ValueError, RuntimeError) as exc:
        chosen, problem = None, str(exc)
    else:
        problem = _mask_problem(masks, chosen, world_size, q_len, kv_len, batch, heads, pieces)
        if problem is None and world_size > 1:
            problem = backend_problem(where.type, process_group)
        if problem is None and ulysses is not None:
            problem = backend_problem(where.type, ulysses.group)
    signature = None
    if problem is None:
        shape = (q_len, kv_len, batch, heads, where)
        signature = mask_signature(masks, chosen, world_size, *shape)
    shared = None
    if world_size * pieces > 1 and check_across_ranks:
        shared = agree_on_mesh(
            "create_ring_mask", problem, MASK_FIELDS, signature, process_group, world_size, ulysses
        )
    elif problem:
        raise RingInputError(f"create_ring_mask: {problem}")
    padding = padding_anywhere(shared, masks)
    mask = build_ring_mask(
        masks, chosen, process_group, *shape, signature, padding, ulysses=ulysses
    )
    mask.classify()
    return mask


def resolved_device(device: torch.device | str) -> torch.device:
    """``device`` with its index: ``"cuda"`` is the current GPU, as a tensor's device says."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _mask_problem(
    masks: MaskArgs,
    layout: Layout,
    world_size: int,
    q_len: object,
    kv_len: object,
    batch: object,
    heads: object,
    pieces: int = 1,
) -> str | None:
    """``pieces``: the Ulysses degree of a 2-D mesh (each ring shard is cut into that many)."""
    everyone = world_size * pieces
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if not isinstance(value, int) or value < 0 or value % everyone:
            return (
                f"{name} must be an int >= 0 that {everyone} ranks share equally (the global "
                f"length of the sharded tensor, see ringattn.padded_length), got {value!r}"
            )
    if q_len > kv_len:
        return f"q_len={q_len} exceeds kv_len={kv_len}: queries are the last key positions"
    for name, value in (("batch", batch), ("heads", heads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            return f"{name} must be a positive int or None, got {value!r}"
    problem = lengths_problem(layout, world_size, q_len // world_size, kv_len // world_size)
    return problem or masks.problem(batch, q_len // everyone, kv_len // everyone, everyone)


def build_ring_mask(
    masks: MaskArgs,
    layout: Layout,
    group: dist.ProcessGroup | None,
    q_len: int,
    kv_len: int,
    batch: int | None,
    heads: int | None,
    device: torch.device,
    signature: Sequence[float],
    gather_padding: bool = True,
    ulysses: UlyssesGroup | None = None,
) -> RingMask:
    """A :class:`RingMask` from arguments already checked: per-shard tensors are gathered into
    global per-position ones (one all-gather each; the ``attention_mask`` only when
    ``gather_padding``, i.e. some rank has padding); tiles are classified when first needed.
    With ``ulysses`` (a 2-D mesh) per-token tensors are pieces, first gathered into the ring
    shard over the Ulysses group."""
    _, world_size = group_rank_and_size(group)
    pieces = ulysses.size if ulysses else 1
    seq_local = kv_len // (world_size * pieces)

    def gathered(local: torch.Tensor) -> torch.Tensor:
        if ulysses is not None:
            local = concat_pieces(local, 1, ulysses)
        return gather_sequence(local, layout, 1, group, world_size)

    doc_ids = valid = None
    real_len = masks.seq_len
    if masks.cu_seqlens is not None:
        bounds = masks.cu_seqlens.to(device=device, dtype=torch.long)
        doc_ids = torch.searchsorted(bounds[1:], torch.arange(kv_len, device=device), right=True)
        doc_ids = doc_ids[None]
        end = int(bounds[-1])
        real_len = end if real_len is None else min(real_len, end)
    if masks.document_ids is not None:
        local_ids = masks.document_ids.to(device=device, dtype=torch.long)
        # (seq,) ids serve every row: gather the same (batch, seq) shape on every rank
        local_ids = local_ids.reshape(-1, seq_local).expand(batch or 1, -1)
        doc_ids = gathered(local_ids)
    if masks.attention_mask is not None and gather_padding:
        local_valid = masks.attention_mask.to(device=device).bool().to(torch.uint8)
        valid = gathered(local_valid).bool()
    if real_len is not None and real_len < kv_len:
        in_range = (torch.arange(kv_len, device=device) < real_len)[None]
        valid = in_range if valid is None else valid & in_range
    if valid is not None and bool(valid.all()):  # no padding anywhere: keep the fast path
        valid = None
    spec = MaskSpec(
        causal=masks.causal,
        window=masks.window_sides,
        doc_ids=doc_ids,
        valid=valid,
        mask_mod=masks.mask_mod,
        batch=batch or 1,
        heads=heads or 1,
        tile_size=masks.tile_size,
        device=device,
    )
    return RingMask(spec, layout, group, q_len, kv_len, batch, heads, signature, ulysses)
