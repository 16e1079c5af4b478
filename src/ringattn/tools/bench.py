"""``ringattn bench``: the ring against one process running the same kernel, measured in one run.

For every grid point (sequence length x world size x layout x causal x heads x dtype) it records
forward and forward+backward time of the ring (median of repeats after a warm-up, slowest rank),
the same for one process running the same kernel over the whole sequence with all the threads the
ranks share, per-rank compute and wait time inside the ring, per-rank peak memory, and the bytes
each rank sent per ring step next to the minimum (one K/V block of KV heads). Results go to a
JSON file, a markdown table and PNG plots.

On CPU the single process gets all the threads the ranks share, so "efficiency" is single-process
time / ring time on the same cores. With ``device="cuda"`` every rank has a GPU of its own and the
single process one GPU, so efficiency is single-GPU time / (p x ring time): 1.0 is perfect scaling.
World sizes above the number of GPUs are skipped (ranks sharing a GPU measure nothing useful).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..engine import Granularity
from ..layout import get_layout
from .launch import init_worker, run_on_ranks
from .memory import MIB
from .workload import Workload, context_scaling, time_ring, time_single_process


@dataclass
class BenchGrid:
    seq_lens: list[int] = field(default_factory=lambda: [4096, 16384])
    world_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    layouts: list[str] = field(default_factory=lambda: ["zigzag", "contiguous", "striped"])
    causal: list[bool] = field(default_factory=lambda: [True, False])
    heads: list[tuple[int, int]] = field(default_factory=lambda: [(8, 8)])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    sub_blocks: list[int] = field(default_factory=lambda: [Granularity().sub_blocks])
    head_dim: int = 64
    head_dim_v: int | None = None
    repeats: int = 3
    threads: int = 0  # total CPU threads; 0 = every core this process may use
    device: str = "cpu"  # or "cuda": one GPU per rank

    @classmethod
    def quick(cls) -> BenchGrid:
        return cls(
            seq_lens=[4096, 8192],
            world_sizes=[1, 2],
            layouts=["zigzag", "contiguous"],
            causal=[True],
            repeats=2,
        )

    def total_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))

    def workloads(self) -> list[Workload]:
        return [
            Workload(
                seq_len=n,
                heads=h,
                kv_heads=hkv,
                head_dim=self.head_dim,
                head_dim_v=self.head_dim_v,
                dtype=dtype,
                causal=causal,
                layout=layout,
                sub_blocks=sub_blocks,
            )
            for n, layout, causal, (h, hkv), dtype, sub_blocks in itertools.product(
                self.seq_lens, self.layouts, self.causal, self.heads, self.dtypes, self.sub_blocks
            )
        ]


def _rank_stats(workload: Workload, repeats: int, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = get_layout(workload.layout)
    seq_local = workload.seq_len // world
    inputs = workload.inputs(layout.positions(rank, world, seq_local), device)
    time_ring(workload, {n: t[:, : min(256, seq_local)] for n, t in inputs.items()}, 1)
    timing = time_ring(workload, inputs, repeats, before_each=lambda i: dist.barrier())
    steps = timing.trace.steps
    return {
        "rank": rank,
        "forward_s": timing.forward_s,
        "backward_s": timing.backward_s,
        "peak_bytes": timing.peak_bytes,
        "total_peak_bytes": timing.total_peak_bytes,
        "compute_s": sum(s.compute_s for s in steps),
        "wait_s": sum(s.wait_s for s in steps),
        "forward_step_bytes": [s.bytes_sent for s in steps if s.phase == "forward"],
    }


def bench_worker(
    workloads: list[Workload], repeats: int, threads: int, device: str = "cpu"
) -> list | None:
    """Every rank: all grid points of one world size. Rank 0 returns the per-rank stats."""
    rank_device = init_worker(device)
    if rank_device.type == "cpu":
        torch.set_num_threads(threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    collected = []
    for i, workload in enumerate(workloads):
        if rank == 0:
            print(
                f"[bench p={world}] {i + 1}/{len(workloads)} {workload.seq_len} tokens "
                f"{workload.layout} {'causal' if workload.causal else 'full'} "
                f"heads {workload.heads}/{workload.kv_heads} {workload.dtype}",
                flush=True,
            )
        stats = [None] * world
        dist.all_gather_object(stats, _rank_stats(workload, repeats, rank_device))
        collected.append(stats)
    dist.destroy_process_group()
    return collected if rank == 0 else None


def single_worker(
    workloads: list[Workload], repeats: int, threads: int, device: str = "cpu"
) -> list[dict]:
    """One process (started like the ranks, so its memory is measured the same way): every
    workload over the whole sequence with ``threads`` threads, after a warm-up."""
    results = []
    for workload in workloads:
        print(f"[bench single process] {_single_key(workload)}", flush=True)
        time_single_process(workload, torch.device(device), threads)  # warm-up
        timing = time_single_process(workload, torch.device(device), threads, repeats)
        results.append(
            {
                "forward_s": timing.forward_s,
                "total_s": timing.forward_s + timing.backward_s,
                "peak_bytes": timing.peak_bytes,
                "total_peak_bytes": timing.total_peak_bytes,
            }
        )
        del timing
    return results


def _single_key(workload: Workload) -> tuple:
    """What the single process's run depends on (not the layout)."""
    return (workload.seq_len, workload.causal, workload.heads, workload.kv_heads, workload.dtype)


def usable_world_sizes(world_sizes: list[int], device: str) -> list[int]:
    """``world_sizes``, without those above the GPU count on CUDA (one GPU per rank)."""
    if device != "cuda":
        return world_sizes
    gpus = torch.cuda.device_count()
    usable = [p for p in world_sizes if p <= gpus]
    skipped = sorted(set(world_sizes) - set(usable))
    if skipped:
        print(f"[bench] skipping world sizes {skipped}: only {gpus} GPU(s)", flush=True)
    return usable


def _row(
    workload: Workload, world: int, ranks: list[dict], single: dict, device: str = "cpu"
) -> dict:
    ring_fwd = max(r["forward_s"] for r in ranks)
    ring_total = max(r["forward_s"] + r["backward_s"] for r in ranks)
    devices = world if device == "cuda" else 1  # GPUs the ring uses for the single one's 1
    compute = [r["compute_s"] for r in ranks]
    wait = [r["wait_s"] for r in ranks]
    element = torch.empty((), dtype=workload.torch_dtype).element_size()
    minimum = workload.batch * (workload.seq_len // world) * workload.kv_heads
    minimum *= (workload.head_dim + workload.value_dim) * element
    sent = [b for r in ranks for b in r["forward_step_bytes"][: world - 1]]
    return {
        "workload": asdict(workload),
        "world_size": world,
        "tokens_per_rank": workload.seq_len // world,
        "ring_forward_s": ring_fwd,
        "ring_total_s": ring_total,
        "single_forward_s": single["forward_s"],
        "single_total_s": single["total_s"],
        "single_peak_bytes": single["peak_bytes"],
        "single_total_peak_bytes": single["total_peak_bytes"],
        "efficiency_forward": single["forward_s"] / (devices * ring_fwd),
        "efficiency_total": single["total_s"] / (devices * ring_total),
        "compute_s": compute,
        "wait_s": wait,
        "balance": max(compute) / max(min(compute), 1e-12),
        "wait_fraction": sum(wait) / max(sum(compute) + sum(wait), 1e-12),
        "peak_bytes": [r["peak_bytes"] for r in ranks],
        "total_peak_bytes": [r["total_peak_bytes"] for r in ranks],
        "context_scaling": context_scaling(
            single["total_peak_bytes"], max(r["total_peak_bytes"] for r in ranks), world
        ),
        "step_bytes_max": max(sent, default=0),
        "step_bytes_min": min(sent, default=0),
        "step_bytes_minimum": minimum if world > 1 else 0,
    }


def run_bench(grid: BenchGrid, out_dir: Path) -> list[dict]:
    """Run the grid, write ``bench.json``, ``bench.md`` and plots to ``out_dir``; return rows.

    Every point runs once measuring memory, then ``repeats`` timed runs (see
    :func:`ringattn.tools.workload.time_ring`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = grid.total_threads()
    workloads = grid.workloads()
    device = torch.device(grid.device)
    unique = list({_single_key(w): w for w in workloads}.values())
    single_args = (unique, grid.repeats, threads, grid.device)
    measured = run_on_ranks(single_worker, single_args, 1)[0]
    singles = dict(zip(map(_single_key, unique), measured, strict=True))
    rows = []
    for world in usable_world_sizes(grid.world_sizes, grid.device):
        fits = [w for w in workloads if w.seq_len % get_layout(w.layout).seq_multiple(world) == 0]
        per_rank_threads = max(1, threads // world)
        worker_args = (fits, grid.repeats, per_rank_threads, grid.device)
        results = run_on_ranks(bench_worker, worker_args, world)
        stats = next(r for r in results.values() if r is not None)
        for workload, ranks in zip(fits, stats, strict=True):
            rows.append(_row(workload, world, ranks, singles[_single_key(workload)], grid.device))
    report = {
        "grid": asdict(grid),
        "machine": machine_description(device),
        "threads_total": threads,
        "rows": rows,
        "memory_slopes": memory_slopes(rows),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench.md").write_text(markdown_report(report))
    plot_report(report, out_dir)
    return rows


def machine_description(device: torch.device | None = None) -> str:
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return f"{model}, {cores} cores, torch {torch.__version__}"


def memory_kind(row: dict) -> str:
    """The group a row's memory belongs to: workload kind and world size."""
    w = row["workload"]
    mask = "causal" if w["causal"] else "full"
    return f"{w['layout']} {mask} h{w['heads']}/{w['kv_heads']} p={row['world_size']}"


def memory_slopes(rows: list[dict]) -> dict[str, float]:
    """Least-squares slope of log(peak per rank, inputs included) against log(tokens per rank)
    as the sequence grows, per workload kind and world size (> 1: a world of one holds no ring
    buffers)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        peak = max(row["total_peak_bytes"])
        if row["world_size"] > 1 and peak > 0:
            point = (math.log(row["tokens_per_rank"]), math.log(peak))
            groups.setdefault(memory_kind(row), []).append(point)
    slopes = {}
    for kind, points in groups.items():
        if len({x for x, _ in points}) < 2:
            continue
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
        var = sum((x - mean_x) ** 2 for x, _ in points)
        slopes[kind] = cov / var
    return slopes


def markdown_report(report: dict) -> str:
    on_gpus = report["grid"].get("device") == "cuda"
    resources = (
        "one GPU per rank; efficiency = single-GPU time / (p x ring time)"
        if on_gpus
        else f"{report['threads_total']} threads shared by the ranks"
    )
    lines = [
        f"Machine: {report['machine']}; {resources}.",
        "",
        "| tokens | p | layout | mask | heads | dtype | sub-blocks | ring fwd s | ring fwd+bwd s "
        "| single fwd+bwd s | eff. fwd | eff. fwd+bwd | compute max/min | wait % "
        "| peak MiB/rank incl. inputs | one process MiB incl. inputs | context scaling "
        "| bytes/step (min) |",
        "|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        w = r["workload"]
        lines.append(
            f"| {w['seq_len']} | {r['world_size']} | {w['layout']} | "
            f"{'causal' if w['causal'] else 'full'} | {w['heads']}/{w['kv_heads']} | "
            f"{w['dtype']} | {w.get('sub_blocks', '')} | "
            f"{r['ring_forward_s']:.3f} | {r['ring_total_s']:.3f} | {r['single_total_s']:.3f} | "
            f"{r['efficiency_forward']:.2f} | {r['efficiency_total']:.2f} | {r['balance']:.2f} | "
            f"{100 * r['wait_fraction']:.1f} | {max(r['total_peak_bytes']) / MIB:.1f} | "
            f"{r['single_total_peak_bytes'] / MIB:.1f} | {r['context_scaling']:.2f} | "
            f"{r['step_bytes_max']} ({r['step_bytes_minimum']}) |"
        )
    lines += [
        "",
        "Context scaling: one process's peak / (p x the largest per-rank peak), both with their "
        "inputs (1.0: the context grows p-fold for the same memory per device).",
    ]
    if report["memory_slopes"]:
        lines += ["", "Memory slope, log(peak per rank incl. inputs) vs log(tokens per rank):", ""]
        lines += [f"- {kind}: {slope:.2f}" for kind, slope in report["memory_slopes"].items()]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """Efficiency, memory and busy/wait plots; skipped (empty list) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    rows = [r for r in report["rows"] if r["world_size"] > 1]
    paths = []

    def kind(r):
        w = r["workload"]
        return f"{w['layout']} {'causal' if w['causal'] else 'full'} p={r['world_size']}"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bases = sorted({kind(r).rsplit(" p=", 1)[0] for r in rows})
    worlds = sorted({r["world_size"] for r in rows})
    for name in sorted({kind(r) for r in rows}):
        base, world = name.rsplit(" p=", 1)
        points = sorted(
            (r["tokens_per_rank"], r["efficiency_total"]) for r in rows if kind(r) == name
        )
        ax.plot(
            *zip(*points, strict=True),
            marker="o",
            label=name,
            color=plt.cm.tab10(bases.index(base) % 10),
            linestyle=("-", "--", ":", "-.")[worlds.index(int(world)) % 4],
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="tokens per rank",
        ylabel="single-process time / ring time",
        title="Ring efficiency, forward+backward",
    )
    ax.legend(fontsize=7)
    paths.append(out_dir / "efficiency.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, slope in report["memory_slopes"].items():
        points = sorted(
            (r["tokens_per_rank"], max(r["total_peak_bytes"]) / MIB)
            for r in rows
            if memory_kind(r) == name
        )
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{name} (slope {slope:.2f})")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="tokens per rank (n/p)",
        ylabel="peak memory per rank incl. inputs, MiB",
        title="Memory per rank vs n/p",
    )
    if report["memory_slopes"]:  # one sequence length per kind draws no line
        ax.legend(fontsize=7)
    paths.append(out_dir / "memory.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    causal_rows = [r for r in rows if r["workload"]["causal"]]
    if causal_rows:
        longest = max(r["workload"]["seq_len"] for r in causal_rows)
        widest = max(r["world_size"] for r in causal_rows)
        chosen = [
            r
            for r in causal_rows
            if r["workload"]["seq_len"] == longest and r["world_size"] == widest
        ]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / max(1, len(chosen))
        for i, r in enumerate(chosen):
            ranks = range(len(r["compute_s"]))
            xs = [x + i * width for x in ranks]
            ax.bar(xs, r["compute_s"], width, label=f"{r['workload']['layout']} compute")
            ax.bar(
                xs,
                r["wait_s"],
                width,
                bottom=r["compute_s"],
                alpha=0.4,
                label=f"{r['workload']['layout']} waiting",
            )
        ax.set_xticks(
            [r + width * (len(chosen) - 1) / 2 for r in range(widest)],
            [str(r) for r in range(widest)],
        )
        ax.set(
            xlabel="rank",
            ylabel="seconds (last repeat, fwd+bwd)",
            title=f"Per-rank busy and waiting time, causal, {longest} tokens, p={widest}",
        )
        ax.legend(fontsize=7)
        paths.append(out_dir / "busy_wait.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths
