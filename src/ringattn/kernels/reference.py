"""Our own dense kernel: matmul + softmax per tile in float32 (float64 for float64 inputs).

It takes any mask, any ``score_mod`` (the gradient flows through the score modification by
autograd on the tile) and dropout, so it runs every tile that the fused kernels cannot. Memory is
``O(batch * heads * seq_q * seq_k)`` per call: the engine hands it tiles of ``tile_size``.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import torch

from ..dropout import TileDropout
from ..merge import accumulator_dtype
from .base import AttentionKernel, ScoreFn, without_autocast


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(b, s, heads_kv, d)`` -> ``(b, s, heads, d)``, each KV head repeated for its group."""
    return x if x.shape[2] == heads else x.repeat_interleave(heads // x.shape[2], dim=2)


def _fold_heads(grad: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """Gradients of repeated KV heads ``(b, s, heads, d)`` summed back to ``heads_kv``."""
    b, s, h, d = grad.shape
    return grad if h == heads_kv else grad.reshape(b, s, heads_kv, h // heads_kv, d).sum(3)


def _visible(q, k, causal, mask):
    """Boolean visibility ``(b|1, h|1, seq_q, seq_k)`` or ``None`` when everything is visible."""
    visible = mask
    if causal:
        tri = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        visible = tri if visible is None else visible & tri
    return visible


def _dropped(probs: torch.Tensor, dropout: TileDropout | None) -> torch.Tensor:
    """``probs`` ``(b, h, q, k)`` with dropout applied: kept entries scaled by ``1 / (1 - p)``.
    With ``out = dropped(P) v``, ``delta = rowsum(dout * out)`` still equals
    ``rowsum(P * dropped(dout v^T))``, so the backward keeps its usual form."""
    if dropout is None:
        return probs
    return probs * dropout.keep / (1.0 - dropout.p)


def _score_fn_vjp(score_fn: ScoreFn, raw: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` (w.r.t. ``score_fn(raw)``) taken back through ``score_fn`` by autograd.

    Inside the custom op of :mod:`ringattn.ops` the dispatcher excludes autograd on the
    calling thread (and ``torch.func`` transforms fail inside a compiled graph's dispatch
    modes), so there the derivative is taken on a short-lived thread of its own, whose
    dispatcher state is the default one (on the caller's CUDA stream)."""
    stream = torch.cuda.current_stream(raw.device) if raw.is_cuda else None
    found: list[torch.Tensor | None] = []

    def vjp() -> None:
        with torch.enable_grad(), torch.cuda.stream(stream) if stream else nullcontext():
            leaf = raw.detach().requires_grad_()
            modified = score_fn(leaf)
            if modified is leaf:  # an identity score_mod (e.g. FlexAttention's noop)
                found.append(grad)
            elif modified.grad_fn is None:  # autograd is off, or score_fn ignores the scores
                found.append(None)
            else:
                found.append(torch.autograd.grad(modified, leaf, grad)[0])

    vjp()
    if found[-1] is None:
        worker = threading.Thread(target=vjp, name="ringattn-score-mod-vjp")
        worker.start()
        worker.join()
    result = found[-1]
    return torch.zeros_like(raw) if result is None else result


class ReferenceKernel(AttentionKernel):
    name = "reference"
    equal_head_dims = False
    supports_mask = True
    supports_score_mod = True
    supports_dropout = True

    def _scores(self, q, k, scale, score_fn, visible):
        """Raw scaled scores, and the modified + masked scores used by the softmax."""
        dtype = accumulator_dtype(q.dtype)
        raw = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
        with torch.no_grad():
            scores = raw if score_fn is None else score_fn(raw)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        return raw, scores

    def forward(self, q, k, v, *, causal, scale, mask=None, score_fn=None, dropout=None):
        with without_autocast(q):
            return self._forward(q, k, v, causal, scale, mask, score_fn, dropout)

    def _forward(self, q, k, v, causal, scale, mask, score_fn, dropout):
        dtype = accumulator_dtype(q.dtype)
        k, v = _expand_heads(k, q.shape[2]), _expand_heads(v, q.shape[2])
        _, scores = self._scores(q, k, scale, score_fn, _visible(q, k, causal, mask))
        lse = torch.logsumexp(scores, dim=-1)
        finite_lse = lse.masked_fill(torch.isinf(lse), 0.0)
        probs = _dropped(torch.exp(scores - finite_lse.unsqueeze(-1)), dropout)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(dtype))
        return out.to(q.dtype), lse

    def backward(
        self, dout, q, k, v, out, lse, *, causal, scale, mask=None, score_fn=None, dropout=None
    ):
        with without_autocast(q):
            return self._backward(dout, q, k, v, out, lse, causal, scale, mask, score_fn, dropout)

    def _backward(self, dout, q, k, v, out, lse, causal, scale, mask, score_fn, dropout):
        dtype = accumulator_dtype(q.dtype)
        heads, heads_kv = q.shape[2], k.shape[2]
        k_e, v_e = _expand_heads(k, heads).to(dtype), _expand_heads(v, heads).to(dtype)
        q_c, dout, out = q.to(dtype), dout.to(dtype), out.to(dtype)
        raw, scores = self._scores(q_c, k_e, scale, score_fn, _visible(q, k_e, causal, mask))
        probs = torch.exp(scores - lse.to(dtype).unsqueeze(-1))
        delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # (b, h, q, 1)
        dv = torch.einsum("bhqk,bqhd->bkhd", _dropped(probs, dropout), dout)
        dprobs = _dropped(torch.einsum("bqhd,bkhd->bhqk", dout, v_e), dropout)
        dscores = probs * (dprobs - delta)
        if score_fn is not None:
            dscores = _score_fn_vjp(score_fn, raw, dscores)
        dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_e) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q_c) * scale
        return dq, _fold_heads(dk, heads_kv), _fold_heads(dv, heads_kv)
