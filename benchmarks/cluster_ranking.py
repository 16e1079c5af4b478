"""The node-aware planner's ranking of 1-D and 2-D configurations, checked by measurement on
this machine's 4 ranks.

    .venv/bin/python benchmarks/cluster_ranking.py                  # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/cluster_ranking.py --from-json      # rank again, no runs

Every configuration of 4 ranks — Ulysses x ring 1x4, 2x2 and 4x1 with pass-KV, pass-Q and
all-gather where a ring exists — runs causal forward+backward of ``ring_attention`` (zigzag) on
the same inputs; the time of a call is the slowest rank's, the median of ``--repeats``. The
prediction is :func:`ringattn.tools.cluster.rank` for a profile of this machine measured in the
same run by :func:`ringattn.tools.plan.calibrate` (kernel rate on all cores, gloo bandwidth and
latency between two ranks, a transfer's compute share): fitted to the parts, never to the
configurations measured. The check: every predicted time within 25% of the measured one, and
every pair of configurations whose predicted times differ by more than 10% measured in the same
order. Writes a JSON file and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (
    (1, 4, "kv"),
    (1, 4, "q"),
    (1, 4, "allgather"),
    (2, 2, "kv"),
    (2, 2, "q"),
    (2, 2, "allgather"),
    (4, 1, "kv"),
)
TIME_TOLERANCE, ORDER_MARGIN = 0.25, 0.10


def _worker(seq_len: int, heads: int, kv_heads: int, dim: int, repeats: int) -> list | None:
    """One of 4 ranks: time every configuration; rank 0 returns the medians."""
    import torch
    import torch.distributed as dist

    import ringattn
    from ringattn.tools.launch import cpu_threads_per_rank, init_worker

    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq_len, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads)]
    dout = torch.randn(1, seq_len, heads, dim, generator=gen)
    rows = []
    for ulysses, ring, rotation in CONFIGS:
        group = None if ulysses == 1 else ringattn.context_mesh(ulysses, ring)
        local = [ringattn.shard(t, "zigzag", group=group).requires_grad_() for t in full]
        local_dout = ringattn.shard(dout, "zigzag", group=group)
        times = []
        for i in range(repeats + 1):  # the first run warms up
            dist.barrier()
            start = time.perf_counter()
            out = ringattn.ring_attention(
                *local, causal=True, group=group, rotation=rotation, layout="zigzag"
            )
            torch.autograd.grad(out, local, local_dout)
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:
                times.append(float(elapsed))
        rows.append({"ulysses": ulysses, "ring": ring, "rotation": rotation, "times": times})
        if dist.get_rank() == 0:
            print(f"  {ulysses}x{ring} {rotation}: {statistics.median(times):.3f} s", flush=True)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rows if rank == 0 else None


def predict(rows: list[dict], profile: dict, seq_len: int, heads: int, kv_heads: int, dim: int):
    """Each measured row with its prediction; the check's verdict."""
    from ringattn.tools.cluster import Strategy, rank
    from ringattn.tools.plan import Config, Hardware

    hardware = Hardware(**profile)
    config = Config(
        seq_len=seq_len, devices=4, heads=heads, kv_heads=kv_heads, head_dim=dim,
        dtype="float32", causal=True,
    )  # fmt: skip
    ranked = {r.strategy: r for r in rank(config, hardware)}
    for row in rows:
        strategy = Strategy(row["ulysses"], row["ring"], row["rotation"], "zigzag")
        row["measured_s"] = statistics.median(row["times"])
        row["predicted_s"] = ranked[strategy].total_s
        row["error"] = row["predicted_s"] / row["measured_s"] - 1
    disordered = [
        (a, b)
        for a in rows
        for b in rows
        if a["predicted_s"] * (1 + ORDER_MARGIN) < b["predicted_s"]
        and not a["measured_s"] < b["measured_s"]
    ]
    within = all(abs(r["error"]) <= TIME_TOLERANCE for r in rows)
    return rows, within, disordered


def table(rows: list[dict]) -> str:
    by_measured = sorted(rows, key=lambda r: r["measured_s"])
    by_predicted = sorted(rows, key=lambda r: r["predicted_s"])
    lines = [
        "| ulysses x ring | rotation | measured s | predicted s | error | measured rank | "
        "predicted rank |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in by_measured:
        lines.append(
            f"| {r['ulysses']}x{r['ring']} | {r['rotation']} | {r['measured_s']:.3f} | "
            f"{r['predicted_s']:.3f} | {100 * r['error']:+.0f}% | {by_measured.index(r) + 1} | "
            f"{by_predicted.index(r) + 1} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192, help="global tokens (default 8192)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--dim", type=int, default=64, help="head dim (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "cluster-ranking.json")
    parser.add_argument(
        "--from-json", action="store_true", help="predict again from --json's measurements"
    )
    args = parser.parse_args(argv)
    shape = (args.seq_len, args.heads, args.kv_heads, args.dim)
    if args.from_json:
        saved = json.loads(args.json.read_text())
        rows, profile, shape = saved["rows"], saved["profile"], tuple(saved["shape"])
    else:
        from ringattn.tools.launch import run_on_ranks
        from ringattn.tools.plan import calibrate

        print("calibrating this machine (kernel, gloo link) ...", flush=True)
        profile = asdict(calibrate(seq_len=args.seq_len // 2))
        print("measuring the configurations of 4 ranks ...", flush=True)
        results = run_on_ranks(_worker, (*shape, args.repeats), 4)
        rows = next(r for r in results.values() if r)
    rows, within, disordered = predict(rows, profile, *shape)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"shape": shape, "profile": profile, "rows": rows}, indent=1) + "\n"
    )
    print(table(rows))
    print(f"every time within {TIME_TOLERANCE:.0%}: {within}")
    for a, b in disordered:
        print(
            f"order differs: {a['ulysses']}x{a['ring']} {a['rotation']} predicted faster than "
            f"{b['ulysses']}x{b['ring']} {b['rotation']} by more than {ORDER_MARGIN:.0%}"
        )
    print(f"ranking matches: {not disordered}")
    return 0 if within and not disordered else 1


if __name__ == "__main__":
    sys.exit(main())
