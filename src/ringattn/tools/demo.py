"""The main job: ring attention over a long sequence on several processes, verified and measured.

Each rank builds only its own shard of the inputs (values are a function of the global token
position, so no rank ever holds the whole sequence), runs the ring forward and backward (forward
only for inference), and records time, per-step compute/wait and peak memory. Then the results
are verified, by one of:

* ``full``: rank 0 computes the single-process result with the same kernel over the whole
  sequence using all the threads the ranks shared, and sends each rank its slice of it;
* ``sampled``: every rank checks sampled rows of out/lse/dq and columns of dk/dv against a float64
  reference that no rank computes over the whole sequence at once (:mod:`ringattn.tools.verify`);
* ``auto`` (default): ``full`` unless one process would take more than
  :data:`SINGLE_PROCESS_LIMIT_S` seconds or more than :data:`MEMORY_SHARE` of the available
  memory, then ``sampled``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from ..comm import transfer_device
from ..layout import get_layout
from ..trace import RingProgress, report_progress
from .launch import cpu_threads_per_rank, init_worker
from .memory import MIB, format_bytes
from .plan import Config, device_memory
from .verify import (
    LOW_PRECISION,
    LOW_PRECISION_FLOOR,
    relative_errors,
    tolerances,
    verify_sampled,
)
from .workload import Workload, context_scaling, time_ring, time_single_process

VERIFY_MODES = ("auto", "full", "sampled", "none")
SINGLE_PROCESS_LIMIT_S = 180.0
"""``--verify auto`` runs the single process only when it should take at most this long."""
MEMORY_SHARE = 0.5
"""... and when it needs at most this share of the memory available."""
PROGRESS_EVERY_S = 30.0
"""Long ring passes and long references report progress this often (rank 0)."""


@dataclass
class DemoConfig:
    seq_len: int = 32768
    world_size: int = 4
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    layout: str = "zigzag"
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = True
    forward_only: bool = False
    repeats: int = 1
    threads: int | None = None
    seed: int = 0
    verify: str = "auto"
    samples: int = 256
    json_path: str | None = None

    @property
    def workload(self) -> Workload:
        return Workload(
            seq_len=self.seq_len,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            batch=self.batch,
            dtype=self.dtype,
            causal=self.causal,
            layout=self.layout,
            seed=self.seed,
        )

    def validate(self, world_size: int) -> None:
        """Raise ``ValueError`` with advice for settings that cannot run."""
        get_layout(self.layout).check_seq_len(self.seq_len, world_size)
        if self.kv_heads <= 0 or self.heads % self.kv_heads:
            raise ValueError(
                f"--heads {self.heads} must be a multiple of --kv-heads {self.kv_heads}"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"--verify must be one of {', '.join(VERIFY_MODES)}")
        sizes = (self.seq_len, self.world_size, self.batch, self.head_dim, self.repeats + 1)
        if min(*sizes, self.samples) <= 0:
            raise ValueError("sizes and --samples must be positive, --repeats at least 0")


def single_process_bytes(workload: Workload, with_backward: bool) -> int:
    """Bytes one process must hold to attend over the whole sequence: its inputs ``q, k, v``
    (and ``dout``) and outputs ``out, lse`` (and ``dq, dk, dv``) — a lower bound on its peak
    (:func:`ringattn.tools.plan.device_memory` of one device)."""
    config = Config(
        seq_len=workload.seq_len,
        devices=1,
        heads=workload.heads,
        kv_heads=workload.kv_heads,
        head_dim=workload.head_dim,
        batch=workload.batch,
        dtype=workload.dtype,
        backward=with_backward,
    )
    return int(device_memory(config))


def choose_verification(
    cfg: DemoConfig, ring_seconds: float, available_bytes: int
) -> tuple[str, str]:
    """The verification to run and why: ``cfg.verify``, or for ``auto`` ``"full"`` unless the
    single process would take more than :data:`SINGLE_PROCESS_LIMIT_S` (estimated as the ring's
    time: same kernel, same total threads; twice that in low precision, where a float32 run is
    added) or need more than :data:`MEMORY_SHARE` of ``available_bytes``. The reason reads
    after "because"."""
    if cfg.verify != "auto":
        return cfg.verify, f"--verify {cfg.verify} asked for it"
    workload = cfg.workload
    needed = single_process_bytes(workload, not cfg.forward_only)
    seconds = ring_seconds
    if cfg.dtype in LOW_PRECISION:
        needed += single_process_bytes(replace(workload, dtype="float32"), not cfg.forward_only)
        seconds *= 2
    if needed > MEMORY_SHARE * available_bytes:
        return "sampled", (
            f"one process would need at least {format_bytes(needed)}, more than "
            f"{MEMORY_SHARE:.0%} of the {format_bytes(available_bytes)} available"
        )
    if seconds > SINGLE_PROCESS_LIMIT_S:
        return "sampled", (
            f"one process would take ~{seconds / 60:.0f} min (the ring's time: same kernel, same "
            f"threads), more than the {SINGLE_PROCESS_LIMIT_S:.0f} s --verify auto allows"
        )
    return "full", (
        f"one process takes ~{seconds:.0f} s and needs at least {format_bytes(needed)} of the "
        f"{format_bytes(available_bytes)} available (--verify auto)"
    )


def _available_bytes(device: torch.device) -> int:
    """Memory free for a new process on this node (CPU: ``MemAvailable``) or on ``device``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _say(rank: int, start: float, message: str) -> None:
    if rank == 0:
        print(f"[ringattn demo {time.perf_counter() - start:7.1f}s] {message}", flush=True)


def _ring_progress(rank: int, start: float) -> contextlib.AbstractContextManager:
    """On rank 0, report every ring pass that has run :data:`PROGRESS_EVERY_S` or longer."""
    if rank != 0:
        return contextlib.nullcontext()

    def report(progress: RingProgress) -> None:
        if progress.elapsed_s >= PROGRESS_EVERY_S:
            _say(rank, start, str(progress))

    return report_progress(report, every_s=PROGRESS_EVERY_S)


def _scatter_reference(results, cfg: DemoConfig, rank: int, world: int, mine: dict):
    """Send every rank its slice of the single-process results (float32 for low-precision
    runs); return this rank's slice."""
    layout = get_layout(cfg.layout)
    seq_local = cfg.seq_len // world
    group, device = dist.group.WORLD, mine["out"].device
    if rank == 0:
        slices = {}
        for r in range(world):
            index = layout.positions(r, world, seq_local).to(results["out"].device)
            part = {
                name: results[name].index_select(2 if name == "lse" else 1, index).contiguous()
                for name in mine
            }
            if r == 0:
                slices = part
            else:
                for name in mine:
                    dist.send(part[name].to(transfer_device(group, device)), dst=r)
        return slices
    received = {}
    for name, like in mine.items():
        dtype = torch.float32 if cfg.dtype in LOW_PRECISION else like.dtype
        buffer = torch.empty(like.shape, dtype=dtype, device=transfer_device(group, device))
        dist.recv(buffer, src=0)
        received[name] = buffer.to(device)
    return received


def _full_check(cfg, workload, device, threads, rank, world, mine, start):
    """Every rank's errors against the single process over the whole sequence, and on rank 0
    the single process's time, memory (and in low precision its own errors)."""
    _say(rank, start, "single-process reference on rank 0 (the other ranks wait)")
    reference = single_stats = None
    with_backward = not cfg.forward_only
    if rank == 0:
        node_threads = threads * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        all_threads = min(node_threads, len(os.sched_getaffinity(0)))
        single = time_single_process(
            workload, device, all_threads, cfg.repeats, with_backward=with_backward
        )
        reference = single.outputs
        single_stats = {
            "forward_s": single.forward_s,
            "backward_s": single.backward_s,
            "peak_bytes": single.peak_bytes,
            "input_bytes": single.input_bytes,
            "total_peak_bytes": single.total_peak_bytes,
        }
        if cfg.dtype in LOW_PRECISION:  # judge both against float32, as the tests do
            _say(rank, start, "float32 single process, the reference for both")
            exact = replace(workload, dtype="float32")
            reference = time_single_process(
                exact, device, all_threads, repeats=0, with_backward=with_backward
            ).outputs
            single_stats["errors"] = relative_errors(single.outputs, reference)
        del single
    dist.barrier()
    _say(rank, start, "comparing every rank's shard with the reference")
    errors = relative_errors(mine, _scatter_reference(reference, cfg, rank, world, mine))
    return errors, single_stats


def _sampled_check(cfg, workload, rank, mine, start, reason):
    outputs = "out, lse, dq" if "dq" in mine else "out, lse"
    columns = " and the same columns of dk, dv" if "dq" in mine else ""
    _say(
        rank,
        start,
        f"verifying {cfg.samples} sampled rows of {outputs}{columns} against a float64 "
        f"reference computed row by row, because {reason}",
    )
    if "dq" in mine:
        _say(
            rank,
            start,
            "dk, dv need a float64 forward over all rows: every rank computes it for its rows, "
            f"streaming the keys (time n^2/p per rank, memory n/p; progress every "
            f"{PROGRESS_EVERY_S:.0f} s)",
        )
    progress = (lambda line: _say(rank, start, line)) if rank == 0 else None
    check = verify_sampled(
        workload, mine, samples=cfg.samples, progress=progress, every_s=PROGRESS_EVERY_S
    )
    _say(rank, start, f"sampled verification done in {check.seconds:.1f} s")
    return check


def demo_worker(cfg: DemoConfig) -> dict | None:
    """Entry point of every rank. Returns the report on rank 0, ``None`` elsewhere."""
    start = time.perf_counter()
    device = init_worker(cfg.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = cpu_threads_per_rank(cfg.threads)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    cfg.validate(world)
    layout = get_layout(cfg.layout)
    seq_local = cfg.seq_len // world
    with_backward = not cfg.forward_only
    _say(rank, start, f"{world} ranks joined; building each rank's shard of {cfg.seq_len:,} tokens")
    workload = cfg.workload
    inputs = workload.inputs(layout.positions(rank, world, seq_local), device)
    if not with_backward:
        del inputs["dout"]

    _say(rank, start, "warm-up on a short sequence")
    short = {name: t[:, : min(seq_local, 256)] for name, t in inputs.items()}
    time_ring(workload, short, repeats=1, with_backward=with_backward)
    passes = "forward+backward" if with_backward else "forward (inference)"

    def before_each(i: int) -> None:
        if i == 0:
            timed = " (also timed)" if cfg.repeats == 0 else ""
            _say(rank, start, f"ring {passes}, counting memory{timed}")
        else:
            _say(rank, start, f"ring {passes}, timed run {i} of {cfg.repeats}")
        dist.barrier()

    with _ring_progress(rank, start):
        timing = time_ring(
            workload, inputs, cfg.repeats, before_each=before_each, with_backward=with_backward
        )
    del inputs, short  # the verification builds what it needs
    mine = timing.outputs
    rank_report = {
        "rank": rank,
        "forward_s": timing.forward_s,
        "backward_s": timing.backward_s,
        "peak_bytes": timing.peak_bytes,
        "input_bytes": timing.input_bytes,
        "total_peak_bytes": timing.total_peak_bytes,
        "memory_method": timing.memory_method,
        "forward": timing.trace.total("forward"),
        "backward": timing.trace.total("backward"),
    }
    dist.barrier()

    decision = [None, None]
    if rank == 0:
        ring_seconds = timing.forward_s + timing.backward_s
        decision = list(choose_verification(cfg, ring_seconds, _available_bytes(device)))
    dist.broadcast_object_list(decision, src=0)
    method, reason = decision
    verification = {"method": method, "reason": reason}
    if method == "full":
        rank_report["errors"], single_stats = _full_check(
            cfg, workload, device, threads, rank, world, mine, start
        )
        if single_stats is not None:
            verification["single_process"] = single_stats
    elif method == "sampled":
        check = _sampled_check(cfg, workload, rank, mine, start, reason)
        verification |= {
            "positions": check.positions,
            "seconds": check.seconds,
            "errors": check.errors,
            "kernel_errors": check.kernel_errors,
            "tolerance": check.tolerance,
        }
    else:
        _say(rank, start, "not verified (--verify none)")

    reports = [None] * world
    dist.all_gather_object(reports, rank_report)
    dist.destroy_process_group()
    if rank != 0:
        return None
    report = _summarise(cfg, world, threads, reports, verification)
    print(format_report(report), flush=True)
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _summarise(cfg, world, threads, reports, verification) -> dict:
    """The report: configuration, ring time, per-rank figures, memory scaling and verdict."""
    workload = cfg.workload
    report = {
        "config": asdict(cfg),
        "world_size": world,
        "threads_per_rank": threads,
        "torch": torch.__version__,
        "ring": {
            "forward_s": max(r["forward_s"] for r in reports),
            "backward_s": max(r["backward_s"] for r in reports),
        },
        "ranks": reports,
        "flops_forward": workload.flops_forward(),
        "verification": verification,
    }
    ring_total = max(r["total_peak_bytes"] for r in reports)
    single = verification.get("single_process")
    if single:
        report["single_process"] = single
        measured = context_scaling(single["total_peak_bytes"], ring_total, world)
        scaling = {"value": measured, "measured": True}
    else:
        least = single_process_bytes(workload, not cfg.forward_only)
        scaling = {"value": context_scaling(least, ring_total, world), "measured": False}
        scaling["single_process_min_bytes"] = least
    report["context_scaling"] = scaling
    if verification["method"] == "full":
        errors = {name: max(r["errors"][name] for r in reports) for name in reports[0]["errors"]}
        report["tolerance"] = tolerances(cfg.dtype, errors, single.get("errors"))
    elif verification["method"] == "sampled":
        errors, report["tolerance"] = verification["errors"], verification["tolerance"]
    else:
        return report
    report["max_relative_error"] = errors
    report["passed"] = all(err <= report["tolerance"][name] for name, err in errors.items())
    return report


def format_report(report: dict) -> str:
    cfg = report["config"]
    world = report["world_size"]
    ring = report["ring"]
    forward_only = cfg["forward_only"]
    tokens = cfg["seq_len"] * cfg["batch"]
    kind = "causal" if cfg["causal"] else "full"
    passes = "forward only (inference)" if forward_only else "forward+backward"
    lines = [
        "",
        f"ringattn demo: {kind} ring attention, {passes}, {cfg['layout']} layout, {world} ranks "
        f"({cfg['device']}, {report['threads_per_rank']} thread(s) per rank, "
        f"torch {report['torch']})",
        f"  {cfg['seq_len']:,} tokens ({cfg['seq_len'] // world:,} per rank), "
        f"batch {cfg['batch']}, "
        f"heads {cfg['heads']} (kv {cfg['kv_heads']}), head_dim {cfg['head_dim']}, {cfg['dtype']}",
        "",
        f"  {'':22}{'forward':>10}{'backward':>10}{'total':>10}{'tokens/s':>12}{'TFLOP/s':>9}",
    ]
    flops = report["flops_forward"] * (1.0 if forward_only else 3.5)  # backward ~2.5x forward

    def row(name, fwd, bwd):
        backward = f"{'-':>10}" if forward_only else f"{bwd:9.2f}s"
        return (
            f"  {name:22}{fwd:9.2f}s{backward}{fwd + bwd:9.2f}s{tokens / (fwd + bwd):12,.0f}"
            f"{flops / (fwd + bwd) / 1e12:9.3f}"
        )

    lines.append(row(f"ring ({world} ranks)", ring["forward_s"], ring["backward_s"]))
    single = report.get("single_process")
    if single:
        lines.append(row("single process", single["forward_s"], single["backward_s"]))
        total_single = single["forward_s"] + single["backward_s"]
        lines.append(
            f"  efficiency (single / ring time): "
            f"{total_single / (ring['forward_s'] + ring['backward_s']):.2f} "
            f"(same kernel, same total threads)"
        )
    lines += ["", *_memory_lines(report), *_verdict_lines(report), "", *NEXT_STEPS]
    return "\n".join(lines)


NEXT_STEPS = (
    "  next: examples/train_long_context.py --compare-local trains a model that learns from",
    "  context on other ranks (a copy task: the ring learns it, attention within each rank's",
    "  shard cannot); `ringattn bench` and `ringattn plan` measure and predict larger runs.",
)


def _memory_lines(report: dict) -> list[str]:
    world = report["world_size"]
    lines = [
        f"  {'rank':>4}{'compute':>10}{'waiting':>10}{'sent MiB':>10}{'inputs MiB':>12}"
        f"{'peak MiB (incl. inputs)':>25}"
    ]
    for r in report["ranks"]:
        compute = r["forward"]["compute_s"] + r["backward"]["compute_s"]
        wait = r["forward"]["wait_s"] + r["backward"]["wait_s"]
        sent = (r["forward"]["bytes_sent"] + r["backward"]["bytes_sent"]) / MIB
        inputs, peak = r["input_bytes"] / MIB, r["total_peak_bytes"] / MIB
        lines.append(
            f"  {r['rank']:>4}{compute:9.2f}s{wait:9.2f}s{sent:10.1f}{inputs:12.1f}{peak:25.1f}"
        )
    single = report.get("single_process")
    scaling = report["context_scaling"]
    if single:
        lines.append(
            f"  single process: peak {single['total_peak_bytes'] / MIB:.1f} MiB incl. its "
            f"inputs ({single['input_bytes'] / MIB:.1f} MiB)"
        )
        lines.append(f"  context scaling mem(1) / (p * mem(p)) = {scaling['value']:.2f}:")
        held = "hold"
    else:
        lines.append(
            f"  context scaling mem(1) / (p * mem(p)) >= {scaling['value']:.2f} (estimate: no "
            f"single process ran; one needs at least its inputs and outputs, "
            f"{scaling['single_process_min_bytes'] / MIB:.1f} MiB):"
        )
        held = "hold at least"
    lines.append(
        f"    with the same memory per device, {world} ranks {held} {world * scaling['value']:.1f} "
        f"times the context of one process (ideal {world})"
    )
    first = report["ranks"][0]
    timed_too = report["config"]["repeats"] == 0
    when = "in the timed run (--repeats 0)" if timed_too else "in an untimed run"
    lines.append(f"  memory: {first['memory_method']}, plus the inputs; measured {when}")
    return lines


def _verdict_lines(report: dict) -> list[str]:
    cfg = report["config"]
    verification = report["verification"]
    method = verification["method"]
    if method == "none":
        return ["", "  not verified (--verify none)"]
    errors = ", ".join(f"{k} {v:.1e}" for k, v in report["max_relative_error"].items())
    verdict = "PASS" if report["passed"] else "FAIL"
    dtype = cfg["dtype"]
    if method == "full":
        lines = [
            "",
            f"  verified against one process over the whole sequence, because "
            f"{verification['reason']}",
        ]
        own_errors = report["single_process"].get("errors")
        reference, own = "a float32 single process", "single process"
    else:
        checked = "rows of out, lse, dq; columns of dk, dv" if "dq" in errors else "rows"
        lines = [
            "",
            f"  verified at {verification['positions']} sampled positions ({checked}: first, last, "
            f"shard and chunk boundaries, random)",
            f"  against a float64 reference in {verification['seconds']:.1f} s, because "
            f"{verification['reason']}",
        ]
        own_errors = verification["kernel_errors"]
        reference, own = "a float64 reference at the samples", "same kernel"
    if dtype not in LOW_PRECISION:
        target = "single process" if method == "full" else "float64 reference at the samples"
        tolerance = max(report["tolerance"].values())
        return [
            *lines,
            f"  max error vs {target} (relative to max |ref|): {errors}",
            f"  {verdict} (tolerance {tolerance:.0e} for {dtype})",
        ]
    own_text = ", ".join(f"{k} {v:.1e}" for k, v in own_errors.items())
    return [
        *lines,
        f"  max error vs {reference} (relative to max |ref|):",
        f"    {'ring (' + dtype + '):':27}{errors}",
        f"    {own + ' (' + dtype + '):':27}{own_text}",
        f"  {verdict} (ring within twice the {own}'s own error, floor {LOW_PRECISION_FLOOR:.0e})",
    ]
