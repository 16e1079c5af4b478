"""``rotation="allgather"``: every rank's K/V all-gathered, fp32 dK/dV reduce-scattered back.

Exact against float64 (out, lse, dq, dk, dv, and max logits and the sinks' gradient where asked)
for every layout and world sizes 1-4, over cases that together cover everything pass-KV
supports: full, causal, sliding window, packed documents (cu_seqlens and document_ids), padding
(attention_mask), mask_mod, score_mod, sinks, dropout, a value head dim of its own, queries
shorter than keys, GQA, sub-blocks, deterministic (bitwise on repeat). Also: bf16 gradients in
the inputs' dtype, the memory it holds, the trace (one step per pass, its bytes) and the
collectives it makes, the choice of ``"auto"`` and the bytes the planner sees, a bad rotation
name, and a peer that dies or stalls mid-backward.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from helpers import assert_close, counting, index_grids, random_qkv
from process_group_pool import KILLED

import ringattn
import ringattn.engine
from ringattn.dropout import keep_mask
from ringattn.rotation import choose_rotation, rotation_bytes
from ringattn.tools.memory import PeakMemory

FP32_TOL = 1e-5
BATCH, HEADS_Q, HEADS_KV, DIM = 2, 4, 2, 16
FINE = ringattn.Granularity(sub_blocks=3, min_tokens=1)


def _run(pools, world, fn, *args):
    """Per-rank results of ``fn``: in this process for a world of one, else on the pool."""
    return [fn(0, 1, *args)] if world == 1 else pools(world).run(fn, *args)


def _reference(q, k, v, allowed, score_mod=None, sinks=None, dropout=None):
    """Float64 attention over full sequences (queries are the last ``seq_q`` key positions)
    with a boolean ``allowed`` ``(batch or 1, heads or 1, seq_q, seq_kv)``, an optional
    ``score_mod``, ``sinks`` ``(heads,)`` and ``dropout`` ``(seed, p)`` as
    :func:`ringattn.dropout.keep_mask` of global positions. Returns (out, lse, max logits)."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    offset = k.shape[1] - q.shape[1]
    if score_mod is not None:
        grids = index_grids(q.shape[0], q.shape[2], q.shape[1], k.shape[1], offset)
        scores = score_mod(scores, *grids)
    scores = scores.masked_fill(~allowed, float("-inf"))
    peak = scores.detach().amax(dim=(0, 2, 3))
    if sinks is not None:
        sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    if sinks is not None:
        probs = probs[..., :-1]
    if dropout is not None:
        seed, p = dropout
        q_pos = torch.arange(offset, k.shape[1])
        keep = keep_mask(seed, p, q.shape[0], q.shape[2], q_pos, torch.arange(k.shape[1]))
        probs = probs * keep / (1 - p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse, peak


def _case(name: str, world: int) -> dict:
    """One case: lengths, keywords of ``ring_attention``, the dense mask and the extras."""
    n = 12 * world
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    case = {"seq_q": n, "seq_kv": n, "dim_v": DIM, "call": {}, "sinks": None, "dropout": None}
    causal = j <= i
    if name == "full-mla":  # a value head dim of its own, sub-blocks
        case.update(dim_v=24, allowed=torch.ones(n, n, dtype=torch.bool))
        case["call"] = {"granularity": FINE}
    elif name == "causal-sinks-max-logits":
        case.update(allowed=causal, sinks=torch.tensor([-1.0, 0.0, 1.5, 3.0]))
        case["masks"] = {"causal": True}
        case["call"] = {"return_max_logits": True}
    elif name == "window-dropout":
        case.update(allowed=(j >= i - 5) & (j <= i + 2), dropout=(1234, 0.3))
        case["masks"] = {"window": (5, 2)}
        case["call"] = {"dropout_p": 0.3, "dropout_seed": 1234, "granularity": FINE}
    elif name == "cu-seqlens":
        cu = torch.tensor([0, 3, 4, n - 5, n])
        docs = torch.searchsorted(cu[1:], torch.arange(n), right=True)
        case.update(allowed=causal & (docs[:, None] == docs[None, :]))
        case["masks"] = {"causal": True, "cu_seqlens": cu}
    elif name == "softcap-deterministic":
        case.update(allowed=causal, score_mod=ringattn.softcap(2.0))
        case["masks"] = {"causal": True}
        case["call"] = {"score_mod": case["score_mod"], "deterministic": True}
    elif name == "ids-padding-mask-mod":  # per-token masks of the shard, and a mask_mod
        ids = (torch.arange(n) >= n // 3).long() + (torch.arange(n) >= n - 4).long()
        ids = torch.stack([ids, torch.zeros(n, dtype=torch.long)])
        valid = torch.ones(BATCH, n, dtype=torch.bool)
        valid[1, n - 7 :] = False
        valid[0, 2] = False
        prefix = ringattn.prefix_lm(5)
        b, h = torch.arange(BATCH)[:, None, None, None], torch.arange(HEADS_Q)[None, :, None, None]
        allowed = (ids[:, :, None] == ids[:, None, :])[:, None] & prefix(b, h, i, j)
        allowed &= (valid[:, :, None] & valid[:, None, :])[:, None]
        case.update(allowed=allowed, shard_masks={"document_ids": ids, "attention_mask": valid})
        case["masks"] = {"mask_mod": prefix}
    else:  # "cross-causal": queries are the last third of the keys, GQA 4:1
        assert name == "cross-causal", name
        case.update(seq_q=4 * world, allowed=causal[n - 4 * world :])
        case["masks"] = {"causal": True}
    return case


CASES = (
    "full-mla",
    "causal-sinks-max-logits",
    "window-dropout",
    "cu-seqlens",
    "softcap-deterministic",
    "ids-padding-mask-mod",
    "cross-causal",
)


def _exact_job(rank, world, layout):
    for seed, name in enumerate(CASES):
        case = _case(name, world)
        gen = torch.Generator().manual_seed(seed)
        heads_kv = 1 if name == "cross-causal" else HEADS_KV
        shapes = (
            (BATCH, case["seq_q"], HEADS_Q, DIM),
            (BATCH, case["seq_kv"], heads_kv, DIM),
            (BATCH, case["seq_kv"], heads_kv, case["dim_v"]),
            (BATCH, case["seq_q"], HEADS_Q, case["dim_v"]),
        )
        q, k, v, dout = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
        sinks = case["sinks"]
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        if sinks is not None:
            full.append(sinks.double().requires_grad_())
        allowed = case["allowed"]
        allowed = allowed if allowed.dim() == 4 else allowed[None, None]
        ref_out, ref_lse, ref_peak = _reference(
            *full[:3],
            allowed,
            case.get("score_mod"),
            full[3] if sinks is not None else None,
            case["dropout"],
        )
        ref_grads = torch.autograd.grad(ref_out, full, dout)

        local = [ringattn.shard(t, layout).float().requires_grad_() for t in (q, k, v)]
        local_sinks = None if sinks is None else sinks.clone().requires_grad_()
        masks = dict(case.get("masks", {}))
        for key, value in case.get("shard_masks", {}).items():
            masks[key] = ringattn.shard(value, layout, dim=1)

        def call(local=local, local_sinks=local_sinks, masks=masks, case=case):
            return ringattn.ring_attention(
                *local,
                sinks=local_sinks,
                layout=layout,
                rotation="allgather",
                return_lse=True,
                **masks,
                **case["call"],
            )

        out, lse, *peak = call()
        inputs = local + ([local_sinks] if sinks is not None else [])
        grads = torch.autograd.grad(out, inputs, ringattn.shard(dout, layout).float())
        label = f"{name} {layout} p={world}"
        assert out.shape == (BATCH, case["seq_q"] // world, HEADS_Q, case["dim_v"])
        assert_close(f"{label} out", out, ringattn.shard(ref_out, layout), FP32_TOL)
        ref_lse = ringattn.shard(ref_lse, layout, dim=2)
        empty = torch.isinf(ref_lse)  # padding rows see no key: -inf in both
        assert torch.equal(torch.isinf(lse), empty), label
        assert_close(f"{label} lse", lse[~empty], ref_lse[~empty], FP32_TOL)
        for got, ref, g in zip(grads[:3], ref_grads[:3], "qkv", strict=True):
            assert got.dtype == torch.float32
            assert_close(f"{label} d{g}", got, ringattn.shard(ref, layout), FP32_TOL)
        if sinks is not None:
            dsinks = grads[3].clone()
            if world > 1:  # each rank's rows: summed over the group, as a shared parameter's
                dist.all_reduce(dsinks)
            assert_close(f"{label} dsinks", dsinks, ref_grads[3], FP32_TOL)
        if peak:
            assert_close(f"{label} max logits", peak[0], ref_peak, FP32_TOL)
        if case["call"].get("deterministic"):
            again, again_lse = call()
            again_grads = torch.autograd.grad(again, local, ringattn.shard(dout, layout).float())
            assert torch.equal(again, out) and torch.equal(again_lse, lse), label
            assert all(torch.equal(a, b) for a, b in zip(again_grads, grads, strict=True))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_allgather_matches_float64(pools, world, layout):
    _run(pools, world, _exact_job, layout)


def _bf16_job(rank, world):
    """bf16 inputs: gradients come back in bf16 (summed in fp32), as close to float64 as
    pass-KV's."""
    q, k, v, dout = random_qkv(BATCH, 16 * world, HEADS_Q, HEADS_KV, DIM, seed=5)
    i = torch.arange(16 * world)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _, _ = _reference(*full, (i[None, :] <= i[:, None])[None, None])
    refs = (ref_out, *torch.autograd.grad(ref_out, full, dout))
    errors = {}
    for rotation in ("allgather", "kv"):
        local = [ringattn.shard(t).bfloat16().requires_grad_() for t in (q, k, v)]
        out = ringattn.ring_attention(*local, causal=True, rotation=rotation)
        grads = torch.autograd.grad(out, local, ringattn.shard(dout).bfloat16())
        assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
        errors[rotation] = [
            assert_close(f"bf16 {rotation} {name}", got, ringattn.shard(ref), 5e-2)
            for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, strict=True)
        ]
    for mine, ring in zip(errors["allgather"], errors["kv"], strict=True):
        assert mine <= 2 * ring + 1e-3, errors


def test_bf16_gradients_in_the_inputs_dtype(pools):
    pools(2).run(_bf16_job)


def _trace_job(rank, world):
    """Forward + backward under record_ring and a collective counter, with a RingMask (whose
    call check is its only collective besides the engine's)."""
    q, k, v, dout = random_qkv(1, 8 * world, HEADS_Q, HEADS_KV, DIM, seed=2)
    local = [ringattn.shard(t).float().requires_grad_() for t in (q, k, v)]
    mask = ringattn.create_ring_mask(8 * world, causal=True)
    ringattn.ring_attention(*local, mask=mask, rotation="allgather")  # the call check, once
    counts: dict[str, int] = {}
    with ringattn.record_ring() as trace, counting(counts):
        out = ringattn.ring_attention(*local, mask=mask, rotation="allgather")
        torch.autograd.grad(out, local, ringattn.shard(dout).float())
    steps = [(s.phase, s.step, s.bytes_sent) for s in trace.steps]
    collectives = {n: c for n, c in counts.items() if n.startswith("collective")}
    return steps, trace.bytes_sent, collectives, trace.kernels


@pytest.mark.parametrize("world", [2, 4])
def test_trace_reports_one_step_per_pass(pools, world):
    """Forward: one step that sends this rank's share of the K/V all-gather, p - 1 shards;
    backward: one step, the gather again plus p - 1 fp32 dK/dV shards to their owners —
    exactly rotation_bytes' "allgather". All of it point-to-point: no collective."""
    shard = 8 * HEADS_KV * DIM * 2  # K and V of 8 tokens, elements
    forward = (world - 1) * shard * 4
    backward = (world - 1) * shard * (4 + 4)
    expected = rotation_bytes(8, 8, HEADS_Q, HEADS_KV, DIM, torch.float32, True, None, world)
    assert forward + backward == expected["allgather"]
    for steps, sent, collectives, kernels in pools(world).run(_trace_job):
        assert steps == [("forward", 0, forward), ("backward", 0, backward)]
        assert sent == forward + backward
        assert collectives == {}, collectives
        assert kernels == ["cpu_flash"]


def test_auto_never_picks_allgather_and_its_bytes():
    """ "auto" decides between pass-KV and pass-Q only; rotation_bytes adds "allgather" (per
    pass, for world_size ranks) without changing what the others report."""
    for nq, nkv in ((4096, 4096), (1, 4096), (64, 65536)):
        for grad in (False, True):
            cost = rotation_bytes(nq, nkv, 8, 2, 64, torch.bfloat16, grad, world_size=4)
            assert choose_rotation(nq, nkv, 8, 2, 64, torch.bfloat16, grad) in ("kv", "q")
            kv_shard = nkv * 2 * (64 + 64)
            assert cost["kv"] == kv_shard * (2 + (2 + 4) * grad)
            assert cost["allgather"] == 3 * kv_shard * (2 + (2 + 4) * grad)
            assert rotation_bytes(nq, nkv, 8, 2, 64, torch.bfloat16, grad)["allgather"] == (
                cost["allgather"] // 3
            )
    assert rotation_bytes(16, 16, 4, 1, 8, torch.float32, False, 24, 3)["allgather"] == (
        2 * 16 * 1 * (8 + 24) * 4
    )


def _memory_job(rank, world):
    """Peaks of forward and backward (tensor storage, exact) above what each pass starts with,
    in query-shards (this rank's q in bytes), and the K/V shard in the same unit."""
    q, k, v, dout = (
        ringattn.shard(t).float() for t in random_qkv(1, 4096 * world, 1, 1, 32, seed=1)
    )
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with PeakMemory() as forward:
        out = ringattn.ring_attention(*leaves, causal=True, rotation="allgather")
    with PeakMemory() as backward:
        torch.autograd.grad(out, leaves, dout)
    unit = q.nbytes
    return forward.bytes / unit, backward.bytes / unit, (k.nbytes + v.nbytes) / unit


@pytest.mark.parametrize("world", [2, 4])
def test_memory_is_the_gathered_kv_and_at_most_two_gradient_shards(pools, world):
    """Beyond what any attention holds (out; dq, dk, dv), the forward holds the other ranks'
    K/V shards and the backward those plus at most two fp32 dK/dV shards in transit (one at
    p = 2) — each gathered shard freed once used — and a band of kernel outputs (under one
    query-shard here: 4,096 tokens per rank in bands of 1,024 or 2,048)."""
    for forward, backward, kv in pools(world).run(_memory_job):
        assert forward <= 1 + (world - 1) * kv + 1, (forward, kv)
        assert backward <= 3 + (world - 1 + min(world - 1, 2)) * kv + 1, (backward, kv)


def _bad_rotation_job(rank, world, rotations):
    q = torch.randn(1, 4, 4, 8)
    try:
        ringattn.ring_attention(q, q[:, :, :2], q[:, :, :2], rotation=rotations[rank])
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    "rotations", [("all_gather", "all_gather"), ("allgather", "kv")], ids=["name", "differs"]
)
def test_a_bad_rotation_raises_on_every_rank(pools, rotations):
    messages = pools(2).run(_bad_rotation_job, rotations)
    assert len(set(messages)) == 1, messages
    if rotations[0] == rotations[1]:
        assert "rotation must be one of" in messages[0] and "'allgather'" in messages[0]
    else:
        assert "every rank must pass the same rotation" in messages[0], messages


def _failing_peer_job(rank, world, how):
    """Rank 1 stalls before the backward's gather, or dies (SIGKILL) after it, as it would post
    its dK/dV; rank 0 must raise a ringattn error within RINGATTN_TIMEOUT (2 s) plus slack, never
    hang, naming what it waited for."""
    q, k, v, dout = random_qkv(1, 4 * world, HEADS_Q, HEADS_KV, DIM, seed=0)
    local = [ringattn.shard(t).float().requires_grad_() for t in (q, k, v)]
    out = ringattn.ring_attention(*local, causal=True, rotation="allgather")
    if rank == 1:
        if how == "stalled":  # alive, never calls the backward's gather
            time.sleep(4)
            return None
        original = ringattn.engine._post_p2p

        def dying(comm, tensors, to, sources, tag, what):  # dies at its first dK/dV exchange
            if what.startswith("reduce-scatter"):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(comm, tensors, to, sources, tag, what)

        ringattn.engine._post_p2p = dying
    previous = os.environ.get("RINGATTN_TIMEOUT")
    os.environ["RINGATTN_TIMEOUT"] = "2"
    start = time.monotonic()
    try:
        torch.autograd.grad(out, local, ringattn.shard(dout))
    except Exception as exc:  # reported to the test
        return type(exc).__name__, str(exc), time.monotonic() - start
    finally:
        os.environ.pop("RINGATTN_TIMEOUT")
        if previous is not None:
            os.environ["RINGATTN_TIMEOUT"] = previous
    return None, "", time.monotonic() - start


@pytest.mark.parametrize("how", ["stalled", "killed-in-reduce-scatter"])
def test_a_failing_peer_ends_in_a_ringattn_error(pools, how):
    """A stall on 2 ranks, a death on 3 (pools the exactness tests started: no new processes
    until a later test needs them); every survivor raises, naming rank 1 where it waited on it."""
    world = 2 if how == "stalled" else 3
    try:
        results = pools(world).run(_failing_peer_job, how, timeout=60, deaths_expected=True)
    finally:
        pools(world).close()  # survivors left operations pending: the next user gets a new group
    if how == "stalled":
        type_name, message, elapsed = results[0]
        assert results[1] is None
        assert type_name == "TimeoutError", message
        assert "all-gather of K/V" in message and "did not complete within 0:00:02" in message
        assert 1.5 <= elapsed <= 10
        return
    assert results[1] == KILLED
    for type_name, message, elapsed in (results[0], results[2]):
        assert type_name in ("RingPeerError", "TimeoutError"), message
        assert elapsed <= 2 + 5, elapsed
        assert "reduce-scatter of dK/dV" in message and "rank 1 of the ring" in message, message
