"""Bad inputs raise a clear error on every rank, before any ring step can hang.

World size 1 runs in-process with ``pytest.raises``. Larger worlds run in the gloo pool: each rank
catches its own exception and returns ``(type name, message, pid)``, so the test asserts on every
rank; a valid ring call on the same pool afterwards shows the group was not left broken.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from helpers import random_qkv, reference_attention, relative_error

import ringattn
from ringattn import RingInputError

# Cases where every rank passes the same bad input: name -> (exception type, message pattern).
UNIFORM = {
    "not_4d": (
        RingInputError,
        r"q must be 4-D \(batch, seq, heads, head_dim\), got shape \(1, 4, 32\)",
    ),
    "int_dtype": (RingInputError, r"q has dtype torch\.int64; use float16, bfloat16, float32"),
    "dtype_mismatch": (
        RingInputError,
        r"q, k and v must share one dtype, got torch\.float32, torch\.float64",
    ),
    "kv_shape": (
        RingInputError,
        r"k and v must have the same batch, length and heads \(only the head_dim may differ\), "
        r"got \(1, 4, 2, 8\) and \(1, 4, 4, 8\)",
    ),
    "heads": (RingInputError, r"heads_q=6 is not a multiple of heads_kv=4"),
    "head_dim": (RingInputError, r"q and k must have the same head_dim, got 8 and 16"),
    "q_k_len": (RingInputError, r"q has 6 local tokens but k/v (have|only) 4"),
    "layout": (
        RingInputError,
        r"unknown layout 'zigzagg'; choose one of \['contiguous', 'striped'",
    ),
    "odd_zigzag": (
        RingInputError,
        r"'zigzag' layout needs a multiple of 2 local tokens per rank, got 3",
    ),
    "group_type": (TypeError, r"group must be a ProcessGroup, a 1-D DeviceMesh or None, got int"),
}


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _uniform_case(name):
    """``(q, k, v, kwargs)`` for one bad input, the same on every rank."""
    q, k, v = _randn(1, 4, 4, 8), _randn(1, 4, 2, 8), _randn(1, 4, 2, 8)
    kwargs = {"causal": True}
    if name == "not_4d":
        q = _randn(1, 4, 32)
    elif name == "int_dtype":
        q, k, v = (torch.ones(t.shape, dtype=torch.int64) for t in (q, k, v))
    elif name == "dtype_mismatch":
        k, v = k.double(), v.double()
    elif name == "kv_shape":
        v = _randn(1, 4, 4, 8)
    elif name == "heads":
        q, k, v = _randn(1, 4, 6, 8), _randn(1, 4, 4, 8), _randn(1, 4, 4, 8)
    elif name == "head_dim":
        k, v = _randn(1, 4, 2, 16), _randn(1, 4, 2, 16)
    elif name == "q_k_len":  # more queries than keys
        q = _randn(1, 6, 4, 8)
    elif name == "layout":
        kwargs["layout"] = "zigzagg"
    elif name == "odd_zigzag":
        q, k, v = _randn(1, 3, 4, 8), _randn(1, 3, 2, 8), _randn(1, 3, 2, 8)
        kwargs["layout"] = "zigzag"
    elif name == "group_type":
        kwargs["group"] = 5
    return q, k, v, kwargs


def _rank_case(name, rank):
    """``(q, k, v, kwargs)`` for a case whose inputs differ between ranks."""
    seq, dtype, causal = 4, torch.float32, True
    if name == "seq_local_differs":
        seq = 2 * (rank + 1)
    elif name == "causal_differs":
        causal = rank == 0
    elif name == "dtype_differs":
        dtype = torch.float64 if rank == 1 else torch.float32
    q, k, v = _randn(1, seq, 4, 8, dtype=dtype), _randn(1, seq, 2, 8), _randn(1, seq, 2, 8)
    k, v = k.to(dtype), v.to(dtype)
    if name == "int_on_rank_1" and rank == 1:
        q, k, v = (torch.ones(t.shape, dtype=torch.int64) for t in (q, k, v))
    kwargs = {"causal": causal, "layout": "zigzag"}
    if name == "layout_typo_on_rank_1" and rank == 1:
        kwargs["layout"] = "zigzgg"
    if name == "scale_differs":  # None means head_dim ** -0.5; 0.0 is a different scale
        kwargs["scale"] = None if rank == 0 else 0.0
    if name == "needs_grad_differs":  # rotation="auto" and the backward ring depend on it
        q.requires_grad_(rank == 0)
    if name == "cu_seqlens_differs":  # the same total, different boundaries
        kwargs["cu_seqlens"] = torch.tensor([0, 1 + rank, 2 * seq])
    if name == "accumulator_split_differs":  # 16-bit backward cuts would not line up
        kwargs["granularity"] = ringattn.Granularity(accumulator_split=1 + (rank == 0))
    return q, k, v, kwargs


def _caught(fn):
    """Run ``fn``; return ``(exception type name, message, pid)`` (type name None if no error).

    Also asserts that no ring step ran (nothing was sent) before the error."""
    result = None, "", os.getpid()
    with ringattn.record_ring() as trace:
        try:
            fn()
        except Exception as exc:  # every rank reports what it raised
            result = type(exc).__name__, str(exc), os.getpid()
    assert not trace.steps and trace.bytes_sent == 0, f"ring steps ran: {trace.steps}"
    return result


def _uniform_job(rank, world, name):
    q, k, v, kwargs = _uniform_case(name)
    return _caught(lambda: ringattn.ring_attention(q, k, v, **kwargs))


def _rank_job(rank, world, name):
    q, k, v, kwargs = _rank_case(name, rank)
    return _caught(lambda: ringattn.ring_attention(q, k, v, **kwargs))


def _valid_job(rank, world):
    """A valid causal zigzag call with gradients; returns ``(pid, worst relative error)``."""
    q, k, v, dout = random_qkv(1, 4 * world, 4, 2, 8, seed=11)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*full, True)
    ref_grads = torch.autograd.grad(ref_out, full, dout)
    local = [ringattn.shard(t, "zigzag").requires_grad_() for t in (q, k, v)]
    out = ringattn.ring_attention(*local, causal=True, layout="zigzag")
    grads = torch.autograd.grad(out, local, ringattn.shard(dout, "zigzag"))
    pairs = [(out, ref_out), *zip(grads, ref_grads, strict=True)]
    worst = max(relative_error(got, ringattn.shard(ref, "zigzag")) for got, ref in pairs)
    return os.getpid(), worst


def _assert_every_rank(results, exc_type, pattern):
    """Every rank raised ``exc_type`` with a message matching ``pattern``; the same message."""
    for rank, (type_name, message, _) in enumerate(results):
        assert type_name == exc_type.__name__, f"rank {rank}: {type_name}: {message}"
        assert re.search(pattern, message), f"rank {rank}: {message!r} !~ {pattern!r}"
    assert len({message for _, message, _ in results}) == 1, results


def _assert_pool_still_works(pool, results):
    """A valid ring call on the same processes still gives the exact result."""
    checks = pool.run(_valid_job)
    assert [pid for pid, _ in checks] == [pid for _, _, pid in results], "the pool was restarted"
    assert max(err for _, err in checks) < 1e-10


@pytest.mark.parametrize("name", sorted(set(UNIFORM) - {"odd_zigzag"}))
def test_uniform_bad_input_world_1(name):
    exc_type, pattern = UNIFORM[name]
    q, k, v, kwargs = _uniform_case(name)
    with pytest.raises(exc_type, match=pattern):
        ringattn.ring_attention(q, k, v, **kwargs)


def test_odd_zigzag_is_fine_in_a_world_of_one():
    """A world of one has no zigzag pairing, so an odd local length is valid there."""
    q, k, v, _ = random_qkv(1, 3, 4, 2, 8, seed=1)
    out = ringattn.ring_attention(q, k, v, causal=True, layout="zigzag")
    assert relative_error(out, reference_attention(q, k, v, True)[0]) < 1e-12


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", sorted(UNIFORM))
def test_uniform_bad_input_raises_on_every_rank(pools, world, name):
    exc_type, pattern = UNIFORM[name]
    results = pools(world).run(_uniform_job, name)
    _assert_every_rank(results, exc_type, pattern)
    if exc_type is RingInputError:  # the gathered message lists every rank's own problem
        message = results[0][1]
        assert message.startswith("ring_attention: invalid input on rank 0: ")
        assert all(f"rank {r}: " in message for r in range(world))
    _assert_pool_still_works(pools(world), results)


def _expected_rank_case(name, world):
    """The message pattern every rank must raise for a rank-dependent case."""
    by_rank = {
        "seq_local_differs": ", ".join(str(2 * (r + 1)) for r in range(world)),
        "causal_differs": ", ".join(["1"] + ["0"] * (world - 1)),
        "dtype_differs": ", ".join(
            "'torch.float64'" if r == 1 else "'torch.float32'" for r in range(world)
        ),
        "needs_grad_differs": ", ".join(["1"] + ["0"] * (world - 1)),
        "accumulator_split_differs": ", ".join(["2"] + ["1"] * (world - 1)),
    }
    if name == "int_on_rank_1":
        return r"^ring_attention: invalid input on rank 1: q has dtype torch\.int64; use float16"
    if name == "layout_typo_on_rank_1":
        return r"^ring_attention: invalid input on rank 1: unknown layout 'zigzgg'"
    if name == "scale_differs":
        return r"^ring_attention: scale differs between ranks \[0\.35355\d*, 0(, 0)*\]"
    if name == "cu_seqlens_differs":  # shown as fingerprints of the boundaries
        return (
            r"^ring_attention: cu_seqlens differs between ranks \[[\d, ]+\] \(by rank\); "
            r"every rank must pass the same cu_seqlens \(global document boundaries\)$"
        )
    field = name.removesuffix("_differs")
    advice = {
        "seq_local": "every rank must hold an equal shard of the sequence; use ringattn.shard",
        "causal": "every rank must pass the same causal flag",
        "dtype": "every rank must use the same dtype",
        "accumulator_split": "every rank must pass the same granularity",
        "needs_grad": "every rank must agree on whether gradients flow (requires_grad of q, k, v "
        "and grad mode): the backward pass and rotation='auto' involve every rank",
    }[field]
    return (
        rf"^ring_attention: {field} differs between ranks \[{re.escape(by_rank[name])}\] "
        rf"\(by rank\); {re.escape(advice)}$"
    )


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "name",
    [
        "seq_local_differs",
        "causal_differs",
        "dtype_differs",
        "int_on_rank_1",
        "layout_typo_on_rank_1",
        "scale_differs",
        "needs_grad_differs",
        "cu_seqlens_differs",
        "accumulator_split_differs",
    ],
)
def test_rank_dependent_input_raises_on_every_rank(pools, world, name):
    results = pools(world).run(_rank_job, name)
    _assert_every_rank(results, RingInputError, _expected_rank_case(name, world))
    if name in ("int_on_rank_1", "layout_typo_on_rank_1"):  # only the rank at fault is named
        assert all(f"rank {r}" not in results[0][1] for r in range(world) if r != 1)
    _assert_pool_still_works(pools(world), results)


def _mesh_job(rank, world):
    """A 2-D DeviceMesh is refused; its 1-D slice works as the group."""
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "cp"))
    except Exception as exc:  # DeviceMesh unavailable on this build: the test skips
        return "skip", f"{type(exc).__name__}: {exc}"
    q, k, v, _ = random_qkv(1, 4, 4, 2, 8, seed=rank)
    error = _caught(lambda: ringattn.ring_attention(q, k, v, group=mesh))
    q, k, v, _ = random_qkv(1, 4 * world, 4, 2, 8, seed=5)
    ref_out, _ = reference_attention(q, k, v, True)
    group = mesh["dp"]
    local = [ringattn.shard(t, "zigzag", group=group) for t in (q, k, v)]
    out = ringattn.ring_attention(*local, causal=True, layout="zigzag", group=group)
    return error, relative_error(out, ringattn.shard(ref_out, "zigzag", group=group))


def test_two_dimensional_device_mesh_is_refused(pools):
    results = pools(2).run(_mesh_job)
    if results[0][0] == "skip":
        pytest.skip(f"cannot build a CPU DeviceMesh: {results[0][1]}")
    pattern = r"group is a 2-D DeviceMesh; pass its context-parallel dimension, e\.g\. mesh\['cp'\]"
    _assert_every_rank([error for error, _ in results], ValueError, pattern)
    assert "('dp', 'cp')" in results[0][0][1]
    assert max(err for _, err in results) < 1e-10
    _assert_pool_still_works(pools(2), [error for error, _ in results])


def _unshard_job(rank, world, local_len):
    return _caught(lambda: ringattn.unshard(torch.zeros(2, local_len, 3), "zigzag"))


def test_unshard_of_odd_zigzag_shard_names_the_multiple(pools):
    results = pools(2).run(_unshard_job, 3)
    pattern = r"^a 'zigzag' shard must have a multiple of 2 tokens along dim 1, got 3$"
    _assert_every_rank(results, ValueError, pattern)
    _assert_pool_still_works(pools(2), results)


def _unknown_layout_job(rank, world, what):
    x = torch.zeros(2, 4 * world, 3)
    calls = {
        "shard": lambda: ringattn.shard(x, "stripy"),
        "unshard": lambda: ringattn.unshard(x, "stripy"),
        "positions": lambda: ringattn.positions(4 * world, "stripy"),
    }
    return _caught(calls[what])


@pytest.mark.parametrize("what", ["shard", "unshard", "positions"])
def test_helpers_refuse_an_unknown_layout_on_every_rank(pools, what):
    results = pools(3).run(_unknown_layout_job, what)
    _assert_every_rank(results, ValueError, r"^unknown layout 'stripy'; choose one of")


def test_shard_errors_in_a_world_of_one():
    """Without a process group any length shards; an unknown layout is still refused."""
    x = torch.arange(7.0).reshape(1, 7)
    assert torch.equal(ringattn.shard(x, "zigzag"), x)
    with pytest.raises(ValueError, match=r"unknown layout 'stripy'"):
        ringattn.shard(x, "stripy")
    with pytest.raises(ValueError, match=r"unknown layout 'stripy'"):
        ringattn.positions(7, "stripy")
