"""The ring engine: pass-KV ring attention as one autograd Function.

Forward, at step ``s`` rank ``r`` holds the keys/values of rank ``r - s``; it posts their transfer
to ``r + 1``, computes the tiles its queries need against them (:func:`ringattn.masks.ring_tiles`)
and merges each tile's ``(out, lse)`` into fp32 accumulators (:mod:`ringattn.merge`).

Backward sends the keys/values around again. Each tile's gradients are computed from the final
``out`` and ``lse`` of its rows; ``dq`` stays local, while the fp32 ``dk``/``dv`` accumulator of
a key block travels one step behind it and arrives back at its owner after ``p`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import RingComm
from .kernels import AttentionKernel
from .layout import Layout
from .masks import ring_tiles
from .merge import merge_partial
from .trace import StepTimer

_KV_TAG, _GRAD_TAG = 0, 2


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges and gradient sums run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Everything the engine needs besides the tensors."""

    comm: RingComm
    layout: Layout
    kernel: AttentionKernel
    causal: bool
    scale: float

    def tiles(self, step: int, seq_local: int):
        rank, world = self.comm.rank, self.comm.world_size
        source = (rank - step) % world
        return ring_tiles(self.layout.name, world, rank, source, seq_local, self.causal)


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``out`` (batch, seq, heads_q, head_dim) in ``q.dtype`` and ``lse``
    (batch, heads_q, seq) in the accumulator dtype, for this rank's queries against the keys of
    all ranks."""
    batch, seq, heads, _ = q.shape
    acc_dtype = accumulator_dtype(q.dtype)
    out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse_acc = torch.full((batch, heads, seq), float("-inf"), dtype=acc_dtype, device=q.device)
    timer = StepTimer("forward", q.device)
    k_cur, v_cur = k, v
    world = plan.comm.world_size
    for step in range(world):
        pending = plan.comm.exchange((k_cur, v_cur), _KV_TAG) if step < world - 1 else None
        with timer.computing():
            for t in plan.tiles(step, seq):
                rows, cols = slice(t.q_start, t.q_end), slice(t.k_start, t.k_end)
                out_t, lse_t = plan.kernel.forward(
                    q[:, rows], k_cur[:, cols], v_cur[:, cols], causal=t.causal, scale=plan.scale
                )
                merge_partial(out_acc[:, rows], lse_acc[:, :, rows], out_t, lse_t)
        if pending is not None:
            with timer.waiting():
                k_cur, v_cur = pending.wait()
        timer.finish_step(step)
    return out_acc.to(q.dtype), lse_acc


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: RingPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``dq, dk, dv`` (in the inputs' dtypes) of this rank's shard."""
    seq = q.shape[1]
    acc_dtype = accumulator_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    timer = StepTimer("backward", q.device)
    world = plan.comm.world_size
    k_cur, v_cur = k, v
    grads_in_flight = None
    dk_acc = dv_acc = None
    for step in range(world):
        pending_kv = plan.comm.exchange((k_cur, v_cur), _KV_TAG) if step < world - 1 else None
        dk_blk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv_blk = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        with timer.computing():
            for t in plan.tiles(step, seq):
                rows, cols = slice(t.q_start, t.q_end), slice(t.k_start, t.k_end)
                dq_t, dk_t, dv_t = plan.kernel.backward(
                    dout[:, rows],
                    q[:, rows],
                    k_cur[:, cols],
                    v_cur[:, cols],
                    out[:, rows],
                    lse[:, :, rows],
                    causal=t.causal,
                    scale=plan.scale,
                )
                dq_acc[:, rows] += dq_t
                dk_blk[:, cols] += dk_t
                dv_blk[:, cols] += dv_t
        if grads_in_flight is not None:
            with timer.waiting():
                dk_prev, dv_prev = grads_in_flight.wait()
            dk_blk += dk_prev
            dv_blk += dv_prev
        if world > 1:
            grads_in_flight = plan.comm.exchange((dk_blk, dv_blk), _GRAD_TAG)
        else:
            dk_acc, dv_acc = dk_blk, dv_blk
        if pending_kv is not None:
            with timer.waiting():
                k_cur, v_cur = pending_kv.wait()
        timer.finish_step(step)
    if grads_in_flight is not None:
        with timer.waiting():
            dk_acc, dv_acc = grads_in_flight.wait()
        timer.finish_step(world)
    return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, plan) -> (out, lse)``; ``lse`` is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        out, lse = ring_forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.plan)
        return dq, dk, dv, None
