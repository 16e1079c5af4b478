"""Peak memory of a block of code, per process: the high-water mark of live tensor storage.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) above the allocation at
entry. CPU: the same quantity, counted by a hook that sees every storage an operator allocates
(a ``TorchDispatchMode``) and every storage's release (a finalizer on its Python object, which
PyTorch keeps exactly as long as the storage): bytes of tensor storage allocated inside the
block and alive at once, at most. Like the CUDA figure it excludes what an allocator keeps cached
for reuse, the interpreter, and scratch buffers a fused kernel allocates internally (the CPU
flash kernel's are a few per-thread tiles). It does not depend on timing or on the order of
earlier allocations, so it is exact to the byte on any machine — unlike the resident set, which
glibc inflates with freed buffers it keeps for reuse.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_METHODS = {
    "cuda": "CUDA allocator peak above entry",
    "cpu": "high-water mark of tensor storage allocated in the run (dispatch hook)",
}


def measurement_method(device: torch.device | str = "cpu") -> str:
    """How :class:`PeakMemory` measures on ``device``, in words (for reports)."""
    return _METHODS["cuda" if torch.device(device).type == "cuda" else "cpu"]


class _StorageHighWater(TorchDispatchMode):
    """Counts the storages that operators allocate while active, and their releases."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._lock = threading.Lock()
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
            with self._lock:
                self._finalizers[key] = weakref.finalize(storage, self._released, key, nbytes)
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
