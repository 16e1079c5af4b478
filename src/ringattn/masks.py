"""Which parts of a (local queries x arriving keys) block must be computed, and how.

For two segments of equal stride (see :mod:`ringattn.layout`) with starts ``qs`` and ``ks``, the
causal condition ``pos_q >= pos_k`` reads ``qs + stride*i >= ks + stride*j``, i.e.

    j <= i + shift,   shift = floor((qs - ks) / stride)

for local row ``i`` and local column ``j``. A block with such a shift splits into at most three
tiles that every kernel runs exactly: a fully visible tile, a square tile with the ordinary
(top-left) causal mask, and the rows that see every key. Rows with ``i + shift < 0`` see nothing and
are left out, so no kernel is ever handed a fully masked row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .layout import LAYOUTS, Segment


@dataclass(frozen=True)
class Tile:
    """Rows ``q_start:q_end`` against columns ``k_start:k_end`` of the local block.

    ``causal`` tiles are square and use the top-left causal mask (row ``i`` sees column ``j <= i``).
    """

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool = False

    @property
    def work(self) -> int:
        """Number of (query, key) pairs scored."""
        rows = self.q_end - self.q_start
        return rows * (rows + 1) // 2 if self.causal else rows * (self.k_end - self.k_start)


def causal_shift(q_seg: Segment, k_seg: Segment) -> int:
    """Shift such that local row ``i`` of ``q_seg`` sees local column ``j`` iff
    ``j <= i + shift``."""
    if q_seg.stride != k_seg.stride:
        raise NotImplementedError("causal masking between segments of different strides")
    return (q_seg.start - k_seg.start) // q_seg.stride


def split_shifted_causal(len_q: int, len_k: int, shift: int) -> list[Tile]:
    """Tiles covering the mask ``j <= i + shift`` on a ``len_q x len_k`` block."""
    first_row = min(len_q, max(0, -shift))  # rows before it see no key
    full_from = max(first_row, min(len_q, len_k - shift - 1))  # rows from here see every key
    tiles = []
    if full_from > first_row:
        diag_col = first_row + shift
        if diag_col > 0:
            tiles.append(Tile(first_row, full_from, 0, diag_col))
        tiles.append(Tile(first_row, full_from, diag_col, full_from + shift, causal=True))
    if len_q > full_from and len_k > 0:
        tiles.append(Tile(full_from, len_q, 0, len_k))
    return tiles


def _coalesce(tiles: list[Tile]) -> list[Tile]:
    """Join fully visible tiles that share rows (or columns) and touch, so kernels run bigger."""
    causal = [t for t in tiles if t.causal]
    full = sorted((t for t in tiles if not t.causal), key=lambda t: (t.q_start, t.k_start))
    merged: list[Tile] = []
    for tile in full:
        last = merged[-1] if merged else None
        if (
            last
            and (last.q_start, last.q_end) == (tile.q_start, tile.q_end)
            and last.k_end == tile.k_start
        ):
            merged[-1] = Tile(last.q_start, last.q_end, last.k_start, tile.k_end)
        else:
            merged.append(tile)
    merged.sort(key=lambda t: (t.k_start, t.k_end, t.q_start))
    stacked: list[Tile] = []
    for tile in merged:
        last = stacked[-1] if stacked else None
        if (
            last
            and (last.k_start, last.k_end) == (tile.k_start, tile.k_end)
            and last.q_end == tile.q_start
        ):
            stacked[-1] = Tile(last.q_start, tile.q_end, last.k_start, last.k_end)
        else:
            stacked.append(tile)
    return causal + stacked


def plan_tiles(
    q_segments: tuple[Segment, ...], k_segments: tuple[Segment, ...], causal: bool
) -> tuple[Tile, ...]:
    """Tiles (in local row/column indices) to compute for queries ``q_segments`` against keys
    ``k_segments``. Non-causal blocks are a single tile."""
    len_q = sum(s.length for s in q_segments)
    len_k = sum(s.length for s in k_segments)
    if not causal:
        return (Tile(0, len_q, 0, len_k),) if len_q and len_k else ()
    tiles = []
    q_offset = 0
    for q_seg in q_segments:
        k_offset = 0
        for k_seg in k_segments:
            for t in split_shifted_causal(q_seg.length, k_seg.length, causal_shift(q_seg, k_seg)):
                tiles.append(
                    Tile(
                        t.q_start + q_offset,
                        t.q_end + q_offset,
                        t.k_start + k_offset,
                        t.k_end + k_offset,
                        t.causal,
                    )
                )
            k_offset += k_seg.length
        q_offset += q_seg.length
    return tuple(_coalesce(tiles))


@functools.lru_cache(maxsize=4096)
def ring_tiles(
    layout_name: str, world_size: int, q_rank: int, k_rank: int, seq_local: int, causal: bool
) -> tuple[Tile, ...]:
    """Tiles for rank ``q_rank``'s queries against rank ``k_rank``'s keys under a layout."""
    layout = LAYOUTS[layout_name]
    return plan_tiles(
        layout.segments(q_rank, world_size, seq_local),
        layout.segments(k_rank, world_size, seq_local),
        causal,
    )


def rank_work(layout_name: str, world_size: int, seq_local: int, causal: bool) -> list[int]:
    """Scored (query, key) pairs per rank over a whole ring pass — the load each rank carries."""
    return [
        sum(
            t.work
            for k_rank in range(world_size)
            for t in ring_tiles(layout_name, world_size, rank, k_rank, seq_local, causal)
        )
        for rank in range(world_size)
    ]
