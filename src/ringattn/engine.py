"""The ring engine: one loop, two rotations, as one autograd Function.

At step ``s`` of a pass, rank ``r`` holds the travelling block of rank ``r - s``; it posts that
block's transfer to ``r + 1`` before computing, so communication overlaps compute. What travels is
data of the rotation:

============  =========================  ==================  ===============================
pass          travels                    stays               returns to the owner
============  =========================  ==================  ===============================
KV forward    k, v                       q, out/lse acc.     —
KV backward   k, v                       q, dout, out, lse   dk, dv (fp32, one step behind)
Q forward     q                          k, v                out, lse (merged, one step behind)
Q backward    q, dout, out, lse          k, v, dk/dv acc.    dq (fp32, one step behind)
============  =========================  ==================  ===============================

A returning accumulator starts at the block's owner, is updated by every rank it visits, and
arrives back after ``p`` steps. Each step computes the tiles (:mod:`ringattn.masks`) of the
(queries x keys) block through the local kernel and merges ``(out, lse)`` with the fp32 online
softmax (:mod:`ringattn.merge`). Gradients of a tile use the final ``out`` and ``lse`` of its rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .comm import RingComm
from .kernels import AttentionKernel
from .layout import Layout, Segment
from .masks import MaskSpec, Tile, plan_tiles
from .merge import merge_partial
from .trace import StepTimer

Rotation = Literal["kv", "q"]
_TRAVEL_TAG, _RETURN_TAG = 0, 16


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges and gradient sums run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=4096)
def _causal_tiles(q_segments: tuple[Segment, ...], k_segments: tuple[Segment, ...], causal: bool):
    return plan_tiles(q_segments, k_segments, causal)


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Everything the engine needs besides the tensors.

    Queries are bottom-right aligned: the ``seq_q`` queries sit at global positions
    ``seq_kv - seq_q .. seq_kv - 1`` (offset 0 for self-attention). ``kernel`` runs unmasked and
    causal tiles; ``masked_kernel`` runs tiles that need a dense mask or a ``score_mod``.
    """

    comm: RingComm
    layout: Layout
    kernel: AttentionKernel
    masked_kernel: AttentionKernel
    mask: MaskSpec
    scale: float
    rotation: Rotation
    seq_q_local: int
    seq_kv_local: int
    _cache: dict = field(default_factory=dict)

    @property
    def q_offset(self) -> int:
        return (self.seq_kv_local - self.seq_q_local) * self.comm.world_size

    def source(self, step: int) -> int:
        """The rank whose travelling block this rank holds at ``step``."""
        return (self.comm.rank - step) % self.comm.world_size

    def _segments(self, rank: int, queries: bool) -> tuple[Segment, ...]:
        world = self.comm.world_size
        if not queries:
            return self.layout.segments(rank, world, self.seq_kv_local)
        return tuple(
            Segment(s.start + self.q_offset, s.stride, s.length)
            for s in self.layout.segments(rank, world, self.seq_q_local)
        )

    def _positions(self, rank: int, queries: bool, device: torch.device) -> torch.Tensor:
        key = ("pos", rank, queries)
        if key not in self._cache:
            segments = self._segments(rank, queries)
            self._cache[key] = torch.cat(
                [torch.arange(s.start, s.start + s.stride * s.length, s.stride) for s in segments]
            ).to(device)
        return self._cache[key]

    def tiles(self, q_rank: int, k_rank: int) -> tuple[Tile, ...]:
        """Tiles of ``q_rank``'s queries against ``k_rank``'s keys (planned once per call)."""
        q_segments, k_segments = self._segments(q_rank, True), self._segments(k_rank, False)
        if self.mask.only_causal:
            return _causal_tiles(q_segments, k_segments, self.mask.causal)
        key = ("tiles", q_rank, k_rank)
        if key not in self._cache:
            self._cache[key] = self.mask.plan(q_segments, k_segments)
        return self._cache[key]

    def tile_args(self, tile: Tile, q_rank: int, k_rank: int, device: torch.device) -> dict:
        """Keyword arguments of the kernel call for ``tile`` (mask and score_mod, if any)."""
        args = {"causal": tile.causal, "scale": self.scale}
        if not tile.masked and self.mask.score_mod is None:
            return args
        q_pos = self._positions(q_rank, True, device)[tile.q_start : tile.q_end]
        k_pos = self._positions(k_rank, False, device)[tile.k_start : tile.k_end]
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


def _ring_loop(
    plan: RingPlan,
    phase: str,
    travelling: Sequence[torch.Tensor],
    compute: Callable[[int, Sequence[torch.Tensor]], Sequence[torch.Tensor] | None],
    combine: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], Sequence[torch.Tensor]]
    | None = None,
) -> Sequence[torch.Tensor] | None:
    """Rotate ``travelling`` once around the ring, calling ``compute(step, block)`` each step.

    With ``combine``, ``compute`` returns this rank's contribution for the block's owner; the
    contributions are folded (``combine(arrived, mine)``) into an accumulator that follows the
    block one step behind and ends at its owner, which gets it as the return value.
    """
    world = plan.comm.world_size
    timer = StepTimer(phase, travelling[0].device)
    in_flight = result = None
    for step in range(world):
        pending = plan.comm.exchange(travelling, _TRAVEL_TAG) if step < world - 1 else None
        with timer.computing():
            contribution = compute(step, travelling)
        if combine is not None:
            if in_flight is not None:
                with timer.waiting():
                    arrived = in_flight.wait()
                contribution = combine(arrived, contribution)
            if world > 1:
                in_flight = plan.comm.exchange(contribution, _RETURN_TAG)
                contribution = None  # only the (contiguous) copy in flight stays alive
            else:
                result = contribution
        if pending is not None:
            with timer.waiting():
                travelling = pending.wait()
        timer.finish_step(step)
    if in_flight is not None:
        with timer.waiting():
            result = in_flight.wait()
        timer.finish_step(world)
    return result


Output = tuple[torch.Tensor, torch.Tensor]
"""Running ``(out (b, s, h, d), lse (b, h, s))`` of a block of query rows, accumulator dtype."""


def _new_output(q: torch.Tensor) -> Output:
    """Empty accumulators: out 0 ``(b, s, h, d)`` and lse ``-inf`` ``(b, h, s)``."""
    dtype = accumulator_dtype(q.dtype)
    batch, seq, heads, _ = q.shape
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((batch, heads, seq), float("-inf"), dtype=dtype, device=q.device)
    return out, lse


def _covers(index: slice, like: torch.Tensor) -> bool:
    return index.start == 0 and index.stop == like.shape[1]


def _attend(plan, q_rank, k_rank, q, k, v, acc: Output | None) -> Output | None:
    """Merge the attention of ``q`` (``q_rank``'s block) over ``k``/``v`` into ``acc``.

    ``acc`` is ``None`` until something is merged: an unmasked tile over all rows then becomes
    the accumulator itself instead of being merged into zeros (one block of memory less, e.g.
    a whole world of one). Returns the accumulator, still ``None`` if every tile was hidden.
    """
    for t in plan.tiles(q_rank, k_rank):
        rows, cols = slice(t.q_start, t.q_end), slice(t.k_start, t.k_end)
        args = plan.tile_args(t, q_rank, k_rank, q.device)
        out_t, lse_t = plan.kernel_for(t).forward(q[:, rows], k[:, cols], v[:, cols], **args)
        if "mask" in args:  # rows the tile hides entirely carry no probability mass
            lse_t = lse_t.masked_fill(~args["mask"].any(-1), float("-inf"))
        elif acc is None and _covers(rows, q):
            dtype = accumulator_dtype(q.dtype)
            acc = out_t.to(dtype), lse_t.to(dtype).contiguous()
            continue
        if acc is None:
            acc = _new_output(q)
        merge_partial(acc[0][:, rows], acc[1][:, :, rows], out_t, lse_t)
    return acc


def _add(acc: torch.Tensor | None, part: torch.Tensor, index: slice, like: torch.Tensor):
    """``acc[:, index] += part`` for a gradient accumulator shaped like ``like`` in the
    accumulator dtype; a ``None`` accumulator adopts a ``part`` that covers it, else starts at 0."""
    dtype = accumulator_dtype(like.dtype)
    if acc is None:
        if _covers(index, like) and part.dtype == dtype:
            return part
        acc = torch.zeros(like.shape, dtype=dtype, device=like.device)
    acc[:, index] += part
    return acc


def _merge_returned(arrived, mine):
    out, lse = mine
    merge_partial(out, lse, *arrived)
    return out, lse


def _sum_returned(arrived, mine):
    for total, part in zip(mine, arrived, strict=True):
        total += part
    return mine


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` (batch, seq_q, heads_q, head_dim) in ``q.dtype`` and ``lse`` (batch, heads_q,
    seq_q) in the accumulator dtype, for this rank's queries against every rank's keys."""
    rank = plan.comm.rank
    if plan.rotation == "kv":
        acc: Output | None = None

        def attend_block(step, kv):
            nonlocal acc
            acc = _attend(plan, rank, plan.source(step), q, *kv, acc)

        _ring_loop(plan, "forward", (k, v), attend_block)
        out, lse = acc if acc is not None else _new_output(q)
    else:

        def visit(step, block):
            return _attend(plan, plan.source(step), rank, block[0], k, v, None) or _new_output(
                block[0]
            )

        out, lse = _ring_loop(plan, "forward", (q,), visit, _merge_returned)
    return out.to(q.dtype).contiguous(), lse


Grads = list[torch.Tensor | None]
"""``[dq, dk, dv]`` accumulators (``None`` until something is added, see :func:`_add`)."""


def _tile_grads(plan, q_rank, k_rank, dout, q, k, v, out, lse, acc: Grads) -> None:
    """Add the gradients of ``q_rank``'s queries against ``k_rank``'s keys to ``acc``."""
    for t in plan.tiles(q_rank, k_rank):
        rows, cols = slice(t.q_start, t.q_end), slice(t.k_start, t.k_end)
        dq_t, dk_t, dv_t = plan.kernel_for(t).backward(
            dout[:, rows],
            q[:, rows],
            k[:, cols],
            v[:, cols],
            out[:, rows],
            lse[:, :, rows],
            **plan.tile_args(t, q_rank, k_rank, q.device),
        )
        acc[0] = _add(acc[0], dq_t, rows, q)
        acc[1] = _add(acc[1], dk_t, cols, k)
        acc[2] = _add(acc[2], dv_t, cols, v)


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
    rank = plan.comm.rank
    acc_dtype = accumulator_dtype(q.dtype)
    # A row that saw no key (lse = -inf) must get P = exp(S - lse) = 0 in every tile: use +inf.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))

    def or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """``grad``, or zeros shaped like ``like`` where nothing was added (all keys hidden)."""
        return grad if grad is not None else like.new_zeros(like.shape, dtype=acc_dtype)

    acc: Grads = [None, None, None]  # dq, dk, dv of the tensors that stay on this rank
    if plan.rotation == "kv":

        def visit(step, block):
            k_b, v_b = block
            _tile_grads(plan, rank, plan.source(step), dout, q, k_b, v_b, out, lse, acc)
            dk_b, dv_b = or_zeros(acc[1], k_b), or_zeros(acc[2], v_b)
            acc[1:] = None, None  # handed to the ring: the next block starts afresh
            return dk_b, dv_b

        dk, dv = _ring_loop(plan, "backward", (k, v), visit, _sum_returned)
        dq = acc[0]
    else:

        def visit(step, block):
            q_b, dout_b, out_b, lse_b = block
            _tile_grads(plan, plan.source(step), rank, dout_b, q_b, k, v, out_b, lse_b, acc)
            dq_b = or_zeros(acc[0], q_b)
            acc[0] = None  # handed to the ring: the next block starts afresh
            return (dq_b,)

        (dq,) = _ring_loop(plan, "backward", (q, dout, out, lse), visit, _sum_returned)
        dk, dv = acc[1], acc[2]
    dq, dk, dv = or_zeros(dq, q), or_zeros(dk, k), or_zeros(dv, v)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.plan)
        return dq, dk, dv, None
