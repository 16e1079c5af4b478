"""Public API: ring attention over a sharded sequence, and the helpers to shard it."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from .checks import MaskArgs, check_inputs, needs_grad
from .comm import GroupLike, RingComm, group_rank_and_size, resolve_group, transfer_device
from .engine import Granularity, RingAttentionFunction, RingPlan
from .kernels import AttentionKernel, masked_kernel_for, select_kernel
from .layout import Layout, LayoutName, checked_layout, get_layout, global_order
from .masks import MaskMod, MaskSpec, ScoreMod
from .rotation import choose_rotation


@torch.compiler.disable
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    layout: LayoutName | Layout = "zigzag",
    scale: float | None = None,
    group: GroupLike = None,
    return_lse: bool = False,
    rotation: Literal["kv", "q", "auto"] = "auto",
    window: int | tuple[int | None, int | None] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    seq_len: int | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    kernel: str | AttentionKernel = "auto",
    tile_size: int = 512,
    granularity: Granularity | None = None,
    check_across_ranks: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of this rank's queries against the keys/values of every rank in ``group``.

    Every rank passes its own shard of the sequence, in ``layout`` order (see :func:`shard`).
    Keys/values travel around the ring (pass-KV) while each rank keeps its queries; results are
    merged with an fp32 online softmax, so the output equals single-device attention over the
    whole sequence. All masks use *global* token positions. Inside ``torch.compile`` the call is a
    graph break: it runs eagerly (its communication cannot be traced) and the rest compiles.

    Args:
        q: ``(batch, seq_q_local, heads_q, head_dim)``.
        k, v: ``(batch, seq_kv_local, heads_kv, head_dim)`` with ``heads_q % heads_kv == 0``
            (MHA, GQA, MQA). Only the ``heads_kv`` heads travel. Queries and keys may differ in
            length (cross-attention, chunked prefill); each is sharded in ``layout`` over its own
            length, and the queries are the *last* ``seq_q`` positions of the key sequence
            (bottom-right alignment, as in flash-attn) for ``causal`` and the other masks.
        causal: mask keys at later global positions than the query.
        layout: "contiguous", "zigzag" (balanced causal work) or "striped".
        scale: score scale; default ``head_dim ** -0.5``.
        group: a ProcessGroup, a 1-D DeviceMesh, or ``None`` for the default group (a world of
            one when ``torch.distributed`` is not initialised: plain attention).
        return_lse: also return the log-sum-exp ``(batch, heads_q, seq_local)`` in float32,
            float64 for float64 inputs (natural log, ``-inf`` for a row that sees no key).
            It carries no gradient.
        rotation: "kv" moves keys/values around the ring (training, full prefill), "q" moves
            queries and returns partial outputs (few queries against many keys); "auto" picks
            the one that moves fewer bytes, see :func:`ringattn.choose_rotation`. Both are exact,
            forward and backward.
        window: ``(left, right)``: query ``i`` sees keys ``i - left <= j <= i + right`` (a side
            may be ``None``: unbounded); an int ``w`` means ``(w, 0)``, a causal left window.
        cu_seqlens: packed documents as global cumulative lengths ``[0, l1, l1 + l2, ...]``
            (1-D, any int dtype, as in flash-attn's varlen API); tokens attend within their
            document only. Tokens past ``cu_seqlens[-1]`` are padding.
        document_ids: packed documents as per-token ids of *this rank's shard*, shaped
            ``(seq_kv_local,)`` or ``(batch, seq_kv_local)``. Use either this or ``cu_seqlens``.
        attention_mask: ``(batch, seq_kv_local)`` of this rank's shard, nonzero/True for real
            tokens and 0/False for padding (the Hugging Face convention). Padding queries get
            zero output and zero gradients; padding keys are seen by nobody.
        seq_len: the real global length when :func:`shard` padded the sequence; positions at or
            past it are padding.
        mask_mod: FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` over global
            indices, called with broadcastable index tensors.
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, e.g.
            :func:`ringattn.softcap` or :func:`ringattn.alibi`. Gradients flow through it to
            q and k (not to tensors it captures).
        kernel: "auto", "cpu_flash", "cuda_flash", "cuda_efficient", "cuda_cudnn", "reference",
            or an :class:`~ringattn.kernels.AttentionKernel`.
        tile_size: tokens per tile side when masks other than causal are classified; partial
            tiles cost ``O(batch * heads * tile_size**2)`` memory for their dense mask.
        granularity: how finely blocks are pipelined through the ring (memory against kernel-call
            size); the default :class:`ringattn.Granularity` cuts each block into up to 8
            sub-blocks of at least 512 tokens.
        check_across_ranks: compare shapes/dtypes/flags across ranks with one small all-gather
            before the ring starts, so mismatches raise everywhere instead of hanging. Turn it off
            only once your shapes are known to agree (it costs one collective per call).

    Returns:
        ``out`` ``(batch, seq_local, heads_q, head_dim)`` in ``q.dtype``, and ``lse`` if asked.

    Raises:
        RingInputError: (a ``ValueError``) on every rank when any rank's inputs cannot work.
    """
    process_group = resolve_group(group)
    _, world_size = group_rank_and_size(process_group)
    masks = MaskArgs(window, cu_seqlens, document_ids, attention_mask, seq_len, mask_mod, score_mod)
    chosen_layout = check_inputs(
        q,
        k,
        v,
        causal=causal,
        layout=layout,
        scale=scale,
        group=process_group,
        world_size=world_size,
        masks=masks,
        tile_size=tile_size,
        granularity=granularity,
        rotation=rotation,
        across_ranks=check_across_ranks,
    )
    spec = _mask_spec(q, k, causal, masks, chosen_layout, process_group, world_size, tile_size)
    main_kernel = select_kernel(kernel, q)
    if rotation == "auto":  # from values the check above found equal on every rank
        rotation = choose_rotation(
            q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, needs_grad(q, k, v)
        )
    plan = RingPlan(
        comm=RingComm(process_group),
        layout=chosen_layout,
        kernel=main_kernel,
        masked_kernel=masked_kernel_for(main_kernel, score_mod is not None),
        mask=spec,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        rotation=rotation,
        seq_q_local=q.shape[1],
        seq_kv_local=k.shape[1],
        granularity=Granularity() if granularity is None else granularity,
    )
    out, lse = RingAttentionFunction.apply(q, k, v, plan)
    return (out, lse) if return_lse else out


def _mask_spec(q, k, causal, masks: MaskArgs, layout, group, world_size, tile_size) -> MaskSpec:
    """Turn the user's mask arguments into global per-position tensors (one all-gather each
    for per-shard ids and padding masks)."""
    batch, seq_local, heads = q.shape[0], k.shape[1], q.shape[2]
    total = seq_local * world_size
    device = q.device
    window = masks.window_sides
    doc_ids = valid = None
    real_len = masks.seq_len
    if masks.cu_seqlens is not None:
        bounds = masks.cu_seqlens.to(device=device, dtype=torch.long)
        doc_ids = torch.searchsorted(bounds[1:], torch.arange(total, device=device), right=True)
        doc_ids = doc_ids[None]
        end = int(bounds[-1])
        real_len = end if real_len is None else min(real_len, end)
    if masks.document_ids is not None:
        local_ids = masks.document_ids.to(device=device, dtype=torch.long)
        # (seq,) and (batch, seq) may differ between ranks: gather the same (batch, seq) shape
        local_ids = local_ids.reshape(-1, seq_local).expand(batch, -1)
        doc_ids = gather_sequence(local_ids, layout, 1, group, world_size)
    if masks.attention_mask is not None:
        local_valid = masks.attention_mask.to(device=device).bool().to(torch.uint8)
        valid = gather_sequence(local_valid, layout, 1, group, world_size).bool()
    if real_len is not None and real_len < total:
        in_range = (torch.arange(total, device=device) < real_len)[None]
        valid = in_range if valid is None else valid & in_range
    return MaskSpec(
        causal=causal,
        window=window,
        doc_ids=doc_ids,
        valid=valid,
        mask_mod=masks.mask_mod,
        score_mod=masks.score_mod,
        batch=batch,
        heads=heads,
        tile_size=tile_size,
        device=device,
    )


def padded_length(seq_len: int, layout: LayoutName | Layout, world_size: int) -> int:
    """The smallest length ``>= seq_len`` that ``layout`` can split over ``world_size`` ranks."""
    multiple = get_layout(layout).seq_multiple(world_size)
    return -(-seq_len // multiple) * multiple


def positions(
    seq_len: int,
    layout: LayoutName | Layout = "zigzag",
    group: GroupLike = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global positions (int64, ``(seq_local,)``) of this rank's tokens — feed them to RoPE so
    rotary phases match the unsharded sequence.

    With ``cu_seqlens`` the positions restart at 0 in every packed document. ``seq_local`` is
    ``padded_length(seq_len, layout, world_size) // world_size``; padding positions continue
    past ``seq_len`` (they are masked anyway).
    """
    process_group = resolve_group(group)
    rank, world_size = group_rank_and_size(process_group)
    seq_local = padded_length(seq_len, layout, world_size) // world_size
    pos = checked_layout(layout, world_size, seq_local).positions(rank, world_size, seq_local)
    if cu_seqlens is None:
        return pos
    starts = cu_seqlens.to(torch.long)
    doc = torch.searchsorted(starts[1:], pos, right=True).clamp(max=len(starts) - 1)
    return pos - starts[doc]


def shard(
    x: torch.Tensor, layout: LayoutName | Layout = "zigzag", dim: int = 1, group: GroupLike = None
) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (a copy; differentiable).

    Any length works: ``x`` is padded with zeros to :func:`padded_length` first. Pass the real
    length as ``ring_attention(..., seq_len=)`` (or a ``cu_seqlens`` / ``attention_mask``) so the
    padding is masked, and to :func:`unshard` to drop it again.
    """
    process_group = resolve_group(group)
    rank, world_size = group_rank_and_size(process_group)
    seq_len = x.shape[dim]
    padded = padded_length(seq_len, layout, world_size)
    chosen = checked_layout(layout, world_size, padded // world_size)
    if padded != seq_len:
        pad_shape = list(x.shape)
        pad_shape[dim] = padded - seq_len
        x = torch.cat([x, x.new_zeros(pad_shape)], dim)
    index = chosen.positions(rank, world_size, padded // world_size).to(x.device)
    return x.index_select(dim, index)


@torch.compiler.disable
def unshard(
    local: torch.Tensor,
    layout: LayoutName | Layout = "zigzag",
    dim: int = 1,
    group: GroupLike = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Gather every rank's shard into the full tensor, in global order (inverse of :func:`shard`).

    ``seq_len`` drops the padding that :func:`shard` added. Differentiable: the gradient of each
    rank's shard is the sum over ranks of the gradients flowing into their copies of the full
    tensor.
    """
    process_group = resolve_group(group)
    _, world_size = group_rank_and_size(process_group)
    chosen = get_layout(layout)
    dim = dim % local.dim()
    if local.shape[dim] % chosen.local_multiple(world_size):
        raise ValueError(
            f"a {chosen.name!r} shard must have a multiple of "
            f"{chosen.local_multiple(world_size)} tokens along dim {dim}, got {local.shape[dim]}"
        )
    checked_layout(chosen, world_size, local.shape[dim])
    full = local if world_size == 1 else _Unshard.apply(local, chosen, dim, process_group)
    return full if seq_len is None else full.narrow(dim, 0, seq_len)


def gather_sequence(
    local: torch.Tensor, layout: Layout, dim: int, group, world_size: int
) -> torch.Tensor:
    """All ranks' shards of ``local`` along ``dim``, put back in global order (no autograd)."""
    if world_size == 1:
        return local
    sent = local.to(transfer_device(group, local.device)).contiguous()
    parts = [torch.empty_like(sent) for _ in range(world_size)]
    dist.all_gather(parts, sent, group=group)
    stacked = torch.cat(parts, dim).to(local.device)
    order = global_order(layout, world_size, stacked.shape[dim]).to(local.device)
    return torch.empty_like(stacked).index_copy_(dim, order, stacked)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, layout: Layout, dim: int, group):
        rank, world_size = group_rank_and_size(group)
        ctx.layout, ctx.dim, ctx.group = layout, dim, group
        ctx.rank, ctx.world_size = rank, world_size
        return gather_sequence(local, layout, dim, group, world_size)

    @staticmethod
    def backward(ctx, grad_full):
        grad_full = grad_full.clone(memory_format=torch.contiguous_format)  # reduced in place
        dist.all_reduce(grad_full, group=ctx.group)
        seq_local = grad_full.shape[ctx.dim] // ctx.world_size
        index = ctx.layout.positions(ctx.rank, ctx.world_size, seq_local).to(grad_full.device)
        return grad_full.index_select(ctx.dim, index), None, None, None
