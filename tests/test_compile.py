"""Models that use ring attention compile. With a RingMask the call is the custom op
``ringattn::ring_attention``: ``torch.compile(fullgraph=True)`` traces the whole model (sinks,
a score_mod, dropout, lse and max logits included), one compilation serves every batch's new
mask, and compiled equals eager, forward and backward. With mask keywords the call is a graph
break and the rest of the model compiles."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import ringattn

HEADS, DIM, WIDTH = 4, 8, 32


def _block(proj: torch.nn.Linear, sinks: torch.Tensor):
    def block(x: torch.Tensor, mask: ringattn.RingMask) -> torch.Tensor:
        q, k, v = proj(x).unflatten(-1, (3, HEADS, DIM)).unbind(2)
        out, lse, peak = ringattn.ring_attention(
            q,
            k[:, :, :2],  # GQA: 2 KV heads
            v[:, :, :2],
            mask=mask,
            sinks=sinks,
            score_mod=ringattn.softcap(4.0),
            dropout_p=0.2,
            dropout_seed=11,
            return_lse=True,
            return_max_logits=True,
        )
        return out.tanh().square().mean() + 1e-3 * (lse.mean() + peak.sum())

    return block


def _counting_backend():
    compiled = []

    def backend(graph_module, example_inputs):
        compiled.append(graph_module)
        return torch._dynamo.backends.debugging.aot_eager(graph_module, example_inputs)

    return backend, compiled


def _fullgraph_job(rank, world, backend_name):
    torch.manual_seed(0)
    proj, sinks = torch.nn.Linear(WIDTH, 3 * HEADS * DIM), torch.randn(HEADS, requires_grad=True)
    block = _block(proj, sinks)
    backend, compiled = _counting_backend()
    compiled_block = torch.compile(
        block, backend=backend if backend_name == "counting" else backend_name, fullgraph=True
    )
    for batch in range(3):  # a new mask per batch, as in training
        x = ringattn.shard(
            torch.randn(2, 24 * world, WIDTH, generator=torch.Generator().manual_seed(batch))
        )
        mask = ringattn.create_ring_mask(24 * world, causal=True, window=(20, 0))
        eager = block(x, mask)
        eager_grads = torch.autograd.grad(eager, (proj.weight, sinks))
        got = compiled_block(x, mask)
        got_grads = torch.autograd.grad(got, (proj.weight, sinks))
        assert_close("loss", got.detach(), eager.detach(), 1e-6)
        for name, g, e in zip(("weight", "sinks"), got_grads, eager_grads, strict=True):
            assert_close(f"d{name}", g, e, 1e-5)
    torch._dynamo.reset()
    return len(compiled)


@pytest.mark.parametrize("world", [2, 3])
def test_fullgraph_compile_equals_eager_and_compiles_once(pools, world):
    counts = pools(world).run(_fullgraph_job, "counting")
    assert counts == [1] * world, f"one graph for every batch's mask, got {counts}"


@pytest.mark.slow  # inductor's C++ compilation, uncached on a fresh machine (`make test-slow`)
def test_fullgraph_compile_with_inductor(pools):
    pools(2).run(_fullgraph_job, "inductor")


def _graph_break_job(rank, world):
    torch.manual_seed(0)
    proj = torch.nn.Linear(WIDTH, 3 * HEADS * DIM)
    x = ringattn.shard(torch.randn(2, 40, WIDTH), "zigzag")

    def block(x: torch.Tensor) -> torch.Tensor:
        q, k, v = proj(x).unflatten(-1, (3, HEADS, DIM)).unbind(2)
        out = ringattn.ring_attention(q, k, v, causal=True)  # keywords: a graph break
        return ringattn.unshard(out.flatten(2).tanh()).square().mean()

    eager = block(x)
    (eager_grad,) = torch.autograd.grad(eager, proj.weight)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=False)(x)
    (compiled_grad,) = torch.autograd.grad(compiled, proj.weight)
    assert_close("loss", compiled.detach(), eager.detach(), 1e-6)
    assert_close("grad", compiled_grad, eager_grad, 1e-6)
    torch._dynamo.reset()
    try:
        torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    except Exception as exc:  # torch._dynamo's graph-break error under fullgraph
        torch._dynamo.reset()
        return type(exc).__name__
    return None


def test_mask_keywords_are_a_graph_break(pools):
    assert all(pools(2).run(_graph_break_job)), "fullgraph must refuse the keyword path"


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake tensors against real outputs, autograd registration."""
    q = torch.randn(1, 16, HEADS, DIM, requires_grad=True)
    k, v = (torch.randn(1, 16, 2, DIM, requires_grad=True) for _ in range(2))
    mask = ringattn.create_ring_mask(16, causal=True)
    from ringattn.ops import _call_key

    options = (None, None, None, "auto", "auto", True, 0.0, None, True, False)
    key = (
        _call_key.__wrapped__(options, True)
        if hasattr(_call_key, "__wrapped__")
        else _call_key(options, True)
    )
    args = (q, k, v, None, mask.key, key, None, 0.0, None)
    torch.library.opcheck(torch.ops.ringattn.ring_attention.default, args)


def _per_step_job(rank, world):
    """Values that change every step — the dropout seed, or none (drawn from torch's generator
    inside the op) — recompile at most once and equal eager; an identity score_mod keeps the
    gradients of q and k."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(WIDTH, 3 * HEADS * DIM)
    mask = ringattn.create_ring_mask(16 * world, causal=True)

    def block(x, seed, score_mod):
        q, k, v = proj(x).unflatten(-1, (3, HEADS, DIM)).unbind(2)
        out = ringattn.ring_attention(
            q, k, v, mask=mask, dropout_p=0.3, dropout_seed=seed, score_mod=score_mod
        )
        return out.square().mean()

    def identity(score, b, h, q_idx, kv_idx):
        return score

    backend, compiled = _counting_backend()
    compiled_block = torch.compile(block, backend=backend, fullgraph=True)
    x = ringattn.shard(
        torch.randn(2, 16 * world, WIDTH, generator=torch.Generator().manual_seed(1))
    )
    for seed, score_mod in ((1, None), (2, None), (3, None), (None, None), (None, identity)):
        torch.manual_seed(5)
        eager = block(x, seed, score_mod)
        (eager_grad,) = torch.autograd.grad(eager, proj.weight)
        torch.manual_seed(5)
        got = compiled_block(x, seed, score_mod)
        (got_grad,) = torch.autograd.grad(got, proj.weight)
        assert_close(f"seed {seed} loss", got.detach(), eager.detach(), 1e-6)
        assert_close(f"seed {seed} grad", got_grad, eager_grad, 1e-5)
    plain = torch.autograd.grad(block(x, 9, None), proj.weight)[0]
    with_identity = torch.autograd.grad(block(x, 9, identity), proj.weight)[0]
    assert_close("identity score_mod's gradient", with_identity, plain, 1e-6)
    torch._dynamo.reset()
    return len(compiled)


def test_per_step_values_and_identity_score_mod(pools):
    counts = pools(2).run(_per_step_job)
    assert all(c <= 4 for c in counts), counts
