"""Which parts of a (local queries x arriving keys) block must be computed, and how.

For two segments of equal stride (see :mod:`ringattn.layout`) with starts ``qs`` and ``ks``, the
causal condition ``pos_q >= pos_k`` reads ``qs + stride*i >= ks + stride*j``, i.e.

    j <= i + shift,   shift = floor((qs - ks) / stride)

for local row ``i`` and local column ``j``. A block with such a shift splits into at most three
tiles that every kernel runs exactly: a fully visible tile, a square tile with the ordinary
(top-left) causal mask, and the rows that see every key. Rows with ``i + shift < 0`` see nothing and
are left out, so no kernel is ever handed a fully masked row.

Other masks (sliding window, packed documents, padding, ``mask_mod``) are a :class:`MaskSpec`.
Its blocks are classified per (query tile, key tile) pair from the tiles' position ranges, block
document ids and validity: a fully hidden pair is skipped, a fully visible one runs the fast
kernel with no mask (or the causal split above when only causality cuts it), and a partial one is
a ``masked`` tile whose dense ``tile x tile`` mask is built only when it is computed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .layout import Layout, Segment, get_layout, segment_positions


@dataclass(frozen=True)
class Tile:
    """Rows ``q_start:q_end`` against columns ``k_start:k_end`` of the local block.

    ``causal`` tiles are square and use the top-left causal mask (row ``i`` sees column ``j <= i``);
    ``masked`` tiles need the dense mask of :meth:`MaskSpec.dense`.
    """

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool = False
    masked: bool = False

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
    # Rows from len_k - shift - 1 on see every key; the first of them still ends the causal
    # square (its diagonal is the last key), so full tiles start one row later.
    full_from = max(first_row, min(len_q, len_k - shift))
    tiles = []
    if full_from > first_row:
        diag_col = first_row + shift
        if diag_col > 0:
            tiles.append(Tile(first_row, full_from, 0, diag_col))
        tiles.append(Tile(first_row, full_from, diag_col, full_from + shift, causal=True))
    if len_q > full_from and len_k > 0:
        tiles.append(Tile(full_from, len_q, 0, len_k))
    return tiles


def _join_runs(tiles: list[Tile], rows_fixed: bool) -> list[Tile]:
    """Join neighbours that share their rows (``rows_fixed``) or their columns and touch."""

    def span(t: Tile) -> tuple[int, int, int, int]:  # (fixed start, end, moving start, end)
        if rows_fixed:
            return t.q_start, t.q_end, t.k_start, t.k_end
        return t.k_start, t.k_end, t.q_start, t.q_end

    joined: list[Tile] = []
    for tile in sorted(tiles, key=span):
        fixed0, fixed1, move0, move1 = span(tile)
        last = span(joined[-1]) if joined else None
        if last and last[:2] == (fixed0, fixed1) and last[3] == move0:
            start = last[2]
            joined[-1] = (
                Tile(fixed0, fixed1, start, move1)
                if rows_fixed
                else Tile(start, move1, fixed0, fixed1)
            )
        else:
            joined.append(tile)
    return joined


def coalesce(tiles: list[Tile]) -> list[Tile]:
    """Join fully visible tiles that share rows (or columns) and touch, so kernels run bigger."""
    special = [t for t in tiles if t.causal or t.masked]
    full = [t for t in tiles if not (t.causal or t.masked)]
    return special + _join_runs(_join_runs(full, rows_fixed=True), rows_fixed=False)


@functools.lru_cache(maxsize=4096)
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
    return tuple(coalesce(tiles))


@functools.lru_cache(maxsize=4096)
def bounded_causal_tiles(
    q_segments: tuple[Segment, ...],
    k_segments: tuple[Segment, ...],
    causal: bool,
    max_rows: int,
    max_cols: int,
) -> tuple[Tile, ...]:
    """:func:`plan_tiles` cut by :func:`bound_tiles` into tiles of at most
    ``max_rows x max_cols``."""
    return bound_tiles(plan_tiles(q_segments, k_segments, causal), max_rows, max_cols)


def _split_rows(tile: Tile, rows: int) -> list[Tile]:
    """``tile`` cut into row bands of at most ``rows``. A band ``[a, b)`` of a causal square sees
    the square's columns before ``a`` in full and is itself a causal square on ``[a, b)``."""
    out = []
    for a in range(0, tile.q_end - tile.q_start, rows):
        b = min(a + rows, tile.q_end - tile.q_start)
        q0, q1 = tile.q_start + a, tile.q_start + b
        if not tile.causal:
            out.append(Tile(q0, q1, tile.k_start, tile.k_end, masked=tile.masked))
            continue
        if a:
            out.append(Tile(q0, q1, tile.k_start, tile.k_start + a))
        out.append(Tile(q0, q1, tile.k_start + a, tile.k_start + b, causal=True))
    return out


def _split_cols(tile: Tile, cols: int) -> list[Tile]:
    """``tile`` cut into column bands of at most ``cols``. A band ``[a, b)`` of a causal square is
    a causal square for the rows ``[a, b)`` and fully visible to the rows after ``b``."""
    out = []
    width = tile.k_end - tile.k_start
    for a in range(0, width, cols):
        b = min(a + cols, width)
        k0, k1 = tile.k_start + a, tile.k_start + b
        if not tile.causal:
            out.append(Tile(tile.q_start, tile.q_end, k0, k1, masked=tile.masked))
            continue
        out.append(Tile(tile.q_start + a, tile.q_start + b, k0, k1, causal=True))
        if b < width:
            out.append(Tile(tile.q_start + b, tile.q_end, k0, k1))
    return out


def bound_tiles(tiles: tuple[Tile, ...], max_rows: int, max_cols: int) -> tuple[Tile, ...]:
    """The same (query, key) pairs as ``tiles``, in tiles of at most ``max_rows x max_cols``, so
    that a kernel call's outputs and transients stay that small."""
    return tuple(
        piece
        for tile in tiles
        for band in _split_rows(tile, max_rows)
        for piece in _split_cols(band, max_cols)
    )


def clip_tiles(
    tiles: tuple[Tile, ...],
    q_pieces: tuple[tuple[int, int], ...],
    k_pieces: tuple[tuple[int, int], ...],
) -> tuple[Tile, ...]:
    """The part of ``tiles`` (local indices of whole shards) that falls on the rows ``q_pieces``
    and the columns ``k_pieces`` (``[start, stop)`` ranges, concatenated in order, as a
    :class:`~ringattn.layout.SubBlock` lists them), in the indices of that part.

    A causal square clipped to a rectangle is the shifted causal mask ``j <= i + shift`` of
    :func:`split_shifted_causal`, so clipping keeps every tile exact without a dense mask.
    """
    q_offsets = _piece_offsets(q_pieces)
    k_offsets = _piece_offsets(k_pieces)
    clipped = []
    for tile in tiles:
        for (q_lo, q_hi), q_at in zip(q_pieces, q_offsets, strict=True):
            r0, r1 = max(tile.q_start, q_lo), min(tile.q_end, q_hi)
            if r0 >= r1:
                continue
            for (k_lo, k_hi), k_at in zip(k_pieces, k_offsets, strict=True):
                c0, c1 = max(tile.k_start, k_lo), min(tile.k_end, k_hi)
                if c0 >= c1:
                    continue
                row, col = r0 - q_lo + q_at, c0 - k_lo + k_at
                if not tile.causal:
                    clipped.append(Tile(row, row + r1 - r0, col, col + c1 - c0, masked=tile.masked))
                    continue
                shift = (r0 - tile.q_start) - (c0 - tile.k_start)
                for t in split_shifted_causal(r1 - r0, c1 - c0, shift):
                    rows, cols = (t.q_start + row, t.q_end + row), (t.k_start + col, t.k_end + col)
                    clipped.append(Tile(*rows, *cols, t.causal))
    return tuple(clipped)


def _piece_offsets(pieces: tuple[tuple[int, int], ...]) -> list[int]:
    offsets, at = [], 0
    for start, stop in pieces:
        offsets.append(at)
        at += stop - start
    return offsets


def one_stride(*segment_groups: tuple[Segment, ...]) -> bool:
    """Whether every segment has the same stride: then causal tiling is pure arithmetic
    (:func:`plan_tiles`); otherwise :meth:`MaskSpec.plan` classifies tile by tile."""
    return len({seg.stride for group in segment_groups for seg in group}) <= 1


def ring_tiles(
    layout: str | Layout,
    world_size: int,
    q_rank: int,
    k_rank: int,
    seq_local: int,
    causal: bool,
    tile_size: int = 512,
) -> tuple[Tile, ...]:
    """Tiles for rank ``q_rank``'s queries against rank ``k_rank``'s keys under a layout (causal
    tiles of segments with different strides are classified in tiles of ``tile_size``)."""
    chosen = get_layout(layout)
    q_segments = chosen.segments(q_rank, world_size, seq_local)
    k_segments = chosen.segments(k_rank, world_size, seq_local)
    if not causal or one_stride(q_segments, k_segments):
        return plan_tiles(q_segments, k_segments, causal)
    return MaskSpec(causal=True, tile_size=tile_size).plan(q_segments, k_segments)


MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]
_EMPTY, _FULL, _PARTIAL = 0, 1, 2
_MASK_MOD_ELEMENTS = 1 << 24  # mask_mod values (batch x heads x queries x keys) per call


def index_grids(
    batch: int, heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcastable ``(b, h, q_idx, kv_idx)`` index tensors of shape ``(B,1,1,1)``,
    ``(1,H,1,1)``, ``(1,1,Q,1)``, ``(1,1,1,K)`` for ``mask_mod`` / ``score_mod``."""
    return (
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(heads, device=device)[None, :, None, None],
        q_pos.to(device)[None, None, :, None],
        k_pos.to(device)[None, None, None, :],
    )


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Every mask of a ring call, over *global* token positions.

    Attributes:
        causal: query ``i`` sees keys ``j <= i``.
        window: ``(left, right)``: query ``i`` sees keys ``i - left <= j <= i + right``; a side
            that is ``None`` is unbounded.
        doc_ids: ``(batch or 1, padded_len)`` int64 document id of every global position; tokens
            attend only within their document.
        valid: ``(batch or 1, padded_len)`` bool, ``False`` for padding; a padding query sees
            nothing and a padding key is seen by nobody.
        mask_mod: FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``, called with
            broadcastable index tensors.
        batch, heads: sizes of the ``b`` and ``h`` indices given to ``mask_mod`` (1: it must not
            depend on that index).
        tile_size: tokens per tile side when tiles are classified.
        device: where ``mask_mod`` is evaluated while tiles are classified (the inputs' device,
            so a ``mask_mod`` may index tensors that live there).
    """

    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    doc_ids: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    mask_mod: MaskMod | None = None
    batch: int = 1
    heads: int = 1
    tile_size: int = 512
    device: torch.device | str = "cpu"

    @property
    def only_causal(self) -> bool:
        """No mask but (possibly) causality: the fast, precomputed tiling applies."""
        return (
            self.window is None
            and self.doc_ids is None
            and self.valid is None
            and self.mask_mod is None
        )

    def dense(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``(batch or 1, heads or 1, len(q_pos), len(k_pos))``, True = visible."""
        q, k = q_pos[:, None], k_pos[None, :]
        allowed = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)
        if self.causal:
            allowed &= q >= k
        if self.window is not None:
            left, right = self.window
            if left is not None:
                allowed &= k >= q - left
            if right is not None:
                allowed &= k <= q + right
        allowed = allowed[None, None]
        if self.doc_ids is not None:
            docs_q, docs_k = self.doc_ids[:, q_pos], self.doc_ids[:, k_pos]
            allowed = allowed & (docs_q[:, None, :, None] == docs_k[:, None, None, :])
        if self.valid is not None:
            valid_q, valid_k = self.valid[:, q_pos], self.valid[:, k_pos]
            allowed = allowed & (valid_q[:, None, :, None] & valid_k[:, None, None, :])
        if self.mask_mod is not None:
            allowed = allowed & self._mask_mod_dense(q_pos, k_pos)
        return allowed

    def _mask_mod_dense(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        b, h, q, k = index_grids(self.batch, self.heads, q_pos, k_pos, q_pos.device)
        out = torch.as_tensor(self.mask_mod(b, h, q, k), dtype=torch.bool, device=q_pos.device)
        return out.expand(-1 if out.shape[0] > 1 else 1, -1, len(q_pos), len(k_pos))

    @functools.cached_property
    def _host_per_token(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``doc_ids`` and ``valid`` on the CPU, copied once per call (tile planning runs there)."""
        return tuple(None if t is None else t.cpu() for t in (self.doc_ids, self.valid))

    def _block_states(self, q_blocks: list[Segment], k_blocks: list[Segment]) -> torch.Tensor:
        """``(len(q_blocks), len(k_blocks))`` states of every mask but causality."""
        state = torch.full((len(q_blocks), len(k_blocks)), _FULL, dtype=torch.int8)
        q_lo, q_hi = _bounds(q_blocks)
        k_lo, k_hi = _bounds(k_blocks)
        q_lo, q_hi, k_lo, k_hi = q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :]
        if self.window is not None:
            left, right = self.window
            empty = torch.zeros_like(state, dtype=torch.bool)
            full = torch.ones_like(empty)
            if left is not None:
                empty |= k_hi < q_lo - left
                full &= k_lo >= q_hi - left
            if right is not None:
                empty |= k_lo > q_hi + right
                full &= k_hi <= q_lo + right
            _combine(state, empty, full)
        for per_token, is_docs in zip(self._host_per_token, (True, False), strict=True):
            if per_token is None:
                continue
            q_stats = _block_stats(per_token, q_blocks)
            k_stats = _block_stats(per_token, k_blocks)
            if is_docs:
                (q_min, q_max), (k_min, k_max) = q_stats, k_stats
                empty_rows = (q_max[:, :, None] < k_min[:, None, :]) | (
                    k_max[:, None, :] < q_min[:, :, None]
                )
                full_rows = (q_min == q_max)[:, :, None] & (k_min == k_max)[:, None, :]
                full_rows &= q_min[:, :, None] == k_min[:, None, :]
            else:
                (q_any, q_all), (k_any, k_all) = q_stats, k_stats
                empty_rows = ~q_any[:, :, None] | ~k_any[:, None, :]
                full_rows = q_all[:, :, None] & k_all[:, None, :]
            _combine(state, empty_rows.all(0), full_rows.all(0))
        if self.mask_mod is not None:
            if self.causal:  # pairs causality hides need no mask_mod call
                state[q_hi < k_lo] = _EMPTY
            _combine(state, *self._mask_mod_states(q_blocks, k_blocks, state != _EMPTY))
        return state

    def _mask_mod_states(
        self, q_blocks: list[Segment], k_blocks: list[Segment], pending: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (query block, key block): whether ``mask_mod`` hides every pair, and whether it
        shows every pair, evaluated where ``pending`` (a CPU bool matrix) is set. A query
        block is evaluated against many key blocks at once on :attr:`device`, at most
        :data:`_MASK_MOD_ELEMENTS` values per call; the counts reach the host in one copy."""
        lengths = torch.tensor([b.length for b in k_blocks])
        visible = torch.zeros(len(q_blocks), len(k_blocks), dtype=torch.long, device=self.device)
        possible = torch.zeros_like(visible)
        for i, block in enumerate(q_blocks):
            wanted = pending[i].nonzero().flatten()
            if not len(wanted):
                continue
            columns = segment_positions([k_blocks[j] for j in wanted.tolist()]).to(self.device)
            owner = torch.repeat_interleave(wanted, lengths[wanted]).to(self.device)
            q_pos = segment_positions((block,)).to(self.device)
            step = max(1, _MASK_MOD_ELEMENTS // (block.length * self.batch * self.heads))
            for first in range(0, len(columns), step):
                dense = self._mask_mod_dense(q_pos, columns[first : first + step])
                seen = dense.sum((0, 1, 2))
                part = owner[first : first + step]
                visible[i].index_add_(0, part, seen)
                possible[i].index_add_(0, part, torch.full_like(seen, dense[..., 0].numel()))
        visible, possible = visible.cpu(), possible.cpu()
        return pending & (visible == 0), ~pending | (visible == possible)

    def plan(
        self, q_segments: tuple[Segment, ...], k_segments: tuple[Segment, ...]
    ) -> tuple[Tile, ...]:
        """Tiles (local indices) for queries ``q_segments`` against keys ``k_segments``."""
        q_blocks, q_offsets = _split(q_segments, self.tile_size)
        k_blocks, k_offsets = _split(k_segments, self.tile_size)
        if not q_blocks or not k_blocks:
            return ()
        states = self._block_states(q_blocks, k_blocks)
        tiles = []
        for i, j in (states != _EMPTY).nonzero().tolist():
            qb, kb = q_blocks[i], k_blocks[j]
            q0, k0 = q_offsets[i], k_offsets[j]
            q_lo, q_hi = qb.start, qb.start + qb.stride * (qb.length - 1)
            k_lo, k_hi = kb.start, kb.start + kb.stride * (kb.length - 1)
            if self.causal and q_hi < k_lo:
                continue
            causal_cuts = self.causal and q_lo < k_hi
            if states[i, j] == _PARTIAL or (causal_cuts and qb.stride != kb.stride):
                tiles.append(Tile(q0, q0 + qb.length, k0, k0 + kb.length, masked=True))
            elif causal_cuts:
                for t in split_shifted_causal(qb.length, kb.length, causal_shift(qb, kb)):
                    tiles.append(
                        Tile(t.q_start + q0, t.q_end + q0, t.k_start + k0, t.k_end + k0, t.causal)
                    )
            else:
                tiles.append(Tile(q0, q0 + qb.length, k0, k0 + kb.length))
        return tuple(coalesce(tiles))


def _combine(state: torch.Tensor, empty: torch.Tensor, full: torch.Tensor) -> None:
    """Fold one mask's per-pair (empty, full) verdicts into ``state`` in place."""
    state[(state == _FULL) & ~full] = _PARTIAL
    state[empty] = _EMPTY


def _bounds(blocks: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.tensor([b.start for b in blocks])
    hi = torch.tensor([b.start + b.stride * (b.length - 1) for b in blocks])
    return lo, hi


def _block_stats(per_token: torch.Tensor, blocks: list[Segment]):
    """Per batch row and block of the CPU tensor ``per_token``: (min, max) of int ids, or
    (any, all) of bool validity."""
    firsts, seconds = [], []
    for block in blocks:
        values = per_token[:, segment_positions((block,))]
        if values.dtype == torch.bool:
            firsts.append(values.any(1))
            seconds.append(values.all(1))
        else:
            firsts.append(values.amin(1))
            seconds.append(values.amax(1))
    return torch.stack(firsts, 1), torch.stack(seconds, 1)


def _split(segments: tuple[Segment, ...], tile: int) -> tuple[list[Segment], list[int]]:
    """Cut segments into blocks of at most ``tile`` tokens; returns blocks and local offsets."""
    blocks, offsets, offset = [], [], 0
    for seg in segments:
        for first in range(0, seg.length, tile):
            length = min(tile, seg.length - first)
            blocks.append(Segment(seg.start + seg.stride * first, seg.stride, length))
            offsets.append(offset + first)
        offset += seg.length
    return blocks, offsets


def rank_work(
    layout: str | Layout,
    world_size: int,
    seq_local: int,
    causal: bool,
    mask: MaskSpec | None = None,
    diagonal_block: int = 0,
) -> list[int]:
    """Scored (query, key) pairs per rank over a whole ring pass — the load each rank carries.

    With a :class:`MaskSpec` (which then decides causality), partial tiles count in full, as the
    kernel computes them in full. ``diagonal_block`` adds the work a fused kernel spends on the
    diagonal of a causal tile, whose blocks of that many tokens it computes in full.
    """
    chosen = get_layout(layout)

    def tiles(rank: int, k_rank: int) -> tuple[Tile, ...]:
        if mask is None or mask.only_causal:
            is_causal = causal if mask is None else mask.causal
            return ring_tiles(chosen, world_size, rank, k_rank, seq_local, is_causal)
        return mask.plan(
            chosen.segments(rank, world_size, seq_local),
            chosen.segments(k_rank, world_size, seq_local),
        )

    def work(t: Tile) -> int:
        rows = t.q_end - t.q_start
        return t.work + (rows * min(diagonal_block, rows) // 2 if t.causal else 0)

    return [
        sum(work(t) for k_rank in range(world_size) for t in tiles(rank, k_rank))
        for rank in range(world_size)
    ]
