"""Layouts: shard/unshard round trips, positions, unshard's gradient, rank work and tile plans.

World size 1 runs in-process (no process group); larger worlds run on the gloo pool.
"""

from __future__ import annotations

import itertools
import pickle
import random

import pytest
import torch
from helpers import (
    MixedLayout,
    OverlappingLayout,
    ReversedLayout,
    random_qkv,
    reference_attention,
    relative_error,
)

import ringattn
from ringattn.layout import LAYOUTS, sub_blocks
from ringattn.masks import Tile, bound_tiles, plan_tiles, ring_tiles, split_shifted_causal

LAYOUT_NAMES = ("contiguous", "zigzag", "striped")


def _run(pools, world, fn, *args):
    """Per-rank results of ``fn``: in-process for a world of one, else on the pool."""
    if world == 1:
        return [fn(0, 1, *args)]
    return pools(world).run(fn, *args)


def _expected_positions(layout, rank, world, seq_len):
    """The global positions rank ``rank`` holds, written out from the layout's definition."""
    if layout == "contiguous":
        n = seq_len // world
        return list(range(rank * n, (rank + 1) * n))
    if layout == "zigzag":
        c = seq_len // (2 * world)  # chunks r and 2p-1-r of 2p
        return [
            *range(rank * c, (rank + 1) * c),
            *range((2 * world - 1 - rank) * c, (2 * world - rank) * c),
        ]
    return list(range(rank, seq_len, world))  # striped: r, r+p, r+2p, ...


def _integer_tensor(*shape, seed):
    """Integer-valued float64 values, identical on every rank, so sums are exact."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, shape, generator=gen).double()


def _layout_job(rank, world, layout):
    """Round trips, positions and unshard's gradient on this rank; returns its positions."""
    found = {}
    for seq_len in (2 * world, 6 * world):
        x = _integer_tensor(2, seq_len, 3, seed=seq_len)
        local = ringattn.shard(x, layout)
        index = torch.tensor(_expected_positions(layout, rank, world, seq_len))
        assert torch.equal(local, x[:, index]), f"seq_len={seq_len}: wrong shard"
        assert torch.equal(ringattn.unshard(local, layout), x)
        assert torch.equal(ringattn.unshard(ringattn.shard(x, layout, dim=-2), layout, dim=-2), x)

        y = _integer_tensor(2, 3, seq_len, 5, seed=seq_len + 1)  # sequence along dim 2
        for dim in (2, -2):
            y_local = ringattn.shard(y, layout, dim=dim)
            assert y_local.shape == (2, 3, seq_len // world, 5)
            assert torch.equal(y_local, y[:, :, index])
            assert torch.equal(ringattn.unshard(y_local, layout, dim=dim), y)

        pos = ringattn.positions(seq_len, layout)
        assert pos.dtype == torch.int64
        assert torch.equal(pos, ringattn.shard(torch.arange(seq_len), layout, dim=0))
        assert torch.equal(pos, index)
        found[seq_len] = pos.tolist()

        # Gradient of sum(unshard(local) * w) with the same w on every rank: each rank's shard
        # collects the sum over ranks, world_size * shard(w).
        w = _integer_tensor(2, seq_len, 3, seed=seq_len + 2)
        leaf = local.clone().requires_grad_()
        (ringattn.unshard(leaf, layout) * w).sum().backward()
        assert torch.equal(leaf.grad, world * ringattn.shard(w, layout))
        w2 = _integer_tensor(2, 3, seq_len, 5, seed=seq_len + 3)
        leaf2 = ringattn.shard(y, layout, dim=2).requires_grad_()
        (ringattn.unshard(leaf2, layout, dim=2) * w2).sum().backward()
        assert torch.equal(leaf2.grad, world * ringattn.shard(w2, layout, dim=2))
    return found


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_shard_unshard_positions(pools, world, layout):
    per_rank = _run(pools, world, _layout_job, layout)
    for seq_len in (2 * world, 6 * world):
        held = [found[seq_len] for found in per_rank]
        assert sorted(itertools.chain(*held)) == list(range(seq_len)), "not a permutation"
        for rank in range(world):
            assert held[rank] == _expected_positions(layout, rank, world, seq_len)


def _padding_job(rank, world, layout):
    """Any length shards: zeros pad it to padded_length; unshard(seq_len=) drops them again."""
    multiple = LAYOUTS[layout].seq_multiple(world)
    for seq_len in (1, 2 * world - 1, 2 * world + 1, 5 * world + 3):
        padded = ringattn.padded_length(seq_len, layout, world)
        assert padded % multiple == 0 and seq_len <= padded < seq_len + multiple
        x = _integer_tensor(2, seq_len, 3, seed=seq_len)
        local = ringattn.shard(x, layout)
        assert local.shape == (2, padded // world, 3)
        x_padded = torch.cat([x, torch.zeros(2, padded - seq_len, 3, dtype=x.dtype)], 1)
        assert torch.equal(local, ringattn.shard(x_padded, layout))
        assert torch.equal(ringattn.unshard(local, layout, seq_len=seq_len), x)
        pos = ringattn.positions(seq_len, layout)
        assert torch.equal(pos, ringattn.shard(torch.arange(padded), layout, dim=0))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_shard_pads_any_length(pools, world, layout):
    _run(pools, world, _padding_job, layout)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zigzag_and_striped_chunks(world):
    """Zigzag rank r holds chunks r and 2p-1-r of 2p; striped rank r holds r, r+p, r+2p, ..."""
    seq_local = 6
    chunk = seq_local // 2
    for rank in range(world):
        zigzag = LAYOUTS["zigzag"].positions(rank, world, seq_local).tolist()
        chunks = sorted({p // chunk for p in zigzag})
        assert chunks == [rank, 2 * world - 1 - rank]
        striped = LAYOUTS["striped"].positions(rank, world, seq_local).tolist()
        assert striped == [rank + i * world for i in range(seq_local)]


def _add_unshards_job(rank, world):
    """Gradient of unshard(a) + unshard(b): both must get world_size * shard(g)."""
    g = torch.arange(4.0 * world).reshape(1, 4 * world)
    g_before = g.clone()
    a = torch.zeros(1, 4, requires_grad=True)
    b = torch.zeros(1, 4, requires_grad=True)
    (ringattn.unshard(a, "contiguous") + ringattn.unshard(b, "contiguous")).backward(g)
    want = world * ringattn.shard(g_before, "contiguous")
    return torch.equal(a.grad, want), torch.equal(b.grad, want), torch.equal(g, g_before)


def test_unshard_backward_does_not_modify_incoming_gradient(pools):
    results = pools(2).run(_add_unshards_job)
    assert results == [(True, True, True)] * 2


# Rank work and tiles: pure functions, no processes.


def _visible_pairs(layout, world, rank, seq_local):
    """Brute force: (query, key) pairs with key position <= query position, over all ranks."""
    q_pos = LAYOUTS[layout].positions(rank, world, seq_local)
    k_pos = torch.cat([LAYOUTS[layout].positions(r, world, seq_local) for r in range(world)])
    return int((k_pos[None, :] <= q_pos[:, None]).sum())


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_rank_work_counts_exactly_the_visible_pairs(layout):
    for world in range(1, 7):
        for seq_local in (2, 4, 6, 10):
            work = ringattn.rank_work(layout, world, seq_local, causal=True)
            assert work == [_visible_pairs(layout, world, r, seq_local) for r in range(world)]
            full = ringattn.rank_work(layout, world, seq_local, causal=False)
            assert full == [world * seq_local**2] * world


@pytest.mark.parametrize("world", range(2, 9))
def test_rank_work_balance(world):
    for seq_local in (2, 8, 64, 130):
        work = ringattn.rank_work("zigzag", world, seq_local, causal=True)
        assert max(work) == min(work)
        half = seq_local // 2  # every rank: chunks r and 2p-1-r, each sees all earlier chunks
        assert work[0] == (2 * world - 1) * half**2 + half * (half + 1)

    for seq_local in (64, 128, 200):
        work = ringattn.rank_work("striped", world, seq_local, causal=True)
        assert max(work) / min(work) <= 1.1
        s = seq_local  # rank r: ranks k <= r give i+1 keys to row i, the others give i
        assert work == [
            (r + 1) * s * (s + 1) // 2 + (world - 1 - r) * s * (s - 1) // 2 for r in range(world)
        ]

    for seq_local in (1, 8, 64, 256):
        work = ringattn.rank_work("contiguous", world, seq_local, causal=True)
        s = seq_local  # rank r: r full blocks before it plus its own triangle
        triangle = s * (s + 1) // 2
        assert work == [r * s * s + triangle for r in range(world)]
        assert all(a < b for a, b in itertools.pairwise(work))
        assert max(work) / min(work) >= 2
        if seq_local >= 64:  # the last rank does about 2 - 1/p times the mean
            mean = sum(work) / world
            assert abs(work[-1] / mean - (2 - 1 / world)) < 0.02


def _paint(tiles, len_q, len_k):
    """How many tiles cover each cell of a ``len_q x len_k`` grid; checks tile shapes."""
    grid = [[0] * len_k for _ in range(len_q)]
    for t in tiles:
        assert 0 <= t.q_start < t.q_end <= len_q and 0 <= t.k_start < t.k_end <= len_k, t
        if t.causal:
            assert t.q_end - t.q_start == t.k_end - t.k_start, f"causal tile not square: {t}"
        for i in range(t.q_start, t.q_end):
            for j in range(t.k_start, t.k_end):
                if not t.causal or j - t.k_start <= i - t.q_start:
                    grid[i][j] += 1
    return grid


def _check_shifted_causal(len_q, len_k, shift):
    grid = _paint(split_shifted_causal(len_q, len_k, shift), len_q, len_k)
    for i in range(len_q):
        for j in range(len_k):
            want = int(j <= i + shift)
            assert grid[i][j] == want, f"({len_q}, {len_k}, {shift}) cell ({i}, {j}): {grid[i][j]}"


def test_split_shifted_causal_small_exhaustive():
    for len_q, len_k in itertools.product(range(7), range(7)):
        for shift in range(-8, 9):
            _check_shifted_causal(len_q, len_k, shift)


def test_square_causal_block_is_one_tile():
    """A diagonal block is one causal kernel call (e.g. a whole world of one)."""
    assert split_shifted_causal(64, 64, 0) == [Tile(0, 64, 0, 64, causal=True)]


def test_split_shifted_causal_random():
    rng = random.Random(0)
    for _ in range(400):
        _check_shifted_causal(rng.randint(0, 24), rng.randint(0, 24), rng.randint(-30, 30))


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_ring_tiles_paint_the_global_causal_mask(layout):
    """plan_tiles over every (query rank, key rank) block matches pos_k <= pos_q exactly."""
    for world in range(1, 6):
        for seq_local in (2, 4, 6):
            chosen = LAYOUTS[layout]
            for q_rank, k_rank in itertools.product(range(world), repeat=2):
                q_pos = chosen.positions(q_rank, world, seq_local).tolist()
                k_pos = chosen.positions(k_rank, world, seq_local).tolist()
                tiles = ring_tiles(layout, world, q_rank, k_rank, seq_local, True)
                assert tiles == plan_tiles(
                    chosen.segments(q_rank, world, seq_local),
                    chosen.segments(k_rank, world, seq_local),
                    True,
                )
                grid = _paint(tiles, seq_local, seq_local)
                want = [[int(kp <= qp) for kp in k_pos] for qp in q_pos]
                assert grid == want, (layout, world, seq_local, q_rank, k_rank)
                full = ring_tiles(layout, world, q_rank, k_rank, seq_local, False)
                assert _paint(full, seq_local, seq_local) == [[1] * seq_local] * seq_local


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_sub_blocks_partition_every_shard_at_the_same_indices(layout):
    """Sub-blocks cover each local index once, in order; their segments are the positions at
    those indices; every rank is cut at the same indices (the receiver knows the shapes)."""
    chosen = LAYOUTS[layout]
    for world, seq_local, count in itertools.product(range(1, 6), (1, 2, 6, 7, 34), range(1, 6)):
        if seq_local % chosen.local_multiple(world):
            continue
        cuts = set()
        for rank in range(world):
            blocks = sub_blocks(chosen.segments(rank, world, seq_local), count)
            assert 1 <= len(blocks) <= count and all(b.length > 0 for b in blocks)
            indices = [i for b in blocks for start, stop in b.pieces for i in range(start, stop)]
            positions = chosen.positions(rank, world, seq_local).tolist()
            for b in blocks:
                local = [i for start, stop in b.pieces for i in range(start, stop)]
                assert [positions[i] for i in local] == [
                    pos for seg in b.segments for pos in seg.positions()
                ]
            assert sorted(indices) == list(range(seq_local)), (world, seq_local, count, rank)
            cuts.add(tuple(b.pieces for b in blocks))
        assert len(cuts) == 1, f"ranks cut differently: {cuts}"


@pytest.mark.parametrize("world", range(2, 6))
def test_zigzag_sub_blocks_carry_equal_causal_work_on_every_rank(world):
    """At every (step, sub-block) each rank computes the same number of pairs, so cutting
    blocks keeps zigzag's balance step by step (no rank waits on a busier neighbour)."""
    zigzag, seq_local, count = LAYOUTS["zigzag"], 48, 4
    for step in range(world):
        for j in range(count):
            work = set()
            for rank in range(world):
                source = zigzag.segments((rank - step) % world, world, seq_local)
                tiles = plan_tiles(
                    zigzag.segments(rank, world, seq_local),
                    sub_blocks(source, count)[j].segments,
                    True,
                )
                work.add(sum(t.work for t in tiles))
            assert len(work) == 1, (step, j, work)


def test_bound_tiles_keep_every_pair_in_small_tiles():
    rng = random.Random(1)
    for _ in range(300):
        len_q, len_k = rng.randint(1, 20), rng.randint(1, 20)
        masked = rng.random() < 0.3
        tiles = split_shifted_causal(len_q, len_k, rng.randint(-25, 25))
        if masked:
            tiles = [Tile(0, len_q, 0, len_k, masked=True)]
        max_rows, max_cols = rng.randint(1, 8), rng.randint(1, 8)
        bounded = bound_tiles(tuple(tiles), max_rows, max_cols)
        assert _paint(bounded, len_q, len_k) == _paint(tiles, len_q, len_k)
        for t in bounded:
            assert t.q_end - t.q_start <= max_rows and t.k_end - t.k_start <= max_cols, t
            assert t.masked == masked, t


# A user-defined layout works everywhere a built-in one does.


def _custom_layout_job(rank, world):
    """ring_attention (causal and not, both rotations, forward and backward), shard, unshard
    and positions with user-defined layouts, against float64 attention over the whole
    sequence; a layout whose ranks overlap is refused on every rank."""
    worst = 0.0
    for layout in (ReversedLayout(), MixedLayout()):
        seq_len = 6 * world
        index = layout.positions(rank, world, seq_len // world)
        x = _integer_tensor(2, seq_len, 3, seed=seq_len)
        local = ringattn.shard(x, layout)
        assert torch.equal(local, x[:, index]) and torch.equal(ringattn.unshard(local, layout), x)
        assert torch.equal(ringattn.positions(seq_len, layout), index)
        q, k, v, dout = random_qkv(2, seq_len, 4, 2, 8, seed=world)
        for causal, rotation in itertools.product((True, False), ("kv", "q")):
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref_out, _ = reference_attention(*full, causal)
            ref_grads = torch.autograd.grad(ref_out, full, dout)
            shards = [ringattn.shard(t, layout).float().requires_grad_() for t in (q, k, v)]
            mask = ringattn.create_ring_mask(seq_len, causal=causal, layout=layout, tile_size=4)
            out = ringattn.ring_attention(
                *shards,
                mask=mask,
                rotation=rotation,
                granularity=ringattn.Granularity(sub_blocks=2, min_tokens=1),
            )
            grads = torch.autograd.grad(out, shards, ringattn.shard(dout, layout).float())
            for got, ref in zip((out, *grads), (ref_out, *ref_grads), strict=True):
                worst = max(worst, relative_error(got, ringattn.shard(ref, layout)))
    try:
        ringattn.ring_attention(*(t[:, :6].float() for t in (q, k, v)), layout=OverlappingLayout())
    except ringattn.RingInputError as exc:
        refused = str(exc)
    return worst, refused


@pytest.mark.parametrize("world", [2, 3])
def test_a_custom_layout_works_end_to_end(pools, world):
    for worst, refused in pools(world).run(_custom_layout_job):
        assert worst < 1e-5
        assert "layout 'overlapping': the ranks' segments must cover positions 0.." in refused


def test_an_unknown_layout_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown layout 'mine'; choose one of \['contiguous'"):
        ringattn.shard(torch.zeros(1, 4), "mine")
    with pytest.raises(TypeError, match="abstract"):
        ringattn.Layout()


def test_tiles_of_segments_with_different_strides_paint_the_causal_mask():
    """MixedLayout's shards pair stride-1 with stride-p segments: those tiles are classified
    tile by tile, and together they still paint pos_k <= pos_q exactly."""
    layout = MixedLayout()
    for world, seq_local in itertools.product(range(1, 5), (2, 4, 8)):
        for q_rank, k_rank in itertools.product(range(world), repeat=2):
            q_pos = layout.positions(q_rank, world, seq_local).tolist()
            k_pos = layout.positions(k_rank, world, seq_local).tolist()
            for tile_size in (1, 3, 512):
                tiles = ring_tiles(layout, world, q_rank, k_rank, seq_local, True, tile_size)
                grid = [[0] * seq_local for _ in q_pos]
                for t in tiles:
                    for i in range(t.q_start, t.q_end):
                        for j in range(t.k_start, t.k_end):
                            visible = not (t.causal or t.masked) or (
                                k_pos[j] <= q_pos[i] if t.masked else j - t.k_start <= i - t.q_start
                            )
                            grid[i][j] += int(visible)
                assert grid == [[int(kp <= qp) for kp in k_pos] for qp in q_pos]


class _BackwardsLayout(ringattn.Layout):
    """Broken: a negative stride (causal tiling assumes positions rise within a segment)."""

    name = "backwards"

    def segments(self, rank, world_size, seq_local):
        return (ringattn.Segment((rank + 1) * seq_local - 1, -1, seq_local),)


def test_segments_must_rise_and_come_as_a_tuple():
    with pytest.raises(ValueError, match="segments need stride >= 1 and length >= 0"):
        ringattn.shard(torch.zeros(1, 4), _BackwardsLayout())
    with pytest.raises(ringattn.RingInputError, match="segments need stride >= 1"):
        q = torch.zeros(1, 4, 1, 8)
        ringattn.ring_attention(q, q, q, causal=True, layout=_BackwardsLayout())


def test_built_in_layouts_are_the_same_after_pickling():
    """Another process's copy of a built-in layout is that built-in layout (so ranks agree)."""
    for name, layout in LAYOUTS.items():
        copy = pickle.loads(pickle.dumps(layout))
        assert copy is layout and type(layout)() == layout and hash(type(layout)()) == hash(layout)
        assert ringattn.layout.layout_problem(copy, 3, 6) is None
        assert ringattn.layout.get_layout(name) is layout
