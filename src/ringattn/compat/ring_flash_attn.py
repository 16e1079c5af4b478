"""ring-flash-attention's functions, with its signatures and sharding, computed by ringattn.

Replace ``from ring_flash_attn import zigzag_ring_flash_attn_func`` with
``from ringattn.compat.ring_flash_attn import zigzag_ring_flash_attn_func`` and keep the calls.
Each rank passes the shard that ring-flash-attention's own tests extract:

=====================================  ==========================================================
functions                              rank ``r`` of ``p`` holds (ringattn layout)
=====================================  ==========================================================
``ring_flash_attn_*``                  chunk ``r`` of ``p`` (``"contiguous"``)
``zigzag_ring_flash_attn_*``           chunks ``r`` and ``2p - 1 - r`` of ``2p`` (``"zigzag"``)
``stripe_flash_attn_*``                tokens ``r, r + p, r + 2p, ...`` (``"striped"``)
``*_varlen_*``                         the same split of *every packed document*; ``cu_seqlens``
                                       are the local boundaries (global ones divided by ``p``);
                                       the stripe forms are on its development branch only
``llama3_flash_attn_varlen_*``         tokens ``r n / p .. (r + 1) n / p`` of the packed sequence
=====================================  ==========================================================

Arguments (flash-attn's): ``q`` ``(batch, seq_local, heads_q, head_dim)``, ``k``/``v``
``(batch, seq_local, heads_kv, head_dim)`` (GQA/MQA when ``heads_q`` is a multiple of
``heads_kv``); packed forms ``qkv`` ``(batch, seq_local, 3, heads, head_dim)`` and ``kv``
``(batch, seq_local, 2, heads_kv, head_dim)``; varlen forms drop the batch dimension
(``(total_local, heads, head_dim)``, ``(total_local, 3, ...)``, ``(total_local, 2, ...)``).
``softmax_scale`` defaults to ``head_dim ** -0.5``. ``causal`` and ``window_size=(left, right)``
(``-1``: unbounded) mean what they mean for ``flash_attn_func`` on the whole sequence (ring-
flash-attention itself applies ``window_size`` inside each block, which its README lists as
unsupported); ``alibi_slopes`` ``(heads,)`` or ``(batch, heads)`` is honoured (ring-flash-attention
asserts it is ``None``); ``causal=False`` works in every layout (its zigzag and stripe functions
assert ``causal``). ``dropout_p`` and ``deterministic`` are ``ringattn.ring_attention``'s (its
dropout mask does not depend on the world size; its seed comes from torch's default CPU
generator, so seed every rank alike). ``group`` is the ring's process group
(``None``: the default group). ``max_seqlen`` is accepted and not needed.

Returns ``out`` shaped like ``q``; with ``return_attn_probs=True`` the triple
``(out, softmax_lse, None)``: ``softmax_lse`` in float32, ``(batch, heads_q, seq_local)`` for
the batch forms and ``(heads_q, total_local)`` for the varlen ones (current flash-attn's layout).
Every result is exact: outputs, ``softmax_lse`` and the gradients of q, k and v equal
single-device attention on the whole sequence.
"""

from __future__ import annotations

import bisect
import itertools

import torch

from ..comm import GroupLike, group_rank_and_size, resolve_group
from ._flash import FlashArgs, FlashResult, Split, document_layout, flash_attention

__all__ = [
    "llama3_flash_attn_prepare_cu_seqlens",
    "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "stripe_flash_attn_varlen_func",
    "stripe_flash_attn_varlen_kvpacked_func",
    "stripe_flash_attn_varlen_qkvpacked_func",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
]

NO_WINDOW = (-1, -1)
WindowSize = tuple[int, int]


def _unpack(packed: torch.Tensor, count: int, name: str) -> tuple[torch.Tensor, ...]:
    """``qkv`` / ``kv`` split along their packing dimension (the one after the tokens')."""
    dim = packed.dim() - 3 if isinstance(packed, torch.Tensor) else 0
    if dim not in (1, 2) or packed.shape[dim] != count:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"{name} must be ([batch,] seq, {count}, heads, head_dim), got {shape}")
    return packed.unbind(dim)


def _check_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: int, what: str) -> None:
    for name, t in zip("qkv", (q, k, v), strict=True):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be {what}, got {shape}")


def _batch(
    split: Split,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: FlashArgs,
    group: GroupLike,
) -> FlashResult:
    _check_dims(q, k, v, 4, "(batch, seq_local, heads, head_dim)")
    return flash_attention(q, k, v, args, layout=split, group=group)


def _varlen(
    split: Split,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    args: FlashArgs,
    group: GroupLike,
) -> FlashResult:
    _check_dims(q, k, v, 3, "(total_local, heads, head_dim)")
    layout, global_cu = document_layout(cu_seqlens, q.shape[0], split, group)
    return _as_batch_of_one(q, k, v, args, layout=layout, group=group, cu_seqlens=global_cu)


def _as_batch_of_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: FlashArgs, **ring_args: object
) -> FlashResult:
    """A varlen call as a batch of one; the results without the batch dimension."""
    slopes = args.alibi_slopes
    if isinstance(slopes, torch.Tensor) and slopes.dim() != 1:
        raise ValueError(
            "alibi_slopes of the varlen forms must be (heads,): slopes per packed sequence "
            f"((num_seqs, heads)) are not supported, got {tuple(slopes.shape)}"
        )
    result = flash_attention(q[None], k[None], v[None], args, **ring_args)
    if not args.return_attn_probs:
        return result[0]
    out, lse, _ = result
    return out[0], lse[0], None


# ---- batch forms, flash_attn_func's ----


def ring_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """Contiguous shards: q ``(batch, seq_local, heads_q, head_dim)``, k/v ``(batch, seq_local,
    heads_kv, head_dim)`` holding chunk ``rank`` of ``world_size``. See the module docstring."""
    args = FlashArgs(
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )
    return _batch("contiguous", q, k, v, args, group)


def ring_flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`ring_flash_attn_func` with ``kv`` ``(batch, seq_local, 2, heads_kv, head_dim)``."""
    k, v = _unpack(kv, 2, "kv")
    return ring_flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def ring_flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`ring_flash_attn_func` with ``qkv`` ``(batch, seq_local, 3, heads, head_dim)``."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return ring_flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def zigzag_ring_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """Zigzag shards: q ``(batch, seq_local, heads_q, head_dim)``, k/v ``(batch, seq_local,
    heads_kv, head_dim)`` holding chunks ``rank`` and ``2 world_size - 1 - rank`` of ``2
    world_size``. See the module docstring."""
    args = FlashArgs(
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )
    return _batch("zigzag", q, k, v, args, group)


def zigzag_ring_flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`zigzag_ring_flash_attn_func` with ``kv`` ``(batch, seq_local, 2, heads_kv,
    head_dim)``."""
    k, v = _unpack(kv, 2, "kv")
    return zigzag_ring_flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def zigzag_ring_flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`zigzag_ring_flash_attn_func` with ``qkv`` ``(batch, seq_local, 3, heads,
    head_dim)``."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return zigzag_ring_flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def stripe_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """Striped shards: q ``(batch, seq_local, heads_q, head_dim)``, k/v ``(batch, seq_local,
    heads_kv, head_dim)`` holding tokens ``rank, rank + world_size, ...``. See the module
    docstring."""
    args = FlashArgs(
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )
    return _batch("striped", q, k, v, args, group)


def stripe_flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`stripe_flash_attn_func` with ``kv`` ``(batch, seq_local, 2, heads_kv, head_dim)``."""
    k, v = _unpack(kv, 2, "kv")
    return stripe_flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def stripe_flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`stripe_flash_attn_func` with ``qkv`` ``(batch, seq_local, 3, heads, head_dim)``."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return stripe_flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


# ---- varlen forms, flash_attn_varlen_func's; cu_seqlens are this rank's local boundaries ----


def ring_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """Packed documents, each split over the ranks like contiguous shards: q ``(total_local,
    heads_q, head_dim)``, k/v ``(total_local, heads_kv, head_dim)`` hold, document after document,
    the chunk ``rank`` of ``world_size`` of each; ``cu_seqlens`` are their local boundaries (the
    global ones divided by ``world_size``). ``max_seqlen`` is not needed. See the module
    docstring."""
    args = FlashArgs(
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )
    return _varlen("contiguous", q, k, v, cu_seqlens, args, group)


def ring_flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`ring_flash_attn_varlen_func` with ``kv`` ``(total_local, 2, heads_kv, head_dim)``."""
    k, v = _unpack(kv, 2, "kv")
    return ring_flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def ring_flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`ring_flash_attn_varlen_func` with ``qkv`` ``(total_local, 3, heads, head_dim)``."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return ring_flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def zigzag_ring_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """Packed documents, each split over the ranks like zigzag shards: q ``(total_local, heads_q,
    head_dim)``, k/v ``(total_local, heads_kv, head_dim)`` hold, document after document, the chunks
    ``rank`` and ``2 world_size - 1 - rank`` of ``2 world_size`` of each; ``cu_seqlens`` are their
    local boundaries (the global ones divided by ``world_size``). ``max_seqlen`` is not needed. See
    the module docstring."""
    args = FlashArgs(
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )
    return _varlen("zigzag", q, k, v, cu_seqlens, args, group)


def zigzag_ring_flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`zigzag_ring_flash_attn_varlen_func` with ``kv`` ``(total_local, 2, heads_kv,
    head_dim)``."""
    k, v = _unpack(kv, 2, "kv")
    return zigzag_ring_flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def zigzag_ring_flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`zigzag_ring_flash_attn_varlen_func` with ``qkv`` ``(total_local, 3, heads,
    head_dim)``."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return zigzag_ring_flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def stripe_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """Packed documents, each split over the ranks like striped shards: q ``(total_local, heads_q,
    head_dim)``, k/v ``(total_local, heads_kv, head_dim)`` hold, document after document, the tokens
    ``rank, rank + world_size, ...`` of each; ``cu_seqlens`` are their local boundaries (the global
    ones divided by ``world_size``). ``max_seqlen`` is not needed. See the module docstring."""
    args = FlashArgs(
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )
    return _varlen("striped", q, k, v, cu_seqlens, args, group)


def stripe_flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`stripe_flash_attn_varlen_func` with ``kv`` ``(total_local, 2, heads_kv,
    head_dim)``."""
    k, v = _unpack(kv, 2, "kv")
    return stripe_flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def stripe_flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`stripe_flash_attn_varlen_func` with ``qkv`` ``(total_local, 3, heads, head_dim)``."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return stripe_flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


# ---- llama3: contiguous slices of the packed sequence, global documents ----


def llama3_flash_attn_prepare_cu_seqlens(
    cu_seqlens: torch.Tensor, causal: bool, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, slice]:
    """The local arguments of :func:`llama3_flash_attn_varlen_func` for ``rank``.

    Rank ``rank`` holds tokens ``rank * n / world_size .. (rank + 1) * n / world_size`` of the
    packed sequence of ``n = cu_seqlens[-1]`` tokens (global boundaries ``cu_seqlens``).

    Returns:
        ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)``: the
        boundaries of the documents this rank's queries belong to, relative to its slice; the
        same documents' key ranges relative to ``local_k_slice`` (from the first one's start
        to the slice's end, or to the last document's end without ``causal``); their longest
        lengths; and the global key range.
    """
    bounds = cu_seqlens.tolist()
    total = bounds[-1]
    if total % world_size:
        raise ValueError(
            f"the packed length {total} must be a multiple of the world size {world_size}"
        )
    per_rank = total // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    first = bisect.bisect_left(bounds, lo)
    if bounds[first] != lo:  # the slice starts inside a document
        first -= 1
    last = bisect.bisect_left(bounds, hi)
    docs = bounds[first : last + 1]
    q_bounds = [0] + [b - lo for b in docs[1:-1]] + [per_rank]
    k_start, k_stop = docs[0], (hi if causal else docs[-1])
    k_bounds = [b - k_start for b in docs[:-1]] + [k_stop - k_start]

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=cu_seqlens.dtype, device=cu_seqlens.device)

    longest_q = max(b - a for a, b in itertools.pairwise(q_bounds))
    longest_k = max(b - a for a, b in itertools.pairwise(k_bounds))
    return as_tensor(q_bounds), as_tensor(k_bounds), longest_q, longest_k, slice(k_start, k_stop)


def llama3_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    heads_k_stride: int,
    local_k_slice: slice,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """Contiguous slices of a packed sequence: q ``(total_local, heads_q, head_dim)``, k/v
    ``(total_local, heads_kv, head_dim)`` hold tokens ``rank * total_local ..`` of it, and
    ``cu_seqlens_q``, ``cu_seqlens_k``, ``local_k_slice`` come from
    :func:`llama3_flash_attn_prepare_cu_seqlens`. Computed by the ring (no all-gather of the
    keys), with each token's document named by its global start. ``heads_k_stride`` must divide
    ``heads_kv`` (it sets how many heads ring-flash-attention gathers at once; the ring needs no
    such choice); ``max_seqlen_q``/``max_seqlen_k`` are not needed. See the module docstring."""
    _check_dims(q, k, v, 3, "(total_local, heads, head_dim)")
    if not isinstance(heads_k_stride, int) or heads_k_stride < 1 or k.shape[1] % heads_k_stride:
        raise ValueError(
            f"heads_k_stride must be a positive divisor of the {k.shape[1]} key heads, "
            f"got {heads_k_stride!r}"
        )
    rank, _ = group_rank_and_size(resolve_group(group))
    ids = _llama3_document_ids(cu_seqlens_q, cu_seqlens_k, local_k_slice, q.shape[0], rank)
    args = FlashArgs(
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )
    return _as_batch_of_one(
        q, k, v, args, layout="contiguous", group=group, document_ids=ids.to(q.device)
    )


def _llama3_document_ids(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    local_k_slice: slice,
    tokens: int,
    rank: int,
) -> torch.Tensor:
    """Per local token, the global start of its document: the same id on every rank."""
    q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lo = rank * tokens
    starts = [local_k_slice.start + b for b in k_bounds[:-1]]
    if (
        len(q_bounds) != len(k_bounds)
        or q_bounds[0] != 0
        or q_bounds[-1] != tokens
        or starts[0] > lo
        or starts[1:] != [lo + b for b in q_bounds[1:-1]]
    ):
        raise ValueError(
            "cu_seqlens_q, cu_seqlens_k and local_k_slice do not describe this rank's slice "
            f"(tokens {lo}..{lo + tokens} of the packed sequence): build them with "
            "llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size)"
        )
    doc = torch.searchsorted(torch.tensor(q_bounds[1:]), torch.arange(tokens), right=True)
    return torch.tensor(starts)[doc]


def llama3_flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    heads_k_stride: int,
    local_k_slice: slice,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`llama3_flash_attn_varlen_func` with ``kv`` ``(total_local, 2, heads_kv,
    head_dim)``."""
    k, v = _unpack(kv, 2, "kv")
    return llama3_flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        heads_k_stride,
        local_k_slice,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )


def llama3_flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    heads_k_stride: int,
    local_k_slice: slice,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = NO_WINDOW,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: GroupLike = None,
) -> FlashResult:
    """:func:`llama3_flash_attn_varlen_func` with ``qkv`` ``(total_local, 3, heads,
    head_dim)``."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return llama3_flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        heads_k_stride,
        local_k_slice,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        group,
    )
