"""The ring engine: one loop, two rotations and an all-gather mode, as one autograd Function.

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

Blocks travel as sub-blocks (:class:`Granularity`): sub-block ``j`` of every rank's block goes
once around the ring, then sub-block ``j + 1``. A rank so holds two travelling *sub-blocks* (the
one it computes on and the one arriving) and three returning ones (the one it fills, the one it
sent, the one arriving) instead of whole blocks, and the stationary side is handed to the kernel
in bands of the same size, so kernel outputs are sub-block-sized too. (The backward of 16-bit
inputs, whose returning accumulators are fp32, cuts its travelling block finer and keeps the
bands: ``Granularity.accumulator_split``.)

A returning accumulator starts at the block's owner, is updated by every rank it visits — in the
buffer it arrived in — and arrives back after ``p`` steps. Each step computes the tiles
(:mod:`ringattn.masks`) of the (queries x keys) block through the local kernel and merges
``(out, lse)`` with the fp32 online softmax (:mod:`ringattn.merge`). Gradients of a tile use the
final ``out`` and ``lse`` of its rows.

``rotation="allgather"`` (TransformerEngine's and Megatron's all-gather context parallelism,
Llama 3's training) moves nothing around the ring: each pass all-gathers every rank's K and V
(the ``heads_kv`` heads) once — as ``p - 1`` pairwise exchanges posted together before this
rank attends its own keys, each shard received into a tensor of its own — and attends its
queries to each rank's shard with the ring's own tiles and kernels (``RingPlan.tiles((rank,
None), (source, None))``), freeing each shard once used. Its backward gathers K/V again, sums
dQ locally and computes fp32 dK/dV for every rank's keys, one source at a time; each is sent
straight to its owner while the next is computed (a reduce-scatter as ``p - 1`` pairwise
exchanges), and the owner adds what arrives in a fixed order. A rank holds every other rank's
K/V, and at most three fp32 dK/dV shards in transit (one filled, one sent, one arriving) —
not ``p`` as a reduce-scatter collective needs, nor the extra staging buffers of gloo's
collectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

from .comm import (
    PendingExchange,
    RingComm,
    all_reduce_bounded,
    host_timeout,
    post_messages,
    transfer_device,
)
from .dropout import Dropout
from .kernels import AttentionKernel
from .layout import Segment, SubBlock, sub_blocks
from .masks import ScoreMod, Tile, index_grids
from .merge import accumulator_dtype, empty_partial, merge_partial, sink_grad, with_sinks
from .trace import StepTimer, current_observers, current_trace, observed_by

if TYPE_CHECKING:
    from .ring_mask import RingMask

Rotation = Literal["kv", "q", "allgather"]
_TRAVEL_TAG, _RETURN_TAG, _SCATTER_TAG, _GATHER_TAG = 0, 16, 32, 48

Part = tuple[int, int | None]
"""``(rank, sub-block index)``: a rank's whole shard (index ``None``) or one of its sub-blocks."""


@dataclass(frozen=True)
class Granularity:
    """How finely the ring pipelines its blocks: memory against kernel-call size.

    The travelling block of every step is cut into ``sub_blocks`` sub-blocks, each holding a
    piece of every layout segment (zigzag: of both chunks), fewer when a piece would hold under
    ``min_tokens`` tokens; the stationary side is handed to the kernel in bands of the same size.
    What the ring holds beyond a rank's own tensors is then about ``6 / sub_blocks``
    block-sizes in the backward pass (two travelling sub-blocks, three returning fp32 ones, a band
    of kernel outputs); ``sub_blocks=1`` double-buffers whole blocks (with
    ``accumulator_split=1`` also in a 16-bit backward). Finer cuts mean more,
    smaller kernel calls and messages: ``min_tokens`` keeps every call at least that long.

    With 16-bit inputs the backward's returning accumulators (dK/dV, or dQ with pass-Q) are fp32,
    twice the inputs' width, while the rank's own fp32 dQ already costs one more query-shard than
    a single process holds: that pass cuts its travelling block ``accumulator_split`` times finer
    (pieces down to ``min_tokens / accumulator_split``), keeping the stationary side's bands, so
    its buffers stay near a quarter of their size at the price of narrower kernel calls.
    ``accumulator_split=1`` cuts every pass alike.
    """

    sub_blocks: int = 8
    min_tokens: int = 512
    accumulator_split: int = 4

    def __post_init__(self) -> None:
        if self.sub_blocks < 1 or self.min_tokens < 1 or self.accumulator_split < 1:
            raise ValueError(
                f"Granularity needs sub_blocks, min_tokens and accumulator_split >= 1, got {self}"
            )

    def count(self, segments: Sequence[Segment], split: int = 1) -> int:
        """Sub-blocks for a shard made of ``segments``, ``split`` times finer than
        ``sub_blocks`` (pieces down to ``min_tokens / split``)."""
        shortest = min(s.length for s in segments)
        return max(1, min(self.sub_blocks * split, shortest // max(1, self.min_tokens // split)))

    def band(self, segments: Sequence[Segment]) -> int:
        """Most tokens of a stationary shard made of ``segments`` in one kernel call."""
        return max(1, -(-sum(s.length for s in segments) // self.count(segments)))


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Everything the engine needs besides the tensors: the batch's :class:`~ringattn.RingMask`
    (layout, lengths, the ring's communicator, tiles) and this call's choices.

    Queries are bottom-right aligned: the ``seq_q`` queries sit at global positions
    ``seq_kv - seq_q .. seq_kv - 1`` (offset 0 for self-attention). ``kernel`` runs unmasked and
    causal tiles; ``masked_kernel`` runs tiles that need a dense mask, a ``score_mod`` (called
    with ``b`` in ``range(batch)`` and ``h`` in ``range(heads)``) or ``dropout``. With
    ``deterministic`` the passes run under ``torch.use_deterministic_algorithms(True)``.
    """

    mask: RingMask
    kernel: AttentionKernel
    masked_kernel: AttentionKernel
    scale: float
    rotation: Rotation
    granularity: Granularity = Granularity()
    score_mod: ScoreMod | None = None
    batch: int = 1
    heads: int = 1
    dropout: Dropout | None = None
    deterministic: bool = False
    head_offset: int = 0  # global index of head 0 (a Ulysses rank's share of the heads)
    travel_split: int = 1  # this pass cuts travelling blocks this much finer (Granularity)

    @property
    def comm(self) -> RingComm:
        return self.mask.comm

    @property
    def seq_q_local(self) -> int:
        return self.mask.seq_q_local

    @property
    def seq_kv_local(self) -> int:
        return self.mask.seq_kv_local

    def source(self, step: int) -> int:
        """The rank whose travelling block this rank holds at ``step``."""
        return (self.comm.rank - step) % self.comm.world_size

    @property
    def _dense(self) -> bool:
        """Whether every tile runs on the masked kernel, in ``tile_size`` squares."""
        return self.score_mod is not None or self.dropout is not None

    @property
    def _pipelined(self) -> bool:
        """Whether blocks are cut at all: in a world of one nothing travels, so the one block is
        computed whole, as a single process would."""
        return self.comm.world_size > 1

    def _sub_blocks(self, rank: int, queries: bool) -> tuple[SubBlock, ...]:
        segments = self.mask.segments(rank, queries)
        count = self.granularity.count(segments, self.travel_split) if self._pipelined else 1
        return sub_blocks(segments, count)

    def band(self, queries: bool) -> int:
        """Most rows (``queries``) or columns of a whole shard in one kernel call."""
        if not self._pipelined:
            return self.seq_q_local if queries else self.seq_kv_local
        return self.granularity.band(self.mask.segments(self.comm.rank, queries))

    @property
    def travel_blocks(self) -> tuple[SubBlock, ...]:
        """Sub-blocks of this rank's travelling block; every rank cuts at the same indices."""
        return self._sub_blocks(self.comm.rank, self.rotation == "q")

    def _block(self, part: Part, queries: bool) -> SubBlock | None:
        rank, sub = part
        return None if sub is None else self._sub_blocks(rank, queries)[sub]

    def _positions(self, part: Part, queries: bool, device: torch.device) -> torch.Tensor:
        block = self._block(part, queries)
        segments = block.segments if block else self.mask.segments(part[0], queries)
        return self.mask.positions(segments, device)

    def tiles(self, q_part: Part, k_part: Part) -> tuple[Tile, ...]:
        """Tiles of ``q_part``'s queries against ``k_part``'s keys (planned once per mask); a
        whole shard is cut into bands of :meth:`Granularity.band` tokens, and tiles under a
        ``score_mod`` or dropout (which our dense kernel computes) into ``tile_size`` squares."""
        max_rows = self.band(queries=True) if q_part[1] is None else self.seq_q_local
        max_cols = self.band(queries=False) if k_part[1] is None else self.seq_kv_local
        if self._dense:
            max_rows = min(max_rows, self.mask.spec.tile_size)
            max_cols = min(max_cols, self.mask.spec.tile_size)
        q_block, k_block = self._block(q_part, True), self._block(k_part, False)
        return self.mask.tiles(q_part[0], q_block, k_part[0], k_block, max_rows, max_cols)

    def tile_args(self, tile: Tile, q_part: Part, k_part: Part, device: torch.device) -> dict:
        """Keyword arguments of the kernel call for ``tile`` (mask, score_mod and dropout, if
        any)."""
        args = {"causal": tile.causal, "scale": self.scale}
        if not tile.masked and not self._dense:
            return args
        q_pos = self._positions(q_part, True, device)[tile.q_start : tile.q_end]
        k_pos = self._positions(k_part, False, device)[tile.k_start : tile.k_end]
        if tile.masked:
            mask = self.mask.spec.dense(q_pos, k_pos)
            if mask.shape[1] > self.heads:  # a mask_mod over all heads: this share of them
                mask = mask[:, self.head_offset : self.head_offset + self.heads]
            args["mask"] = mask
        if self.score_mod is not None or self.dropout is not None:
            b, h, q_idx, k_idx = index_grids(self.batch, self.heads, q_pos, k_pos, device)
            h = h + self.head_offset  # global head indices (a Ulysses rank's share of them)
        if self.score_mod is not None:
            grids = (b, h, q_idx, k_idx)
            score_mod = self.score_mod

            def score_fn(scores: torch.Tensor) -> torch.Tensor:
                return score_mod(scores, *grids)

            args["score_fn"] = score_fn
        if self.dropout is not None:
            args["dropout"] = self.dropout.tile(b, h, q_pos, k_pos)
        return args

    def single_call(self) -> Tile | None:
        """The tile that is this whole call when nothing needs pipelining — a world of one whose
        queries and keys form one unmasked tile (plain or causal attention) — else ``None``.
        Its kernel's outputs and gradients are then the results as they are, in the inputs'
        dtypes: exactly what one process computes and holds."""
        if self._pipelined or not (self.seq_q_local and self.seq_kv_local):
            return None
        tiles = self.tiles((0, None), (0, None))
        if len(tiles) != 1:
            return None
        whole = Tile(0, self.seq_q_local, 0, self.seq_kv_local, causal=tiles[0].causal)
        return whole if tiles[0] == whole else None

    def kernel_for(self, tile: Tile) -> AttentionKernel:
        kernel = self.masked_kernel if tile.masked or self._dense else self.kernel
        trace = current_trace()
        if trace is not None:  # which kernels ran: "auto"'s choice, and the masked path's
            trace.used_kernel(kernel.name)
        return kernel


def _gather(t: torch.Tensor, block: SubBlock, dim: int) -> torch.Tensor:
    """Sub-block ``block`` of ``t`` along ``dim``: a view when it is one piece, else a copy."""
    views = [t.narrow(dim, start, stop - start) for start, stop in block.pieces]
    return views[0] if len(views) == 1 else torch.cat(views, dim)


def _scatter(dest: torch.Tensor, block: SubBlock, dim: int, values: torch.Tensor) -> None:
    """Write ``values`` (sub-block ``block`` along ``dim``) into ``dest`` in place."""
    offset = 0
    for start, stop in block.pieces:
        dest.narrow(dim, start, stop - start).copy_(values.narrow(dim, offset, stop - start))
        offset += stop - start


Tensors = Sequence[torch.Tensor]


def _ring_loop(
    plan: RingPlan,
    phase: str,
    travelling: Tensors,
    dims: Sequence[int],
    compute: Callable[[int, int, Tensors], Tensors | None],
    combine: Callable[[Tensors, Tensors], Tensors] | None = None,
    deliver: Callable[[int, Tensors], None] | None = None,
) -> None:
    """Rotate ``travelling`` (cut along ``dims`` into :attr:`RingPlan.travel_blocks`) once
    around the ring, one sub-block at a time, calling ``compute(step, j, sub_block)``.

    Sub-block ``j`` makes its whole turn (steps ``0 .. p-1``) before sub-block ``j + 1`` starts,
    so what a rank receives is needed at its very next call: two travelling sub-blocks are alive.
    With ``combine``, ``compute`` returns this rank's contribution for the sub-block's owner. The
    contributions are folded into an accumulator that follows the sub-block one step behind
    (``combine(arrived, mine)`` folds ``mine`` into the buffer ``arrived`` and returns it) and
    reaches the owner after ``p`` steps, which gets it as ``deliver(j, accumulator)``.
    """
    world = plan.comm.world_size
    blocks = plan.travel_blocks
    returns_late = combine is not None and world > 1  # the last return is waited for at step p
    timer = StepTimer(phase, travelling[0].device, world, world + returns_late, world * len(blocks))
    in_flight = None
    for j, sub in enumerate(blocks):
        block = [_gather(t, sub, dim) for t, dim in zip(travelling, dims, strict=True)]
        for step in range(world):
            pending = None
            if step < world - 1:
                pending = plan.comm.exchange(block, _TRAVEL_TAG)
                timer.sent(step, pending.bytes_sent)
            with timer.computing(step):
                contribution = compute(step, j, block)
            if combine is not None:
                if in_flight is not None:
                    with timer.waiting(step if step else world):
                        arrived = in_flight.wait()
                    if step:
                        contribution = combine(arrived, contribution)
                    else:  # what arrived is sub-block j - 1, home after its whole turn
                        deliver(j - 1, arrived)
                    del arrived
                if world > 1:
                    in_flight = plan.comm.exchange(contribution, _RETURN_TAG)
                    timer.sent(step, in_flight.bytes_sent)
                else:
                    deliver(j, contribution)
                contribution = None  # only the copy in flight stays alive
            if pending is not None:
                with timer.waiting(step):
                    block = pending.wait()
            timer.unit_done(step)
    if in_flight is not None:
        with timer.waiting(world):
            deliver(len(blocks) - 1, in_flight.wait())
    timer.finish()


Output = tuple[torch.Tensor, torch.Tensor]
"""Running ``(out (b, s, h, d), lse (b, h, s))`` of a block of query rows, accumulator dtype."""


def _covers(index: slice, like: torch.Tensor) -> bool:
    return index.start == 0 and index.stop == like.shape[1]


def _score_args(args: dict) -> dict:
    """The arguments of a kernel call that shape its scores (for ``max_scores``)."""
    return {n: args[n] for n in ("causal", "scale", "mask", "score_fn") if n in args}


def _attend(
    plan, q_part: Part, k_part: Part, q, k, v, acc: Output | None, peak: torch.Tensor | None
) -> Output | None:
    """Merge the attention of ``q`` (``q_part``'s queries) over ``k``/``v`` into ``acc``, and
    raise ``peak`` (``(heads_q,)``, if given) to the largest score of every head.

    ``acc`` is ``None`` until something is merged: an unmasked tile over all rows then becomes
    the accumulator itself instead of being merged into zeros (one block of memory less, e.g.
    a whole world of one). Returns the accumulator, still ``None`` if every tile was hidden.
    """
    for t in plan.tiles(q_part, k_part):
        rows, cols = slice(t.q_start, t.q_end), slice(t.k_start, t.k_end)
        args = plan.tile_args(t, q_part, k_part, q.device)
        kernel = plan.kernel_for(t)
        if peak is not None:
            tile_peak = kernel.max_scores(q[:, rows], k[:, cols], **_score_args(args))
            torch.maximum(peak, tile_peak, out=peak)
        out_t, lse_t = kernel.forward(q[:, rows], k[:, cols], v[:, cols], **args)
        if "mask" in args:  # rows the tile hides entirely carry no probability mass
            lse_t = lse_t.masked_fill(~args["mask"].any(-1), float("-inf"))
        elif acc is None and _covers(rows, q):
            dtype = accumulator_dtype(q.dtype)
            acc = out_t.to(dtype), lse_t.to(dtype).contiguous()
            continue
        if acc is None:
            acc = empty_partial(q, v.shape[-1])
        merge_partial(acc[0][:, rows], acc[1][:, :, rows], out_t, lse_t)
        del out_t, lse_t  # before the next call allocates its own
    return acc


class _GradSum:
    """A gradient shaped like ``like`` ``(batch, seq, heads, dim)``, summed over tiles in the
    accumulator dtype; rows that nothing was added to are zero.

    It is kept in bands of ``band`` rows when it must end in a narrower dtype than it sums in:
    :meth:`result` then converts band by band, freeing each fp32 band at once, so the
    conversion needs no more memory than the accumulator itself (one tensor would need the fp32
    sum and its bf16 copy together). A part that covers a band exactly in the accumulator dtype
    becomes that band instead of being added to zeros (a world of one keeps the kernel's output).
    """

    def __init__(self, like: torch.Tensor, band: int | None = None):
        self.like = like
        self.dtype = accumulator_dtype(like.dtype)
        rows = like.shape[1]
        self.band = max(1, rows if band is None or self.dtype == like.dtype else band)
        self.parts: dict[int, torch.Tensor] = {}

    def _rows(self, index: int) -> int:
        return min(self.band, self.like.shape[1] - index * self.band)

    def _zeros(self, index: int) -> torch.Tensor:
        shape = (self.like.shape[0], self._rows(index), *self.like.shape[2:])
        return torch.zeros(shape, dtype=self.dtype, device=self.like.device)

    def add(self, part: torch.Tensor, rows: slice) -> None:
        """Add ``part`` (rows ``rows`` of the gradient, any floating dtype)."""
        for index in range(rows.start // self.band, -(-rows.stop // self.band)):
            lo, hi = max(rows.start, index * self.band), min(rows.stop, (index + 1) * self.band)
            total = self.parts.get(index)
            if total is None:
                if hi - lo == part.shape[1] == self._rows(index) and part.dtype == self.dtype:
                    self.parts[index] = part
                    continue
                total = self.parts[index] = self._zeros(index)
            start = index * self.band
            total[:, lo - start : hi - start] += part[:, lo - rows.start : hi - rows.start]

    def accumulated(self) -> torch.Tensor:
        """The sum in the accumulator dtype, as one tensor (a gradient kept in one band)."""
        assert self.band >= self.like.shape[1], "accumulated() needs a gradient in one band"
        total = self.parts.pop(0, None)
        return self._zeros(0) if total is None else total

    def result(self) -> torch.Tensor:
        """The sum in ``like``'s dtype; the accumulator is emptied band by band."""
        bands = []
        for index in range(max(1, -(-self.like.shape[1] // self.band))):
            total = self.parts.pop(index, None)
            bands.append((self._zeros(index) if total is None else total).to(self.like.dtype))
            del total
        return bands[0] if len(bands) == 1 else torch.cat(bands, 1)


def _merge_into_arrived(arrived: Tensors, mine: Tensors) -> Tensors:
    merge_partial(arrived[0], arrived[1], *mine)
    return arrived


def _sum_into_arrived(arrived: Tensors, mine: Tensors) -> Tensors:
    for total, part in zip(arrived, mine, strict=True):
        total += part
    return arrived


class _Assembly:
    """This rank's returned tensors (``shapes``, sequence along ``dims``, in ``dtypes``),
    assembled as :func:`_ring_loop` delivers them sub-block by sub-block. A result that arrives
    as one sub-block is adopted rather than copied (a world of one)."""

    def __init__(
        self,
        plan: RingPlan,
        shapes: Sequence[tuple[int, ...]],
        dims: Sequence[int],
        dtypes: Sequence[torch.dtype],
        device: torch.device,
    ):
        self.blocks = plan.travel_blocks
        self.shapes, self.dims, self.dtypes, self.device = shapes, dims, dtypes, device
        self.tensors: list[torch.Tensor | None] = [None] * len(shapes)

    def result(self) -> list[torch.Tensor]:
        """The assembled tensors (empty ones for an empty shard, which has no sub-block)."""
        return [
            torch.empty(shape, dtype=dtype, device=self.device) if t is None else t
            for t, shape, dtype in zip(self.tensors, self.shapes, self.dtypes, strict=True)
        ]

    def __call__(self, j: int, returned: Tensors) -> None:
        for i, values in enumerate(returned):
            if len(self.blocks) == 1:
                self.tensors[i] = values.to(self.dtypes[i])
                continue
            if self.tensors[i] is None:
                self.tensors[i] = torch.empty(
                    self.shapes[i], dtype=self.dtypes[i], device=self.device
                )
            _scatter(self.tensors[i], self.blocks[j], self.dims[i], values)


def _one_step(phase: str, device: torch.device, call, *args, **kwargs):
    """``call(*args, **kwargs)`` traced and reported as the single step of a ring pass."""
    timer = StepTimer(phase, device, 1, 1, 1)
    with timer.computing(0):
        result = call(*args, **kwargs)
    timer.unit_done(0)
    timer.finish()
    return result


@contextlib.contextmanager
def _determinism(plan: RingPlan) -> Iterator[None]:
    """Runs a pass under ``torch.use_deterministic_algorithms(True)`` when the plan asks for
    it (the CUDA kernels then take their deterministic backward), restoring the setting."""
    if not plan.deterministic:
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan, max_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``out`` (batch, seq_q, heads_q, head_dim_v) in ``q.dtype`` and ``lse`` (batch, heads_q,
    seq_q) in the accumulator dtype, for this rank's queries against every rank's keys; with
    ``max_logits`` also the largest score of every query head over all ranks' queries and keys,
    ``(heads_q,)`` in the accumulator dtype (one all-reduce), else ``None``."""
    peak = None
    if max_logits:
        peak = torch.full((q.shape[2],), float("-inf"), dtype=accumulator_dtype(q.dtype))
        peak = peak.to(q.device)
    with _determinism(plan):
        out, lse = _forward(q, k, v, plan, peak)
    if peak is not None and plan.comm.world_size > 1:
        all_reduce_bounded(peak, plan.comm.group, "max logits", dist.ReduceOp.MAX)
    return out, lse, peak


def _forward(q, k, v, plan: RingPlan, peak: torch.Tensor | None):
    rank = plan.comm.rank
    single = plan.single_call()
    if single is not None:
        args = plan.tile_args(single, (rank, None), (rank, None), q.device)
        kernel = plan.kernel_for(single)
        if peak is not None:
            peak.copy_(kernel.max_scores(q, k, **_score_args(args)))
        out, lse = _one_step("forward", q.device, kernel.forward, q, k, v, **args)
        return out.contiguous(), lse
    if plan.rotation == "allgather":
        return _allgather_forward(q, k, v, plan, peak)
    if plan.rotation == "kv":
        acc: Output | None = None

        def attend_block(step, j, kv):
            nonlocal acc
            acc = _attend(plan, (rank, None), (plan.source(step), j), q, *kv, acc, peak)

        _ring_loop(plan, "forward", (k, v), (1, 1), attend_block)
        out, lse = acc if acc is not None else empty_partial(q, v.shape[-1])
        return out.to(q.dtype).contiguous(), lse

    def visit(step, j, block):
        (q_b,) = block
        found = _attend(plan, (plan.source(step), j), (rank, None), q_b, k, v, None, peak)
        return found or empty_partial(q_b, v.shape[-1])

    batch, seq, heads, _ = q.shape
    returned = _Assembly(
        plan,
        ((batch, seq, heads, v.shape[-1]), (batch, heads, seq)),
        (1, 2),
        (q.dtype, accumulator_dtype(q.dtype)),
        q.device,
    )
    _ring_loop(plan, "forward", (q,), (1,), visit, _merge_into_arrived, returned)
    out, lse = returned.result()
    return out.contiguous(), lse


def _tile_grads(plan, q_part, k_part, dout, q, k, v, out, lse, grads) -> None:
    """Add the gradients of ``q_part``'s queries against ``k_part``'s keys to ``grads``
    (``[dq, dk, dv]`` :class:`_GradSum` s)."""
    for t in plan.tiles(q_part, k_part):
        rows, cols = slice(t.q_start, t.q_end), slice(t.k_start, t.k_end)
        dq_t, dk_t, dv_t = plan.kernel_for(t).backward(
            dout[:, rows],
            q[:, rows],
            k[:, cols],
            v[:, cols],
            out[:, rows],
            lse[:, :, rows],
            **plan.tile_args(t, q_part, k_part, q.device),
        )
        grads[0].add(dq_t, rows)
        grads[1].add(dk_t, cols)
        grads[2].add(dv_t, cols)
        del dq_t, dk_t, dv_t  # before the next call allocates its own


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
    with _determinism(plan):
        return _backward(dout, q, k, v, out, lse, plan)


def _backward(dout, q, k, v, out, lse, plan: RingPlan):
    rank = plan.comm.rank
    # A row that saw no key (lse = -inf) must get P = exp(S - lse) = 0 in every tile: use +inf.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    single = plan.single_call()
    if single is not None:
        args = plan.tile_args(single, (rank, None), (rank, None), q.device)
        kernel = plan.kernel_for(single)
        grads = _one_step("backward", q.device, kernel.backward, dout, q, k, v, out, lse, **args)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True))
    if plan.rotation == "allgather":
        return _allgather_backward(dout, q, k, v, out, lse, plan)
    if accumulator_dtype(q.dtype).itemsize > q.dtype.itemsize:  # fp32 gradients travel home
        plan = replace(plan, travel_split=plan.granularity.accumulator_split)
    if plan.rotation == "kv":
        dq = _GradSum(q, plan.band(queries=True))

        def visit(step, j, block):
            k_b, v_b = block
            grads = [dq, _GradSum(k_b), _GradSum(v_b)]
            _tile_grads(
                plan, (rank, None), (plan.source(step), j), dout, q, k_b, v_b, out, lse, grads
            )
            return grads[1].accumulated(), grads[2].accumulated()

        returned = _Assembly(plan, (k.shape, v.shape), (1, 1), (k.dtype, v.dtype), k.device)
        _ring_loop(plan, "backward", (k, v), (1, 1), visit, _sum_into_arrived, returned)
        dk, dv = returned.result()
        return dq.result(), dk, dv

    band = plan.band(queries=False)
    dk, dv = _GradSum(k, band), _GradSum(v, band)

    def visit(step, j, block):
        q_b, dout_b, out_b, lse_b = block
        grads = [_GradSum(q_b), dk, dv]
        _tile_grads(
            plan, (plan.source(step), j), (rank, None), dout_b, q_b, k, v, out_b, lse_b, grads
        )
        return (grads[0].accumulated(),)

    returned = _Assembly(plan, (q.shape,), (1,), (q.dtype,), q.device)
    _ring_loop(
        plan, "backward", (q, dout, out, lse), (1, 1, 1, 2), visit, _sum_into_arrived, returned
    )
    (dq_result,) = returned.result()
    return dq_result, dk.result(), dv.result()


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    plan: RingPlan,
    max_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ring_forward` with the sinks applied: ``(out, lse, peak)`` as the backward needs
    them (``peak`` empty without ``max_logits``)."""
    out, lse, peak = ring_forward(q, k, v, plan, max_logits)
    if sinks is not None:
        out, lse = with_sinks(out, lse, sinks)
    return out, lse, lse.new_empty(0) if peak is None else peak


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sinks: torch.Tensor | None,
    plan: RingPlan,
    needs: Sequence[bool] = (True, True, True, True),
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``dq, dk, dv, dsinks`` for the ``out``, ``lse`` of :func:`attention_forward`
    (``None`` where ``needs`` — for q, k, v, sinks — says none is wanted)."""
    dq = dk = dv = dsinks = None
    if any(needs[:3]):
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, plan)
    if sinks is not None and needs[3]:
        dsinks = sink_grad(dout, out, lse, sinks)
    return dq, dk, dv, dsinks


def _count_sent(timer: StepTimer, nbytes: int) -> None:
    """Bytes this rank sends in the single step of an all-gather pass, in the step record and
    the trace's total (as :meth:`RingComm.exchange` counts the ring's)."""
    timer.sent(0, nbytes)
    trace = current_trace()
    if trace is not None:
        trace.bytes_sent += nbytes


def _post_p2p(
    comm: RingComm,
    tensors: Tensors,
    to: Sequence[int],
    sources: Sequence[int],
    tag: int,
    what: str,
) -> PendingExchange:
    """Post sends of ``tensors`` to each ring rank in ``to`` and receives of same-shaped tensors
    from each ring rank in ``sources`` (received: ``tensors``' worth per source, in order),
    bounded and naming the peer as the ring's exchanges are."""
    device = tensors[0].device
    staging = transfer_device(comm.group, device)
    sent = [t.to(staging).contiguous() for t in tensors]

    def messages(peers: Sequence[int], verb: str, buffer) -> list:
        found = []
        for peer in peers:
            global_rank = dist.get_global_rank(comm.group, peer)
            text = f"{what}: {verb} rank {peer} of the ring (global rank {global_rank})"
            found += [(global_rank, buffer(t), tag + i, text) for i, t in enumerate(sent)]
        return found

    receives = messages(sources, "receiving from", torch.empty_like)
    sends = messages(to, "sending to", lambda t: t)
    timeout = host_timeout(staging, comm.group, comm._timeout_s)
    coalesced = f"{what} with ranks {[*to, *sources]} of the ring"
    return post_messages(comm.group, receives, sends, timeout, device, coalesced)


class _Gather:
    """Every rank's K and V shards, all-gathered as ``p - 1`` pairwise exchanges posted at
    once: this rank's shards go to every other rank, theirs arrive, each into a tensor of its
    own. (Both forms of gloo's all-gather stage all ``p`` shards in one more buffer: ``2p - 1``
    or ``2p`` shards at once instead of ``p - 1``, and an output in one tensor could not be
    freed shard by shard.) Each rank sends ``p - 1`` shards, what a ring all-gather sends."""

    def __init__(self, plan: RingPlan, k: torch.Tensor, v: torch.Tensor, timer: StepTimer):
        comm = plan.comm
        self.mine, self.rank, self.timer = (k, v), comm.rank, timer
        self.others = [plan.source(step) for step in range(1, comm.world_size)]
        self.pending = None
        if self.others:
            what = f"all-gather of K/V over the ring's {comm.world_size} ranks"
            self.pending = _post_p2p(comm, (k, v), self.others, self.others, _GATHER_TAG, what)
            _count_sent(timer, self.pending.bytes_sent)

    def wait(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """``({rank: k shard}, {rank: v shard})``; the caller's dicts become the only
        references to the received shards, which are freed as the caller drops them."""
        keys, values = {self.rank: self.mine[0]}, {self.rank: self.mine[1]}
        if self.pending is not None:
            pending, self.pending = self.pending, None
            with self.timer.waiting(0):
                received = pending.wait()
            del pending
            for i, source in enumerate(self.others):
                keys[source], values[source] = received[2 * i], received[2 * i + 1]
        return keys, values


def _allgather_forward(q, k, v, plan: RingPlan, peak: torch.Tensor | None):
    """The forward of ``rotation="allgather"``: this rank's queries against every rank's
    gathered K/V shard, in the ring's order of sources, as one traced step."""
    rank, world = plan.comm.rank, plan.comm.world_size
    timer = StepTimer("forward", q.device, 1, 1, world)
    gather = _Gather(plan, k, v, timer)
    acc: Output | None = None

    def attend(source: int, k_s: torch.Tensor, v_s: torch.Tensor) -> None:
        nonlocal acc
        with timer.computing(0):
            acc = _attend(plan, (rank, None), (source, None), q, k_s, v_s, acc, peak)
        timer.unit_done(0)

    attend(rank, k, v)  # while the gather is in flight
    keys, values = gather.wait()
    for step in range(1, world):
        source = plan.source(step)
        attend(source, keys.pop(source), values.pop(source))  # each shard freed once attended
    timer.finish()
    out, lse = acc if acc is not None else empty_partial(q, v.shape[-1])
    return out.to(q.dtype).contiguous(), lse


def _allgather_backward(dout, q, k, v, out, lse, plan: RingPlan):
    """The backward of ``rotation="allgather"``: K/V gathered again, dQ summed here, fp32 dK/dV
    of each source's keys sent to their owner (a reduce-scatter as ``p - 1`` pairwise
    exchanges, each posted before the next source is computed); the owner adds its own part and
    then what rank ``r + 1``, ``r + 2``, ... sent, in that order."""
    comm = plan.comm
    rank, world = comm.rank, comm.world_size
    timer = StepTimer("backward", q.device, 1, 1, world)
    gather = _Gather(plan, k, v, timer)
    dq = _GradSum(q, plan.band(queries=True))

    def grads_of(source: int, k_s: torch.Tensor, v_s: torch.Tensor) -> list[torch.Tensor]:
        with timer.computing(0):
            sums = [dq, _GradSum(k_s), _GradSum(v_s)]
            _tile_grads(plan, (rank, None), (source, None), dout, q, k_s, v_s, out, lse, sums)
            result = [sums[1].accumulated(), sums[2].accumulated()]
        timer.unit_done(0)
        return result

    own = grads_of(rank, k, v)  # while the gather is in flight

    def fold(pending: PendingExchange) -> None:
        with timer.waiting(0):
            arrived = pending.wait()
        with timer.computing(0):
            for total, part in zip(own, arrived, strict=True):
                total += part

    keys, values = gather.wait()
    in_flight = None
    for step in range(1, world):
        owner = plan.source(step)
        part = grads_of(owner, keys.pop(owner), values.pop(owner))
        if in_flight is not None:
            fold(in_flight)
            in_flight = None  # its buffers go before the next exchange allocates its own
        # to the keys' owner; from the rank whose step `step` holds this rank's keys
        sender = (rank + step) % world
        what = "reduce-scatter of dK/dV"
        in_flight = _post_p2p(comm, part, [owner], [sender], _SCATTER_TAG, what)
        _count_sent(timer, in_flight.bytes_sent)
        del part  # only the copy in flight stays alive
    if in_flight is not None:
        fold(in_flight)
    timer.finish()
    return dq.result(), own[0].to(k.dtype), own[1].to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, sinks, plan, max_logits) -> (out, lse, peak)``
    (``sinks``: ``(heads_q,)`` logits or ``None``, see :func:`ringattn.merge.with_sinks`;
    ``peak``: the max logits of :func:`ring_forward`, empty without ``max_logits``); ``lse``
    and ``peak`` are not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: RingPlan, max_logits: bool):
        out, lse, peak = attention_forward(q, k, v, sinks, plan, max_logits)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.plan = plan
        ctx.observers = current_observers()
        ctx.mark_non_differentiable(lse, peak)
        return out, lse, peak

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse, _dpeak):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        with observed_by(ctx.observers):
            grads = attention_backward(
                dout.contiguous(), q, k, v, out, lse, sinks, ctx.plan, ctx.needs_input_grad[:4]
            )
        return *grads, None, None
