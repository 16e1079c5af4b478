"""One attention workload, measured the same way by ``ringattn demo`` and ``ringattn bench``.

Inputs are a function of the seed and the *global* token position only, so every rank builds its
own shard without ever holding the whole sequence, and a single process can build the whole
sequence bit-identically.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..api import ring_attention
from ..comm import GroupLike
from ..engine import Granularity
from ..kernels import select_kernel
from ..trace import RingTrace, record_ring
from .memory import PeakMemory

_BLOCK = 1024  # tokens generated together from one seed
OUTPUT_NAMES = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class Workload:
    """Shapes and flags of one attention problem over the whole sequence."""

    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int = 64
    head_dim_v: int | None = None  # the values' head dim when it differs (MLA)
    batch: int = 1
    dtype: str = "float32"
    causal: bool = True
    layout: str = "zigzag"
    seed: int = 0
    sub_blocks: int = Granularity().sub_blocks
    min_tokens: int = Granularity().min_tokens
    accumulator_split: int = Granularity().accumulator_split

    @property
    def granularity(self) -> Granularity:
        """How the ring cuts its blocks (:class:`ringattn.Granularity`)."""
        return Granularity(self.sub_blocks, self.min_tokens, self.accumulator_split)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def value_dim(self) -> int:
        """Head dim of v, out and dout."""
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    def flops_forward(self) -> float:
        """Forward FLOPs of attention (two matmuls: ``q k^T`` over ``head_dim`` and ``p v``
        over ``value_dim``), halved under a causal mask."""
        pairs = self.seq_len * self.seq_len * (0.5 if self.causal else 1.0)
        return 2.0 * self.batch * self.heads * (self.head_dim + self.value_dim) * pairs

    def inputs(self, positions: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """``q, k, v, dout`` at the given global positions, ``(batch, len, heads, head_dim)``."""
        shapes = (
            ("q", self.heads, self.head_dim),
            ("k", self.kv_heads, self.head_dim),
            ("v", self.kv_heads, self.value_dim),
            ("dout", self.heads, self.value_dim),
        )
        return {
            name: tokens_at(
                positions, self.batch, heads, dim, self.seed * 4 + i, self.torch_dtype
            ).to(device)
            for i, (name, heads, dim) in enumerate(shapes)
        }


def tokens_at(
    positions: torch.Tensor, batch: int, heads: int, dim: int, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """Unit-normal values ``(batch, len(positions), heads, dim)`` that depend only on the seed and
    the global positions."""
    out = torch.empty(batch, len(positions), heads, dim, dtype=dtype)
    block_ids = positions // _BLOCK
    for block in torch.unique(block_ids).tolist():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(batch, _BLOCK, heads, dim, generator=gen)
        rows = (block_ids == block).nonzero().squeeze(1)
        out[:, rows] = values[:, positions[rows] - block * _BLOCK].to(dtype)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    """Bytes held by ``tensors`` (an iterable of tensors)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Timing:
    """Median seconds over the timed repeats, peak memory above entry, and the last outputs.

    ``input_bytes`` counts ``q, k, v, dout``, which exist before the measurement starts:
    ``peak_bytes + input_bytes`` is what the run costs a user (:attr:`total_peak_bytes`).
    """

    forward_s: float
    backward_s: float
    peak_bytes: int
    memory_method: str
    outputs: dict[str, torch.Tensor]
    input_bytes: int = 0
    trace: RingTrace | None = None

    @property
    def total_peak_bytes(self) -> int:
        """Peak memory including the inputs."""
        return self.peak_bytes + self.input_bytes


def context_scaling(single_total_bytes: float, ring_total_bytes: float, world_size: int) -> float:
    """How much of the ideal ``p``-fold context the ring delivers for a fixed memory budget:
    ``mem(1) / (p * mem(p))``, both peaks including the inputs (1.0 = proportional)."""
    return single_total_bytes / (world_size * ring_total_bytes)


@dataclass
class _Run:
    forward_s: float
    backward_s: float
    outputs: dict[str, torch.Tensor]
    trace: RingTrace | None = None


def _measured(
    run_once: Callable[[], _Run],
    device: torch.device,
    repeats: int,
    input_bytes: int,
    before_each: Callable[[int], None] | None = None,
) -> Timing:
    """One run under :class:`PeakMemory` (run 0), then ``repeats`` timed runs (1..repeats), so
    that counting allocations (a little Python per operator on CPU) never slows a timed run.
    ``repeats=0``: one run, measured and timed (for runs too long to repeat)."""
    runs: list[_Run] = []
    for i in range(repeats + 1):
        if before_each is not None:
            before_each(i)
        if runs:
            runs[-1].outputs = {}  # free the previous results first
        if i == 0:
            with PeakMemory(device) as peak:
                runs.append(run_once())
        else:
            runs.append(run_once())
    timed = runs[1:] or runs
    return Timing(
        statistics.median(r.forward_s for r in timed),
        statistics.median(r.backward_s for r in timed),
        peak.bytes,
        peak.method,
        runs[-1].outputs,
        input_bytes,
        runs[-1].trace,
    )


def time_ring(
    workload: Workload,
    inputs: dict[str, torch.Tensor],
    repeats: int,
    group: GroupLike = None,
    before_each: Callable[[int], None] | None = None,
    with_backward: bool = True,
) -> Timing:
    """Ring forward and backward on this rank's shard ``inputs``: one run measuring memory, then
    ``repeats`` timed runs (see :func:`_measured`; ``before_each(i)`` runs before run ``i``, e.g.
    a barrier). The trace and outputs of the last run are kept. Without ``with_backward`` only
    the forward runs, under ``torch.no_grad`` as in inference (``inputs`` need no ``dout``,
    ``backward_s`` is 0, the outputs are ``out`` and ``lse``)."""
    device = inputs["q"].device
    leaves = [inputs[n].detach().requires_grad_(with_backward) for n in ("q", "k", "v")]

    def run_once() -> _Run:
        with record_ring() as trace, torch.set_grad_enabled(with_backward):
            synchronize(device)
            t0 = time.perf_counter()
            out, lse = ring_attention(
                *leaves,
                causal=workload.causal,
                layout=workload.layout,
                granularity=workload.granularity,
                group=group,
                return_lse=True,
            )
            synchronize(device)
            t1 = time.perf_counter()
            grads = torch.autograd.grad(out, leaves, inputs["dout"]) if with_backward else ()
            synchronize(device)
            t2 = time.perf_counter()
        results = (out.detach(), lse, *grads)
        return _Run(t1 - t0, t2 - t1, dict(zip(OUTPUT_NAMES, results, strict=False)), trace)

    input_bytes = tensor_bytes(inputs[n] for n in ("q", "k", "v", "dout") if n in inputs)
    return _measured(run_once, device, repeats, input_bytes, before_each)


def time_single_process(
    workload: Workload,
    device: torch.device,
    threads: int,
    repeats: int = 1,
    with_backward: bool = True,
) -> Timing:
    """The same kernel over the whole sequence in this process, with ``threads`` CPU threads:
    one run measuring memory, then ``repeats`` timed runs (only the forward without
    ``with_backward``: no ``dout``, ``backward_s`` 0)."""
    inputs = workload.inputs(torch.arange(workload.seq_len), device)
    if not with_backward:
        del inputs["dout"]
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    kernel = select_kernel("auto", q, v.shape[-1])
    scale = workload.head_dim**-0.5

    def run_once() -> _Run:
        synchronize(device)
        t0 = time.perf_counter()
        out, lse = kernel.forward(q, k, v, causal=workload.causal, scale=scale)
        synchronize(device)
        t1 = time.perf_counter()
        grads = ()
        if with_backward:
            grads = kernel.backward(
                inputs["dout"], q, k, v, out, lse, causal=workload.causal, scale=scale
            )
        synchronize(device)
        t2 = time.perf_counter()
        results = (out, lse, *grads)
        return _Run(t1 - t0, t2 - t1, dict(zip(OUTPUT_NAMES, results, strict=False)))

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measured(run_once, device, repeats, tensor_bytes(inputs.values()))
    finally:
        torch.set_num_threads(previous_threads)


@dataclass(frozen=True)
class RingMemory:
    """Peak memory of one ring forward + backward above this rank's inputs, in bytes.

    ``forward`` is the forward pass's peak above its start; ``backward`` the backward pass's
    peak above *its* start, when the output (and the saved log-sum-exp) already exist, so the
    pair's peak is ``max(forward, backward + output)``; ``inherent`` is what any implementation
    must hold above the inputs: out, lse, dq, dk, dv.
    """

    forward: int
    backward: int
    output: int
    inherent: int

    @property
    def peak(self) -> int:
        """Peak above the inputs over the whole forward + backward."""
        return max(self.forward, self.backward + self.output)

    @property
    def added(self) -> int:
        """What the ring holds beyond the inherent set at its peak."""
        return self.peak - self.inherent


def measure_ring_memory(
    workload: Workload, inputs: dict[str, torch.Tensor], group: GroupLike = None
) -> RingMemory:
    """:class:`RingMemory` of ring attention on this rank's shard ``inputs`` (after a short
    warm-up on a few tokens)."""
    q, k, v = (inputs[name].detach().requires_grad_() for name in "qkv")
    options = {
        "causal": workload.causal,
        "layout": workload.layout,
        "group": group,
        "granularity": workload.granularity,
    }
    warm = [t[:, :256].detach().requires_grad_() for t in (q, k, v)]
    warm_out = ring_attention(*warm, **options)
    torch.autograd.grad(warm_out, warm, torch.ones_like(warm_out))
    del warm, warm_out
    with PeakMemory(q.device) as forward:
        out, lse = ring_attention(q, k, v, return_lse=True, **options)
    with PeakMemory(q.device) as backward:
        grads = torch.autograd.grad(out, (q, k, v), inputs["dout"])
    output = tensor_bytes((out, lse))
    return RingMemory(forward.bytes, backward.bytes, output, output + tensor_bytes(grads))
