"""The CUDA path.

Everywhere (CI included): each CUDA kernel runs with its fused aten op replaced by float64 math on
the CPU that keeps the op's signature and layouts, and must return exact attention, log-sum-exp and
gradients — which checks argument order, the ``(batch, seq, heads, dim)`` <-> ``(batch, heads,
seq, dim)`` plumbing, GQA and the log-sum-exp layout each op hands back, without a GPU; and the
backend routing that lets ranks share a GPU over gloo is checked on real gloo groups.

With a GPU (marker ``cuda``; ``make test-cuda`` or ``scripts/device-check.sh``): every CUDA kernel
against an fp64 reference, then the same exactness jobs the CPU suite runs (all layouts, masks,
both rotations, the KV cache) on CUDA tensors, over NCCL when there is a GPU per rank and over
gloo through host memory when the ranks share one GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import test_inference
import test_masks
import test_ring_exact
import test_rotation
import torch
import torch.distributed as dist
from helpers import assert_close, reference_attention

import ringattn
from ringattn.comm import backend_for, transfer_device
from ringattn.kernels import KERNELS, select_kernel
from ringattn.tools.launch import cuda_backend

CUDA_KERNELS = ("cuda_flash", "cuda_efficient", "cuda_cudnn")
LAYOUTS = ("contiguous", "zigzag", "striped")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fresh(name: str):
    """A new instance, so no random-state placeholders are left from an earlier call."""
    return type(KERNELS[name])()


def _math_attention(q, k, v, causal, scale):
    """Attention in the ops' ``(batch, heads, seq, dim)`` layout; fewer KV heads are grouped
    (query head ``h`` reads KV head ``h // group``); causal is top-left, as the fused ops do."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        hidden = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse


def _math_grads(dout, q, k, v, out, lse, causal, scale):
    """Gradients from the ``out`` and ``lse`` the kernel hands back, as the fused backward ops
    compute them: P = exp(S - lse), delta = rowsum(dO * O), dS = P (dO V^T - delta)."""
    _check_layouts(dout, q, k, v, out)
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k_rep.transpose(-1, -2)) * scale
    if causal:
        hidden = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.exp(scores - lse[..., None])
    delta = (dout * out).sum(-1, keepdim=True)
    d_scores = probs * (dout @ v_rep.transpose(-1, -2) - delta)
    dq = d_scores @ k_rep * scale
    dk = (d_scores.transpose(-1, -2) @ q * scale).unflatten(1, (k.shape[1], group)).sum(2)
    dv = (probs.transpose(-1, -2) @ dout).unflatten(1, (k.shape[1], group)).sum(2)
    return dq, dk, dv


def _check_layouts(dout, q, k, v, out):
    """What the fused ops assume of their inputs: the last dimension contiguous, and ``dout``
    and ``out`` laid out as contiguous (batch, seq, heads, dim) rows."""
    for t in (dout, q, k, v, out):
        assert t.stride(-1) == 1, t.stride()
    for t in (dout, out):
        _, heads, _, dim = t.shape
        assert t.stride(1) == dim and t.stride(2) == heads * dim, t.stride()


class _FakeOps:
    """Stand-ins for the fused aten ops with their documented signatures and layouts, computed
    in float64 math on the CPU; each records what it was given, so the kernels' plumbing
    (transposes, GQA, scale, causality, the log-sum-exp layout each op returns and takes back)
    is checked against attention itself, without a GPU."""

    def __init__(self):
        self.calls = []

    def flash(self, q, k, v, dropout, causal, debug, *, scale):
        self.calls.append(("flash", q.shape, k.shape, causal, scale))
        out, lse = _math_attention(q, k, v, causal, scale)
        return out, lse, None, None, q.shape[2], k.shape[2], "rng", "unused", None

    def flash_backward(self, dout, q, k, v, out, lse, cq, ck, mq, mk, p, causal, rng, u, *, scale):
        assert (rng, u, mq, mk) == ("rng", "unused", q.shape[2], k.shape[2])
        assert type(mq) is int and type(mk) is int and lse.shape == q.shape[:3]
        return _math_grads(dout, q, k, v, out, lse, causal, scale)

    def efficient(self, q, k, v, bias, compute_lse, dropout, causal, *, scale):
        self.calls.append(("efficient", q.shape, k.shape, causal, scale))
        out, lse = _math_attention(q, k, v, causal, scale)
        padded = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32), value=float("nan"))
        return out, padded, "seed", "offset"

    def efficient_backward(
        self, dout, q, k, v, bias, out, lse, seed, offset, p, mask, causal, *, scale
    ):
        assert (seed, offset) == ("seed", "offset") and lse.shape[-1] % 32 == 0
        assert list(mask) == [True, True, True, False]
        lse = lse[..., : q.shape[2]]
        return (*_math_grads(dout, q, k, v, out, lse, causal, scale), None)

    def cudnn(self, q, k, v, bias, compute_lse, dropout, causal, debug, *, scale):
        self.calls.append(("cudnn", q.shape, k.shape, causal, scale))
        out, lse = _math_attention(q, k, v, causal, scale)
        return out, lse[..., None], None, None, q.shape[2], k.shape[2], "seed", "offset", None

    def cudnn_backward(
        self, dout, q, k, v, out, lse, seed, offset, bias, cq, ck, mq, mk, p, causal, *, scale
    ):
        assert (seed, offset) == ("seed", "offset") and lse.shape == (*q.shape[:3], 1)
        assert type(mq) is int and type(mk) is int and (mq, mk) == (q.shape[2], k.shape[2])
        return _math_grads(dout, q, k, v, out, lse[..., 0], causal, scale)


@pytest.mark.parametrize("name", CUDA_KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_contract_on_meta(name, causal):
    """The real aten ops' schemas and meta kernels accept the arguments each kernel passes."""
    batch, heads_q, heads_kv, dim = 2, 8, 2, 64
    seq_q, seq_k = (40, 40) if causal else (40, 24)
    dtype, scale = torch.bfloat16, 0.125

    def strided(seq, heads):  # a slice along the sequence, as the engine passes tiles
        return torch.empty(batch, seq + 5, heads, dim, device="meta", dtype=dtype)[:, 3 : 3 + seq]

    q, dout = strided(seq_q, heads_q), strided(seq_q, heads_q)
    k, v = strided(seq_k, heads_kv), strided(seq_k, heads_kv)
    kernel = _fresh(name)
    out, lse = kernel.forward(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, heads_q, seq_q) and lse.dtype == torch.float32
    for backward_first in (False, True):  # a backward before any forward makes its own state
        kernel = _fresh(name) if backward_first else kernel
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.fixture
def fake_ops(monkeypatch):
    ops = _FakeOps()
    names = {
        "_scaled_dot_product_flash_attention": ops.flash,
        "_scaled_dot_product_flash_attention_backward": ops.flash_backward,
        "_scaled_dot_product_efficient_attention": ops.efficient,
        "_scaled_dot_product_efficient_attention_backward": ops.efficient_backward,
        "_scaled_dot_product_cudnn_attention": ops.cudnn,
        "_scaled_dot_product_cudnn_attention_backward": ops.cudnn_backward,
    }
    for name, fake in names.items():
        monkeypatch.setattr(torch.ops.aten, name, fake)
    return ops


@pytest.mark.parametrize("name", CUDA_KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_plumbing_against_attention(fake_ops, name, causal):
    """Each CUDA kernel, its fused op replaced by float64 math on the CPU with the op's own
    layout, returns exact attention, log-sum-exp and gradients for strided (batch, seq, heads,
    dim) slices with GQA, also when its backward runs before any forward."""
    batch, heads_q, heads_kv, dim = 2, 6, 2, 8
    seq_q, seq_k = (7, 7) if causal else (5, 9)
    scale = 0.3

    def strided(seq, heads, seed):  # a slice along the sequence, as the engine passes tiles
        gen = torch.Generator().manual_seed(seed)
        full = torch.randn(batch, seq + 5, heads, dim, generator=gen, dtype=torch.float64)
        return full[:, 3 : 3 + seq]

    q, dout = strided(seq_q, heads_q, 0), strided(seq_q, heads_q, 1)
    k, v = strided(seq_k, heads_kv, 2), strided(seq_k, heads_kv, 3)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*full, causal, scale)
    ref_grads = torch.autograd.grad(ref_out, full, dout)
    kernel = _fresh(name)
    out, lse = kernel.forward(q, k, v, causal=causal, scale=scale)
    assert_close(f"{name} out", out, ref_out, 1e-12)
    assert_close(f"{name} lse", lse, ref_lse, 1e-12)
    op, q_shape, k_shape, op_causal, op_scale = fake_ops.calls[-1]
    assert name.endswith(op) and (op_causal, op_scale) == (causal, scale)
    native_gqa = name == "cuda_flash"
    assert q_shape == (batch, heads_q, seq_q, dim)
    assert k_shape == (batch, heads_kv if native_gqa else heads_q, seq_k, dim)
    for backward_first in (False, True):  # a backward before any forward makes its own state
        kernel = _fresh(name) if backward_first else kernel
        grads = kernel.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
        for got, ref, label in zip(grads, ref_grads, ("dq", "dk", "dv"), strict=True):
            assert got.shape == ref.shape, f"{name} {label}: {got.shape}"
            assert_close(f"{name} {label}", got, ref, 1e-12)


@pytest.mark.parametrize("name", CUDA_KERNELS)
def test_cuda_kernels_refuse_cpu_tensors(name):
    q = torch.zeros(1, 8, 2, 64)
    assert "CUDA tensors only" in KERNELS[name].unsupported_reason(q)
    with pytest.raises(ValueError, match="runs on CUDA tensors only"):
        select_kernel(name, q)
    assert select_kernel("auto", q).name == "cpu_flash"


@pytest.mark.parametrize(
    "capability, dim, dtype, expected",
    [
        ((9, 0), 128, torch.bfloat16, "cuda_flash"),
        ((9, 0), 256, torch.bfloat16, "cuda_flash"),
        ((9, 0), 512, torch.bfloat16, "cuda_efficient"),  # flash takes at most 256
        ((8, 6), 256, torch.float16, "cuda_efficient"),  # no flash backward above 192 there
        ((8, 6), 192, torch.float16, "cuda_flash"),
        ((9, 0), 128, torch.float32, "cuda_efficient"),  # flash has no float32
    ],
)
def test_auto_skips_kernels_that_cannot_take_the_head_dim(
    monkeypatch, capability, dim, dtype, expected
):
    """The automatic choice by head dim, dtype and architecture, without a GPU: the checks read
    only the tensor's device type, dtype and shape and the device's compute capability."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    q = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(1, 8, 4, dim))
    assert select_kernel("auto", q).name == expected
    if expected != "cuda_flash":
        assert KERNELS["cuda_flash"].unsupported_reason(q) is not None


def test_the_trace_says_which_kernel_ran():
    q = torch.randn(1, 8, 2, 16)
    with ringattn.record_ring() as trace:
        ringattn.ring_attention(q, q, q, causal=True)
    assert trace.kernels == ["cpu_flash"] and "kernel: cpu_flash" in trace.summary()
    with ringattn.record_ring() as trace:  # a score_mod runs on the masked path's kernel
        ringattn.ring_attention(q, q, q, causal=True, score_mod=ringattn.softcap(0.5))
    assert trace.kernels == ["reference"]


def test_backend_override_for_nodes_that_differ(monkeypatch):
    monkeypatch.setenv("RINGATTN_CUDA_BACKEND", "gloo")
    assert cuda_backend(local_world_size=2, gpus=8) == "gloo"
    monkeypatch.setenv("RINGATTN_CUDA_BACKEND", "mpi")
    with pytest.raises(ValueError, match="'nccl' or 'gloo'"):
        cuda_backend(local_world_size=2, gpus=8)


def test_ranks_share_a_gpu_over_gloo():
    assert cuda_backend(local_world_size=2, gpus=2) == "nccl"
    assert cuda_backend(local_world_size=8, gpus=4) == "gloo"
    assert cuda_backend(local_world_size=4, gpus=1) == "gloo"
    assert transfer_device(None, torch.device("cuda", 0)) == torch.device("cuda", 0)


def _routing_job(rank, world):
    group = dist.group.WORLD
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    return (
        backend_for(group, "cuda"),
        transfer_device(group, cuda) == cpu,
        transfer_device(group, cpu) == cpu,
    )


def test_gloo_groups_move_cuda_tensors_through_host_memory(pools):
    for backend, cuda_staged, cpu_direct in pools(2).run(_routing_job):
        assert backend == "gloo" and cuda_staged and cpu_direct


def test_backend_of_a_mixed_group(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group: "cpu:gloo,cuda:nccl")
    group = object()
    assert backend_for(group, "cuda") == "nccl" and backend_for(group, "cpu") == "gloo"
    assert transfer_device(group, torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert backend_for(group, "xpu") is None


# Per-dtype tolerances of one fused kernel call against fp64 (relative to max |reference|).
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("name", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_cuda_kernel_matches_fp64_reference(name, dtype, causal, heads):
    heads_q, heads_kv = heads
    seq_q, seq_k, dim, device = 200, (200 if causal else 136), 64, torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(seq, h):
        return torch.randn(2, seq, h, dim, generator=gen, device=device, dtype=torch.float64)

    q64, k64, v64, dout64 = (
        rand(seq_q, heads_q),
        rand(seq_k, heads_kv),
        rand(seq_k, heads_kv),
        rand(seq_q, heads_q),
    )
    kernel = _fresh(name)
    reason = kernel.unsupported_reason(q64.to(dtype))
    if reason:
        pytest.skip(f"{name} {reason}")
    scale = dim**-0.5
    reference = KERNELS["reference"]
    ref_out, ref_lse = reference.forward(q64, k64, v64, causal=causal, scale=scale)
    ref_grads = reference.backward(
        dout64, q64, k64, v64, ref_out, ref_lse, causal=causal, scale=scale
    )
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    out, lse = kernel.forward(q, k, v, causal=causal, scale=scale)
    grads = kernel.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    tol = KERNEL_TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, ref_out, tol)
    assert_close("lse", lse, ref_lse, tol)
    for label, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(label, got, ref, tol * 2)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ring_fp32_on_cuda(pools, world, layout, causal):
    pools(world, "cuda").run(test_ring_exact._fp32_job, layout, causal, "cuda")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_ring_low_precision_on_cuda(pools, world, causal, dtype_name):
    for layout in LAYOUTS:
        pools(world, "cuda").run(
            test_ring_exact._low_precision_job, layout, causal, dtype_name, "cuda"
        )


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("world", [1, 2, 3])
def test_masks_rotations_and_decoding_on_cuda(pools, world):
    pool = pools(world, "cuda")
    for layout in LAYOUTS:
        pool.run(test_masks._masks_job, layout, (37, 48), "cuda")
        for rotation in ("q", "kv"):
            pool.run(test_rotation._rotation_job, layout, rotation, "cuda")
    pool.run(test_inference._decode_job, "zigzag", 10, 1, "cuda")


@pytest.mark.cuda
@needs_gpu
def test_cuda_output_keeps_input_dtype_and_device():
    q = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = ringattn.ring_attention(q, q, q, causal=True)
    out.sum().backward()
    assert out.dtype == q.grad.dtype == torch.bfloat16 and out.device == q.device
