"""Attention dropout that does not depend on the world size: a counter-based keep mask.

Whether the probability of query ``i`` on key ``j`` is kept is a pure function of
``(seed, batch index, query head, global query position i, global key position j)`` — a
32-bit integer hash, computed wherever the (query, key) pair is — never of the rank, the
layout, the sub-block or the order of the ring's steps. So the same seed drops the same
probabilities on any world size and layout, a single process with :func:`keep_mask` reproduces
them, and the backward pass regenerates the mask instead of storing it.

Dropout acts on the normalised probabilities, as flash-attn's ``dropout_p`` does:
``out_i = sum_j P_ij * keep_ij / (1 - p) * v_j`` with ``P`` the softmax over all keys (the
log-sum-exp is that of the undropped scores).

**RNG contract.** ``dropout_seed`` fixes the mask. Without it every call draws a seed from
torch's default CPU generator (one draw per call), which gives every rank the same seed when
every rank seeded it alike (``torch.manual_seed`` with one value on all ranks) and ran the same
draws before; a single process seeded alike and making the same calls then draws the same seeds
too. Ranks that draw different seeds still get a valid dropout, just not the single process's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2**27: every product of a 32-bit value stays below 2**63


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit values (held in int64) that spreads every input bit over all."""
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    return (x >> 16) ^ x


def _fold(state: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Mix a value in ``[0, 2**32)`` (int64) into a hash ``state``, both broadcast."""
    return _mix(state ^ value)


def keep_mask(
    seed: int,
    p: float,
    batch: torch.Tensor | int,
    heads: torch.Tensor | int,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
) -> torch.Tensor:
    """Which attention probabilities dropout keeps: bool ``(batch, heads, len_q, len_k)``.

    Args:
        seed: the dropout seed (any int; only its lowest 62 bits count).
        p: the probability of dropping, in ``[0, 1)``.
        batch, heads: indices ``(B, 1, 1, 1)`` and ``(1, H, 1, 1)`` (or counts: ``range``).
        q_positions, k_positions: global token positions, 1-D, below ``2**32``.
    """
    device = q_positions.device
    if isinstance(batch, int):
        batch = torch.arange(batch, device=device)[:, None, None, None]
    if isinstance(heads, int):
        heads = torch.arange(heads, device=device)[None, :, None, None]
    seed &= 2**62 - 1
    state = torch.tensor(0x2545F491, device=device)
    state = _fold(_fold(state, torch.tensor(seed & _MASK32)), torch.tensor(seed >> 32))
    state = _fold(_fold(state.to(device), batch), heads)
    rows = _fold(state, q_positions.to(device, torch.long)[None, None, :, None])
    columns = _mix(k_positions.to(device, torch.long) ^ 0x6A09E667)[None, None, None, :]
    # the only passes over the whole tile: two multiply rounds of two mixed halves (the
    # comparison reads the high bits, which the last multiply makes depend on every bit)
    pairs = rows ^ columns
    pairs.mul_(_MULTIPLIER).bitwise_and_(_MASK32)
    pairs ^= pairs >> 16
    pairs.mul_(_MULTIPLIER).bitwise_and_(_MASK32)
    return pairs >= int(p * 2**32)


class TileDropout(NamedTuple):
    """Dropout of one kernel call: ``keep`` bool ``(batch, heads_q, seq_q, seq_k)`` and the drop
    probability ``p`` (kept probabilities are scaled by ``1 / (1 - p)``)."""

    keep: torch.Tensor
    p: float


@dataclass(frozen=True)
class Dropout:
    """Attention dropout of one call: drop probability ``p`` and the ``seed`` of its mask."""

    p: float
    seed: int

    def tile(self, batch: int, heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """The :class:`TileDropout` of queries at ``q_pos`` against keys at ``k_pos``."""
        return TileDropout(keep_mask(self.seed, self.p, batch, heads, q_pos, k_pos), self.p)


def draw_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator (see the RNG contract)."""
    return int(torch.randint(0, 2**62, (1,)).item())
