"""The node-aware planner's ranking of 1-D and 2-D configurations, checked by measurement on
this machine's 4 ranks: on two simulated hosts of 2 ranks joined by a shaped link, or on one.

    sudo .venv/bin/python benchmarks/cluster_ranking.py --hosts 2 --rate 100mbit   # ~5 minutes
    .venv/bin/python benchmarks/cluster_ranking.py                   # one host, about 5 minutes
    .venv/bin/python benchmarks/cluster_ranking.py --hosts 2 --from-json   # rank again, no runs

Every configuration of 4 ranks — Ulysses x ring 1x4, 2x2 and 4x1 with pass-KV, pass-Q and
all-gather where a ring exists — runs causal forward+backward of ``ring_attention`` (zigzag) on
the same inputs; the time of a call is the slowest rank's, the median of ``--repeats``. With
``--hosts 2`` the ranks run as two nodes of ``torchrun`` (``scripts/multihost.py``): ranks 0-1
and 2-3 talk over their host's loopback, and between the hosts over veths whose outgoing rate
is limited to ``--rate`` (``tc tbf``, one link per host, shared by its ranks: a node with one
NIC). The Ulysses groups of 2x2 stay inside a host and its rings cross; 1x4's ring crosses twice;
4x1's all-to-alls cross.

The prediction is :func:`ringattn.tools.cluster.rank` for a profile of this machine measured in the
same run by :func:`ringattn.tools.plan.calibrate` (kernel rate on all cores, gloo bandwidth and
latency between two ranks, a transfer's compute share) and, with hosts, the link's rate measured
by the job before it times anything (ranks 0 and 2 exchanging messages of two sizes through the
engine, fitted ``t = L + bytes / B``): fitted to the parts, never to the configurations measured.
The check: every predicted time within 25% of the measured one, and every pair of configurations
whose predicted times differ by more than 10% measured in the same order. Writes a JSON file and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANKS, RANKS_PER_HOST = 4, 2
LINK_MESSAGES = (2**20, 2**23)  # bytes: the two sizes the inter-host link is fitted to
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
    """One of 4 ranks on this host: time every configuration; rank 0 returns the rows."""
    import torch.distributed as dist

    from ringattn.tools.launch import init_worker

    init_worker("cpu")
    rows = _time_configurations(seq_len, heads, kv_heads, dim, repeats)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rows if rank == 0 else None


def _host_worker(args: argparse.Namespace) -> None:
    """One of 4 ranks on two simulated hosts (started by ``torchrun``): measure the link
    between the hosts, then time every configuration; rank 0 writes both to ``args.out``."""
    import torch.distributed as dist

    from ringattn.tools.launch import init_worker

    init_worker("cpu")
    link = _measure_link(args.repeats)
    rows = _time_configurations(args.seq_len, args.heads, args.kv_heads, args.dim, args.repeats)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"link": link, "rows": rows}))
    dist.destroy_process_group()


def _measure_link(repeats: int) -> dict:
    """The link between the hosts, each way at once: ranks 0 and 2 exchange one message of each
    of :data:`LINK_MESSAGES`' sizes through the engine's exchange, nothing else running (the
    medians of ``repeats``); ``t = latency + bytes / rate`` through the two points."""
    import torch
    import torch.distributed as dist

    from ringattn.comm import RingComm

    pair = dist.new_group([0, RANKS_PER_HOST])  # one rank of each host
    rank = dist.get_rank()
    seconds = []
    for size in LINK_MESSAGES:
        message = torch.zeros(size // 4)
        samples = []
        for i in range(repeats + 1):  # the first one warms up
            dist.barrier()
            start = time.perf_counter()
            if rank in (0, RANKS_PER_HOST):
                RingComm(pair).exchange([message]).wait()
            if i:
                samples.append(time.perf_counter() - start)
        seconds.append(statistics.median(samples))
    elapsed = torch.tensor(seconds, dtype=torch.float64)
    dist.broadcast(elapsed, 0)
    (small, large), (t_small, t_large) = LINK_MESSAGES, elapsed.tolist()
    rate = (large - small) / (t_large - t_small)
    return {"gbps": rate * 8 / 1e9, "latency_s": max(0.0, t_small - small / rate)}


def _time_configurations(
    seq_len: int, heads: int, kv_heads: int, dim: int, repeats: int
) -> list[dict]:
    """Every configuration's call times (the slowest rank's each), on every rank."""
    import torch
    import torch.distributed as dist

    import ringattn

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // dist.get_world_size()))  # the ranks share the cores
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
    return rows


def predict(
    rows: list[dict],
    profile: dict,
    link: dict | None,
    seq_len: int,
    heads: int,
    kv_heads: int,
    dim: int,
):
    """Each measured row with its prediction; the check's verdict. ``link`` (the measured one
    between two hosts of 2 ranks, one per host) or ``None`` (one host)."""
    from ringattn.tools.cluster import Strategy, rank
    from ringattn.tools.plan import Config, Hardware

    hardware = Hardware(**profile)
    config = Config(
        seq_len=seq_len, devices=RANKS, heads=heads, kv_heads=kv_heads, head_dim=dim,
        dtype="float32", causal=True,
    )  # fmt: skip
    nodes = {}
    if link is not None:
        nodes = {
            "gpus_per_node": RANKS_PER_HOST,
            "inter_node_gbps": link["gbps"],
            "nics_per_node": 1,
        }
    ranked = {r.strategy: r for r in rank(config, hardware, **nodes)}
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
    parser.add_argument(
        "--hosts",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: the 4 ranks on this host; 2: two simulated hosts of 2 ranks (needs root)",
    )
    parser.add_argument(
        "--rate", default="100mbit", help="with --hosts 2: each host's outgoing link (tc rate)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="results (default docs/cluster-ranking.json, docs/cluster-ranking-hosts.json)",
    )
    parser.add_argument(
        "--from-json", action="store_true", help="predict again from --json's measurements"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _host_worker(args)
        return 0
    name = "cluster-ranking.json" if args.hosts == 1 else "cluster-ranking-hosts.json"
    args.json = args.json or ROOT / "docs" / name
    shape = (args.seq_len, args.heads, args.kv_heads, args.dim)
    if args.from_json:
        saved = json.loads(args.json.read_text())
        rows, profile, shape = saved["rows"], saved["profile"], tuple(saved["shape"])
        link = saved.get("link")
    else:
        from ringattn.tools.plan import calibrate

        print("calibrating this machine (kernel, gloo link) ...", flush=True)
        profile = asdict(calibrate(seq_len=args.seq_len // 2))
        rows, link = _measure(args, shape)
    rows, within, disordered = predict(rows, profile, link, *shape)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    saved = {"shape": shape, "profile": profile, "rows": rows}
    if link is not None:
        saved |= {"rate": args.rate, "link": link}
    args.json.write_text(json.dumps(saved, indent=1) + "\n")
    if link is not None:
        print(
            f"link between the hosts: {link['gbps']:.3f} Gbit/s measured each way, "
            f"latency {link['latency_s'] * 1e3:.2f} ms"
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


def _measure(args: argparse.Namespace, shape: tuple) -> tuple[list[dict], dict | None]:
    """The rows (and, with two hosts, the link between them) of a run of the 4 ranks."""
    if args.hosts == 1:
        from ringattn.tools.launch import run_on_ranks

        print("measuring the configurations of 4 ranks ...", flush=True)
        results = run_on_ranks(_worker, (*shape, args.repeats), RANKS)
        return next(r for r in results.values() if r), None
    sys.path.insert(0, str(ROOT / "scripts"))
    import multihost

    reason = multihost.unavailable_reason()
    if reason:
        raise SystemExit(f"cannot simulate hosts here: {reason}")
    print(f"measuring the configurations of 2 hosts x 2 ranks, link {args.rate} ...", flush=True)
    with multihost.Hosts(2, rate=args.rate) as hosts, tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "rows.json")
        target = [__file__, "--worker", "--out", out, "--seq-len", str(args.seq_len),
                  "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
                  "--dim", str(args.dim), "--repeats", str(args.repeats)]  # fmt: skip
        runs = hosts.torchrun(
            target, nproc_per_node=RANKS_PER_HOST, rendezvous="static", timeout=3600, echo=True
        )
        failed = [r for r in runs if r.returncode != 0]
        if failed:
            raise SystemExit(f"host {failed[0].host} failed:\n{failed[0].output[-4000:]}")
        measured = json.loads(Path(out).read_text())
    return measured["rows"], measured["link"]


if __name__ == "__main__":
    sys.exit(main())
