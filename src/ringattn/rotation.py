"""Which block should travel: keys/values (pass-KV) or queries (pass-Q).

Both rotations compute the same tiles, so they hide the same compute per step; they differ in
what each step must move. Per step and rank (``e`` = element size of the inputs, accumulators in
fp32, ``d`` the query/key head_dim and ``dv`` the value head_dim, equal but for MLA):

- pass-KV forward: the K and V blocks, ``n_kv * h_kv * (d + dv) * e``;
  backward: K and V again plus their fp32 gradients, ``n_kv * h_kv * (d + dv) * (e + 4)``.
- pass-Q forward: the Q block plus the returning partial output and log-sum-exp,
  ``n_q * h_q * (d * e + dv * 4 + 4)``; backward: Q, dO, O and lse plus the returning fp32
  dQ, ``n_q * h_q * ((d + 2 * dv) * e + 4 + d * 4)``.

- all-gather (``rotation="allgather"``, never chosen by ``"auto"``) sends no ring steps: per
  *pass* each rank sends its K/V shard's share of one all-gather, ``(p - 1)`` shards (``(p - 1)
  / p`` of all K/V), ``(p - 1) * n_kv * h_kv * (d + dv) * e``; the backward gathers K/V again
  and sends the fp32 dK/dV of the other ranks' keys to their owners (a reduce-scatter),
  ``(p - 1) * n_kv * h_kv * (d + dv) * (e + 4)`` in all. That is pass-KV's volume less one
  fp32 dK/dV block, but none of it overlaps compute beyond this rank's own shard.

The rule: pick the rotation that moves fewer bytes (over forward and backward when gradients are
needed); on a tie keep pass-KV. With equal query and key lengths pass-KV always wins; pass-Q wins
when queries are few next to keys — chunked prefill against a long cache, cross-attention to a long
context.
"""

from __future__ import annotations

from typing import Literal

import torch


def rotation_bytes(
    seq_q_local: int,
    seq_kv_local: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    dtype: torch.dtype,
    needs_grad: bool,
    head_dim_v: int | None = None,
    world_size: int = 2,
) -> dict[str, int]:
    """Bytes one rank sends per ring step under each rotation, ``"kv"`` and ``"q"``, and per
    pass (forward, or forward and backward together) under ``"allgather"`` with ``world_size``
    ranks (the default 2: one peer's share), see the module docstring; ``head_dim_v``
    defaults to ``head_dim``."""
    e = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    d, dv = head_dim, head_dim if head_dim_v is None else head_dim_v
    kv = seq_kv_local * heads_kv * (d + dv) * e
    q = seq_q_local * heads_q * (d * e + dv * acc + acc)
    if needs_grad:
        kv += seq_kv_local * heads_kv * (d + dv) * (e + acc)
        q += seq_q_local * heads_q * ((d + 2 * dv) * e + acc + d * acc)
    shard = seq_kv_local * heads_kv * (d + dv)
    allgather = (world_size - 1) * shard * (2 * e + acc if needs_grad else e)
    return {"kv": kv, "q": q, "allgather": allgather}


def choose_rotation(
    seq_q_local: int,
    seq_kv_local: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    needs_grad: bool = False,
    head_dim_v: int | None = None,
) -> Literal["kv", "q"]:
    """``"q"`` when moving queries costs fewer bytes per step than moving keys/values, else
    ``"kv"``. A pure function of the shapes; ``rotation="auto"`` calls it."""
    cost = rotation_bytes(
        seq_q_local, seq_kv_local, heads_q, heads_kv, head_dim, dtype, needs_grad, head_dim_v
    )
    return "q" if cost["q"] < cost["kv"] else "kv"
