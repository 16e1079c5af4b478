"""Opt-in per-step measurements of the ring: compute time, time blocked on communication, bytes.

    with ringattn.record_ring() as trace:
        out = ringattn.ring_attention(q, k, v, causal=True)
    print(trace.summary())

Recording costs two clock reads per step on CPU; on CUDA it synchronises the device at step
boundaries, so leave it off outside of measurements.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

_ACTIVE: contextvars.ContextVar[RingTrace | None] = contextvars.ContextVar(
    "ringattn_trace", default=None
)


@dataclass
class StepRecord:
    """One ring step of one pass ("forward" or "backward") on this rank."""

    phase: str
    step: int
    compute_s: float
    wait_s: float
    bytes_sent: int


@dataclass
class RingTrace:
    """Step records of every ring pass run while the trace was active."""

    steps: list[StepRecord] = field(default_factory=list)
    bytes_sent: int = 0
    kernels: list[str] = field(default_factory=list)  # the local kernels the calls chose, once each

    def total(self, phase: str | None = None) -> dict[str, float]:
        """Summed compute seconds, wait seconds and bytes sent, optionally for one phase."""
        chosen = [s for s in self.steps if phase is None or s.phase == phase]
        return {
            "compute_s": sum(s.compute_s for s in chosen),
            "wait_s": sum(s.wait_s for s in chosen),
            "bytes_sent": float(sum(s.bytes_sent for s in chosen)),
        }

    def used_kernel(self, name: str) -> None:
        if name not in self.kernels:
            self.kernels.append(name)

    def summary(self) -> str:
        lines = [f"kernel: {', '.join(self.kernels)}"] if self.kernels else []
        for phase in sorted({s.phase for s in self.steps}):
            t = self.total(phase)
            lines.append(
                f"{phase}: compute {t['compute_s'] * 1e3:.1f} ms, "
                f"waiting {t['wait_s'] * 1e3:.1f} ms,"
                f" sent {t['bytes_sent'] / 2**20:.2f} MiB"
            )
        return "\n".join(lines)


def current_trace() -> RingTrace | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def record_ring() -> Iterator[RingTrace]:
    """Record per-step compute/wait time and bytes of every ring pass inside the block."""
    trace = RingTrace()
    token = _ACTIVE.set(trace)
    try:
        yield trace
    finally:
        _ACTIVE.reset(token)


def seconds_left(fraction_done: float, elapsed_s: float) -> float:
    """Linear estimate of the seconds left when ``fraction_done`` took ``elapsed_s``."""
    return elapsed_s * (1 - fraction_done) / max(fraction_done, 1e-9)


def progress_text(label: str, fraction_done: float, elapsed_s: float) -> str:
    """``"<label> (38%), 120 s elapsed, ~200 s left"``."""
    left = seconds_left(fraction_done, elapsed_s)
    return f"{label} ({100 * fraction_done:.0f}%), {elapsed_s:.0f} s elapsed, ~{left:.0f} s left"


@dataclass(frozen=True)
class RingProgress:
    """How far one ring pass of this rank has got (see :func:`report_progress`)."""

    phase: str
    """"forward" or "backward"."""
    done: int
    """Sub-block steps finished (a ring step of ``p`` is ``sub_blocks`` of them)."""
    total: int
    step: int
    """Ring step (0-based, of ``world_size``) of the sub-block step just finished."""
    world_size: int
    elapsed_s: float

    @property
    def remaining_s(self) -> float:
        """Linear estimate of the seconds left in this pass."""
        return seconds_left(self.done / self.total, self.elapsed_s)

    def __str__(self) -> str:
        label = f"{self.phase}: ring step {self.step + 1}/{self.world_size}"
        return progress_text(label, self.done / self.total, self.elapsed_s)


_PROGRESS: contextvars.ContextVar[tuple[Callable[[RingProgress], None], float] | None] = (
    contextvars.ContextVar("ringattn_progress", default=None)
)


@contextlib.contextmanager
def report_progress(
    callback: Callable[[RingProgress], None] = print, every_s: float = 10.0
) -> Iterator[None]:
    """Call ``callback(RingProgress)`` from inside every ring pass in the block, at most once every
    ``every_s`` seconds and once at the end of each pass — for runs that take minutes.

        with ringattn.report_progress(every_s=30):   # prints "forward: ring step 2/4 (38%) ..."
            out = ringattn.ring_attention(q, k, v, causal=True)
    """
    token = _PROGRESS.set((callback, every_s))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


Observers = tuple["RingTrace | None", "tuple[Callable[[RingProgress], None], float] | None"]


def current_observers() -> Observers:
    """The trace and progress reporter active in this context, to hand to the backward pass:
    autograd may run it on another thread (one per CUDA device), which does not see them."""
    return _ACTIVE.get(), _PROGRESS.get()


@contextlib.contextmanager
def observed_by(observers: Observers) -> Iterator[None]:
    """Run the block with ``observers`` wherever this context has none of its own."""
    trace, progress = observers
    tokens = [
        (var, var.set(value))
        for var, value in ((_ACTIVE, trace), (_PROGRESS, progress))
        if var.get() is None and value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class StepTimer:
    """Per-step compute time, waiting time and bytes of one ring pass, when a trace is active,
    and progress reports, when asked for. A ring step is made of several sub-block steps,
    possibly interleaved with other steps' sub-blocks: every measurement names its step."""

    def __init__(self, phase: str, device: torch.device, world_size: int, steps: int, units: int):
        self.trace = current_trace()
        self.world_size = world_size
        self.phase = phase
        self.sync = device.type == "cuda"
        self.records = [StepRecord(phase, s, 0.0, 0.0, 0) for s in range(steps)]
        self.units, self.done = units, 0
        self.progress = _PROGRESS.get()
        self.start = self.last_report = time.perf_counter()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def _timed(self, step: int, field: str) -> Iterator[None]:
        if self.trace is None:
            yield
            return
        start = self._now()
        yield
        record = self.records[step]
        setattr(record, field, getattr(record, field) + self._now() - start)

    def computing(self, step: int) -> contextlib.AbstractContextManager[None]:
        """Time the block as compute of ring step ``step``."""
        return self._timed(step, "compute_s")

    def waiting(self, step: int) -> contextlib.AbstractContextManager[None]:
        """Time the block as waiting on communication in ring step ``step``."""
        return self._timed(step, "wait_s")

    def sent(self, step: int, nbytes: int) -> None:
        self.records[step].bytes_sent += nbytes

    def unit_done(self, step: int) -> None:
        """A sub-block step of ring step ``step`` finished: report progress if it is time."""
        self.done += 1
        if self.progress is None:
            return
        callback, every_s = self.progress
        now = time.perf_counter()
        if now - self.last_report >= every_s or self.done == self.units:
            self.last_report = now
            callback(
                RingProgress(
                    self.phase, self.done, self.units, step, self.world_size, now - self.start
                )
            )

    def finish(self) -> None:
        if self.trace is not None:
            self.trace.steps.extend(self.records)
