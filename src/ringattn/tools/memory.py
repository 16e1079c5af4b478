"""Peak memory of a block of code, per process.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) above what was allocated
at entry, which includes the workspaces kernels allocate. CPU: the high-water mark of the tensor
storage that operators allocate inside the block, counted by a hook that sees every storage an
operator returns (a ``TorchDispatchMode``) and every storage's release (a finalizer on its Python
object, which PyTorch keeps exactly as long as the storage). The CPU figure leaves out what an
allocator keeps cached for reuse, the interpreter, buffers allocated inside an operator's C++ code
(the CPU flash kernel's per-thread tiles, about 1.5 MB with one thread; gloo's), tensors made from
Python data (``torch.tensor``, ``from_numpy``), and storages that grow in place (``out=``,
``resize_``); and it counts a storage allocated in the block even after a tensor that existed
before the block is freed. The ring allocates its buffers through operators, so the figure is
its working set, the same on every run and machine; the resident set instead depends on the
order of earlier allocations (glibc keeps freed buffers for reuse).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2**20


def format_bytes(size: float) -> str:
    """Bytes as KiB, MiB or GiB with one decimal ('64.0 MiB')."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


_METHODS = {
    "cuda": "CUDA allocator peak above entry",
    "cpu": "high-water mark of tensor storage allocated by operators in the run (dispatch hook)",
}


def measurement_method(device: torch.device | str = "cpu") -> str:
    """How :class:`PeakMemory` measures on ``device``, in words (for reports)."""
    return _METHODS["cuda" if torch.device(device).type == "cuda" else "cpu"]


class _StorageHighWater(TorchDispatchMode):
    """Counts the storages that operators allocate while active, and their releases."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._lock = threading.RLock()  # a finalizer may run inside a locked region
        self._finalizers: dict[int, weakref.finalize] = {}

    def _released(self, key: int, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes
            self._finalizers.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._finalizers:
                continue  # a view or an in-place result: nothing new
            nbytes = storage.nbytes()
            finalizer = weakref.finalize(storage, self._released, key, nbytes)
            with self._lock:
                self._finalizers[key] = finalizer
                self.live += nbytes
                self.peak = max(self.peak, self.live)
        return out

    def stop(self) -> None:
        """Forget the storages still alive (their later release is not this block's)."""
        with self._lock:
            for finalizer in self._finalizers.values():
                finalizer.detach()
            self._finalizers.clear()


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (peak above entry) and
    ``peak.method`` (how it was measured)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes = 0
        self.method = measurement_method(self.device)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._hook = _StorageHighWater()
        self._hook.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._hook.__exit__(*exc)
        self._hook.stop()
        self.bytes = self._hook.peak
