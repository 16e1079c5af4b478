"""Ready-made FlexAttention-style score and mask modifications, usable in ring mode.

Each returns a function with FlexAttention's signature; the ring calls it with broadcastable
index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``, ``q_idx (1,1,Q,1)``, ``kv_idx (1,1,1,K)`` holding
*global* positions.
"""

from __future__ import annotations

import torch

from .masks import MaskMod, ScoreMod


def softcap(value: float) -> ScoreMod:
    """Tanh soft-capping of scores (Gemma 2, Grok): ``value * tanh(score / value)``."""
    if value <= 0:
        raise ValueError(f"softcap value must be positive, got {value}")

    def score_mod(score, b, h, q_idx, kv_idx):
        return value * torch.tanh(score / value)

    return score_mod


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)`` with one slope per query head."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes.to(score.device, score.dtype)[h] * (kv_idx - q_idx)

    return score_mod


def alibi_slopes(heads: int) -> torch.Tensor:
    """The geometric ALiBi slopes of the paper for ``heads`` heads (a power of two or not)."""
    closest = 2 ** int(torch.log2(torch.tensor(float(heads))).floor())
    base = torch.tensor(2.0 ** (-8.0 / closest))
    slopes = base ** torch.arange(1, closest + 1)
    if closest < heads:
        extra = torch.tensor(2.0 ** (-4.0 / closest)) ** torch.arange(1, 2 * (heads - closest), 2)
        slopes = torch.cat([slopes, extra])
    return slopes


def prefix_lm(prefix_len: int) -> MaskMod:
    """Prefix-LM: the first ``prefix_len`` tokens see each other bidirectionally; the rest is
    causal. Use with ``causal=False``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prefix_len)

    return mask_mod
