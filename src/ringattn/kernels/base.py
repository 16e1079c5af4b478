"""The one interface every local attention kernel implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
_MAX_SCORES_CHUNK = 1 << 24
"""Scores (elements) :meth:`AttentionKernel.max_scores` materialises at once without a score_fn."""


class AttentionKernel(ABC):
    """Attention of a block of queries against a block of keys, with its log-sum-exp.

    Shapes: ``q`` and ``k`` are ``(batch, seq_q | seq_k, heads_q | heads_kv, head_dim)``,
    ``v`` is ``(batch, seq_k, heads_kv, head_dim_v)`` (``head_dim_v`` may differ only where
    :attr:`equal_head_dims` is false) and ``out`` has ``v``'s head dim, with
    ``heads_q % heads_kv == 0`` (query head ``h`` uses key/value head
    ``h // (heads_q // heads_kv)``). Inputs may be strided views. ``causal`` is only ever asked
    of square blocks and means the top-left mask (row ``i`` sees keys ``j <= i``).
    Outputs must be freshly allocated and not overlap each other or the inputs: the engine
    accumulates into them in place.
    """

    name: str = "abstract"
    equal_head_dims: bool = True
    """Needs one head_dim for q, k and v; :func:`ringattn.kernels.select_kernel` wraps such a
    kernel in :class:`PaddedHeadDims` when the value head_dim differs (MLA)."""
    supports_mask: bool = False
    """Accepts ``mask``: bool ``(batch or 1, heads or 1, seq_q, seq_k)``, True = visible."""
    supports_score_mod: bool = False
    """Accepts ``score_fn``: ``scores (batch, heads, seq_q, seq_k) -> modified scores``."""
    supports_dropout: bool = False
    """Accepts a keyword ``dropout`` (forward and backward): a
    :class:`ringattn.dropout.TileDropout` applied to the probabilities."""
    deterministic: bool = True
    """Gives bitwise-identical results when called again on the same inputs (forward and
    backward)."""

    def unsupported_reason(self, q: torch.Tensor) -> str | None:
        """Why this kernel cannot run ``q``'s device/dtype/shape, or ``None`` if it can."""
        return None

    def max_scores(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
        score_fn: ScoreFn | None = None,
    ) -> torch.Tensor:
        """The largest score (scaled, after ``score_fn``) of each query head over the visible
        (query, key) pairs of this call, ``(heads_q,)`` in the accumulator dtype; ``-inf`` for
        a head that sees nothing. Computes ``q k^T`` once more, in slices of rows (the whole
        call with a ``score_fn``, whose index grids span all rows)."""
        with without_autocast(q):
            return self._max_scores(q, k, causal, scale, mask, score_fn)

    def _max_scores(self, q, k, causal, scale, mask, score_fn) -> torch.Tensor:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        batch, seq_q, heads, dim = q.shape
        heads_kv, seq_k = k.shape[2], k.shape[1]
        grouped = q.reshape(batch, seq_q, heads_kv, heads // heads_kv, dim).to(dtype)
        keys = k.to(dtype)
        rows = seq_q if score_fn else max(1, _MAX_SCORES_CHUNK // max(1, batch * heads * seq_k))
        peak = torch.full((heads,), float("-inf"), dtype=dtype, device=q.device)
        for start in range(0, seq_q, rows):
            stop = min(seq_q, start + rows)
            scores = torch.einsum("bqkgd,bskd->bkgqs", grouped[:, start:stop], keys)
            scores = scores.reshape(batch, heads, stop - start, seq_k) * scale
            if score_fn is not None:
                scores = score_fn(scores)
            visible = None if mask is None else mask[..., start:stop, :]
            if causal:
                i = torch.arange(start, stop, device=q.device)[:, None]
                tri = i >= torch.arange(seq_k, device=q.device)[None, :]
                visible = tri if visible is None else visible & tri
            if visible is not None:
                scores = scores.masked_fill(~visible, float("-inf"))
            peak = torch.maximum(peak, scores.amax(dim=(0, 2, 3)))
            del scores
        return peak

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
        score_fn: ScoreFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``out`` ``(batch, seq_q, heads_q, head_dim_v)`` in ``q.dtype`` and ``lse``
        ``(batch, heads_q, seq_q)`` in float32 — float64 for float64 inputs — (natural log of
        the softmax denominator). Rows that ``mask`` hides entirely must come back finite; their
        ``lse`` is ignored."""

    @abstractmethod
    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
        score_fn: ScoreFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of this block given the *final* ``out`` and ``lse`` of the rows.

        With ``P = exp(S - lse)`` and ``delta = rowsum(dout * out)``: ``dv = P^T dout``,
        ``dS = P * (dout v^T - delta)``, ``dq = scale dS k``, ``dk = scale dS^T q``. Returns
        ``dq``, ``dk``, ``dv`` shaped like ``q``, ``k``, ``v`` (any floating dtype).
        ``lse`` is ``+inf`` for rows that saw no key at all, so that their ``P`` is 0.
        """


def without_autocast(t: torch.Tensor) -> torch.autocast:
    """A context that keeps autocast off on ``t``'s device: our own fp32 math stays fp32."""
    return torch.autocast(t.device.type, enabled=False)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean visibility mask as the additive float mask fused kernels take (0 or -inf)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


class PaddedHeadDims(AttentionKernel):
    """``inner`` (a kernel that needs one head_dim) run on a value head_dim that differs from the
    query/key one, e.g. MLA's 192 for q/k and 128 for v: the narrower side is zero-padded per
    call. Zero value columns give zero output columns (cut off again); zero query/key columns
    leave every score unchanged, and their gradient columns are zero (cut off too), so results
    are exact. The padding costs a copy of the narrower tensors per call (tile-sized) and the
    compute of the wider head_dim."""

    equal_head_dims = False

    def __init__(self, inner: AttentionKernel):
        self.inner = inner
        self.name = inner.name
        self.supports_mask = inner.supports_mask
        self.supports_score_mod = inner.supports_score_mod

    def unsupported_reason(self, q: torch.Tensor) -> str | None:
        return self.inner.unsupported_reason(q)

    def forward(self, q, k, v, *, causal, scale, mask=None, score_fn=None):
        width = max(q.shape[-1], v.shape[-1])
        out, lse = self.inner.forward(
            _pad(q, width),
            _pad(k, width),
            _pad(v, width),
            causal=causal,
            scale=scale,
            mask=mask,
            score_fn=score_fn,
        )
        return out[..., : v.shape[-1]], lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, score_fn=None):
        width = max(q.shape[-1], v.shape[-1])
        padded = (_pad(t, width) for t in (dout, q, k, v, out))
        dq, dk, dv = self.inner.backward(
            *padded, lse, causal=causal, scale=scale, mask=mask, score_fn=score_fn
        )
        return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dv[..., : v.shape[-1]]


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with its last dim zero-padded to ``width`` (``t`` itself when already that wide)."""
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))
