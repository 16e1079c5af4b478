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
from collections.abc import Iterator
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

    def total(self, phase: str | None = None) -> dict[str, float]:
        """Summed compute seconds, wait seconds and bytes sent, optionally for one phase."""
        chosen = [s for s in self.steps if phase is None or s.phase == phase]
        return {
            "compute_s": sum(s.compute_s for s in chosen),
            "wait_s": sum(s.wait_s for s in chosen),
            "bytes_sent": float(sum(s.bytes_sent for s in chosen)),
        }

    def summary(self) -> str:
        lines = []
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


class StepTimer:
    """Times the compute and the waits of one ring step when a trace is active."""

    def __init__(self, phase: str, device: torch.device):
        self.trace = current_trace()
        self.phase = phase
        self.sync = device.type == "cuda"
        self.compute_s = self.wait_s = 0.0
        self._bytes_mark = self.trace.bytes_sent if self.trace else 0

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def _timed(self, field: str) -> Iterator[None]:
        if self.trace is None:
            yield
            return
        start = self._now()
        yield
        setattr(self, field, getattr(self, field) + self._now() - start)

    def computing(self) -> contextlib.AbstractContextManager[None]:
        """Time the block as compute of the current step."""
        return self._timed("compute_s")

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        """Time the block as waiting on communication in the current step."""
        return self._timed("wait_s")

    def finish_step(self, step: int) -> None:
        if self.trace is None:
            return
        sent = self.trace.bytes_sent - self._bytes_mark
        self.trace.steps.append(StepRecord(self.phase, step, self.compute_s, self.wait_s, sent))
        self.compute_s = self.wait_s = 0.0
        self._bytes_mark = self.trace.bytes_sent
