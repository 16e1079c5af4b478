"""Learnable attention sinks (gpt-oss) in ring mode: a per-head logit in every row's softmax
denominator, against a float64 reference with the sink as an extra zero-valued key, forward and
backward (q, k, v and the sinks, whose per-rank gradients sum to the reference's), every layout,
the masks of helpers.MASK_CASES, both rotations, world sizes 1-4."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import MASK_CASES, assert_close, mask_case, masked_reference, random_qkv

import ringattn

FP32_TOL = 1e-5
BATCH, HEADS_Q, HEADS_KV, DIM = 2, 4, 2, 16


def _sinks_job(rank, world, layout, rotation):
    for seed, name in enumerate(MASK_CASES):
        seq_len = 12 * world
        kwargs, allowed, score_mod = mask_case(name, seq_len)
        q, k, v, dout = random_qkv(BATCH, seq_len, HEADS_Q, HEADS_KV, DIM, seed)
        sinks = torch.tensor([-1.0, 0.0, 1.5, 3.0], dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        ref_out, ref_lse = masked_reference(
            *full[:3], allowed[None, None], score_mod=score_mod, sinks=full[3]
        )
        ref_grads = torch.autograd.grad(ref_out, full, dout)
        local = [ringattn.shard(t, layout).float().requires_grad_() for t in (q, k, v)]
        local_sinks = sinks.float().requires_grad_()
        out, lse = ringattn.ring_attention(
            *local, sinks=local_sinks, layout=layout, rotation=rotation, return_lse=True, **kwargs
        )
        grads = torch.autograd.grad(
            out, [*local, local_sinks], ringattn.shard(dout, layout).float()
        )
        label = f"{name} {layout} {rotation} p={world}"
        assert_close(f"{label} out", out, ringattn.shard(ref_out, layout), FP32_TOL)
        assert_close(f"{label} lse", lse, ringattn.shard(ref_lse, layout, dim=2), FP32_TOL)
        for got, ref, g in zip(grads[:3], ref_grads[:3], "qkv", strict=True):
            assert_close(f"{label} d{g}", got, ringattn.shard(ref, layout), FP32_TOL)
        dsinks = grads[3].clone()
        if world > 1:  # each rank's rows: summed over the group, as a shared parameter's grad
            dist.all_reduce(dsinks)
        assert_close(f"{label} dsinks", dsinks, ref_grads[3], FP32_TOL)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_sinks_match_reference(pools, world, layout):
    pools(world).run(_sinks_job, layout, "kv")


@pytest.mark.parametrize("world", [2, 3])
def test_sinks_under_pass_q(pools, world):
    pools(world).run(_sinks_job, "zigzag", "q")


def _padding_and_off_sinks_job(rank, world):
    """A sink of -inf (switched off) on rows that see no key (padding): zeros, never NaN; the
    head whose sink is off equals attention without sinks."""
    seq_len = 8 * world
    q, k, v, dout = (t.float() for t in random_qkv(BATCH, seq_len, HEADS_Q, HEADS_KV, DIM, 5))
    valid = torch.ones(BATCH, seq_len, dtype=torch.bool)
    valid[1, seq_len // 2 :] = False
    local = [ringattn.shard(t, "zigzag").requires_grad_() for t in (q, k, v)]
    kwargs = {"causal": True, "attention_mask": ringattn.shard(valid, "zigzag", dim=1)}
    sinks = torch.tensor([float("-inf"), 0.0, 1.0, 2.0], requires_grad=True)
    out = ringattn.ring_attention(*local, sinks=sinks, **kwargs)
    grads = torch.autograd.grad(out, [*local, sinks], ringattn.shard(dout, "zigzag"))
    assert all(torch.isfinite(t).all() for t in (out, *grads)), "NaN or inf"
    padded = ~ringattn.shard(valid, "zigzag", dim=1)
    assert torch.equal(out[padded], torch.zeros_like(out[padded]))
    plain = ringattn.ring_attention(*(t.detach() for t in local), **kwargs)
    assert_close("sink off", out[:, :, 0].detach(), plain[:, :, 0], FP32_TOL)


def test_a_switched_off_sink_on_padding_rows_is_zero_not_nan(pools):
    pools(2).run(_padding_and_off_sinks_job)


def _bad_sinks_job(rank, world, bad):
    q = torch.randn(1, 4, 4, 8)
    sinks = {"shape": torch.zeros(3), "dtype": torch.zeros(4, dtype=torch.long)}[bad]
    try:
        ringattn.ring_attention(q, q[:, :, :2], q[:, :, :2], sinks=sinks if rank == 0 else None)
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_bad_sinks_raise_on_every_rank(pools, bad):
    messages = pools(2).run(_bad_sinks_job, bad)
    assert all(m and "sinks must" in m for m in messages), messages
