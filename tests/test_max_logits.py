"""The per-head max logit over the whole sequence (QK-clip's statistic), exact across ranks:
every world size 1-4, every layout, five masks, both rotations, equal on every rank, against
a float64 single process; with sinks (excluded) and a value head dim of its own."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK_CASES, assert_close, index_grids, mask_case, random_qkv

import ringattn

BATCH, HEADS_Q, HEADS_KV, DIM = 2, 4, 2, 16
FINE = ringattn.Granularity(sub_blocks=3, min_tokens=1)


def reference_max_logits(q, k, allowed, score_mod=None):
    """Float64 ``(heads_q,)`` largest scaled (and score-modified) visible score per head."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if score_mod is not None:
        scores = score_mod(scores, *index_grids(q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return scores.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))


def _max_logits_job(rank, world, layout, rotation):
    for seed, name in enumerate(MASK_CASES):
        seq_len = 12 * world
        kwargs, allowed, score_mod = mask_case(name, seq_len)
        q, k, v, _ = random_qkv(BATCH, seq_len, HEADS_Q, HEADS_KV, DIM, seed)
        q = q * 3  # logits large enough for QK-clip to care
        ref = reference_max_logits(q, k, allowed, score_mod)
        local = [ringattn.shard(t, layout).float().requires_grad_() for t in (q, k, v)]
        out, peak = ringattn.ring_attention(
            *local,
            layout=layout,
            rotation=rotation,
            return_max_logits=True,
            granularity=FINE if seed % 2 else None,
            **kwargs,
        )
        assert peak.shape == (HEADS_Q,) and peak.dtype == torch.float32
        assert not peak.requires_grad
        assert_close(f"{name} {layout} {rotation} p={world}", peak, ref, 1e-6)
        out.sum().backward()  # the extra output does not disturb the gradients
    return peak


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_max_logits_match_single_process(pools, world, layout):
    peaks = pools(world).run(_max_logits_job, layout, "kv")
    assert all(torch.equal(p, peaks[0]) for p in peaks), "every rank must get the same values"


@pytest.mark.parametrize("world", [2, 3])
def test_max_logits_under_pass_q(pools, world):
    pools(world).run(_max_logits_job, "zigzag", "q")


def _with_lse_sinks_and_value_dim_job(rank, world):
    """Returned in order (out, lse, max_logits); sinks are not scores; v has its own dim."""
    seq_len = 8 * world
    q, k, _, _ = random_qkv(1, seq_len, HEADS_Q, HEADS_KV, DIM, 9)
    v = torch.randn(1, seq_len, HEADS_KV, 8, dtype=torch.float64)
    i = torch.arange(seq_len)
    ref = reference_max_logits(q, k, i[None, :] <= i[:, None])
    local = [ringattn.shard(t).float() for t in (q, k, v)]
    sinks = torch.full((HEADS_Q,), 50.0)  # above every score: must not show up
    out, lse, peak = ringattn.ring_attention(
        *local, causal=True, sinks=sinks, return_lse=True, return_max_logits=True
    )
    assert out.shape[-1] == 8 and lse.shape == (1, HEADS_Q, seq_len // world)
    assert_close("max logits", peak, ref, 1e-6)


@pytest.mark.parametrize("world", [1, 3])
def test_max_logits_with_lse_sinks_and_value_dim(pools, world):
    pools(world).run(_with_lse_sinks_and_value_dim_job)


def _disagreeing_job(rank, world):
    q = torch.randn(1, 4, 4, 8)
    try:
        ringattn.ring_attention(q, q, q, return_max_logits=rank == 0)
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


def test_ranks_that_disagree_on_max_logits_raise_everywhere(pools):
    """The all-reduce would hang on the ranks that asked: the check raises first."""
    messages = pools(2).run(_disagreeing_job)
    assert all(m and "return_max_logits" in m for m in messages), messages
