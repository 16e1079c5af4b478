"""Online-softmax merge of partial attention results, in fp32.

For a query row with partial results ``(o1, l1)`` and ``(o2, l2)`` — ``l`` the log-sum-exp of the
scaled scores seen so far and ``o`` the normalised output —

    l = log(exp(l1) + exp(l2)),      o = exp(l1 - l) * o1 + exp(l2 - l) * o2.

A row that has seen no key has ``l = -inf`` and ``o = 0`` and stays finite through the merge.
"""

from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges and gradient sums run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_partial(q: torch.Tensor, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The result of seeing no key, in the accumulator dtype: out 0 ``(b, s, h, value_dim)``
    and lse ``-inf`` ``(b, h, s)`` for queries ``q`` ``(b, s, h, d)``."""
    dtype = accumulator_dtype(q.dtype)
    batch, seq, heads, _ = q.shape
    out = torch.zeros((batch, seq, heads, value_dim), dtype=dtype, device=q.device)
    lse = torch.full((batch, heads, seq), float("-inf"), dtype=dtype, device=q.device)
    return out, lse


def merge_partial(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor, lse_block: torch.Tensor
) -> None:
    """Merge a block's result into the running accumulators, in place.

    Args:
        out_acc: ``(batch, seq, heads, head_dim)`` running output in float32 (float64 for
            float64 inputs); may be a view.
        lse_acc: ``(batch, heads, seq)`` running log-sum-exp, same dtype; may be a view.
        out_block: ``(batch, seq, heads, head_dim)`` block output, any floating dtype.
        lse_block: ``(batch, heads, seq)`` float32 block log-sum-exp (``-inf`` for rows that saw
            no key).
    """
    lse_new = torch.logaddexp(lse_acc, lse_block)
    # Where both are -inf the row is still empty: use 0 as the reference so both weights are 0.
    reference = lse_new.masked_fill(lse_new == float("-inf"), 0.0)
    weight_acc = torch.exp(lse_acc - reference).transpose(1, 2).unsqueeze(-1)
    weight_block = torch.exp(lse_block - reference).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(weight_acc).addcmul_(out_block, weight_block)
    lse_acc.copy_(lse_new)


def with_sinks(
    out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of rows whose softmax also counts a per-head sink logit — a key every row
    sees, whose value is zero (gpt-oss's learnable attention sinks).

    With ``Z = exp(lse)`` over the real keys, the sink adds ``exp(sink)`` to the denominator:
    ``lse' = log(Z + exp(sink))`` and ``out' = out * exp(lse - lse')``. The backward of attention
    with ``(out', lse')`` in place of ``(out, lse)`` is then exact for q, k and v (the sink is
    one more key, with a zero value), which is why the engine saves these.

    Args:
        out: ``(batch, seq, heads, head_dim)``; lse: ``(batch, heads, seq)`` in the accumulator
            dtype (``-inf`` for rows that saw no key: they get the sink's mass only and out 0);
        sinks: ``(heads,)`` logits.
    """
    total = torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None])
    kept = torch.exp(lse - _finite(total)).transpose(1, 2).unsqueeze(-1)  # 0 where both -inf
    return (out.to(kept.dtype) * kept).to(out.dtype), total


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (a row with no mass at all) replaced by 0, as a reference point."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def sink_grad(
    dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> torch.Tensor:
    """Gradient ``(heads,)`` of the sink logits, from this rank's rows: the sink is a key with a
    zero value, so its score gradient is ``-P_sink * delta`` with ``P_sink = exp(sink - lse)``
    and ``delta = rowsum(dout * out)`` (``out``, ``lse`` as :func:`with_sinks` returned them).
    Like any parameter shared by the ranks, its gradient is summed over the group by the
    caller's data/context-parallel reduction (e.g. FSDP over the context-parallel dimension)."""
    dtype = lse.dtype
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1).transpose(1, 2)  # (batch, heads, seq)
    p_sink = torch.exp(sinks.to(dtype)[None, :, None] - _finite(lse))
    return (-(p_sink * delta)).sum(dim=(0, 2)).to(sinks.dtype)
