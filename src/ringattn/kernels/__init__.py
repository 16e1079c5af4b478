"""Local attention kernels behind one interface, and the automatic choice between them."""

from __future__ import annotations

import torch

from .base import AttentionKernel
from .cpu_flash import CpuFlashKernel
from .cuda import CudaCudnnKernel, CudaEfficientKernel, CudaFlashKernel
from .reference import ReferenceKernel

KERNELS: dict[str, AttentionKernel] = {
    kernel.name: kernel
    for kernel in (
        CpuFlashKernel(),
        CudaFlashKernel(),
        CudaEfficientKernel(),
        CudaCudnnKernel(),
        ReferenceKernel(),
    )
}
_PREFERENCE = ("cuda_flash", "cuda_efficient", "cpu_flash", "reference")


def select_kernel(kernel: str | AttentionKernel, q: torch.Tensor) -> AttentionKernel:
    """Resolve ``kernel`` ("auto", a name in :data:`KERNELS`, or an instance) for input ``q``.

    "auto" takes the first of cuda_flash, cuda_efficient, cpu_flash, reference that supports
    ``q``'s device, dtype and head_dim (``cuda_cudnn`` is only used when named).
    """
    if isinstance(kernel, AttentionKernel):
        return kernel
    if kernel == "auto":
        return next(KERNELS[n] for n in _PREFERENCE if KERNELS[n].unsupported_reason(q) is None)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose 'auto' or one of {sorted(KERNELS)}")
    chosen = KERNELS[kernel]
    reason = chosen.unsupported_reason(q)
    if reason:
        raise ValueError(f"kernel {kernel!r} {reason}; use kernel='auto'")
    return chosen


def masked_kernel_for(kernel: AttentionKernel, needs_score_mod: bool) -> AttentionKernel:
    """``kernel`` if it takes dense masks (and ``score_mod`` when needed), else the reference."""
    if kernel.supports_mask and (kernel.supports_score_mod or not needs_score_mod):
        return kernel
    return KERNELS["reference"]


__all__ = ["KERNELS", "AttentionKernel", "masked_kernel_for", "select_kernel"]
