"""CUDA kernels: PyTorch's fused flash and memory-efficient attention ops.

Both are called per square or full tile only (see :mod:`ringattn.masks`), so the kernels'
different conventions for causal masks on non-square blocks never matter. Tiles that need a dense
mask or a ``score_mod`` go to the reference kernel. Grouped KV heads are
repeated for the call and their gradients summed back; only ``heads_kv`` heads ever travel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionKernel
from .reference import _expand_heads, _fold_heads

_LSE_ALIGN = 32  # the memory-efficient kernel pads log-sum-exp rows to a multiple of this


class _CudaKernel(AttentionKernel):
    """Shared checks; subclasses keep the auxiliary tensors their backward op expects
    (random-state placeholders, unused with dropout 0) from the last forward call."""

    dtypes: tuple[torch.dtype, ...] = ()

    def __init__(self) -> None:
        self._aux: tuple | None = None

    def unsupported_reason(self, q: torch.Tensor) -> str | None:
        if q.device.type != "cuda":
            return f"runs on CUDA tensors only, got {q.device}"
        if q.dtype not in self.dtypes:
            return f"does not support dtype {q.dtype}"
        return None

    @staticmethod
    def _bshd_grads(dq, dk, dv, heads_kv):
        """Kernel gradients ``(b, h, s, d)`` back to ``(b, s, h, d)``, KV heads summed."""
        return (
            dq.transpose(1, 2),
            _fold_heads(dk.transpose(1, 2), heads_kv),
            _fold_heads(dv.transpose(1, 2), heads_kv),
        )

    @staticmethod
    def _bhsd(q, k, v):
        heads = q.shape[2]
        return (
            q.transpose(1, 2),
            _expand_heads(k, heads).transpose(1, 2),
            _expand_heads(v, heads).transpose(1, 2),
        )


class CudaFlashKernel(_CudaKernel):
    name = "cuda_flash"
    dtypes = (torch.float16, torch.bfloat16)

    def unsupported_reason(self, q):
        reason = super().unsupported_reason(q)
        if reason is None and (q.shape[-1] > 256 or q.shape[-1] % 8):
            reason = f"needs head_dim <= 256 and a multiple of 8, got {q.shape[-1]}"
        return reason

    def forward(self, q, k, v, *, causal, scale, mask=None, score_fn=None):
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(
                *self._bhsd(q, k, v), 0.0, causal, False, scale=scale
            )
        )
        self._aux = (cum_q, cum_k, seed, offset)
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, score_fn=None):
        if self._aux is None:
            self.forward(q[:, :1], k[:, :1], v[:, :1], causal=False, scale=scale)
        cum_q, cum_k, seed, offset = self._aux
        qt, kt, vt = self._bhsd(q, k, v)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.transpose(1, 2),
            qt,
            kt,
            vt,
            out.transpose(1, 2),
            lse.contiguous(),
            cum_q,
            cum_k,
            q.shape[1],
            k.shape[1],
            0.0,
            causal,
            seed,
            offset,
            scale=scale,
        )
        return self._bshd_grads(dq, dk, dv, k.shape[2])


class CudaEfficientKernel(_CudaKernel):
    name = "cuda_efficient"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def forward(self, q, k, v, *, causal, scale, mask=None, score_fn=None):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            *self._bhsd(q, k, v), None, True, 0.0, causal, scale=scale
        )
        self._aux = (seed, offset)
        return out.transpose(1, 2), lse[:, :, : q.shape[1]]

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, score_fn=None):
        if self._aux is None:
            self.forward(q[:, :1], k[:, :1], v[:, :1], causal=False, scale=scale)
        seed, offset = self._aux
        pad = -lse.shape[-1] % _LSE_ALIGN
        lse_padded = F.pad(lse, (0, pad)).contiguous()
        qt, kt, vt = self._bhsd(q, k, v)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.transpose(1, 2),
            qt,
            kt,
            vt,
            None,
            out.transpose(1, 2),
            lse_padded,
            seed,
            offset,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
        return self._bshd_grads(dq, dk, dv, k.shape[2])
