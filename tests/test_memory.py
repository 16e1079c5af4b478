"""What the ring holds beyond the inherent set, measured (no timing).

Per-rank peak resident memory above the inputs (``measure_ring_memory``: ``VmHWM`` reset at
entry, read after), in pool workers started with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc maps
every buffer above 64 KiB on its own and unmaps it when freed: the resident set then follows the
live tensors, stable to a fraction of a MiB on 2 cores, where an allocation hook would miss the
buffers that kernels and gloo allocate internally. The inherent set is out, lse, dq, dk, dv; what
the ring adds on top (travelling and returning sub-blocks, kernel outputs of a band) must stay
under 2.5 query-shards (measured here: 0.66-0.84). Whole blocks (``sub_blocks=1``, the old
double buffering; 3.6-4.5 at p=2) are measured too, to show the measurement tells them apart.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn.layout import get_layout
from ringattn.workload import Workload, measure_ring_memory

LIMIT_Q_SHARDS = 2.5
ALLOWANCE = 2 * 2**20  # interpreter, gloo and allocator bookkeeping, bytes
WORKLOAD = Workload(seq_len=16384, heads=8, kv_heads=4, head_dim=64, causal=True)


def _memory_job(rank, world, sub_blocks):
    positions = get_layout(WORKLOAD.layout).positions(rank, world, WORKLOAD.seq_len // world)
    inputs = WORKLOAD.inputs(positions, torch.device("cpu"))
    granularity = ringattn.Granularity(sub_blocks=sub_blocks)
    memory = measure_ring_memory(WORKLOAD, inputs, granularity=granularity)
    dist.barrier()
    return memory.added / inputs["q"].nbytes, memory.added


@pytest.mark.parametrize("world", [2, 4])
def test_ring_adds_under_two_and_a_half_query_shards(pools, world):
    unit = WORKLOAD.seq_len // world * WORKLOAD.heads * WORKLOAD.head_dim * 4
    default = pools(world).run(_memory_job, ringattn.Granularity().sub_blocks)
    for rank, (shards, added) in enumerate(default):
        assert added <= LIMIT_Q_SHARDS * unit + ALLOWANCE, (
            f"rank {rank} of {world}: the ring adds {shards:.2f} query-shards"
        )
    if world == 2:
        whole_blocks = pools(world).run(_memory_job, 1)
        assert max(shards for shards, _ in whole_blocks) > LIMIT_Q_SHARDS + 1, whole_blocks
