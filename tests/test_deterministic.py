"""``deterministic=True``: repeated calls give bitwise-identical outputs, log-sum-exp and
gradients on every world size 1-4, layout, mask and rotation; the passes run under
torch.use_deterministic_algorithms and restore the caller's setting; kernels that are not
deterministic are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK_CASES, mask_case, random_qkv

import ringattn
from ringattn.kernels import KERNELS, select_kernel
from ringattn.kernels.cpu_flash import CpuFlashKernel

FINE = ringattn.Granularity(sub_blocks=3, min_tokens=1)


def _run(local, dout, **kwargs):
    inputs = [t.detach().clone().requires_grad_() for t in local]
    out, lse = ringattn.ring_attention(*inputs, return_lse=True, deterministic=True, **kwargs)
    return (out, lse, *torch.autograd.grad(out, inputs, dout))


def _repeat_job(rank, world, layout, rotation):
    for seed, name in enumerate(MASK_CASES):
        seq_len = 24 * world
        kwargs, _, _ = mask_case(name, seq_len)
        q, k, v, dout = random_qkv(2, seq_len, 8, 2, 32, seed, dtype=torch.float32)
        local = [ringattn.shard(t, layout) for t in (q, k, v)]
        kwargs.update(layout=layout, rotation=rotation, granularity=FINE if seed % 2 else None)
        first = _run(local, ringattn.shard(dout, layout), **kwargs)
        second = _run(local, ringattn.shard(dout, layout), **kwargs)
        for a, b, what in zip(first, second, ("out", "lse", "dq", "dk", "dv"), strict=True):
            assert torch.equal(a, b), f"{name} {layout} {rotation} p={world}: {what} differs"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_repeated_calls_are_bitwise_identical(pools, world, layout):
    pools(world).run(_repeat_job, layout, "kv")


@pytest.mark.parametrize("world", [2, 3])
def test_repeated_calls_under_pass_q_are_bitwise_identical(pools, world):
    pools(world).run(_repeat_job, "zigzag", "q")


class _Spy(CpuFlashKernel):
    """The CPU kernel, recording whether deterministic algorithms were on in every call."""

    def __init__(self):
        self.seen = []

    def forward(self, *args, **kwargs):
        self.seen.append(torch.are_deterministic_algorithms_enabled())
        return super().forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.seen.append(torch.are_deterministic_algorithms_enabled())
        return super().backward(*args, **kwargs)


def test_passes_run_in_deterministic_mode_and_restore_the_setting():
    spy = _Spy()
    q = torch.randn(1, 8, 2, 8, requires_grad=True)
    assert not torch.are_deterministic_algorithms_enabled()
    ringattn.ring_attention(q, q, q, kernel=spy, deterministic=True).sum().backward()
    assert spy.seen == [True, True]
    assert not torch.are_deterministic_algorithms_enabled()
    ringattn.ring_attention(q, q, q, kernel=spy).sum().backward()
    assert spy.seen[2:] == [False, False]


def test_non_deterministic_kernels_are_refused():
    class Racy(CpuFlashKernel):
        deterministic = False

    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="not deterministic"):
        ringattn.ring_attention(q, q, q, kernel=Racy(), deterministic=True)
    assert not KERNELS["cuda_cudnn"].deterministic
    assert select_kernel("auto", q, deterministic=True).deterministic


def test_repeated_calls_with_threads_are_bitwise_identical():
    """One process, every core (the pools run one thread per rank): the fused CPU kernel splits
    its work over threads, and the results still repeat bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for name in ("causal", "softcap"):
            kwargs, _, _ = mask_case(name, 1024)
            q, k, v, dout = random_qkv(2, 1024, 8, 2, 64, 3, dtype=torch.float32)
            first = _run((q, k, v), dout, granularity=FINE, **kwargs)
            second = _run((q, k, v), dout, granularity=FINE, **kwargs)
            for a, b in zip(first, second, strict=True):
                assert torch.equal(a, b), name
    finally:
        torch.set_num_threads(threads)
