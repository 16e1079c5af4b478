"""``ringattn bench --max-context``: the longest sequence whose per-rank memory fits a budget.

For every world size ``p`` the search runs real probes — forward+backward (forward only for
inference) at a chosen total length, on ``p`` real ranks — and measures each rank's peak memory
*including its inputs* (:attr:`ringattn.tools.workload.Timing.total_peak_bytes`: the high-water mark
of tensor storage, see :mod:`ringattn.tools.memory`). ``p = 1`` is one process running the same
kernel over the whole sequence (:func:`ringattn.tools.workload.time_single_process`), the baseline:
what a user without the ring would run. The budget is what the attention itself costs, inputs
included.

Memory grows linearly with the length, so the search needs few full-size probes
(:func:`find_longest`): two cheap ones at a half and three quarters of ``ringattn plan``'s
prediction draw a line, whose crossing with the budget is probed next; then the line through the
longest fitting and the shortest failing probe (or, before a probe failed, the two longest)
picks every further probe, kept at least one resolution step inside the bracket, until the
longest fitting and the shortest failing length are one step apart. The answer is always a
length that a probe measured as fitting; the shortest measured failure is reported next to it.
Memory steps *down* where the ring starts cutting its blocks into more sub-blocks, so a longer
length can fit again beyond the failure: when ``ringattn plan`` predicts one, it is probed too,
and the search goes on from there if it fits.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..layout import get_layout
from .bench import machine_description, usable_world_sizes
from .launch import init_worker, run_on_ranks
from .memory import MIB, format_bytes, measurement_method
from .plan import Config, longest_sequence
from .workload import Workload, time_ring, time_single_process


@dataclass(frozen=True)
class Probe:
    """One measured length: total tokens, the largest per-rank peak (bytes, inputs included)."""

    seq_len: int
    peak_bytes: int
    fits: bool
    seconds: float = 0.0


@dataclass
class SearchResult:
    """The longest fitting length (a probe that fitted; ``None`` when not even the shortest
    length fits) and the shortest failing length above it (a probe that did not fit)."""

    longest: Probe | None
    shortest_failure: Probe
    probes: list[Probe]
    step: int  # the resolution the search stopped at, tokens


def find_longest(
    measure: Callable[[int], int],
    budget: int,
    multiple: int,
    guess: int,
    resolution: float = 0.01,
    on_probe: Callable[[Probe], None] | None = None,
) -> SearchResult:
    """The longest multiple of ``multiple`` tokens whose ``measure(tokens)`` (peak bytes) fits
    ``budget`` bytes, found to ``max(multiple, resolution x answer)`` tokens: the longest fitting
    length below the shortest failing one, where memory grows with the length.

    ``guess`` is a prediction of the answer (``ringattn plan``'s): if the bracket ends below it,
    ``guess`` is probed as well, and the search continues above the old bracket if it fits
    (memory that steps down with the length). Deterministic in the measurements, so ranks that
    share them take the same path. ``on_probe`` sees every probe.
    """
    probes: list[Probe] = []

    def floor_multiple(tokens: float) -> int:
        return max(multiple, int(tokens // multiple) * multiple)

    def probe(tokens: int) -> Probe:
        start = time.perf_counter()
        peak = measure(tokens)
        done = Probe(tokens, peak, peak <= budget, time.perf_counter() - start)
        probes.append(done)
        if on_probe is not None:
            on_probe(done)
        return done

    def crossing(a: Probe, b: Probe) -> float:
        """Where the line through two probes reaches the budget."""
        slope = (b.peak_bytes - a.peak_bytes) / (b.seq_len - a.seq_len)
        if slope <= 0:
            return 2.0 * max(a.seq_len, b.seq_len)
        return a.seq_len + (budget - a.peak_bytes) / slope

    first = floor_multiple(guess / 2)
    while not probe(first).fits:
        if first == multiple:
            return SearchResult(None, probes[-1], probes, multiple)
        first = floor_multiple(first / 2)
    probe(floor_multiple(max(1.5 * first, first + multiple)))
    moved: list[bool] = []  # which end of the bracket each probe inside it moved (True: low)
    while True:
        fitting = sorted((p for p in probes if p.fits), key=lambda p: p.seq_len)
        low = fitting[-1]
        failing = [p for p in probes if not p.fits and p.seq_len > low.seq_len]
        high = min(failing, key=lambda p: p.seq_len) if failing else None
        step = floor_multiple(resolution * low.seq_len)
        if high is not None and high.seq_len - low.seq_len <= step:
            beyond = floor_multiple(guess)
            if beyond <= high.seq_len or any(p.seq_len == beyond for p in probes):
                return SearchResult(low, high, probes, step)
            probe(beyond)
            moved.clear()
            continue
        if high is None:  # extrapolate the two longest fitting probes, at most doubling
            target = floor_multiple(crossing(fitting[-2], low))
            tokens = min(max(target, low.seq_len + step), 2 * low.seq_len)
        else:
            width = high.seq_len - low.seq_len
            middle = low.seq_len + floor_multiple(width / 2)
            stuck = len(moved) >= 2 and moved[-1] == moved[-2]
            if width < 2 * step or stuck:
                tokens = middle
            else:
                target = floor_multiple(crossing(low, high))
                tokens = min(max(target, low.seq_len + step), high.seq_len - step)
        measured = probe(tokens)
        if high is not None:
            moved.append(measured.fits)


@dataclass
class MaxContextSearch:
    """What ``ringattn bench --max-context`` searches: a budget per rank, the world sizes, and
    the workloads (heads x dtypes x layouts)."""

    budget_bytes: int = 48 * MIB
    world_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    layouts: list[str] = field(default_factory=lambda: ["zigzag"])
    causal: bool = True
    heads: list[tuple[int, int]] = field(default_factory=lambda: [(4, 2)])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    head_dim: int = 64
    inference: bool = False
    resolution: float = 0.01
    threads: int = 0  # total CPU threads; 0 = every core this process may use
    device: str = "cpu"

    def total_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))

    def workloads(self, world: int) -> list[Workload]:
        """The workloads at ``world`` ranks; a single process has no layout (one per heads x
        dtype, under the first layout's name)."""
        layouts = self.layouts if world > 1 else self.layouts[:1]
        return [
            Workload(
                seq_len=0,
                heads=h,
                kv_heads=hkv,
                head_dim=self.head_dim,
                dtype=dtype,
                causal=self.causal,
                layout=layout,
            )
            for (h, hkv), dtype, layout in itertools.product(self.heads, self.dtypes, layouts)
        ]

    def plan_config(self, workload: Workload, world: int) -> Config:
        """``ringattn plan``'s view of ``workload`` on ``world`` devices."""
        return Config.for_workload(asdict(workload), world, backward=not self.inference)


def probe_peak(workload: Workload, inference: bool, device: torch.device, threads: int) -> int:
    """This rank's peak bytes, inputs included, for one run of ``workload`` on the current
    process group (forward+backward, or forward only under ``torch.no_grad`` for inference);
    a world of one runs the kernel over the whole sequence in one process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        timing = time_single_process(
            workload, device, threads, repeats=0, with_backward=not inference
        )
        return timing.total_peak_bytes
    positions = get_layout(workload.layout).positions(rank, world, workload.seq_len // world)
    inputs = workload.inputs(positions, device)
    if inference:
        del inputs["dout"]
    return time_ring(workload, inputs, 0, with_backward=not inference).total_peak_bytes


def max_context_worker(search: MaxContextSearch, guesses: list[int]) -> list[dict] | None:
    """Every rank: the search for each workload of this world size, in one process group.
    Rank 0 prints every probe and returns the results."""
    device = init_worker(search.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = max(1, search.total_threads() // world)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    results = []
    for workload, guess in zip(search.workloads(world), guesses, strict=True):
        multiple = get_layout(workload.layout).seq_multiple(world) if world > 1 else 1
        name = f"p={world} {workload.layout if world > 1 else 'single process'}"
        name += f" h{workload.heads}/{workload.kv_heads} {workload.dtype}"

        def measure(tokens: int, workload=workload) -> int:
            peak = probe_peak(replace(workload, seq_len=tokens), search.inference, device, threads)
            peaks: list = [None] * world
            dist.all_gather_object(peaks, peak)
            return max(peaks)

        def report(probe: Probe, name=name) -> None:
            if rank == 0:
                print(
                    f"[max-context {name}] {probe.seq_len:,} tokens "
                    f"({probe.seq_len // world:,}/rank): peak {probe.peak_bytes / MIB:.1f} MiB "
                    f"incl. inputs -> {'fits' if probe.fits else 'does not fit'} "
                    f"({probe.seconds:.1f} s)",
                    flush=True,
                )

        measure(max(multiple, 256 * world))  # warm-up: libraries, allocator and gloo buffers
        result = find_longest(
            measure, search.budget_bytes, multiple, guess, search.resolution, report
        )
        results.append({"workload": asdict(workload), **asdict(result)})
    dist.destroy_process_group()
    return results if rank == 0 else None


def _row(world: int, result: dict, guess: int) -> dict:
    longest, failure = result["longest"], result["shortest_failure"]
    return {
        "world_size": world,
        "workload": result["workload"],
        "longest_seq_len": longest["seq_len"] if longest else 0,
        "longest_peak_bytes": longest["peak_bytes"] if longest else None,
        "shortest_failure_seq_len": failure["seq_len"],
        "shortest_failure_peak_bytes": failure["peak_bytes"],
        "resolution_tokens": result["step"],
        "plan_longest_seq_len": guess,
        "probes": result["probes"],
        "seconds": sum(p["seconds"] for p in result["probes"]),
    }


def _group(row: dict) -> tuple:
    w = row["workload"]
    return (w["heads"], w["kv_heads"], w["head_dim"], w["dtype"])


def run_max_context(search: MaxContextSearch, out_dir: Path) -> list[dict]:
    """Search every world size, write ``max_context.json``, ``max_context.md`` and
    ``max_context.png`` to ``out_dir``; return the rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(
        f"[max-context] budget {format_bytes(search.budget_bytes)} per rank, inputs included; "
        f"{'forward only' if search.inference else 'forward+backward'}; world sizes "
        f"{search.world_sizes}; resolution {search.resolution:.0%}",
        flush=True,
    )
    rows = []
    for world in usable_world_sizes(search.world_sizes, search.device):
        workloads = search.workloads(world)
        guesses = [
            longest_sequence(search.plan_config(w, world), search.budget_bytes) for w in workloads
        ]
        results = run_on_ranks(max_context_worker, (search, guesses), world)
        found = next(r for r in results.values() if r is not None)
        rows += [_row(world, r, g) for r, g in zip(found, guesses, strict=True)]
    singles = {_group(r): r["longest_seq_len"] for r in rows if r["world_size"] == 1}
    for row in rows:
        single = singles.get(_group(row))
        row["ratio_to_single"] = row["longest_seq_len"] / single if single else None
    report = {
        "search": asdict(search),
        "machine": machine_description(torch.device(search.device)),
        "memory_method": measurement_method(search.device),
        "rows": rows,
        "wall_s": time.perf_counter() - started,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out_dir / "max_context.json").write_text(json.dumps(report, indent=2))
    (out_dir / "max_context.md").write_text(markdown_report(report))
    plot_max_context(report, out_dir / "max_context.png")
    return rows


def markdown_report(report: dict) -> str:
    """The table: per world size the longest fitting length against the ideal p-fold one."""
    search = report["search"]
    kind = "forward only (inference)" if search["inference"] else "forward+backward"
    lines = [
        f"Machine: {report['machine']}. Budget {format_bytes(search['budget_bytes'])} per rank, "
        f"inputs included; {kind}, {'causal' if search['causal'] else 'full'}; "
        f"memory: {report['memory_method']}.",
        "",
        "| p | layout | heads | dtype | longest fitting tokens | ratio to p=1 | ideal | "
        "peak MiB (incl. inputs) | shortest failure (peak MiB) | plan predicts | probes |",
        "|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in report["rows"]:
        w = r["workload"]
        ratio = f"{r['ratio_to_single']:.2f}" if r["ratio_to_single"] is not None else "-"
        peak = r["longest_peak_bytes"]
        failed = f"{r['shortest_failure_seq_len']:,} ({r['shortest_failure_peak_bytes'] / MIB:.1f})"
        lines.append(
            f"| {r['world_size']} | {w['layout'] if r['world_size'] > 1 else 'single process'} "
            f"| {w['heads']}/{w['kv_heads']} | {w['dtype']} | {r['longest_seq_len']:,} | "
            f"{ratio} | {r['world_size']} | {peak / MIB if peak else 0:.1f} | {failed} | "
            f"{r['plan_longest_seq_len']:,} | {len(r['probes'])} |"
        )
    lines += ["", f"Wall time {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot_max_context(report: dict, path: Path) -> Path | None:
    """Longest fitting context against devices, next to the ideal p-fold line and the plan's
    prediction; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = report["rows"]
    singles = {_group(r): r for r in rows if r["world_size"] == 1}
    curves = sorted({(_group(r), r["workload"]["layout"]) for r in rows if r["world_size"] > 1})
    for i, (group, layout) in enumerate(curves or [(g, "") for g in sorted(singles)]):
        line = [singles[group]] if group in singles else []
        line += [
            r
            for r in rows
            if r["world_size"] > 1 and _group(r) == group and r["workload"]["layout"] == layout
        ]
        worlds = [r["world_size"] for r in line]
        color = plt.cm.tab10(i % 10)
        label = f"{layout or 'single process'} h{group[0]}/{group[1]} {group[3]}"
        ax.plot(worlds, [r["longest_seq_len"] for r in line], "o-", color=color, label=label)
        ax.plot(worlds, [r["plan_longest_seq_len"] for r in line], ":", color=color, lw=1)
        if group in singles:
            ideal = singles[group]["longest_seq_len"]
            ax.plot(worlds, [w * ideal for w in worlds], "--", color="grey", lw=0.8)
    ax.plot([], [], "--", color="grey", lw=0.8, label="ideal: p x one process")
    ax.plot([], [], ":", color="black", lw=1, label="ringattn plan")
    worlds = sorted({r["world_size"] for r in rows})
    ax.set_xticks(worlds, [str(w) for w in worlds])
    ax.set(
        xlabel="devices (ranks)",
        ylabel="longest sequence that fits, tokens",
        title=f"Longest context, {format_bytes(report['search']['budget_bytes'])} per rank "
        f"incl. inputs, {'forward only' if report['search']['inference'] else 'fwd+bwd'}",
    )
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
