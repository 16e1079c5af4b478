"""Public API: ring attention over a sharded sequence, and the helpers to shard it."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .checks import check_inputs
from .comm import GroupLike, RingComm, group_rank_and_size, resolve_group
from .engine import RingAttentionFunction, RingPlan
from .kernels import AttentionKernel, select_kernel
from .layout import Layout, LayoutName, get_layout, global_order


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
    kernel: str | AttentionKernel = "auto",
    check_across_ranks: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of this rank's queries against the keys/values of every rank in ``group``.

    Every rank passes its own shard of the sequence, in ``layout`` order (see :func:`shard`).
    Keys/values travel around the ring (pass-KV) while each rank keeps its queries; results are
    merged with an fp32 online softmax, so the output equals single-device attention over the
    whole sequence.

    Args:
        q: ``(batch, seq_local, heads_q, head_dim)``.
        k, v: ``(batch, seq_local, heads_kv, head_dim)`` with ``heads_q % heads_kv == 0``
            (MHA, GQA, MQA). Only the ``heads_kv`` heads travel.
        causal: mask keys at later global positions than the query.
        layout: "contiguous", "zigzag" (balanced causal work) or "striped".
        scale: score scale; default ``head_dim ** -0.5``.
        group: a ProcessGroup, a 1-D DeviceMesh, or ``None`` for the default group (a world of
            one when ``torch.distributed`` is not initialised: plain attention).
        return_lse: also return the log-sum-exp ``(batch, heads_q, seq_local)`` in float32,
            float64 for float64 inputs (natural log, ``-inf`` for a row that sees no key).
            It carries no gradient.
        kernel: "auto", "cpu_flash", "cuda_flash", "cuda_efficient", "reference", or an
            :class:`~ringattn.kernels.AttentionKernel`.
        check_across_ranks: compare shapes/dtypes/flags across ranks with one small all-gather
            before the ring starts, so mismatches raise everywhere instead of hanging. Turn it off
            only once your shapes are known to agree (it costs one collective per call).

    Returns:
        ``out`` ``(batch, seq_local, heads_q, head_dim)`` in ``q.dtype``, and ``lse`` if asked.

    Raises:
        RingInputError: (a ``ValueError``) on every rank when any rank's inputs cannot work.
    """
    process_group = resolve_group(group)
    chosen_layout = get_layout(layout)
    _, world_size = group_rank_and_size(process_group)
    check_inputs(
        q,
        k,
        v,
        causal=causal,
        layout=chosen_layout,
        scale=scale,
        group=process_group,
        world_size=world_size,
        across_ranks=check_across_ranks,
    )
    plan = RingPlan(
        comm=RingComm(process_group),
        layout=chosen_layout,
        kernel=select_kernel(kernel, q),
        causal=causal,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
    )
    out, lse = RingAttentionFunction.apply(q, k, v, plan)
    return (out, lse) if return_lse else out


def positions(
    seq_len: int, layout: LayoutName | Layout = "zigzag", group: GroupLike = None
) -> torch.Tensor:
    """Global positions (int64, ``(seq_len // world_size,)``) of this rank's tokens — feed them
    to RoPE so rotary phases match the unsharded sequence."""
    process_group = resolve_group(group)
    rank, world_size = group_rank_and_size(process_group)
    chosen = get_layout(layout)
    chosen.check_seq_len(seq_len, world_size)
    return chosen.positions(rank, world_size, seq_len // world_size)


def shard(
    x: torch.Tensor, layout: LayoutName | Layout = "zigzag", dim: int = 1, group: GroupLike = None
) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (a copy; differentiable)."""
    process_group = resolve_group(group)
    rank, world_size = group_rank_and_size(process_group)
    chosen = get_layout(layout)
    chosen.check_seq_len(x.shape[dim], world_size)
    index = chosen.positions(rank, world_size, x.shape[dim] // world_size).to(x.device)
    return x.index_select(dim, index)


def unshard(
    local: torch.Tensor,
    layout: LayoutName | Layout = "zigzag",
    dim: int = 1,
    group: GroupLike = None,
) -> torch.Tensor:
    """Gather every rank's shard into the full tensor, in global order (inverse of :func:`shard`).

    Differentiable: the gradient of each rank's shard is the sum over ranks of the gradients
    flowing into their copies of the full tensor.
    """
    process_group = resolve_group(group)
    _, world_size = group_rank_and_size(process_group)
    chosen = get_layout(layout)
    if world_size == 1:
        return local
    if local.shape[dim] % chosen.local_multiple(world_size):
        raise ValueError(
            f"a {chosen.name!r} shard must have a multiple of "
            f"{chosen.local_multiple(world_size)} tokens "
            f"along dim {dim}, got {local.shape[dim]}"
        )
    return _Unshard.apply(local, chosen, dim % local.dim(), process_group)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, layout: Layout, dim: int, group):
        rank, world_size = group_rank_and_size(group)
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        seq_len = local.shape[dim] * world_size
        order = global_order(layout.name, world_size, seq_len).to(local.device)
        full = torch.empty_like(torch.cat(parts, dim))
        full.index_copy_(dim, order, torch.cat(parts, dim))
        ctx.layout, ctx.dim, ctx.group, ctx.rank, ctx.world_size = (
            layout,
            dim,
            group,
            rank,
            world_size,
        )
        return full

    @staticmethod
    def backward(ctx, grad_full):
        grad_full = grad_full.contiguous()
        dist.all_reduce(grad_full, group=ctx.group)
        seq_local = grad_full.shape[ctx.dim] // ctx.world_size
        index = ctx.layout.positions(ctx.rank, ctx.world_size, seq_local).to(grad_full.device)
        return grad_full.index_select(ctx.dim, index), None, None, None
