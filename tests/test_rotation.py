"""Pass-Q against the reference and against pass-KV; the automatic choice between them."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, masked_reference

import ringattn
from ringattn.rotation import choose_rotation, rotation_bytes

FP32_TOL = 1e-5


def _qkv(batch, seq_q, seq_kv, heads_q, heads_kv, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads_q, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, seq_kv, heads_kv, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, seq_kv, heads_kv, dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, seq_q, heads_q, dim, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def _allowed(seq_q, seq_kv, causal, window=None):
    """Bottom-right aligned: query i sits at key position i + seq_kv - seq_q."""
    i = torch.arange(seq_q)[:, None] + (seq_kv - seq_q)
    j = torch.arange(seq_kv)[None, :]
    allowed = torch.ones(seq_q, seq_kv, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (j >= i - window[0]) & (j <= i + window[1])
    return allowed[None, None]


def _rotation_job(rank, world, layout, rotation, device="cpu"):
    configs = [
        # (seq_q_local, seq_kv_local, heads_q, heads_kv, causal, window)
        (6, 6, 4, 4, False, None),
        (6, 6, 8, 2, True, None),
        (2, 10, 4, 2, True, None),  # q shorter than kv: chunked prefill
        (4, 12, 4, 1, False, None),  # cross-attention, MQA
        (4, 8, 4, 2, True, (3, 0)),  # windowed, q shorter
    ]
    for seed, (nq, nkv, hq, hkv, causal, window) in enumerate(configs):
        q, k, v, dout = _qkv(2, nq * world, nkv * world, hq, hkv, 16, seed)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = masked_reference(
            *full, _allowed(nq * world, nkv * world, causal, window)
        )
        ref_grads = torch.autograd.grad(ref_out, full, dout)
        local = [
            ringattn.shard(t, layout).to(device, torch.float32).requires_grad_() for t in (q, k, v)
        ]
        mask = ringattn.create_ring_mask(
            nq * world, nkv * world, causal=causal, window=window, layout=layout, tile_size=4
        )
        out, lse = ringattn.ring_attention(
            *local,
            mask=mask,
            rotation=rotation,
            return_lse=True,
            granularity=ringattn.Granularity(sub_blocks=3, min_tokens=1) if seed % 2 else None,
        )
        grads = torch.autograd.grad(out, local, ringattn.shard(dout, layout).to(device).float())
        out, lse, grads = out.cpu(), lse.cpu(), [g.cpu() for g in grads]
        label = f"{rotation} nq={nq} nkv={nkv} h={hq}/{hkv} causal={causal} window={window}"
        assert_close(f"{label} out", out, ringattn.shard(ref_out, layout), FP32_TOL)
        assert_close(f"{label} lse", lse, ringattn.shard(ref_lse, layout, dim=2), FP32_TOL)
        for got, ref, name in zip(grads, ref_grads, ("dq", "dk", "dv"), strict=True):
            assert got.dtype == torch.float32
            assert_close(f"{label} {name}", got, ringattn.shard(ref, layout), FP32_TOL)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("rotation", ["q", "kv"])
def test_rotation_matches_reference(pools, world, layout, rotation):
    pools(world).run(_rotation_job, layout, rotation)


def _bytes_job(rank, world):
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 32, 2, 16)
    v = torch.randn(1, 32, 2, 16)
    with ringattn.record_ring() as trace:
        ringattn.ring_attention(q, k, v, layout="contiguous", rotation="q")
    forward = [s.bytes_sent for s in trace.steps if s.phase == "forward"]
    q_bytes = q.numel() * 4
    partial_bytes = q.numel() * 4 + 1 * 8 * 4 * 4  # fp32 out + lse (b, h, s)
    return forward, q_bytes, partial_bytes


def test_pass_q_sends_query_block_and_partials(pools):
    world = 3
    for forward, q_bytes, partial_bytes in pools(world).run(_bytes_job):
        # steps 0..p-2 send the travelling query block and the returning partials; the last
        # step sends only the partials home, and the final entry records the last wait.
        assert forward[: world - 1] == [q_bytes + partial_bytes] * (world - 1)
        assert forward[world - 1] == partial_bytes


def test_choose_rotation_rule_and_boundary():
    # Equal lengths: keys/values always move fewer bytes.
    for dtype in (torch.float32, torch.bfloat16):
        for heads_kv in (1, 2, 8):
            assert choose_rotation(4096, 4096, 8, heads_kv, 64, dtype) == "kv"
            assert choose_rotation(4096, 4096, 8, heads_kv, 64, dtype, needs_grad=True) == "kv"
    # Decoding-like: one query against a long cache moves queries.
    assert choose_rotation(1, 4096, 8, 8, 64) == "q"
    # The boundary is exactly where the byte counts cross.
    for needs_grad in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            flips = [
                n
                for n in range(1, 4097)
                if choose_rotation(n, 4096, 8, 2, 64, dtype, needs_grad) == "kv"
            ]
            first_kv = flips[0]
            below = rotation_bytes(first_kv - 1, 4096, 8, 2, 64, dtype, needs_grad)
            at = rotation_bytes(first_kv, 4096, 8, 2, 64, dtype, needs_grad)
            assert below["q"] < below["kv"] and at["q"] >= at["kv"]
            assert flips == list(range(first_kv, 4097))
