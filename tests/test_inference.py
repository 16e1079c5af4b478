"""Sharded KV cache: prefill + decode steps equal single-device attention at every step."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, masked_reference

import ringattn
import ringattn.inference
from ringattn.inference import KVCache

TOL = 1e-5


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _decode_job(rank, world, layout, steps, chunk, device="cpu", tile=None, with_sinks=False):
    if tile is not None:  # extend in tiles of tile x tile pairs, or one query x tile**2 keys
        ringattn.inference.EXTEND_TILE = tile
    batch, heads_q, heads_kv, dim = 2, 4, 2, 16
    prompt_len = 10 * world  # padded prompt, divisible by every layout
    lengths = torch.tensor([prompt_len, prompt_len - 7])  # uneven sequences
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_rand(gen, batch, prompt_len, h, dim) for h in (heads_q, heads_kv, heads_kv))
    sinks = torch.tensor([-1.0, 0.0, 1.5, 3.0], dtype=torch.float64) if with_sinks else None
    local_sinks = None if sinks is None else sinks.float().to(device)
    cache = KVCache(2, batch, heads_kv, dim, capacity=4, device=device)  # tiny: must grow
    layer = 1
    out = cache.prefill(
        layer,
        *(ringattn.shard(t.float(), layout).to(device) for t in (q, k, v)),
        lengths=lengths,
        layout=layout,
        sinks=local_sinks,
    )
    # reference for the prompt: causal within each sequence's real tokens
    pos = torch.arange(prompt_len)
    valid = pos[None, :] < lengths[:, None]
    allowed = (pos[None, :] <= pos[:, None])[None, None] & valid[:, None, :, None]
    allowed &= valid[:, None, None, :]
    ref, _ = masked_reference(q, k, v, allowed, sinks=sinks)
    assert_close("prefill", out.cpu(), ringattn.shard(ref, layout).float(), TOL)
    keys = [[k[b, : lengths[b]]] for b in range(batch)]
    values = [[v[b, : lengths[b]]] for b in range(batch)]
    for step in range(steps):
        new_q, new_k, new_v = (
            _rand(gen, batch, chunk, h, dim) for h in (heads_q, heads_kv, heads_kv)
        )
        new = [t.float().to(device) for t in (new_q, new_k, new_v)]
        got = cache.extend(layer, *new, sinks=local_sinks).cpu()
        for b in range(batch):
            keys[b].append(new_k[b])
            values[b].append(new_v[b])
            all_k, all_v = torch.cat(keys[b])[None], torch.cat(values[b])[None]
            n = all_k.shape[1]
            i = torch.arange(n - chunk, n)[:, None]
            causal = (torch.arange(n)[None, :] <= i)[None, None]
            ref, _ = masked_reference(new_q[b : b + 1], all_k, all_v, causal, sinks=sinks)
            assert_close(f"step {step} row {b}", got[b : b + 1], ref.float(), TOL)
    held = cache.local_tokens(layer)
    return held, [int(x) for x in cache.lengths[layer]]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_prefill_then_50_decode_steps(pools, world):
    results = pools(world).run(_decode_job, "zigzag", 50, 1)
    totals = [sum(held[b] for held, _ in results) for b in range(2)]
    lengths = results[0][1]
    assert totals == lengths  # every token stored exactly once
    per_rank = [held[0] for held, _ in results]
    assert max(per_rank) - min(per_rank) <= 1  # balanced as it grows


@pytest.mark.parametrize("world", [1, 3])
def test_decode_with_attention_sinks(pools, world):
    """A layer with learnable sinks: prefill and every decode step equal single-device
    attention whose softmax counts the sink."""
    pools(world).run(_decode_job, "zigzag", 5, 1, "cpu", None, True)


@pytest.mark.parametrize("layout", ["contiguous", "striped"])
def test_chunked_extend_other_layouts(pools, layout):
    pools(3).run(_decode_job, layout, 4, 5)


@pytest.mark.parametrize("world", [1, 2])
def test_long_chunks_extend_in_bounded_tiles(pools, world):
    """Chunks of 7 new tokens against a cache attended 3 queries x 3 keys per kernel call."""
    pool = pools(world)
    try:
        pool.run(_decode_job, "zigzag", 3, 7, "cpu", 3)
        pool.run(_decode_job, "zigzag", 4, 1, "cpu", 2)  # decode: 1 query x 4 keys per call
    finally:
        pool.run(_restore_extend_tile)


def _restore_extend_tile(rank, world):
    ringattn.inference.EXTEND_TILE = 1024


def _merge_job(rank, world):
    """Each rank attends the same queries to its own slice of the keys (some slices see
    nothing for some rows); the merge of the partial results equals attention over all keys."""
    gen = torch.Generator().manual_seed(4)
    q = _rand(gen, 2, 5, 4, 8)
    k, v = _rand(gen, 2, 6 * world, 2, 8), _rand(gen, 2, 6 * world, 2, 8)
    allowed = torch.ones(1, 1, 5, 6 * world, dtype=torch.bool)
    allowed[..., 0, 6:] = False  # row 0 sees rank 0's keys only: -inf lse on the others
    ref, ref_lse = masked_reference(q, k, v, allowed)
    mine = slice(6 * rank, 6 * rank + 6)
    out, lse = masked_reference(q, k[:, mine], v[:, mine], allowed[..., mine])
    merged, merged_lse = ringattn.merge_across_ranks(out, lse, return_lse=True)
    return (merged - ref).abs().max().item(), (merged_lse - ref_lse).abs().max().item()


@pytest.mark.parametrize("world", [1, 3])
def test_merge_across_ranks_equals_attention_over_all_keys(pools, world):
    results = [_merge_job(0, 1)] if world == 1 else pools(world).run(_merge_job)
    for out_error, lse_error in results:
        assert out_error < 1e-12 and lse_error < 1e-12
