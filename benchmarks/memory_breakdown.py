"""Where a rank's memory goes: peak above the inputs in the forward and the backward pass.

Each world size runs ring attention forward + backward (after a short warm-up, so first-touch
library pages do not count) and reports, per rank, the peak resident memory of the forward pass
and of the backward pass above what existed when each began, in MiB and in units of the rank's
query shard (``seq_local x heads x head_dim x 4`` bytes). One process then runs the same kernel
over the whole sequence for comparison (forward and backward in one measurement). Workers start
with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns freed buffers at once and the resident set
tracks live tensors.

    python benchmarks/memory_breakdown.py --seq-len 32K --world-sizes 1,2,4
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import ringattn
from ringattn.cli import parse_tokens
from ringattn.launch import init_worker, run_on_ranks
from ringattn.layout import get_layout
from ringattn.memory import PeakMemory, steady_rss_for_children
from ringattn.workload import Workload, time_single_process

_MIB = 2**20


def _peaks(workload: Workload, inputs: dict) -> tuple[int, int]:
    """(forward peak, backward peak) bytes of one ring forward + backward on ``inputs``."""
    q, k, v = (inputs[name].detach().requires_grad_() for name in "qkv")
    warm = [t[:, :256].detach().requires_grad_() for t in (q, k, v)]
    warm_out = ringattn.ring_attention(*warm, causal=workload.causal, layout=workload.layout)
    torch.autograd.grad(warm_out, warm, torch.ones_like(warm_out))
    del warm, warm_out
    with PeakMemory() as forward:
        out = ringattn.ring_attention(q, k, v, causal=workload.causal, layout=workload.layout)
    with PeakMemory() as backward:
        torch.autograd.grad(out, (q, k, v), inputs["dout"])
    return forward.bytes, backward.bytes


def _worker(workload: Workload) -> dict:
    init_worker("cpu")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    positions = get_layout(workload.layout).positions(rank, world, workload.seq_len // world)
    forward, backward = _peaks(workload, workload.inputs(positions, torch.device("cpu")))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (forward, backward))
    dist.destroy_process_group()
    return {"world": world, "peaks": gathered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=parse_tokens, default=32768)
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    args = parser.parse_args()
    steady_rss_for_children()
    workload = Workload(
        seq_len=args.seq_len,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        causal=args.causal,
    )
    print(
        f"{args.seq_len:,} tokens, heads {args.heads} (kv {args.kv_heads}), d={args.head_dim}, "
        f"fp32, {'causal' if args.causal else 'full'}, zigzag; MiB above the inputs "
        "(backward: above the end of the forward pass, which holds the output)"
    )
    print(
        f"{'p':>3} {'tokens/rank':>12} {'q-shard MiB':>12} {'fwd peak':>9} {'bwd peak':>9} "
        f"{'peak':>8} {'in q-shards':>12} {'vs one process':>15}"
    )
    time_single_process(workload, torch.device("cpu"), threads=1)  # warm-up
    single_total = time_single_process(workload, torch.device("cpu"), threads=1).peak_bytes
    for world in (int(x) for x in args.world_sizes.split(",")):
        result = run_on_ranks(_worker, (workload,), world)[0]
        local = args.seq_len // world
        unit = local * args.heads * args.head_dim * 4
        forward = max(f for f, _ in result["peaks"])  # the most loaded rank
        backward = max(b for _, b in result["peaks"])
        total = max(forward, backward + unit)  # the output (one q-shard) lives on in backward
        print(
            f"{world:>3} {local:>12,} {unit / _MIB:>12.1f} {forward / _MIB:>9.1f} "
            f"{backward / _MIB:>9.1f} {total / _MIB:>8.1f} {total / unit:>12.1f} "
            f"{total / single_total:>15.2f}"
        )
    print(f"one process over all {args.seq_len:,} tokens: peak {single_total / _MIB:.1f} MiB")


if __name__ == "__main__":
    main()
