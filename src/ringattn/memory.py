"""Peak memory of a block of code, per process.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) above the allocation at
entry. CPU: the process's resident-set high-water mark (``VmHWM``) above the resident set at entry;
Linux lets a process reset its high-water mark (``/proc/self/clear_refs``), so the figure is the
peak of this block alone. Elsewhere the lifetime peak (``ru_maxrss``) is used, which can only
over-estimate.
"""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import torch

MMAP_THRESHOLD = "65536"
"""``MALLOC_MMAP_THRESHOLD_`` for measured processes: glibc then maps every buffer above 64 KiB
on its own and unmaps it when freed, so the resident set tracks live tensors instead of what
the allocator keeps for reuse (first touches cost a little time: page faults)."""

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (peak above entry) and
    ``peak.method`` (how it was measured)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "CUDA allocator peak above entry"
            return self
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "RSS high-water mark above entry (VmHWM reset at entry)"
        except OSError:
            self.method = "lifetime max RSS above RSS at entry (may over-estimate)"
        self._base = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kib("VmHWM")
            peak = (
                hwm * 1024
                if hwm is not None
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
        self.bytes = max(0, peak - self._base)


def steady_rss_for_children() -> None:
    """Make processes started from now on return freed buffers at once (see
    :data:`MMAP_THRESHOLD`), unless the user set ``MALLOC_MMAP_THRESHOLD_`` already. glibc reads
    it at start-up, so it affects child processes (the ranks), not this one."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
