"""Ring attention against an independent single-device fp64 reference, on real gloo groups.

Every world size 1-4, every layout, causal and not, MHA/GQA/MQA, batch 1 and 2, two head dims,
tiny and odd local lengths: output, log-sum-exp and all three gradients, with asserted tolerances.
Every other case cuts the travelling blocks into 3 sub-blocks (lengths that 3 does not divide,
and 1-token shards, included); the others run whole blocks, as the default does at these sizes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_qkv, reference_attention, relative_error

import ringattn

LAYOUTS = ("contiguous", "zigzag", "striped")
HEADS = ((4, 4), (8, 2), (4, 1))  # MHA, GQA 4:1, MQA
FP32_TOL = 1e-5
FINE = ringattn.Granularity(sub_blocks=3, min_tokens=1)


def _local_lengths(layout: str) -> tuple[int, ...]:
    return (2, 6, 34) if layout == "zigzag" else (1, 3, 17)


def _ring_vs_reference(
    layout,
    causal,
    dtype,
    batch,
    heads_q,
    heads_kv,
    dim,
    seq_local,
    world,
    seed,
    device="cpu",
    granularity=None,
):
    """Ring result (computed on ``device``, returned on the CPU) and the fp64 reference for one
    config, both as this rank's shard."""
    q, k, v, dout = random_qkv(batch, seq_local * world, heads_q, heads_kv, dim, seed)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*full, causal)
    ref_grads = torch.autograd.grad(ref_out, full, dout)
    local = [ringattn.shard(t, layout).to(device, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = ringattn.ring_attention(
        *local, causal=causal, layout=layout, return_lse=True, granularity=granularity
    )
    grads = torch.autograd.grad(out, local, ringattn.shard(dout, layout).to(device, dtype))
    got = {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    got = {name: t.cpu() for name, t in got.items()}
    ref = {
        "out": ringattn.shard(ref_out, layout),
        "lse": ringattn.shard(ref_lse, layout, dim=2),
        "dq": ringattn.shard(ref_grads[0], layout),
        "dk": ringattn.shard(ref_grads[1], layout),
        "dv": ringattn.shard(ref_grads[2], layout),
    }
    return got, ref


def _fp32_job(rank, world, layout, causal, device="cpu"):
    worst = 0.0
    cases = itertools.product((1, 2), HEADS, (64, 24), _local_lengths(layout))
    for i, (batch, (heads_q, heads_kv), dim, seq_local) in enumerate(cases):
        got, ref = _ring_vs_reference(
            layout,
            causal,
            torch.float32,
            batch,
            heads_q,
            heads_kv,
            dim,
            seq_local,
            world,
            i,
            device,
            FINE if i % 2 else None,
        )
        label = f"b={batch} h={heads_q}/{heads_kv} d={dim} n_local={seq_local} case {i}"
        assert got["out"].dtype == torch.float32 and got["lse"].dtype == torch.float32
        for name in ("dq", "dk", "dv"):
            assert got[name].dtype == torch.float32, f"{name} dtype {got[name].dtype}"
        for name in got:
            worst = max(worst, assert_close(f"{label} {name}", got[name], ref[name], FP32_TOL))
    return worst


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp32_matches_fp64_reference(pools, world, layout, causal):
    worst = pools(world).run(_fp32_job, layout, causal)
    assert max(worst) <= FP32_TOL


def _single_device_low_precision(q, k, v, dout, causal, dtype, device="cpu"):
    """The error a single device makes in ``dtype``: fused SDPA over the whole sequence."""
    inputs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in inputs), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    grads = torch.autograd.grad(out, inputs, dout.to(device, dtype))
    return {"out": out.cpu(), "dq": grads[0].cpu(), "dk": grads[1].cpu(), "dv": grads[2].cpu()}


def _low_precision_job(rank, world, layout, causal, dtype_name, device="cpu"):
    dtype = getattr(torch, dtype_name)
    batch, heads_q, heads_kv, dim, seq_local, seed = 2, 8, 2, 64, 48, 7
    got, ref = _ring_vs_reference(
        layout, causal, dtype, batch, heads_q, heads_kv, dim, seq_local, world, seed, device, FINE
    )
    q, k, v, dout = random_qkv(batch, seq_local * world, heads_q, heads_kv, dim, seed)
    single = _single_device_low_precision(q, k, v, dout, causal, dtype, device)
    report = {}
    for name in ("out", "dq", "dk", "dv"):
        assert got[name].dtype == dtype, f"{name} dtype {got[name].dtype} != {dtype}"
        single_err = relative_error(ringattn.shard(single[name], layout), ref[name])
        tol = max(2 * single_err, 1e-3)
        report[name] = (assert_close(name, got[name], ref[name], tol), single_err)
    assert_close("lse", got["lse"], ref["lse"], 1e-2)
    return report


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_low_precision_within_twice_single_device_error(pools, world, layout, causal, dtype_name):
    pools(world).run(_low_precision_job, layout, causal, dtype_name)


def _no_group_job(rank, world):
    """Without an initialised group the call is plain attention (a world of one)."""
    q, k, v, _ = random_qkv(1, 9, 2, 1, 16, 3)
    ref_out, _ = reference_attention(q, k, v, True)
    return relative_error(ringattn.ring_attention(q, k, v, causal=True), ref_out)


def test_without_process_group_is_plain_attention():
    assert _no_group_job(0, 1) < 1e-12


def _empty_shard_job(rank, world, rotation):
    """Shards of no tokens (on every rank) give empty outputs and gradients, no error."""
    q, k, v = (torch.randn(2, 0, 4, 16).requires_grad_() for _ in range(3))
    out, lse = ringattn.ring_attention(q, k, v, causal=True, rotation=rotation, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)
    return tuple(out.shape), tuple(lse.shape), [tuple(g.shape) for g in grads]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("rotation", ["kv", "q"])
def test_empty_shards(pools, world, rotation):
    run = (
        [_empty_shard_job(0, 1, rotation)]
        if world == 1
        else pools(world).run(_empty_shard_job, rotation)
    )
    for out, lse, grads in run:
        assert out == (2, 0, 4, 16) and lse == (2, 4, 0)
        assert grads == [(2, 0, 4, 16)] * 3


def _large_head_dim_job(rank, world, layout):
    worst = 0.0
    for i, (dim, causal) in enumerate(itertools.product((192, 256, 512), (False, True))):
        got, ref = _ring_vs_reference(
            layout, causal, torch.float32, 1, 4, 2, dim, 6, world, 100 + i, "cpu", FINE
        )
        for name in got:
            label = f"d={dim} causal={causal} {name}"
            worst = max(worst, assert_close(label, got[name], ref[name], FP32_TOL))
    return worst


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_head_dims_up_to_512(pools, world, layout):
    """Head dims of current models (192 for MLA's q/k, 256, 512) on the CPU path, causal and
    full, GQA, travelling blocks cut into sub-blocks: out, lse and every gradient."""
    pools(world).run(_large_head_dim_job, layout)


def _bf16_split_job(rank, world, rotation):
    """bf16 through every mask case with the backward cut 4 times finer than the forward
    (``accumulator_split=4``, pieces of 1-2 tokens: shards not divisible by the counts) and
    not at all (``1``): both within twice a float64 reference's error of the other, and of the
    input dtype."""
    from helpers import MASK_CASES, mask_case, masked_reference

    for seed, name in enumerate(MASK_CASES):
        seq_len = 14 * world
        kwargs, allowed, score_mod = mask_case(name, seq_len)
        q, k, v, dout = random_qkv(1, seq_len, 4, 2, 16, seed)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out, _ = masked_reference(*full, allowed, score_mod)
        refs = [ref_out, *torch.autograd.grad(ref_out, full, dout)]
        errors = {}
        for split in (1, 4):
            granularity = ringattn.Granularity(sub_blocks=3, min_tokens=2, accumulator_split=split)
            local = [ringattn.shard(t, "zigzag").bfloat16().requires_grad_() for t in (q, k, v)]
            out = ringattn.ring_attention(
                *local, layout="zigzag", rotation=rotation, granularity=granularity, **kwargs
            )
            grads = torch.autograd.grad(out, local, ringattn.shard(dout, "zigzag").bfloat16())
            assert all(g.dtype == torch.bfloat16 for g in grads)
            errors[split] = [
                relative_error(got, ringattn.shard(ref, "zigzag"))
                for got, ref in zip([out, *grads], refs, strict=True)
            ]
        for unsplit, split in zip(errors[1], errors[4], strict=True):
            assert split <= max(2 * unsplit, 1e-2), (name, rotation, world, errors)


@pytest.mark.parametrize(("world", "rotation"), [(2, "kv"), (4, "kv"), (3, "q")])
def test_bf16_backward_split_is_exact_for_every_mask(pools, world, rotation):
    pools(world).run(_bf16_split_job, rotation)
