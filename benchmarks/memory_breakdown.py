"""Where a rank's memory goes: peak above the inputs in the forward and the backward pass.

Each world size runs ring attention forward + backward (after a short warm-up) and reports, per
rank, the peak memory (tensor storage, :mod:`ringattn.tools.memory`) of the forward pass
and of the backward pass above what existed when each began, in MiB and in units of the rank's
query shard (``seq_local x heads x head_dim x 4`` bytes). One process then runs the same kernel
over the whole sequence for comparison (forward and backward in one measurement).

    python benchmarks/memory_breakdown.py --seq-len 32K --world-sizes 1,2,4
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from ringattn import Granularity
from ringattn.layout import get_layout
from ringattn.tools.cli import parse_tokens
from ringattn.tools.launch import init_worker, run_on_ranks
from ringattn.tools.memory import MIB
from ringattn.tools.workload import (
    Workload,
    context_scaling,
    measure_ring_memory,
    tensor_bytes,
    time_single_process,
)


def _worker(workload: Workload) -> list:
    init_worker("cpu")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    positions = get_layout(workload.layout).positions(rank, world, workload.seq_len // world)
    inputs = workload.inputs(positions, torch.device("cpu"))
    memory = measure_ring_memory(workload, inputs)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (memory, tensor_bytes(inputs.values())))
    dist.destroy_process_group()
    return gathered


def _single_worker(workload: Workload) -> int:
    """Peak including the inputs of one process running the kernel over the whole sequence."""
    time_single_process(workload, torch.device("cpu"), threads=1)  # warm-up
    return time_single_process(workload, torch.device("cpu"), threads=1).total_peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=parse_tokens, default=32768)
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument(
        "--sub-blocks", type=int, default=Granularity().sub_blocks, help="ringattn.Granularity"
    )
    args = parser.parse_args()
    workload = Workload(
        seq_len=args.seq_len,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        causal=args.causal,
        sub_blocks=args.sub_blocks,
    )
    print(
        f"{args.seq_len:,} tokens, heads {args.heads} (kv {args.kv_heads}), d={args.head_dim}, "
        f"{args.dtype}, {'causal' if args.causal else 'full'}, zigzag, {workload.granularity}.\n"
        "MiB; fwd/bwd: peak above the pass's start; peak: above the inputs; added: beyond out, "
        "lse, dq, dk, dv, in q-shards (this rank's q in bytes); the most loaded rank"
    )
    single = run_on_ranks(_single_worker, (workload,), 1)[0]
    print(f"one process over all {args.seq_len:,} tokens: {single / MIB:.1f} MiB with its inputs")
    print(
        f"{'p':>3} {'tokens/rank':>12} {'q-shard':>8} {'fwd':>7} {'bwd':>7} {'peak':>7} "
        f"{'added':>6} {'inputs':>7} {'with inputs':>12} {'context scaling':>16}"
    )
    element = torch.empty((), dtype=workload.torch_dtype).element_size()
    for world in (int(x) for x in args.world_sizes.split(",")):
        ranks = run_on_ranks(_worker, (workload,), world)[0]
        memory, inputs = max(ranks, key=lambda r: r[0].peak + r[1])
        local = args.seq_len // world
        unit = local * args.heads * args.head_dim * element
        total = memory.peak + inputs
        print(
            f"{world:>3} {local:>12,} {unit / MIB:>8.1f} {memory.forward / MIB:>7.1f} "
            f"{memory.backward / MIB:>7.1f} {memory.peak / MIB:>7.1f} "
            f"{memory.added / unit:>6.2f} {inputs / MIB:>7.1f} {total / MIB:>12.1f} "
            f"{context_scaling(single, total, world):>16.2f}"
        )


if __name__ == "__main__":
    main()
