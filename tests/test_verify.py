"""Sampled verification (ringattn.tools.verify) on real gloo groups of 2 and 3 ranks.

Its float64 reference equals dense float64 attention, it passes on the ring's results, and it
fails when a single sampled row of out, lse or dq, or a single sampled column of dk or dv, on a
single rank, is off by 1%. Tiles of a few scores make every pass merge many blocks, and the ring
cuts its blocks into 3 sub-blocks, so what is verified comes from the sub-block engine.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import reference_attention

from ringattn.layout import get_layout
from ringattn.tools import verify
from ringattn.tools.verify import sample_positions, verify_sampled
from ringattn.tools.workload import OUTPUT_NAMES, Workload, time_ring

SAMPLES = 48  # more than the cut positions, so some are random
SMALL_TILES = 48  # scores per tile: blocks of a few rows and keys


def _workload(world: int, **changes) -> Workload:
    base = Workload(
        seq_len=24 * world, heads=4, kv_heads=2, head_dim=16, batch=2, sub_blocks=3, min_tokens=1
    )
    return replace(base, **changes)


def _own_positions(rank: int, world: int, workload: Workload) -> torch.Tensor:
    return get_layout(workload.layout).positions(rank, world, workload.seq_len // world)


def _ring_outputs(rank, world, workload, with_backward=True) -> dict[str, torch.Tensor]:
    inputs = workload.inputs(_own_positions(rank, world, workload), torch.device("cpu"))
    return time_ring(workload, inputs, repeats=1, with_backward=with_backward).outputs


def _verify_with_small_tiles(workload, outputs, **options):
    default = verify.TILE_ELEMENTS
    verify.TILE_ELEMENTS = SMALL_TILES
    try:
        return verify_sampled(workload, outputs, samples=SAMPLES, **options)
    finally:
        verify.TILE_ELEMENTS = default


def _dense_reference_job(rank, world, workload):
    """Dense float64 attention's results as the "ring" results: errors at rounding level."""
    full = replace(workload, dtype="float64").inputs(torch.arange(workload.seq_len), "cpu")
    q, k, v = (full[name].requires_grad_() for name in "qkv")
    out, lse = reference_attention(q, k, v, workload.causal)
    grads = torch.autograd.grad(out, (q, k, v), full["dout"])
    own = _own_positions(rank, world, workload)
    outputs = {
        name: t.detach().index_select(2 if name == "lse" else 1, own)
        for name, t in zip(OUTPUT_NAMES, (out, lse, *grads), strict=True)
    }
    return _verify_with_small_tiles(workload, outputs)


@pytest.mark.parametrize(
    "world, layout, causal",
    [(2, "zigzag", True), (3, "striped", True), (3, "contiguous", False)],
)
def test_reference_equals_dense_float64_attention(pools, world, layout, causal):
    workload = _workload(world, layout=layout, causal=causal)
    for check in pools(world).run(_dense_reference_job, workload):
        assert check.positions == SAMPLES
        for name, error in check.errors.items():
            assert error <= 1e-12, f"{name}: {error:.1e}"


def _ring_job(rank, world, workload, with_backward, corrupt):
    """The ring's results, with ``corrupt = (name, position)`` 1% off at one global position
    (a row of out/lse/dq, a column of dk/dv) on the rank that holds it."""
    outputs = _ring_outputs(rank, world, workload, with_backward)
    if corrupt is not None:
        name, position = corrupt
        held = (_own_positions(rank, world, workload) == position).nonzero().squeeze(1)
        dim = 2 if name == "lse" else 1
        outputs[name].index_copy_(dim, held, outputs[name].index_select(dim, held) * 1.01)
    return _verify_with_small_tiles(workload, outputs)


@pytest.mark.parametrize(
    "world, layout, causal, with_backward",
    [
        (2, "zigzag", True, True),
        (3, "striped", True, True),
        (3, "contiguous", False, True),
        (3, "zigzag", True, False),
    ],
)
def test_passes_on_the_ring(pools, world, layout, causal, with_backward):
    workload = _workload(world, layout=layout, causal=causal)
    checks = pools(world).run(_ring_job, workload, with_backward, None)
    names = ("out", "lse", "dq", "dk", "dv") if with_backward else ("out", "lse")
    for check in checks:
        assert check.passed, check
        assert tuple(check.errors) == names and check.kernel_errors is None
        assert all(check.tolerance[name] == 1e-5 for name in names)
    assert len({tuple(c.errors.values()) for c in checks}) == 1  # the same verdict everywhere


@pytest.mark.parametrize("world, name", [(2, "out"), (3, "lse"), (2, "dq"), (3, "dk"), (3, "dv")])
def test_fails_on_one_wrong_row_or_column(pools, world, name):
    workload = _workload(world)
    sample = sample_positions(workload, world, SAMPLES)
    boundaries = set(sample_positions(workload, world, 0).tolist())
    position = next(p for p in sample.tolist() if p not in boundaries)  # a random sample
    checks = pools(world).run(_ring_job, workload, True, (name, position))
    for check in checks:
        assert not check.passed
        assert check.errors[name] > 100 * check.tolerance[name]
        assert all(err <= check.tolerance[n] for n, err in check.errors.items() if n != name)


def test_low_precision_is_judged_against_the_same_kernel(pools):
    workload = _workload(2, dtype="bfloat16")
    (check, _) = pools(2).run(_ring_job, workload, True, None)
    assert check.passed, check
    for name, error in check.kernel_errors.items():
        assert 0 < error and check.tolerance[name] == max(2 * error, verify.LOW_PRECISION_FLOOR)


def test_samples_hold_the_ends_and_every_segment_boundary():
    workload = Workload(seq_len=120, heads=1, kv_heads=1, layout="zigzag", seed=3)
    sample = sample_positions(workload, 3, 40)
    assert len(sample) == 40 and sample.tolist() == sorted(set(sample.tolist()))
    assert torch.equal(sample, sample_positions(workload, 3, 40))  # the same on every rank
    chunk = 120 // 6  # zigzag on 3 ranks: 6 chunks
    boundaries = {0, 119} | {c * chunk for c in range(6)} | {c * chunk - 1 for c in range(1, 7)}
    assert set(sample_positions(workload, 3, 0).tolist()) == boundaries
    assert boundaries <= set(sample.tolist())
    assert len(sample_positions(workload, 3, 1000)) == 120  # never more than the sequence


def test_samples_hold_every_sub_block_piece_and_band_edge():
    """Where a sub-block engine could go wrong: both ends of every piece of every sub-block and
    of every band of kernel rows are sampled."""
    workload = Workload(seq_len=120, heads=1, kv_heads=1, layout="zigzag", sub_blocks=2)
    workload = replace(workload, min_tokens=1)
    chunk = 120 // 6  # zigzag on 3 ranks: 6 chunks of 20; 2 sub-blocks halve every chunk
    edges = {c * chunk + offset for c in range(6) for offset in (0, 9, 10, 19)}
    assert set(sample_positions(workload, 3, 0).tolist()) == edges | {119}


def test_world_of_one_reports_progress_of_the_float64_forward():
    workload = _workload(1)
    lines = []
    check = _verify_with_small_tiles(
        workload, _ring_outputs(0, 1, workload), progress=lines.append, every_s=0.0
    )
    assert check.passed, check
    assert lines and all(
        line.startswith("float64 reference forward over all 24 rows (") for line in lines
    )
    done = [int(line.split(" (")[1].split("%")[0]) for line in lines]
    assert done == sorted(done) and done[-1] < 100 and "s elapsed, ~" in lines[-1]
