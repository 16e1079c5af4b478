"""Attention dropout invariant to the world size: the ring with a seed equals a float64 single
process that drops with ringattn.dropout.keep_mask over global positions — out, lse, dq, dk,
dv — on every world size 1-4, every layout, five masks, both rotations, GQA; the seed drawn
from torch's generator when none is given; the keep mask's statistics."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK_CASES, assert_close, index_grids, mask_case, random_qkv

import ringattn
from ringattn.dropout import draw_seed, keep_mask

FP32_TOL = 1e-5
BATCH, HEADS_Q, HEADS_KV, DIM, P = 2, 4, 2, 16, 0.3
FINE = ringattn.Granularity(sub_blocks=3, min_tokens=1)


def dropout_reference(q, k, v, allowed, seed, p, score_mod=None):
    """Float64 attention whose probabilities are dropped by :func:`keep_mask` of the global
    positions (queries and keys of one sequence), scaled by ``1 / (1 - p)``."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if score_mod is not None:
        scores = score_mod(scores, *index_grids(q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    positions = torch.arange(q.shape[1])
    keep = keep_mask(seed, p, q.shape[0], q.shape[2], positions, positions)
    return torch.einsum("bhqk,bkhd->bqhd", probs * keep / (1 - p), v), lse


def _dropout_job(rank, world, layout, rotation):
    for seed, name in enumerate(MASK_CASES):
        seq_len = 12 * world
        kwargs, allowed, score_mod = mask_case(name, seq_len)
        q, k, v, dout = random_qkv(BATCH, seq_len, HEADS_Q, HEADS_KV, DIM, seed)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = dropout_reference(*full, allowed, 1000 + seed, P, score_mod)
        ref_grads = torch.autograd.grad(ref_out, full, dout)
        local = [ringattn.shard(t, layout).float().requires_grad_() for t in (q, k, v)]
        out, lse = ringattn.ring_attention(
            *local,
            layout=layout,
            rotation=rotation,
            dropout_p=P,
            dropout_seed=1000 + seed,
            return_lse=True,
            granularity=FINE if seed % 2 else None,
            **kwargs,
        )
        grads = torch.autograd.grad(out, local, ringattn.shard(dout, layout).float())
        label = f"{name} {layout} {rotation} p={world}"
        assert_close(f"{label} out", out, ringattn.shard(ref_out, layout), FP32_TOL)
        assert_close(f"{label} lse", lse, ringattn.shard(ref_lse, layout, dim=2), FP32_TOL)
        for got, ref, g in zip(grads, ref_grads, "qkv", strict=True):
            assert_close(f"{label} d{g}", got, ringattn.shard(ref, layout), FP32_TOL)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_dropout_equals_single_process_with_the_same_mask(pools, world, layout):
    pools(world).run(_dropout_job, layout, "kv")


@pytest.mark.parametrize("world", [2, 3])
def test_dropout_under_pass_q(pools, world):
    pools(world).run(_dropout_job, "zigzag", "q")


def _drawn_seed_job(rank, world):
    """Without a seed, ranks seeded alike draw one seed: the single process's with that seed."""
    seq_len = 8 * world
    q, k, v, _ = random_qkv(1, seq_len, HEADS_Q, HEADS_KV, DIM, 3)
    torch.manual_seed(7)
    out = ringattn.ring_attention(*(ringattn.shard(t) for t in (q, k, v)), dropout_p=P)
    torch.manual_seed(7)
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool)
    ref, _ = dropout_reference(q, k, v, allowed, draw_seed(), P)
    assert_close("drawn seed", out, ringattn.shard(ref), 1e-12)
    again = ringattn.ring_attention(*(ringattn.shard(t) for t in (q, k, v)), dropout_p=P)
    assert not torch.equal(again, out), "the next call must draw a new seed"


def test_a_drawn_seed_is_the_same_on_ranks_seeded_alike(pools):
    pools(3).run(_drawn_seed_job)


def test_keep_mask_statistics():
    """About 1 - p kept, per row and column; heads, sequences and seeds drop independently."""
    positions = torch.arange(256)
    keep = keep_mask(11, 0.25, 2, 4, positions, positions).double()
    assert abs(keep.mean().item() - 0.75) < 0.01
    assert keep.mean(-1).sub(0.75).abs().max() < 0.15  # 256 draws per row: 5.6 sigma
    assert keep.mean(-2).sub(0.75).abs().max() < 0.15
    agreement = 0.75**2 + 0.25**2  # of two independent masks
    assert abs((keep[0, 0] == keep[0, 1]).double().mean().item() - agreement) < 0.01
    assert abs((keep[0] == keep[1]).double().mean().item() - agreement) < 0.01
    other = keep_mask(12, 0.25, 2, 4, positions, positions).double()
    assert abs((keep == other).double().mean().item() - agreement) < 0.01
    columns = torch.corrcoef(keep[0, 0].T) - torch.eye(256, dtype=torch.float64)
    assert columns.abs().max() < 0.35  # independent columns: about 0.27 at most
    assert torch.equal(
        keep_mask(11, 0.0, 1, 1, positions, positions), torch.ones(1, 1, 256, 256).bool()
    )


def _bad_dropout_job(rank, world, bad):
    q = torch.randn(1, 4, 4, 8)
    kwargs = {"p": {"dropout_p": 1.0}, "seed": {"dropout_p": 0.1, "dropout_seed": 0.5}}[bad]
    try:
        ringattn.ring_attention(q, q, q, **(kwargs if rank == 0 else {}))
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("bad", ["p", "seed"])
def test_bad_dropout_raises_on_every_rank(pools, bad):
    messages = pools(2).run(_bad_dropout_job, bad)
    assert all(m and "dropout" in m for m in messages), messages
