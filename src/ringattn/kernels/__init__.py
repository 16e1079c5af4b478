"""Local attention kernels behind one interface, and the automatic choice between them."""

from __future__ import annotations

import torch

from .base import AttentionKernel, PaddedHeadDims
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


def select_kernel(
    kernel: str | AttentionKernel,
    q: torch.Tensor,
    value_dim: int | None = None,
    deterministic: bool = False,
) -> AttentionKernel:
    """Resolve ``kernel`` ("auto", a name in :data:`KERNELS`, or an instance) for input ``q``
    ``(batch, seq, heads, head_dim)`` and values of head dim ``value_dim`` (default: q's).

    "auto" takes the first of cuda_flash, cuda_efficient, cpu_flash, reference that supports
    ``q``'s device, dtype and the wider of the two head dims (``cuda_cudnn`` is only used when
    named). A kernel that needs one head_dim gets :class:`PaddedHeadDims` around it when the
    value head_dim differs. With ``deterministic`` only :attr:`AttentionKernel.deterministic`
    kernels qualify, and naming another raises.
    """
    value_dim = q.shape[-1] if value_dim is None else value_dim
    if isinstance(kernel, AttentionKernel):
        chosen = kernel
    else:
        widest = q if value_dim <= q.shape[-1] else q.new_empty((0, 0, 0, value_dim))
        if kernel == "auto":
            chosen = next(
                KERNELS[n]
                for n in _PREFERENCE
                if KERNELS[n].unsupported_reason(widest) is None
                and (KERNELS[n].deterministic or not deterministic)
            )
        elif kernel not in KERNELS:
            raise ValueError(
                f"unknown kernel {kernel!r}; choose 'auto' or one of {sorted(KERNELS)}"
            )
        else:
            chosen = KERNELS[kernel]
            reason = chosen.unsupported_reason(widest)
            if reason:
                raise ValueError(f"kernel {kernel!r} {reason}; use kernel='auto'")
    if deterministic and not chosen.deterministic:
        raise ValueError(
            f"kernel {chosen.name!r} is not deterministic; use kernel='auto' with "
            "deterministic=True (or deterministic=False)"
        )
    if value_dim != q.shape[-1] and chosen.equal_head_dims:
        return PaddedHeadDims(chosen)
    return chosen


def masked_kernel_for(
    kernel: AttentionKernel, needs_score_mod: bool, needs_dropout: bool = False
) -> AttentionKernel:
    """``kernel`` if it takes dense masks (and ``score_mod`` and dropout when needed), else the
    reference."""
    if (
        kernel.supports_mask
        and (kernel.supports_score_mod or not needs_score_mod)
        and (kernel.supports_dropout or not needs_dropout)
    ):
        return kernel
    return KERNELS["reference"]


__all__ = ["KERNELS", "AttentionKernel", "PaddedHeadDims", "masked_kernel_for", "select_kernel"]
