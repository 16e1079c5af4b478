"""The RingMask workflow: a mask planned once per batch, reused by every layer.

A 16-layer stack of ring calls on one RingMask issues no collective besides the ring's own
point-to-point transfers and no host sync once its call is agreed, and exactly one small
all-gather (the check of the call) before that; results stay exact; a mask passed together with
mask keywords, or with inputs it was not built for, is refused on every rank.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import counting, masked_reference, random_qkv, relative_error

import ringattn

LAYERS, BATCH, HEADS_Q, HEADS_KV, DIM = 16, 2, 4, 2, 8


GRANULARITY = ringattn.Granularity(sub_blocks=2, min_tokens=1)


def _layer_stack(local_x, weights, **masks):
    """``LAYERS`` attention layers: ``x <- x + attention(x W_q, x W_k, x W_v)``."""
    x = local_x
    for w_q, w_kv in weights:
        q = (x @ w_q).unflatten(-1, (HEADS_Q, DIM))
        k, v = (x @ w_kv).unflatten(-1, (2, HEADS_KV, DIM)).unbind(2)
        out = ringattn.ring_attention(q, k, v, granularity=GRANULARITY, **masks)
        x = x + out.flatten(2)
    return x


def _every_fifth(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) % 5 != 3


def _sixteen_layers_job(rank, world, seq_len):
    """Counts over a 16-layer forward+backward on one RingMask with documents, padding and a
    mask_mod (every tile classified), cut into sub-blocks; and the result against the same
    stack run with keyword masks on every call."""
    torch.manual_seed(0)
    width = HEADS_Q * DIM
    x = torch.randn(BATCH, seq_len, width, dtype=torch.float64)
    weights = [
        (torch.randn(width, width) * width**-0.5, torch.randn(width, 2 * HEADS_KV * DIM) * 0.2)
        for _ in range(LAYERS)
    ]
    weights = [(a.double().requires_grad_(), b.double().requires_grad_()) for a, b in weights]
    cu = torch.tensor([0, seq_len // 3, seq_len - 5, seq_len])
    valid = torch.ones(BATCH, seq_len, dtype=torch.bool)
    valid[1, -7:] = False
    local_x = ringattn.shard(x, "zigzag").requires_grad_()
    masks = {
        "causal": True,
        "cu_seqlens": cu,
        "attention_mask": ringattn.shard(valid, "zigzag"),
        "mask_mod": _every_fifth,
    }
    mask = ringattn.create_ring_mask(seq_len, tile_size=4, **masks)
    results = {}
    for phase, check in (("first batch", True), ("agreed", True), ("unchecked", False)):
        with counting({}) as counts, ringattn.record_ring() as trace:
            out = _layer_stack(local_x, weights, mask=mask, check_across_ranks=check)
            out.sum().backward()
        results[phase] = dict(counts), len(trace.steps)
    with torch.no_grad():  # the same layers with keyword masks: a mask built on every call
        stacked = _layer_stack(local_x, weights, mask=mask)
        keywords = _layer_stack(local_x, weights, **masks)
    return results, relative_error(stacked, keywords), repr(mask)


@pytest.mark.parametrize("world", [2, 3])
def test_sixteen_layers_plan_once(pools, world):
    for results, error, shown in pools(world).run(_sixteen_layers_job, 12 * world):
        first, first_steps = results["first batch"]
        collectives = {name: n for name, n in first.items() if name.startswith("collective")}
        assert collectives == {"collective all_gather": 1}, first  # the call's check, once
        for phase in ("agreed", "unchecked"):
            counts, steps = results[phase]
            assert counts == {}, f"{phase}: {counts}"
            assert steps == first_steps > 0
        assert error < 1e-10  # float64; tiles of 4 here, of 512 with the keywords
        assert shown.startswith(f"RingMask(q_len={12 * world}, kv_len={12 * world}")


def _reference_job(rank, world, rotation):
    """A RingMask built for queries shorter than keys, used by both rotations and by several
    calls with different tensors, matches the fp64 reference."""
    nq, nkv = 4 * world, 8 * world
    mask = ringattn.create_ring_mask(nq, nkv, causal=True, window=(5, None), layout="striped")
    worst = 0.0
    i = torch.arange(nkv - nq, nkv)[:, None]
    j = torch.arange(nkv)[None, :]
    allowed = ((j <= i) & (j >= i - 5))[None, None]
    for seed in range(3):
        q, _, _, _ = random_qkv(BATCH, nq, HEADS_Q, HEADS_KV, DIM, seed)
        _, k, v, _ = random_qkv(BATCH, nkv, HEADS_Q, HEADS_KV, DIM, seed + 10)
        ref, _ = masked_reference(q, k, v, allowed)
        local = [ringattn.shard(t, "striped") for t in (q, k, v)]
        out = ringattn.ring_attention(*local, mask=mask, rotation=rotation)
        worst = max(worst, relative_error(out, ringattn.shard(ref, "striped")))
    return worst


@pytest.mark.parametrize("rotation", ["kv", "q"])
def test_one_mask_serves_many_calls_and_both_rotations(pools, rotation):
    assert max(pools(3).run(_reference_job, rotation)) < 1e-12


def _misuse_job(rank, world, case):
    q, k, v, _ = random_qkv(1, 8, 4, 2, 8, 0)
    mask = ringattn.create_ring_mask(8 * world, causal=True)
    kwargs = {"mask": mask}
    if case == "keyword_too":
        kwargs["causal"] = True
        kwargs["window"] = 3
    elif case == "wrong_length":
        q, k, v = (t[:, :4] for t in (q, k, v))
    elif case == "not_a_mask":
        kwargs["mask"] = torch.ones(8, 8)
    elif case == "other_layout":
        kwargs["layout"] = "striped"
    try:
        ringattn.ring_attention(q, k, v, **kwargs)
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("keyword_too", r"either as a RingMask or as keywords, not both: got mask= and causal=, "),
        ("wrong_length", r"q has 4 local tokens but the RingMask was built for q_len=\d+ over"),
        ("not_a_mask", r"mask must be a ringattn.RingMask \(see create_ring_mask\), got Tensor"),
        ("other_layout", r"not both: got mask= and layout="),
    ],
)
def test_mask_misuse_raises_on_every_rank(pools, case, pattern):
    messages = pools(2).run(_misuse_job, case)
    assert all(m and re.search(pattern, m) for m in messages), messages
    assert all(m.startswith("ring_attention: invalid input on rank 0: ") for m in messages)


def _changed_after_agreement_job(rank, world):
    """After a call was agreed, the same bad call on every rank raises locally, at once."""
    q, k, v, _ = random_qkv(1, 8, 4, 2, 8, 0)
    mask = ringattn.create_ring_mask(8 * world, causal=True)
    ringattn.ring_attention(q, k, v, mask=mask)
    try:
        ringattn.ring_attention(q[:, :, :3], k, v, mask=mask)
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


def test_a_bad_call_after_agreement_is_refused_locally(pools):
    for message in pools(2).run(_changed_after_agreement_job):
        assert message == (
            "ring_attention: heads_q=3 is not a multiple of heads_kv=2; grouped-query attention "
            "needs every key/value head to serve the same number of query heads "
            "(found on this rank only)"
        )


def _requires_grad_job(rank, world, via_mask):
    """The issue's case: 509 queries and 512 keys per rank, 8 heads, d=64, causal,
    requires_grad on rank 0's q only: pass-Q on one rank and pass-KV on the other would hang."""
    q = torch.randn(1, 509, 8, 64).requires_grad_(rank == 0)
    k, v = torch.randn(1, 512, 8, 64), torch.randn(1, 512, 8, 64)
    kwargs = {"causal": True, "layout": "contiguous"}
    if via_mask:
        kwargs = {"mask": ringattn.create_ring_mask(509 * world, 512 * world, **kwargs)}
    try:
        ringattn.ring_attention(q, k, v, **kwargs)
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("via_mask", [False, True], ids=["keywords", "mask"])
def test_ranks_that_differ_in_requires_grad_are_refused(pools, via_mask):
    for message in pools(2).run(_requires_grad_job, via_mask):
        assert message and message.startswith(
            "ring_attention: needs_grad differs between ranks [1, 0] (by rank)"
        ), message


def _mask_differs_job(rank, world, field):
    kwargs = {"causal": True}
    if field == "causal":
        kwargs["causal"] = rank == 0
    elif field == "cu_seqlens":
        kwargs["cu_seqlens"] = torch.tensor([0, 3 + rank, 8 * world])
    elif field == "q_len":
        kwargs = {"causal": True, "kv_len": 8 * world}
    q_len = 8 * world - (2 * world * rank if field == "q_len" else 0)
    try:
        ringattn.create_ring_mask(q_len, **kwargs)
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("field", ["causal", "cu_seqlens", "q_len"])
def test_create_ring_mask_checks_across_ranks(pools, field):
    for message in pools(2).run(_mask_differs_job, field):
        assert message and message.startswith(f"create_ring_mask: {field} differs between ranks")


def test_world_of_one_and_repr():
    q, k, v, _ = random_qkv(2, 10, 4, 2, 8, 1)
    mask = ringattn.create_ring_mask(10, causal=True, window=3)
    out = ringattn.ring_attention(q, k, v, mask=mask)
    same = ringattn.ring_attention(q, k, v, causal=True, window=3)
    assert torch.equal(out, same)
    assert repr(mask) == "RingMask(q_len=10, kv_len=10, layout='zigzag', causal=True, " + (
        "window=(3, 0), world_size=1)"
    )
    with pytest.raises(ringattn.RingInputError, match=r"q_len must be an int >= 0"):
        ringattn.create_ring_mask(-1)
    with pytest.raises(ringattn.RingInputError, match=r"q_len=12 exceeds kv_len=10"):
        ringattn.create_ring_mask(12, 10)
