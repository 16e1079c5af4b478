"""The one interface every local attention kernel implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


class AttentionKernel(ABC):
    """Attention of a block of queries against a block of keys, with its log-sum-exp.

    Shapes: ``q`` is ``(batch, seq_q, heads_q, head_dim)``; ``k`` and ``v`` are
    ``(batch, seq_k, heads_kv, head_dim)`` with ``heads_q % heads_kv == 0`` (query head ``h`` uses
    key/value head ``h // (heads_q // heads_kv)``). Inputs may be strided views. ``causal`` is only
    ever asked of square blocks and means the top-left mask (row ``i`` sees keys ``j <= i``).
    Outputs must be freshly allocated and not overlap each other or the inputs: the engine
    accumulates into them in place.
    """

    name: str = "abstract"
    supports_mask: bool = False
    """Accepts ``mask``: bool ``(batch or 1, heads or 1, seq_q, seq_k)``, True = visible."""
    supports_score_mod: bool = False
    """Accepts ``score_fn``: ``scores (batch, heads, seq_q, seq_k) -> modified scores``."""

    def unsupported_reason(self, q: torch.Tensor) -> str | None:
        """Why this kernel cannot run ``q``'s device/dtype/shape, or ``None`` if it can."""
        return None

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
        """Return ``out`` ``(batch, seq_q, heads_q, head_dim)`` in ``q.dtype`` and ``lse``
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
        ``dq`` shaped like ``q`` and ``dk``, ``dv`` shaped like ``k`` (any floating dtype).
        ``lse`` is ``+inf`` for rows that saw no key at all, so that their ``P`` is 0.
        """


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean visibility mask as the additive float mask fused kernels take (0 or -inf)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )
