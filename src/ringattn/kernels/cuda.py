"""CUDA kernels: PyTorch's fused flash, memory-efficient and cuDNN attention ops.

All three are called per square or full tile only (see :mod:`ringattn.masks`), so the kernels'
different conventions for causal masks on non-square blocks never matter. Tiles that need a dense
mask or a ``score_mod`` go to the reference kernel. Where an op does not group query heads itself,
KV heads are repeated for the call and their gradients summed back; only ``heads_kv`` heads ever
travel between ranks.

The aten ops take ``(batch, heads, seq, head_dim)``; the engine's ``(batch, seq, heads, head_dim)``
tensors are passed as transposed views (the ops only need the last dimension contiguous). The
backward ops also take the forward's random-number state, which is unused with dropout 0: each
kernel keeps the placeholders of its last forward call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionKernel
from .reference import _expand_heads, _fold_heads

# The memory-efficient kernel pads log-sum-exp rows to a multiple of 32 on CUDA; ROCm's returns
# them unpadded and its backward expects the same.
_LSE_ALIGN = 1 if torch.version.hip else 32
_HALF = (torch.float16, torch.bfloat16)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhsd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native_gqa: bool = False):
    """``(b, s, h, d)`` views as the ops' ``(b, h, s, d)``; KV heads repeated to ``heads_q``
    unless the op groups query heads itself (``native_gqa``)."""
    heads = k.shape[2] if native_gqa else q.shape[2]
    return tuple(
        _last_dim_contiguous(t).transpose(1, 2)
        for t in (q, _expand_heads(k, heads), _expand_heads(v, heads))
    )


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(b, s, h, d)`` with rows laid out as in a contiguous tensor (row stride ``h * d``,
    head stride ``d``), which the fused backward ops assume of ``out`` and ``dout``."""
    _, _, heads, dim = t.shape
    if t.stride(3) == 1 and t.stride(2) == dim and t.stride(1) == heads * dim:
        return t
    return t.contiguous()


def _bshd_grads(dq, dk, dv, heads_kv: int):
    """Op gradients ``(b, h, s, d)`` back to ``(b, s, h, d)``, repeated KV heads summed."""
    return (
        dq.transpose(1, 2),
        _fold_heads(dk.transpose(1, 2), heads_kv),
        _fold_heads(dv.transpose(1, 2), heads_kv),
    )


class _CudaKernel(AttentionKernel):
    """Device, dtype, head_dim and architecture checks shared by the CUDA kernels."""

    dtypes: tuple[torch.dtype, ...] = ()
    min_capability: tuple[int, int] = (0, 0)
    max_head_dim: int | None = None

    def __init__(self) -> None:
        self._rng_state: tuple | None = None

    def head_dim_multiple(self, dtype: torch.dtype) -> int:
        return 8

    def unsupported_reason(self, q: torch.Tensor) -> str | None:
        if q.device.type != "cuda":
            return f"runs on CUDA tensors only, got {q.device}"
        if q.dtype not in self.dtypes:
            return f"does not support dtype {q.dtype} (supported: {self.dtypes})"
        dim, multiple = q.shape[-1], self.head_dim_multiple(q.dtype)
        if dim % multiple or (self.max_head_dim is not None and dim > self.max_head_dim):
            limit = f" and at most {self.max_head_dim}" if self.max_head_dim else ""
            return f"needs head_dim a multiple of {multiple}{limit}, got {dim}"
        capability = torch.cuda.get_device_capability(q.device)
        needed = (8, 0) if q.dtype == torch.bfloat16 else self.min_capability
        if capability < needed:
            return f"needs compute capability {needed} or newer for {q.dtype}, got {capability}"
        return self.arch_reason(dim, capability)

    def arch_reason(self, head_dim: int, capability: tuple[int, int]) -> str | None:
        """A limit of this op on this architecture, or ``None``."""
        return None

    def _ensure_rng_state(self, q, k, v, scale: float) -> tuple:
        """The random-state placeholders of a forward call (one is made on a 2-token slice when
        this kernel never ran forward, e.g. after a checkpoint reload)."""
        if self._rng_state is None:
            self.forward(q[:, :2], k[:, :2], v[:, :2], causal=False, scale=scale)
        assert self._rng_state is not None
        return self._rng_state


class CudaFlashKernel(_CudaKernel):
    """``aten._scaled_dot_product_flash_attention`` (FlashAttention-2), fp16/bf16, sm80+. It maps
    query head ``h`` to KV head ``h // (heads_q // heads_kv)`` itself, so KV heads are not
    repeated."""

    name = "cuda_flash"
    dtypes = _HALF
    min_capability = (8, 0)
    max_head_dim = 256

    def arch_reason(self, head_dim, capability):
        # PyTorch refuses the flash backward for head_dim > 192 on these consumer architectures.
        if head_dim > 192 and capability in ((8, 6), (8, 9), (12, 0), (12, 1)):
            return f"has no backward for head_dim > 192 on compute capability {capability}"
        return None

    def forward(self, q, k, v, *, causal, scale, mask=None, score_fn=None):
        out, lse, cum_q, cum_k, _, _, rng_state, unused, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(
                *_bhsd(q, k, v, native_gqa=True), 0.0, causal, False, scale=scale
            )
        )
        self._rng_state = (cum_q, cum_k, rng_state, unused)
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, score_fn=None):
        cum_q, cum_k, rng_state, unused = self._ensure_rng_state(q, k, v, scale)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            _rows_contiguous(dout).transpose(1, 2),
            *_bhsd(q, k, v, native_gqa=True),
            _rows_contiguous(out).transpose(1, 2),
            lse.contiguous(),
            cum_q,
            cum_k,
            q.shape[1],
            k.shape[1],
            0.0,
            causal,
            rng_state,
            unused,
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class CudaEfficientKernel(_CudaKernel):
    """``aten._scaled_dot_product_efficient_attention`` (memory-efficient, xFormers-style):
    fp32/fp16/bf16, any head_dim that meets the GEMM alignment."""

    name = "cuda_efficient"
    dtypes = (torch.float32, *_HALF)

    def head_dim_multiple(self, dtype):
        return 4 if dtype == torch.float32 else 8

    def forward(self, q, k, v, *, causal, scale, mask=None, score_fn=None):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            *_bhsd(q, k, v), None, True, 0.0, causal, scale=scale
        )
        self._rng_state = (seed, offset)
        return out.transpose(1, 2), lse[:, :, : q.shape[1]]

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, score_fn=None):
        seed, offset = self._ensure_rng_state(q, k, v, scale)
        lse_padded = F.pad(lse, (0, -lse.shape[-1] % _LSE_ALIGN)).contiguous()
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            _rows_contiguous(dout).transpose(1, 2),
            *_bhsd(q, k, v),
            None,
            _rows_contiguous(out).transpose(1, 2),
            lse_padded,
            seed,
            offset,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
        return _bshd_grads(dq, dk, dv, k.shape[2])


class CudaCudnnKernel(_CudaKernel):
    """``aten._scaled_dot_product_cudnn_attention`` (cuDNN 9 fused attention), fp16/bf16, sm80+.

    Not chosen by ``kernel="auto"``: pass ``kernel="cuda_cudnn"`` to use it.
    """

    name = "cuda_cudnn"
    deterministic = False  # PyTorch excludes cuDNN attention from deterministic mode
    dtypes = _HALF
    min_capability = (8, 0)
    max_head_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self._short_keys = CudaFlashKernel()  # cuDNN refuses a single key

    def unsupported_reason(self, q):
        if q.device.type == "cuda" and not torch.backends.cudnn.is_available():
            return "needs cuDNN, which this torch build does not have"
        return super().unsupported_reason(q)

    def forward(self, q, k, v, *, causal, scale, mask=None, score_fn=None):
        if k.shape[1] < 2:
            return self._short_keys.forward(q, k, v, causal=causal, scale=scale)
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_cudnn_attention(
                *_bhsd(q, k, v), None, True, 0.0, causal, False, scale=scale
            )
        )
        self._rng_state = (cum_q, cum_k, seed, offset)
        return out.transpose(1, 2), lse.reshape(lse.shape[:3])

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, score_fn=None):
        if k.shape[1] < 2:
            return self._short_keys.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
        cum_q, cum_k, seed, offset = self._ensure_rng_state(q, k, v, scale)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            _rows_contiguous(dout).transpose(1, 2),
            *_bhsd(q, k, v),
            _rows_contiguous(out).transpose(1, 2),
            lse.unsqueeze(-1).contiguous(),
            seed,
            offset,
            None,  # no attention bias
            cum_q,
            cum_k,
            q.shape[1],
            k.shape[1],
            0.0,
            causal,
            scale=scale,
        )
        return _bshd_grads(dq, dk, dv, k.shape[2])
