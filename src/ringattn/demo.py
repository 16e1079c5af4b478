"""The main job: ring attention over a long sequence on several processes, verified and measured.

Each rank builds only its own shard of the inputs (values are a function of the global token
position, so no rank ever holds the whole sequence), runs the ring forward and backward, and
records time, per-step compute/wait and peak memory. Rank 0 then computes the single-process
result with the same kernel over the whole sequence using all the threads the ranks shared, sends
each rank its slice of it, and prints the report.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from .comm import transfer_device
from .launch import cpu_threads_per_rank, init_worker
from .layout import get_layout
from .workload import OUTPUT_NAMES, Workload, time_ring, time_single_process

_TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
_LOW_PRECISION = ("bfloat16", "float16")
_LOW_PRECISION_FLOOR = 1e-3  # relative error below which low-precision results always pass
_MIB = 2**20


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
    repeats: int = 1
    threads: int | None = None
    seed: int = 0
    verify: bool = True
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
        if min(self.seq_len, self.world_size, self.batch, self.head_dim, self.repeats) <= 0:
            raise ValueError("sizes and --repeats must be positive")


def _say(rank: int, start: float, message: str) -> None:
    if rank == 0:
        print(f"[ringattn demo {time.perf_counter() - start:7.1f}s] {message}", flush=True)


def _scatter_reference(results, cfg: DemoConfig, rank: int, world: int, mine: dict):
    """Send every rank its slice of the single-process results (float32 for low-precision
    runs); return this rank's slice."""
    """Send every rank its slice of the single-process results; return this rank's slice."""
    layout = get_layout(cfg.layout)
    seq_local = cfg.seq_len // world
    names = OUTPUT_NAMES
    group, device = dist.group.WORLD, mine["out"].device
    if rank == 0:
        slices = {}
        for r in range(world):
            index = layout.positions(r, world, seq_local).to(results["out"].device)
            part = {
                name: results[name].index_select(2 if name == "lse" else 1, index).contiguous()
                for name in names
            }
            if r == 0:
                slices = part
            else:
                for name in names:
                    dist.send(part[name].to(transfer_device(group, device)), dst=r)
        return slices
    received = {}
    for name in names:
        like = mine[name]
        dtype = torch.float32 if cfg.dtype in _LOW_PRECISION else like.dtype
        buffer = torch.empty(like.shape, dtype=dtype, device=transfer_device(group, device))
        dist.recv(buffer, src=0)
        received[name] = buffer.to(device)
    return received


def _max_errors(mine: dict, reference: dict) -> dict[str, float]:
    errors = {}
    for name, got in mine.items():
        ref = reference[name].double()
        errors[name] = ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return errors


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
    _say(rank, start, f"{world} ranks joined; building each rank's shard of {cfg.seq_len:,} tokens")
    workload = cfg.workload
    inputs = workload.inputs(layout.positions(rank, world, seq_local), device)

    _say(rank, start, "warm-up on a short sequence")
    short = {name: t[:, : min(seq_local, 256)] for name, t in inputs.items()}
    time_ring(workload, short, repeats=1)

    def before_each(i: int) -> None:
        _say(rank, start, f"ring forward+backward, run {i + 1} of {cfg.repeats}")
        dist.barrier()

    timing = time_ring(workload, inputs, cfg.repeats, before_each=before_each)
    mine = timing.outputs
    rank_report = {
        "rank": rank,
        "forward_s": timing.forward_s,
        "backward_s": timing.backward_s,
        "peak_bytes": timing.peak_bytes,
        "memory_method": timing.memory_method,
        "input_bytes": sum(t.numel() * t.element_size() for t in inputs.values()),
        "forward": timing.trace.total("forward"),
        "backward": timing.trace.total("backward"),
    }
    dist.barrier()

    reference_stats = None
    if cfg.verify:
        _say(rank, start, "single-process reference on rank 0 (the other ranks wait)")
        reference = reference_stats = None
        if rank == 0:
            node_threads = threads * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            all_threads = min(node_threads, len(os.sched_getaffinity(0)))
            single = time_single_process(workload, device, all_threads)
            reference = single.outputs
            reference_stats = {
                "forward_s": single.forward_s,
                "backward_s": single.backward_s,
                "peak_bytes": single.peak_bytes,
            }
            if cfg.dtype in _LOW_PRECISION:  # judge both against float32, as the tests do
                _say(rank, start, "float32 single process, the reference for both")
                exact = replace(workload, dtype="float32")
                reference = time_single_process(exact, device, all_threads).outputs
                reference_stats["errors"] = _max_errors(single.outputs, reference)
            del single
        dist.barrier()
        _say(rank, start, "comparing every rank's shard with the reference")
        rank_report["errors"] = _max_errors(
            mine, _scatter_reference(reference, cfg, rank, world, mine)
        )
        del reference

    reports = [None] * world
    dist.all_gather_object(reports, rank_report)
    dist.destroy_process_group()
    if rank != 0:
        return None
    report = _summarise(cfg, world, threads, reports, reference_stats)
    print(format_report(report), flush=True)
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _summarise(cfg, world, threads, reports, reference_stats) -> dict:
    ring_forward = max(r["forward_s"] for r in reports)
    ring_backward = max(r["backward_s"] for r in reports)
    report = {
        "config": asdict(cfg),
        "world_size": world,
        "threads_per_rank": threads,
        "torch": torch.__version__,
        "ring": {"forward_s": ring_forward, "backward_s": ring_backward},
        "ranks": reports,
        "flops_forward": cfg.workload.flops_forward(),
    }
    if reference_stats is not None:
        worst = {name: max(r["errors"][name] for r in reports) for name in reports[0]["errors"]}
        report["single_process"] = reference_stats
        report["max_relative_error"] = worst
        if cfg.dtype in _LOW_PRECISION:
            # within twice the error the single process makes in the same dtype
            single_errors = reference_stats["errors"]
            report["tolerance"] = {
                name: max(2 * single_errors[name], _LOW_PRECISION_FLOOR) for name in worst
            }
        else:
            report["tolerance"] = dict.fromkeys(worst, _TOLERANCE[cfg.dtype])
        report["passed"] = all(err <= report["tolerance"][name] for name, err in worst.items())
    return report


def format_report(report: dict) -> str:
    cfg = report["config"]
    world = report["world_size"]
    ring = report["ring"]
    total_ring = ring["forward_s"] + ring["backward_s"]
    tokens = cfg["seq_len"] * cfg["batch"]
    kind = "causal" if cfg["causal"] else "full"
    lines = [
        "",
        f"ringattn demo: {kind} ring attention, {cfg['layout']} layout, {world} ranks "
        f"({cfg['device']}, {report['threads_per_rank']} thread(s) per rank, "
        f"torch {report['torch']})",
        f"  {cfg['seq_len']:,} tokens ({cfg['seq_len'] // world:,} per rank), "
        f"batch {cfg['batch']}, "
        f"heads {cfg['heads']} (kv {cfg['kv_heads']}), head_dim {cfg['head_dim']}, {cfg['dtype']}",
        "",
        f"  {'':22}{'forward':>10}{'backward':>10}{'fwd+bwd':>10}{'tokens/s':>12}{'TFLOP/s':>9}",
    ]
    flops = report["flops_forward"] * 3.5  # backward ~2.5x forward

    def row(name, fwd, bwd):
        return (
            f"  {name:22}{fwd:9.2f}s{bwd:9.2f}s{fwd + bwd:9.2f}s{tokens / (fwd + bwd):12,.0f}"
            f"{flops / (fwd + bwd) / 1e12:9.3f}"
        )

    lines.append(row(f"ring ({world} ranks)", ring["forward_s"], ring["backward_s"]))
    single = report.get("single_process")
    if single:
        lines.append(row("single process", single["forward_s"], single["backward_s"]))
        total_single = single["forward_s"] + single["backward_s"]
        lines.append(
            f"  efficiency (single / ring time): {total_single / total_ring:.2f} "
            f"(same kernel, same total threads)"
        )
    lines += [
        "",
        f"  {'rank':>4}{'compute':>10}{'waiting':>10}{'sent MiB':>10}{'peak MiB':>10}"
        f"{'inputs MiB':>12}",
    ]
    for r in report["ranks"]:
        compute = r["forward"]["compute_s"] + r["backward"]["compute_s"]
        wait = r["forward"]["wait_s"] + r["backward"]["wait_s"]
        sent = (r["forward"]["bytes_sent"] + r["backward"]["bytes_sent"]) / _MIB
        lines.append(
            f"  {r['rank']:>4}{compute:9.2f}s{wait:9.2f}s{sent:10.1f}{r['peak_bytes'] / _MIB:10.1f}"
            f"{r['input_bytes'] / _MIB:12.1f}"
        )
    if single:
        lines.append(
            f"  single process peak {single['peak_bytes'] / _MIB:.1f} MiB "
            f"(memory: {report['ranks'][0]['memory_method']})"
        )
        errors = ", ".join(f"{k} {v:.1e}" for k, v in report["max_relative_error"].items())
        verdict = "PASS" if report["passed"] else "FAIL"
        if "errors" in single:
            single_errors = ", ".join(f"{k} {v:.1e}" for k, v in single["errors"].items())
            lines += [
                "",
                "  max error vs a float32 single process (relative to max |ref|):",
                f"    ring ({cfg['dtype']}):           {errors}",
                f"    single process ({cfg['dtype']}): {single_errors}",
                f"  {verdict} (ring within twice the single process's own error, floor "
                f"{_LOW_PRECISION_FLOOR:.0e})",
            ]
        else:
            tolerance = max(report["tolerance"].values())
            lines += [
                "",
                f"  max error vs single process (relative to max |ref|): {errors}",
                f"  {verdict} (tolerance {tolerance:.0e} for {cfg['dtype']})",
            ]
    return "\n".join(lines)
