"""A value head dim that differs from the query/key one (DeepSeek's MLA: 192 for q/k, 128 for v)
in ring mode, against a float64 reference: out, lse, dq, dk, dv, every layout, the masks
(full, causal, sliding window, packed documents, a score_mod), both rotations, world sizes 1-4,
blocks cut into sub-blocks; the zero-padding kernel wrapper on its own; a sharded KV cache."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK_CASES, assert_close, mask_case, masked_reference

import ringattn
from ringattn.kernels import KERNELS, PaddedHeadDims, select_kernel

FP32_TOL = 1e-5
BATCH, HEADS_Q, HEADS_KV = 2, 4, 2
FINE = ringattn.Granularity(sub_blocks=3, min_tokens=1)


def _inputs(seq_len: int, dim_qk: int, dim_v: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, seq_len, HEADS_Q, dim_qk, generator=gen, dtype=torch.float64)
    k = torch.randn(BATCH, seq_len, HEADS_KV, dim_qk, generator=gen, dtype=torch.float64)
    v = torch.randn(BATCH, seq_len, HEADS_KV, dim_v, generator=gen, dtype=torch.float64)
    dout = torch.randn(BATCH, seq_len, HEADS_Q, dim_v, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def _value_dim_job(rank, world, layout, rotation, dims):
    dim_qk, dim_v = dims
    for seed, name in enumerate(MASK_CASES):
        seq_len = 12 * world
        kwargs, allowed, score_mod = mask_case(name, seq_len)
        q, k, v, dout = _inputs(seq_len, dim_qk, dim_v, seed)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = masked_reference(*full, allowed[None, None], score_mod=score_mod)
        ref_grads = torch.autograd.grad(ref_out, full, dout)
        local = [ringattn.shard(t, layout).float().requires_grad_() for t in (q, k, v)]
        out, lse = ringattn.ring_attention(
            *local,
            layout=layout,
            rotation=rotation,
            return_lse=True,
            granularity=FINE if seed % 2 else None,
            **kwargs,
        )
        assert out.shape == (BATCH, seq_len // world, HEADS_Q, dim_v)
        grads = torch.autograd.grad(out, local, ringattn.shard(dout, layout).float())
        label = f"{name} {layout} {rotation} p={world} d={dim_qk}/{dim_v}"
        assert_close(f"{label} out", out, ringattn.shard(ref_out, layout), FP32_TOL)
        assert_close(f"{label} lse", lse, ringattn.shard(ref_lse, layout, dim=2), FP32_TOL)
        for got, ref, g in zip(grads, ref_grads, "qkv", strict=True):
            assert got.shape == ringattn.shard(ref, layout).shape
            assert_close(f"{label} d{g}", got, ringattn.shard(ref, layout), FP32_TOL)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_mla_value_dim_matches_reference(pools, world, layout):
    pools(world).run(_value_dim_job, layout, "kv", (24, 16))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dims", [(24, 16), (8, 20)], ids=["v-narrower", "v-wider"])
def test_value_dim_under_pass_q(pools, world, dims):
    pools(world).run(_value_dim_job, "zigzag", "q", dims)


def test_value_wider_than_query_under_pass_kv(pools):
    pools(2).run(_value_dim_job, "zigzag", "kv", (8, 20))


@pytest.mark.parametrize("dims", [(24, 16), (16, 24)])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_wrapper_equals_the_reference_kernel(dims, causal):
    """The fused CPU kernel on zero-padded copies equals the dense kernel on the real dims."""
    dim_qk, dim_v = dims
    q, k, v, dout = (t.float() for t in _inputs(9, dim_qk, dim_v, 3))
    wrapped = select_kernel("cpu_flash", q, dim_v)
    assert isinstance(wrapped, PaddedHeadDims) and wrapped.name == "cpu_flash"
    assert select_kernel("reference", q, dim_v) is KERNELS["reference"]
    args = {"causal": causal, "scale": 0.3}
    out, lse = wrapped.forward(q, k, v, **args)
    ref_out, ref_lse = KERNELS["reference"].forward(q, k, v, **args)
    assert out.shape == ref_out.shape == (BATCH, 9, HEADS_Q, dim_v)
    assert_close("out", out, ref_out, FP32_TOL)
    assert_close("lse", lse, ref_lse, FP32_TOL)
    grads = wrapped.backward(dout, q, k, v, out, lse, **args)
    ref_grads = KERNELS["reference"].backward(dout, q, k, v, out, lse, **args)
    for got, ref, like in zip(grads, ref_grads, (q, k, v), strict=True):
        assert got.shape == like.shape
        assert_close("grad", got, ref, FP32_TOL)


def _cache_job(rank, world):
    """Prefill and decode from a sharded KV cache whose values have their own head dim."""
    dim_qk, dim_v, prompt, steps = 24, 16, 6 * world, 3
    q, k, v, _ = (t.float() for t in _inputs(prompt + steps, dim_qk, dim_v, 11))
    cache = ringattn.KVCache(1, BATCH, HEADS_KV, dim_qk, head_dim_v=dim_v)
    i = torch.arange(prompt + steps)
    ref, _ = masked_reference(q.double(), k.double(), v.double(), (i[None, :] <= i[:, None]))
    out = cache.prefill(0, *(ringattn.shard(t[:, :prompt]) for t in (q, k, v)))
    assert_close("prefill", out, ringattn.shard(ref[:, :prompt]).float(), FP32_TOL)
    for step in range(prompt, prompt + steps):
        new = [t[:, step : step + 1] for t in (q, k, v)]
        assert_close(f"decode {step}", cache.extend(0, *new), ref[:, step : step + 1], FP32_TOL)


@pytest.mark.parametrize("world", [1, 3])
def test_kv_cache_with_value_dim(pools, world):
    pools(world).run(_cache_job)


def _bad_value_job(rank, world):
    q = torch.randn(1, 4, 4, 8)
    v = torch.randn(1, 4, 1 if rank == 0 else 2, 6)
    try:
        ringattn.ring_attention(q, q[:, :, :2], v)
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


def test_values_with_other_heads_raise_on_every_rank(pools):
    messages = pools(2).run(_bad_value_job)
    assert all(m and "only the head_dim may differ" in m for m in messages), messages
