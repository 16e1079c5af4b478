"""All-gather KV (``rotation="allgather"``) against the ring (``rotation="kv"``): per-rank peak
memory and time of forward + backward, side by side in one run, on the same inputs.

For each world size and head configuration, every rank runs both rotations in turn on its shard
(zigzag, causal): a full-size warm-up, one run under the exact tensor-storage high-water mark
(:class:`ringattn.tools.memory.PeakMemory`), one run under the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``; the script sets ``MALLOC_MMAP_THRESHOLD_``
so that freed tensors leave at once), then ``--repeats`` timed runs, interleaved between the
rotations. Both peaks include the rank's inputs (q, k, v, dout); the RSS figure is above the
process's resident set before the inputs existed. Printed per rotation: the most loaded rank's
peaks in MiB and in query-shards (this rank's q in bytes), and the median wall time and CPU time
(all of the process's threads, gloo's included) of the slowest rank; on a machine shared with
other work the CPU time is the steadier of the two.

    python benchmarks/allgather_vs_ring.py --seq-len 16K --world-sizes 2,4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from ringattn import Granularity, ring_attention
from ringattn.layout import get_layout
from ringattn.tools.cli import parse_tokens
from ringattn.tools.launch import cpu_threads_per_rank, init_worker, run_on_ranks
from ringattn.tools.memory import MIB, PeakMemory
from ringattn.tools.workload import Workload, tensor_bytes

ROTATIONS = ("kv", "allgather")
CONFIGS = {"MHA": 4, "GQA 4:1": 1}  # name: kv heads, for 4 query heads


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _worker(workload: Workload, repeats: int) -> list:
    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    rank, world = dist.get_rank(), dist.get_world_size()
    gc.collect()
    base_rss = _status_kib("VmRSS") * 1024
    positions = get_layout(workload.layout).positions(rank, world, workload.seq_len // world)
    inputs = workload.inputs(positions, torch.device("cpu"))
    input_bytes = tensor_bytes(inputs.values())
    leaves = [inputs[n].requires_grad_() for n in "qkv"]

    def run(rotation: str) -> tuple[float, float]:
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = ring_attention(
            *leaves,
            causal=workload.causal,
            layout=workload.layout,
            granularity=workload.granularity,
            rotation=rotation,
        )
        torch.autograd.grad(out, leaves, inputs["dout"])
        return time.perf_counter() - start, time.process_time() - cpu_start

    result: dict[str, dict] = {}
    for rotation in ROTATIONS:
        run(rotation)  # warm-up at full size: allocator, gloo buffers, code paths
        with PeakMemory() as peak:
            run(rotation)
        gc.collect()
        dist.barrier()
        _reset_high_water()
        run(rotation)
        rss = _status_kib("VmHWM") * 1024 - base_rss
        result[rotation] = {"tensor_peak": peak.bytes + input_bytes, "rss_peak": rss}
        result[rotation].update(s=[], cpu_s=[])
    for _ in range(repeats):
        for rotation in ROTATIONS:
            wall, cpu = run(rotation)
            result[rotation]["s"].append(wall)
            result[rotation]["cpu_s"].append(cpu)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, result)
    dist.destroy_process_group()
    return gathered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=parse_tokens, default=16384)
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="of: " + ", ".join(CONFIGS))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the ranks
    print(
        f"{args.seq_len:,} tokens, 4 query heads, d={args.head_dim}, float32, causal, zigzag, "
        f"{Granularity()}; per rank, inputs included; the most loaded rank; "
        f"{cpu_threads_per_rank()} core(s), max(1, cores // p) threads per rank"
    )
    header = (
        f"{'config':<8} {'p':>2} {'rotation':<10} {'q-shard':>8} {'tensor peak':>12} "
        f"{'= q-shards':>10} {'RSS peak':>9} {'= q-shards':>10} {'fwd+bwd s':>10} {'cpu s':>6}"
    )
    print(header)
    rows = []
    for name in args.configs.split(","):
        kv_heads = CONFIGS[name.strip()]
        workload = Workload(
            seq_len=args.seq_len, heads=4, kv_heads=kv_heads, head_dim=args.head_dim
        )
        for world in (int(x) for x in args.world_sizes.split(",")):
            ranks = run_on_ranks(_worker, (workload, args.repeats), world)[0]
            unit = args.seq_len // world * 4 * args.head_dim * 4
            for rotation in ROTATIONS:
                tensor = max(r[rotation]["tensor_peak"] for r in ranks)
                rss = max(r[rotation]["rss_peak"] for r in ranks)
                seconds, cpu = (
                    statistics.median(
                        max(r[rotation][kind][i] for r in ranks) for i in range(args.repeats)
                    )
                    for kind in ("s", "cpu_s")
                )
                row = {
                    "config": name.strip(),
                    "world_size": world,
                    "rotation": rotation,
                    "q_shard_bytes": unit,
                    "tensor_peak_bytes": tensor,
                    "rss_peak_bytes": rss,
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                }
                rows.append(row)
                print(
                    f"{name.strip():<8} {world:>2} {rotation:<10} {unit / MIB:>8.1f} "
                    f"{tensor / MIB:>12.1f} {tensor / unit:>10.2f} {rss / MIB:>9.1f} "
                    f"{rss / unit:>10.2f} {seconds:>10.2f} {cpu:>6.2f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
