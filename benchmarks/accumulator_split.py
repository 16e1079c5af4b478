"""What the 16-bit backward's finer cut costs in time: ring forward and backward with
``Granularity(accumulator_split=1)`` and ``=4`` (the default) side by side, runs interleaved.

    .venv/bin/python benchmarks/accumulator_split.py                 # 16K tokens, p=2, ~3 minutes

Causal zigzag, 4 query heads and 2 KV heads, d=64, one thread per rank; each split runs
``--repeats`` times after a warm-up, alternating with the other; a run's time is the slowest
rank's. Its memory side is `benchmarks/memory_breakdown.py --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn.tools.cli import parse_tokens
from ringattn.tools.launch import init_worker, run_on_ranks

SPLITS = (1, 4)


def _worker(seq_len: int, dtype: str, repeats: int) -> dict | None:
    init_worker("cpu")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    n, kind = seq_len // world, getattr(torch, dtype)
    q, k, v = (torch.randn(1, n, h, 64, generator=gen).to(kind) for h in (4, 2, 2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(1, n, 4, 64, generator=gen).to(kind)
    times: dict = {split: [] for split in SPLITS}
    for repeat in range(repeats + 1):  # the first round warms up
        for split in SPLITS:
            granularity = ringattn.Granularity(accumulator_split=split)
            dist.barrier()
            start = time.perf_counter()
            out = ringattn.ring_attention(
                q, k, v, causal=True, layout="zigzag", granularity=granularity
            )
            middle = time.perf_counter()
            torch.autograd.grad(out, (q, k, v), dout)
            elapsed = torch.tensor([middle - start, time.perf_counter() - middle])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if repeat:
                times[split].append(elapsed.tolist())
    dist.destroy_process_group()
    return times if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=parse_tokens, default=16384)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results = run_on_ranks(_worker, (args.seq_len, args.dtype, args.repeats), args.world_size)
    times = next(r for r in results.values() if r)
    print(f"{args.seq_len:,} tokens, p={args.world_size}, {args.dtype}; seconds, each run")
    print("| accumulator_split | forward s | backward s | backward median s |")
    print("|---:|---|---|---:|")
    for split, runs in times.items():
        forward = ", ".join(f"{f:.2f}" for f, _ in runs)
        backward = ", ".join(f"{b:.2f}" for _, b in runs)
        median = statistics.median(b for _, b in runs)
        print(f"| {split} | {forward} | {backward} | {median:.2f} |")


if __name__ == "__main__":
    main()
