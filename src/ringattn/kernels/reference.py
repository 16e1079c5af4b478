"""Reference kernel: plain matmul + softmax in float32 (float64 for float64 inputs).

Readable and device-agnostic; used by tests and as the fallback when no fused kernel fits.
Memory is O(seq_q * seq_k) per head, so keep blocks small.
"""

from __future__ import annotations

import torch

from .base import AttentionKernel


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def _fold_heads(grad: torch.Tensor, heads_kv: int) -> torch.Tensor:
    b, s, h, d = grad.shape
    return grad.reshape(b, s, heads_kv, h // heads_kv, d).sum(3)


def _scores(q, k, causal, scale, compute_dtype):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute_dtype), k.to(compute_dtype)) * scale
    if causal:
        hidden = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


class ReferenceKernel(AttentionKernel):
    name = "reference"

    @staticmethod
    def _compute_dtype(q: torch.Tensor) -> torch.dtype:
        return torch.float64 if q.dtype == torch.float64 else torch.float32

    def forward(self, q, k, v, *, causal, scale):
        dtype = self._compute_dtype(q)
        heads = q.shape[2]
        k, v = _expand_heads(k, heads), _expand_heads(v, heads)
        scores = _scores(q, k, causal, scale, dtype)
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(dtype))
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        dtype = self._compute_dtype(q)
        heads, heads_kv = q.shape[2], k.shape[2]
        k_e, v_e = _expand_heads(k, heads).to(dtype), _expand_heads(v, heads).to(dtype)
        dout, out = dout.to(dtype), out.to(dtype)
        probs = torch.exp(_scores(q, k_e, causal, scale, dtype) - lse.to(dtype).unsqueeze(-1))
        delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # (b, h, q, 1)
        dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
        dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout, v_e) - delta)
        dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_e) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.to(dtype)) * scale
        return dq, _fold_heads(dk, heads_kv), _fold_heads(dv, heads_kv)
