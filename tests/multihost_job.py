"""The exactness suite as one ``torchrun`` job, for rings that cross (simulated) hosts:
``tests/test_multihost.py`` runs it on every host through ``scripts/multihost.py``.

    torchrun --nnodes 2 --nproc-per-node 2 ... tests/multihost_job.py

Every layout, causal and full (fp32, MHA/GQA/MQA, sub-blocks), and every mask under both
rotations, against the float64 reference, on the ranks of the job; prints one line per rank.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from test_masks import _masks_job
from test_ring_exact import LAYOUTS, _fp32_job


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    started = time.perf_counter()
    cases = 0
    for layout in LAYOUTS:
        for causal in (False, True):
            _fp32_job(rank, world, layout, causal)
            cases += 1
        for rotation in ("kv", "q"):
            _masks_job(rank, world, layout, (37,), "cpu", rotation)
            cases += 1
    dist.barrier()
    print(
        f"rank {rank}/{world}: EXACT, {cases} groups of cases in "
        f"{time.perf_counter() - started:.1f}s",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
