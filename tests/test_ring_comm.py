"""The ring's communication: bytes per step, overlap order, dead peers, strides and subgroups."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import random_qkv, reference_attention, relative_error
from process_group_pool import KILLED

import ringattn
import ringattn.comm
import ringattn.inference
from ringattn.kernels.cpu_flash import CpuFlashKernel
from ringattn.layout import LAYOUTS, sub_blocks
from ringattn.masks import bound_tiles, plan_tiles

BATCH, SEQ_LOCAL, HEADS_Q, HEADS_KV, DIM = 1, 4, 8, 2, 16
FINE = ringattn.Granularity(sub_blocks=3, min_tokens=1)


def _run(pools, world, fn, *args):
    """Per-rank results of ``fn``: in-process for a world of one, else on the pool."""
    if world == 1:
        return [fn(0, 1, *args)]
    return pools(world).run(fn, *args)


def _traced_job(rank, world, dtype_name, granularity):
    """Forward + backward of a GQA ring call under record_ring; returns the step records."""
    dtype = getattr(torch, dtype_name)
    q, k, v, dout = random_qkv(BATCH, SEQ_LOCAL * world, HEADS_Q, HEADS_KV, DIM, seed=3)
    local = [ringattn.shard(t, "zigzag").to(dtype).requires_grad_() for t in (q, k, v)]
    with ringattn.record_ring() as trace:
        out = ringattn.ring_attention(*local, causal=True, layout="zigzag", granularity=granularity)
        out.backward(ringattn.shard(dout, "zigzag").to(dtype))
    assert all(s.compute_s >= 0 and s.wait_s >= 0 for s in trace.steps)
    steps = [(s.phase, s.step, s.bytes_sent) for s in trace.steps]
    return steps, trace.bytes_sent, trace.total()["bytes_sent"]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("granularity", [None, FINE], ids=["whole", "sub-blocks"])
def test_bytes_per_step(pools, world, dtype_name, granularity):
    """Forward steps but the last send one K and one V block of heads_kv heads; backward sends
    K/V the same way plus the float32 dK/dV accumulators, which finish one step later. Cut into
    sub-blocks, a step sends the same bytes in pieces."""
    element = torch.empty(0, dtype=getattr(torch, dtype_name)).element_size()
    block = BATCH * SEQ_LOCAL * HEADS_KV * DIM
    kv, grads = 2 * block * element, 2 * block * 4
    forward = [("forward", s, kv if s < world - 1 else 0) for s in range(world)]
    if world == 1:
        backward = [("backward", 0, 0)]
    else:  # step s < p-1: K/V + grads; step p-1: grads only; step p: the wait for the last grads
        backward = [("backward", s, (kv if s < world - 1 else 0) + grads) for s in range(world)]
        backward.append(("backward", world, 0))
    total = sum(b for _, _, b in forward + backward)
    for steps, sent, summed in _run(pools, world, _traced_job, dtype_name, granularity):
        assert steps == forward + backward
        assert sent == total and summed == total


class LoggingKernel(CpuFlashKernel):
    """The CPU flash kernel, logging each call to ``events``."""

    def __init__(self, events):
        self.events = events

    def forward(self, *args, **kwargs):
        self.events.append(("forward",))
        return super().forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.events.append(("backward",))
        return super().backward(*args, **kwargs)


def _overlap_job(rank, world, layout, seq_local, granularity):
    """Log exchanges, waits and kernel calls of one forward + backward ring call."""
    events = []
    comm_cls, pending_cls = ringattn.comm.RingComm, ringattn.comm.PendingExchange
    exchange, wait = comm_cls.exchange, pending_cls.wait

    def logged_exchange(self, tensors, tag=0):
        events.append(("exchange", tag))
        pending = exchange(self, tensors, tag)
        pending.logged_tag = tag
        return pending

    def logged_wait(self):
        events.append(("wait", self.logged_tag))
        return wait(self)

    q, k, v, dout = random_qkv(1, seq_local * world, 4, 2, 8, seed=9)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*full, True)
    ref_grads = torch.autograd.grad(ref_out, full, dout)
    local = [ringattn.shard(t, layout).requires_grad_() for t in (q, k, v)]
    comm_cls.exchange, pending_cls.wait = logged_exchange, logged_wait
    try:
        out = ringattn.ring_attention(
            *local,
            causal=True,
            layout=layout,
            kernel=LoggingKernel(events),
            granularity=granularity,
        )
        events.append(("backward pass",))
        grads = torch.autograd.grad(out, local, ringattn.shard(dout, layout))
    finally:
        comm_cls.exchange, pending_cls.wait = exchange, wait
    pairs = [(out, ref_out), *zip(grads, ref_grads, strict=True)]
    worst = max(relative_error(got, ringattn.shard(ref, layout)) for got, ref in pairs)
    # Name exchanges by what they carry: the first one posted moves K/V; any other tag is the
    # returning dK/dV accumulator.
    kv_tag = next(e[1] for e in events if e[0] == "exchange")
    named = [
        (e[0], "kv" if e[1] == kv_tag else "grads") if e[0] in ("exchange", "wait") else e
        for e in events
    ]
    return named, worst


def _expected_events(layout, world, rank, seq_local, granularity):
    """The event order the engine promises: sub-block j of every block makes its whole turn
    before sub-block j + 1; each step's exchange is posted before its kernels and waited on
    after them; backward grads travel one step behind the keys/values."""
    chosen = LAYOUTS[layout]
    q_segments = chosen.segments(rank, world, seq_local)
    band = granularity.band(q_segments)
    count = granularity.count(q_segments)
    forward, backward = [], []
    for j in range(len(sub_blocks(q_segments, count))):
        for s in range(world):
            source = chosen.segments((rank - s) % world, world, seq_local)
            keys = sub_blocks(source, count)[j].segments
            calls = len(bound_tiles(plan_tiles(q_segments, keys, True), band, seq_local))
            last = s == world - 1
            forward += [] if last else [("exchange", "kv")]
            forward += [("forward",)] * calls
            forward += [] if last else [("wait", "kv")]
            backward += [] if last else [("exchange", "kv")]
            backward += [("backward",)] * calls
            backward += [("wait", "grads")] if (j, s) != (0, 0) else []
            backward += [("exchange", "grads")]
            backward += [] if last else [("wait", "kv")]
    return forward, [*backward, ("wait", "grads")]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize(
    ("seq_local", "granularity"),
    [(4, ringattn.Granularity()), (12, FINE)],
    ids=["whole", "sub-blocks"],
)
def test_exchange_is_posted_before_the_step_compute(pools, layout, seq_local, granularity):
    world = 3
    for rank, (events, worst) in enumerate(
        pools(world).run(_overlap_job, layout, seq_local, granularity)
    ):
        assert worst < 1e-10
        split = events.index(("backward pass",))
        forward, backward = events[:split], events[split + 1 :]
        expected_forward, expected_backward = _expected_events(
            layout, world, rank, seq_local, granularity
        )
        # Spelled out: no step waits for its keys/values before it has computed.
        for events_of_pass, kernel in ((forward, "forward"), (backward, "backward")):
            for i, event in enumerate(events_of_pass):
                if event == ("wait", "kv"):
                    assert events_of_pass[i - 1][0] in (kernel, "exchange"), f"rank {rank}"
        assert forward == expected_forward, f"rank {rank}"
        assert backward == expected_backward, f"rank {rank}"


def _raised(call, timeout_s: int) -> tuple[str | None, str, float]:
    """``(exception type name or None, message, seconds)`` of ``call()`` run with
    ``RINGATTN_TIMEOUT=timeout_s``."""
    previous = os.environ.get("RINGATTN_TIMEOUT")
    os.environ["RINGATTN_TIMEOUT"] = str(timeout_s)
    start = time.monotonic()
    try:
        call()
    except Exception as exc:  # reported to the test
        return type(exc).__name__, str(exc), time.monotonic() - start
    finally:
        if previous is None:
            del os.environ["RINGATTN_TIMEOUT"]
        else:
            os.environ["RINGATTN_TIMEOUT"] = previous
    return None, "", time.monotonic() - start


def _dead_peer_job(rank, world):
    """Rank 1 never joins the ring; rank 0 must time out instead of hanging."""
    if rank == 1:
        return None
    q, k, v, _ = random_qkv(1, 4, 2, 1, 8, seed=0)
    return _raised(
        lambda: ringattn.ring_attention(q, k, v, causal=True, check_across_ranks=False), 2
    )


def test_dead_peer_times_out(pools):
    try:
        results = pools(2).run(_dead_peer_job, timeout=60)
    finally:
        pools(2).close()  # rank 0 left a send pending: start the next test from a fresh group
    assert results[1] is None
    type_name, message, elapsed = results[0]
    assert type_name == "TimeoutError", message
    # the wait names the peer it waited for
    assert re.search(r"ring exchange: (sending to|receiving from) rank 1 of the ring", message)
    assert "did not complete within 0:00:02" in message
    assert "RINGATTN_TIMEOUT" in message
    assert 1.5 <= elapsed <= 10


def _short_group_timeout_job(rank, world):
    """The group's own timeout (2 s) is shorter than RINGATTN_TIMEOUT (60 s): it is the bound."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=2))
    if rank == 1:
        time.sleep(5)
        return None
    q, k, v, _ = random_qkv(1, 4, 2, 1, 8, seed=0)
    return _raised(lambda: ringattn.ring_attention(q, k, v, causal=True, group=group), 60)


def test_the_groups_own_shorter_timeout_is_a_timeout(pools):
    """Told apart from a dead peer by the time waited, not by the backend's message."""
    try:
        results = pools(2).run(_short_group_timeout_job, timeout=60)
    finally:
        pools(2).close()
    type_name, message, elapsed = results[0]
    assert type_name == "TimeoutError", message
    assert "did not complete within 0:00:02" in message
    assert elapsed <= 5


def _stalled_peer_job(rank, world, where):
    """Rank 1 stays alive but never makes the call; rank 0 must raise within the timeout."""
    if rank == 1:
        time.sleep(6)
        return None
    q, k, v, _ = random_qkv(1, 4, 2, 1, 8, seed=0)
    calls = {
        "check": lambda: ringattn.ring_attention(q, k, v, causal=True),
        "create_ring_mask": lambda: ringattn.create_ring_mask(8, causal=True),
        "decode": lambda: ringattn.merge_across_ranks(q.float(), torch.zeros(1, 2, 4)),
        "unshard": lambda: ringattn.unshard(q.requires_grad_()).sum().backward(),
    }
    return _raised(calls[where], 2)


@pytest.mark.parametrize("where", ["check", "create_ring_mask", "decode", "unshard"])
def test_a_stalled_peer_ends_in_a_timeout(pools, where):
    """Every collective the package issues is bounded by RINGATTN_TIMEOUT, not only the ring's
    transfers: the check across ranks, the gathers, the KV cache's merge, unshard."""
    try:
        results = pools(2).run(_stalled_peer_job, where, timeout=60)
    finally:
        pools(2).close()  # rank 0 left an operation pending: the next test gets a fresh group
    type_name, message, elapsed = results[0]
    assert type_name == "TimeoutError", message
    assert "did not complete within 0:00:02" in message and "destroy it" in message
    assert 1.5 <= elapsed <= 10


def _killed_peer_job(rank, world, when):
    """Rank 1's process is killed (SIGKILL) at ``when``; rank 0 must raise, not hang."""
    if rank == 1 and when == "before_check":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 1 and when in ("mid_forward", "mid_backward"):
        original, calls = ringattn.comm.RingComm.exchange, []
        survives = {"mid_forward": 0, "mid_backward": 1}[when]  # forward makes one exchange

        def dying_exchange(self, tensors, tag=0):
            calls.append(tag)
            if len(calls) > survives:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, tensors, tag)

        ringattn.comm.RingComm.exchange = dying_exchange
    if rank == 1 and when == "decode":
        ringattn.inference.merge_across_ranks = lambda *a, **k: os.kill(os.getpid(), 9)
    q, k, v, _ = random_qkv(1, 4, 2, 1, 8, seed=0)

    def call():
        if when == "decode":
            cache = ringattn.KVCache(1, 1, 1, 8)
            cache.prefill(0, q.float(), k.float(), v.float())
            cache.extend(0, q[:, :1].float(), k[:, :1].float(), v[:, :1].float())
        else:
            local = [t.float().requires_grad_() for t in (q, k, v)]
            ringattn.ring_attention(*local, causal=True).sum().backward()

    return _raised(call, 5)


@pytest.mark.parametrize("when", ["before_check", "mid_forward", "mid_backward", "decode"])
def test_a_killed_peer_ends_in_a_ringattn_error(pools, when):
    """SIGKILL on one rank: the survivor raises RingPeerError (gloo sees the connection close)
    or TimeoutError, within RINGATTN_TIMEOUT plus a small slack."""
    try:
        results = pools(2).run(_killed_peer_job, when, timeout=60, deaths_expected=True)
    finally:
        pools(2).close()
    assert results[1] == KILLED
    type_name, message, elapsed = results[0]
    assert type_name in ("RingPeerError", "TimeoutError"), message
    assert elapsed <= 5 + 5, elapsed
    if when in ("mid_forward", "mid_backward"):  # the ring knows which peer it waited for
        assert "rank 1 of the ring (global rank 1)" in message, message


def _strided_kv_job(rank, world):
    """k and v as transposed views of (batch, heads, seq, dim) buffers, a common layout."""
    q, k, v, dout = random_qkv(1, SEQ_LOCAL * world, 4, 2, 8, seed=4)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*full, True)
    ref_grads = torch.autograd.grad(ref_out, full, dout)
    q, k, v = (ringattn.shard(t, "zigzag") for t in (q, k, v))
    q = q.requires_grad_()
    k_bhsd, v_bhsd = (t.transpose(1, 2).contiguous().requires_grad_() for t in (k, v))
    k, v = k_bhsd.transpose(1, 2), v_bhsd.transpose(1, 2)
    assert not k.is_contiguous() and not v.is_contiguous()
    try:
        out = ringattn.ring_attention(q, k, v, causal=True, layout="zigzag")
        grads = torch.autograd.grad(out, (q, k_bhsd, v_bhsd), ringattn.shard(dout, "zigzag"))
    except Exception as exc:  # reported to the test
        return f"{type(exc).__name__}: {exc}"
    grads = (grads[0], grads[1].transpose(1, 2), grads[2].transpose(1, 2))
    pairs = [(out, ref_out), *zip(grads, ref_grads, strict=True)]
    return max(relative_error(got, ringattn.shard(ref, "zigzag")) for got, ref in pairs)


@pytest.mark.parametrize("world", [2, 3])
def test_non_contiguous_kv(pools, world):
    """Regression: k/v views with strides must be sent as their values, not refused by isend."""
    results = pools(world).run(_strided_kv_job)
    assert all(isinstance(r, float) and r < 1e-10 for r in results), results


def _subgroup_job(rank, world):
    """A ring over global ranks [1, 2] of a 3-rank world: peers are mapped to global ranks."""
    group = dist.new_group([1, 2])
    if rank == 0:
        return None
    q, k, v, dout = random_qkv(1, 8, 4, 2, 8, seed=6)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*full, True)
    ref_grads = torch.autograd.grad(ref_out, full, dout)
    local = [ringattn.shard(t, "zigzag", group=group).requires_grad_() for t in (q, k, v)]
    out = ringattn.ring_attention(*local, causal=True, layout="zigzag", group=group)
    grads = torch.autograd.grad(out, local, ringattn.shard(dout, "zigzag", group=group))
    pairs = [(out, ref_out), *zip(grads, ref_grads, strict=True)]
    return max(
        relative_error(got, ringattn.shard(ref, "zigzag", group=group)) for got, ref in pairs
    )


def test_ring_over_a_subgroup(pools):
    results = pools(3).run(_subgroup_job)
    assert results[0] is None
    assert max(results[1:]) < 1e-10
