"""The one interface every local attention kernel implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AttentionKernel(ABC):
    """Attention of a block of queries against a block of keys, with its log-sum-exp.

    Shapes: ``q`` is ``(batch, seq_q, heads_q, head_dim)``; ``k`` and ``v`` are
    ``(batch, seq_k, heads_kv, head_dim)`` with ``heads_q % heads_kv == 0`` (query head ``h`` uses
    key/value head ``h // (heads_q // heads_kv)``). Inputs may be strided views. ``causal`` is only
    ever asked of square blocks and means the top-left mask (row ``i`` sees keys ``j <= i``).
    """

    name: str = "abstract"

    def unsupported_reason(self, q: torch.Tensor) -> str | None:
        """Why this kernel cannot run ``q``'s device/dtype/shape, or ``None`` if it can."""
        return None

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``out`` ``(batch, seq_q, heads_q, head_dim)`` in ``q.dtype`` and ``lse``
        ``(batch, heads_q, seq_q)`` in float32 — float64 for float64 inputs — (natural log of
        the softmax denominator)."""

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of this block given the *final* ``out`` and ``lse`` of the rows.

        With ``P = exp(S - lse)`` and ``delta = rowsum(dout * out)``: ``dv = P^T dout``,
        ``dS = P * (dout v^T - delta)``, ``dq = scale dS k``, ``dk = scale dS^T q``. Returns
        ``dq`` shaped like ``q`` and ``dk``, ``dv`` shaped like ``k`` (any floating dtype).
        """
