"""CPU kernel: PyTorch's fused flash attention for CPU.

Calls ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``.
"""

from __future__ import annotations

import torch

from .base import AttentionKernel, additive_mask

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class CpuFlashKernel(AttentionKernel):
    """Tiled fused attention on CPU; handles grouped KV heads natively."""

    name = "cpu_flash"
    supports_mask = True

    def unsupported_reason(self, q: torch.Tensor) -> str | None:
        if q.device.type != "cpu":
            return f"runs on CPU tensors only, got {q.device}"
        if q.dtype not in _DTYPES:
            return f"does not support dtype {q.dtype}"
        return None

    def forward(self, q, k, v, *, causal, scale, mask=None, score_fn=None):
        out, lse = _FORWARD(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            0.0,
            causal,
            attn_mask=additive_mask(mask, q.dtype),
            scale=scale,
        )
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, score_fn=None):
        dq, dk, dv = _BACKWARD(
            dout.transpose(1, 2),
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            out.transpose(1, 2),
            lse,
            0.0,
            causal,
            attn_mask=additive_mask(mask, q.dtype),
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
