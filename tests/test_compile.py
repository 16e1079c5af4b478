"""Models that use ring attention still compile: the ring call is a graph break, results equal."""

from __future__ import annotations

import torch
from helpers import assert_close

import ringattn


def _compiled_job(rank, world):
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 96)
    x = ringattn.shard(torch.randn(2, 40, 32), "zigzag")

    def block(x: torch.Tensor) -> torch.Tensor:
        q, k, v = proj(x).unflatten(-1, (3, 4, 8)).unbind(2)  # 4 heads of dim 8
        out = ringattn.ring_attention(q, k, v, causal=True)
        return ringattn.unshard(out.flatten(2).tanh()).square().mean()

    eager = block(x)
    (eager_grad,) = torch.autograd.grad(eager, proj.weight)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=False)(x)
    (compiled_grad,) = torch.autograd.grad(compiled, proj.weight)
    assert_close("loss", compiled.detach(), eager.detach(), 1e-6)
    assert_close("grad", compiled_grad, eager_grad, 1e-6)
    torch._dynamo.reset()


def test_compiled_model_with_ring_attention_equals_eager(pools):
    pools(2).run(_compiled_job)
