"""flash-attn's calling conventions, translated into one :func:`ringattn.ring_attention` call.

ring-flash-attention and yunchang take flash-attn's arguments: ``softmax_scale``, ``causal``,
``window_size=(left, right)`` with ``-1`` for an unbounded side, ``alibi_slopes``, ``softcap``,
``dropout_p``, ``deterministic`` and ``return_attn_probs``. Here each becomes the ringattn
keyword that computes the same thing over *global* positions, or an error naming the argument.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .. import Layout, Segment, ring_attention
from .. import softcap as softcap_mod
from ..comm import GroupLike, group_rank_and_size, resolve_group
from ..masks import ScoreMod

Split = Literal["contiguous", "zigzag", "striped"]
FlashResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]


@dataclass(frozen=True)
class FlashArgs:
    """flash-attn's keyword arguments of one call, as the caller passed them."""

    dropout_p: float = 0.0
    softmax_scale: float | None = None
    causal: bool = False
    window_size: Sequence[int] = (-1, -1)
    alibi_slopes: torch.Tensor | None = None
    deterministic: bool = False
    return_attn_probs: bool = False
    softcap: float = 0.0


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: FlashArgs,
    *,
    layout: str | Layout,
    group: GroupLike,
    cu_seqlens: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> FlashResult:
    """Ring attention of this rank's shard with flash-attn's arguments.

    Args:
        q: ``(batch, seq_local, heads_q, head_dim)``; k, v: ``(batch, seq_local, heads_kv,
            head_dim)``, the shards of ``layout``.
        args: flash-attn's arguments, see :func:`window` and :func:`score_mod`; ``dropout_p``
            and ``deterministic`` are ring_attention's own (its dropout's seed is drawn from
            torch's default CPU generator on every call: seed every rank alike to get the
            single-process mask).
        layout, group, cu_seqlens, document_ids: passed on to :func:`ringattn.ring_attention`.

    Returns:
        ``out`` ``(batch, seq_local, heads_q, head_dim)``; with ``return_attn_probs`` the triple
        ``(out, softmax_lse, None)`` that flash-attn returns (no attention probabilities), with
        ``softmax_lse`` ``(batch, heads_q, seq_local)`` in float32.
    """
    result = ring_attention(
        q,
        k,
        v,
        scale=args.softmax_scale,
        causal=args.causal,
        window=window(args.window_size),
        score_mod=score_mod(args.alibi_slopes, args.softcap, q.shape[0], q.shape[2]),
        layout=layout,
        group=group,
        cu_seqlens=cu_seqlens,
        document_ids=document_ids,
        return_lse=args.return_attn_probs,
        dropout_p=args.dropout_p,
        deterministic=args.deterministic,
    )
    if not args.return_attn_probs:
        return result
    out, lse = result
    return out, lse.to(torch.float32), None


def window(window_size: Sequence[int]) -> tuple[int | None, int | None] | None:
    """flash-attn's ``window_size=(left, right)`` (``-1``: unbounded) as ringattn's ``window``.

    Query ``i`` sees keys ``i - left <= j <= i + right`` of the *global* sequence (with queries
    aligned to the last keys, as in flash-attn); ``causal`` still applies on top. ``(-1, -1)``
    is no window.
    """
    if not (
        isinstance(window_size, tuple | list)
        and len(window_size) == 2
        and all(isinstance(side, int) and side >= -1 for side in window_size)
    ):
        raise ValueError(
            "window_size must be a (left, right) pair of ints >= -1 (-1: unbounded), as in "
            f"flash-attn; got {window_size!r}"
        )
    left, right = (None if side == -1 else side for side in window_size)
    return None if left is None and right is None else (left, right)


def score_mod(
    alibi_slopes: torch.Tensor | None, softcap: float, batch: int, heads: int
) -> ScoreMod | None:
    """flash-attn's ``softcap`` and ``alibi_slopes`` as one FlexAttention-style score_mod.

    As in flash-attn, the scaled score is soft-capped first (``softcap > 0``:
    ``softcap * tanh(score / softcap)``, ``0``: off), then the ALiBi bias
    ``-slope * |i - j|`` of query ``i`` and key ``j`` (global positions) is added; ``alibi_slopes``
    is ``(heads,)`` or ``(batch, heads)``. flash-attn's kernel adds ``slope * j`` instead under
    ``causal``, the same up to a constant per row: outputs and gradients agree, and our
    ``softmax_lse`` is the one of the bias ``-slope * (i - j)``.
    """
    if not isinstance(softcap, int | float) or softcap < 0:
        raise ValueError(
            f"softcap must be a float >= 0 (0: off), as in flash-attn; got {softcap!r}"
        )
    cap = softcap_mod(float(softcap)) if softcap > 0 else None
    bias = None if alibi_slopes is None else _alibi(alibi_slopes, batch, heads)
    if cap is None or bias is None:
        return cap or bias

    def capped_then_biased(score, b, h, q_idx, kv_idx):
        return bias(cap(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)

    return capped_then_biased


def _alibi(slopes: torch.Tensor, batch: int, heads: int) -> ScoreMod:
    if (
        not isinstance(slopes, torch.Tensor)
        or not slopes.is_floating_point()
        or tuple(slopes.shape) not in ((heads,), (batch, heads))
    ):
        shape = tuple(slopes.shape) if isinstance(slopes, torch.Tensor) else type(slopes).__name__
        raise ValueError(
            f"alibi_slopes must be a float tensor of shape ({heads},) or ({batch}, {heads}) "
            f"(nheads or batch x nheads, as in flash-attn), got {shape}"
        )
    slopes = slopes.detach()

    def alibi_bias(score, b, h, q_idx, kv_idx):
        per_head = slopes.to(score.device, score.dtype)
        slope = per_head[h] if per_head.dim() == 1 else per_head[b, h]
        return score - slope * (q_idx - kv_idx).abs()

    return alibi_bias


@dataclass(frozen=True)
class DocumentLayout(Layout):
    """Packed documents, each split over the ranks on its own (ring-flash-attention's varlen
    convention): every rank holds ``local_lengths[d]`` tokens of document ``d``, documents in
    order, and a document of ``L`` global tokens is split ``contiguous`` (rank ``r`` holds its
    chunk ``r`` of ``p``), ``zigzag`` (its chunks ``r`` and ``2p - 1 - r`` of ``2p``) or
    ``striped`` (its tokens ``r, r + p, ...``)."""

    split: Split
    local_lengths: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.split} per document"

    def segments(self, rank: int, world_size: int, seq_local: int) -> tuple[Segment, ...]:
        segments: list[Segment] = []
        start = 0  # global position of the document's first token
        for length in self.local_lengths:
            if self.split == "contiguous":
                segments.append(Segment(start + rank * length, 1, length))
            elif self.split == "striped":
                segments.append(Segment(start + rank, world_size, length))
            else:
                half = length // 2
                last = 2 * world_size - 1 - rank
                segments += [
                    Segment(start + rank * half, 1, half),
                    Segment(start + last * half, 1, half),
                ]
            start += length * world_size
        return tuple(segment for segment in segments if segment.length)


def document_layout(
    cu_seqlens: torch.Tensor, tokens: int, split: Split, group: GroupLike
) -> tuple[DocumentLayout, torch.Tensor]:
    """The layout of ring-flash-attention's *local* ``cu_seqlens`` over ``tokens`` local tokens,
    and the *global* ``cu_seqlens`` (local ones times the world size) that ringattn takes."""
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.numel() < 2
        or cu_seqlens.is_floating_point()
    ):
        raise ValueError("cu_seqlens must be a 1-D integer tensor [0, l1, l1 + l2, ...]")
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if bounds[0] != 0 or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {bounds}")
    if bounds[-1] != tokens:
        raise ValueError(
            f"cu_seqlens ends at {bounds[-1]} but this rank holds {tokens} tokens: "
            "ring-flash-attention's varlen cu_seqlens are this rank's *local* boundaries "
            "(the global ones divided by the world size)"
        )
    if split == "zigzag" and any(length % 2 for length in lengths):
        raise ValueError(
            f"zigzag varlen needs every local document length even (global lengths multiples of "
            f"2 x world size), got local lengths {lengths}: pad the documents, or use "
            "ring_flash_attn_varlen_func (multiples of the world size)"
        )
    _, world_size = group_rank_and_size(resolve_group(group))
    return DocumentLayout(split, tuple(lengths)), cu_seqlens.to(torch.long) * world_size
