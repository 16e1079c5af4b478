"""The ring engine: pass-KV ring attention as one autograd Function.

Forward, at step ``s`` rank ``r`` holds the keys/values of rank ``r - s``; it posts their transfer
to ``r + 1``, computes the tiles its queries need against them (:func:`ringattn.masks.ring_tiles`)
and merges each tile's ``(out, lse)`` into fp32 accumulators (:mod:`ringattn.merge`).

Backward sends the keys/values around again. Each tile's gradients are computed from the final
``out`` and ``lse`` of its rows; ``dq`` stays local, while the fp32 ``dk``/``dv`` accumulator of
a key block travels one step behind it and arrives back at its owner after ``p`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .comm import RingComm
from .kernels import AttentionKernel
from .layout import Layout
from .masks import MaskSpec, Tile, ring_tiles
from .merge import merge_partial
from .trace import StepTimer

_KV_TAG, _GRAD_TAG = 0, 2


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges and gradient sums run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Everything the engine needs besides the tensors.

    ``kernel`` runs unmasked and causal tiles; ``masked_kernel`` runs tiles that need a dense
    mask or a ``score_mod``. Tiles of each step are planned once and reused by the backward pass.
    """

    comm: RingComm
    layout: Layout
    kernel: AttentionKernel
    masked_kernel: AttentionKernel
    mask: MaskSpec
    scale: float
    _tiles: dict = field(default_factory=dict)
    _positions: dict = field(default_factory=dict)

    def positions(self, rank: int, seq_local: int, device: torch.device) -> torch.Tensor:
        if rank not in self._positions:
            world = self.comm.world_size
            self._positions[rank] = self.layout.positions(rank, world, seq_local).to(device)
        return self._positions[rank]

    def tiles(self, step: int, seq_local: int) -> tuple[Tile, ...]:
        rank, world = self.comm.rank, self.comm.world_size
        source = (rank - step) % world
        if self.mask.only_causal:
            return ring_tiles(self.layout.name, world, rank, source, seq_local, self.mask.causal)
        if step not in self._tiles:
            self._tiles[step] = self.mask.plan(
                self.layout.segments(rank, world, seq_local),
                self.layout.segments(source, world, seq_local),
            )
        return self._tiles[step]

    def tile_args(self, tile: Tile, step: int, seq_local: int, device: torch.device) -> dict:
        """Keyword arguments of the kernel call for ``tile`` (mask and score_mod, if any)."""
        if not tile.masked and self.mask.score_mod is None:
            return {"causal": tile.causal, "scale": self.scale}
        source = (self.comm.rank - step) % self.comm.world_size
        q_pos = self.positions(self.comm.rank, seq_local, device)[tile.q_start : tile.q_end]
        k_pos = self.positions(source, seq_local, device)[tile.k_start : tile.k_end]
        args = {"causal": tile.causal, "scale": self.scale}
        if tile.masked:
            args["mask"] = self.mask.dense(q_pos, k_pos)
        if self.mask.score_mod is not None:
            grids = self.mask.index_grids(q_pos, k_pos, device)
            score_mod = self.mask.score_mod

            def score_fn(scores: torch.Tensor) -> torch.Tensor:
                return score_mod(scores, *grids)

            args["score_fn"] = score_fn
        return args

    def kernel_for(self, tile: Tile) -> AttentionKernel:
        return self.masked_kernel if tile.masked or self.mask.score_mod is not None else self.kernel


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
                args = plan.tile_args(t, step, seq, q.device)
                out_t, lse_t = plan.kernel_for(t).forward(
                    q[:, rows], k_cur[:, cols], v_cur[:, cols], **args
                )
                if "mask" in args:  # rows the tile hides entirely carry no probability mass
                    lse_t = lse_t.masked_fill(~args["mask"].any(-1), float("-inf"))
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
    # A row that saw no key (lse = -inf) must get P = exp(S - lse) = 0 in every tile: use +inf.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
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
                dq_t, dk_t, dv_t = plan.kernel_for(t).backward(
                    dout[:, rows],
                    q[:, rows],
                    k_cur[:, cols],
                    v_cur[:, cols],
                    out[:, rows],
                    lse[:, :, rows],
                    **plan.tile_args(t, step, seq, q.device),
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
