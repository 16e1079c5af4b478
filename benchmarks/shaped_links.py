"""Shaped links check the planner: the ring between two simulated hosts whose link is rate-limited
(tc token-bucket filter), measured at several bandwidths and block sizes, next to what
``ringattn plan``'s model predicts for a profile of the same kernel and link.

    sudo .venv/bin/python benchmarks/shaped_links.py                      # about 5 minutes
    sudo .venv/bin/python benchmarks/shaped_links.py --rates 100mbit,1gbit --tokens 512,2K,8K
    .venv/bin/python benchmarks/shaped_links.py --from-json               # predict again

Two hosts (``scripts/multihost.py``), one rank each, one thread each, ring forward of full
(non-causal) attention with pass-KV and whole blocks (``Granularity(sub_blocks=1)``), so a ring of
2 has one step whose transfer can hide behind compute. For every rate and tokens-per-device ``n``
it measures (medians of ``--repeats``):

- alone: the kernel on the rank's own block, both hosts at once, nothing in flight;
- compute: the kernel's time in the ring step that overlaps the transfer;
- transfer: the engine's exchange of one K/V block between the hosts, nothing else running;
- wait: the time that step waited for its block after computing; step = compute + wait.

The prediction is the planner's model (``step = max(compute + s * transfer, transfer)``, and the
fewest tokens per device whose compute hides the transfer) for a profile fitted to measurements
of the parts, none of the ring's steps (:func:`measured_profile`): the kernel's rate (this
machine's speed varies between days, so the stored ``cpu-2core`` rate is not reused), the link's
rate and latency, and its compute share. The measured crossover is where the measured transfer
and in-ring compute times cross (each smoothed by a fit of its own form: single sizes are noisy
at these step lengths). Writes a JSON file (measurements, fitted profiles, predictions) and a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADS, DIM = 8, 64


def _worker(tokens: list[int], repeats: int, out: str) -> None:
    """One rank of the two-host job: measure every block size, rank 0 writes ``out``."""
    import torch
    import torch.distributed as dist

    import ringattn
    from ringattn.comm import RingComm

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    whole = ringattn.Granularity(sub_blocks=1)
    ring = RingComm(dist.group.WORLD)
    rows = []
    for n in tokens:
        gen = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, n, HEADS, DIM, generator=gen) for _ in range(3))
        mask = ringattn.create_ring_mask(2 * n, layout="contiguous", batch=1, heads=HEADS)
        samples = {"alone": [], "compute": [], "wait": [], "step": [], "transfer": []}
        heads_first = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
        for repeat in range(repeats + 1):  # the first run warms up
            dist.barrier()
            started = time.perf_counter()
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*heads_first, 0.0, False)
            alone = time.perf_counter() - started
            dist.barrier()
            with ringattn.record_ring() as trace:
                ringattn.ring_attention(q, k, v, mask=mask, granularity=whole, rotation="kv")
            steps = trace.steps
            dist.barrier()
            started = time.perf_counter()
            ring.exchange([k, v]).wait()  # the engine's own exchange, with nothing to compute
            transfer = time.perf_counter() - started
            if repeat:
                samples["alone"].append(alone)
                samples["compute"].append(steps[0].compute_s)
                samples["wait"].append(sum(s.wait_s for s in steps))
                samples["step"].append(steps[0].compute_s + sum(s.wait_s for s in steps))
                samples["transfer"].append(transfer)
        measured = {name: statistics.median(values) for name, values in samples.items()}
        # the slower rank sets the pace of the ring
        gathered = [None, None]
        dist.all_gather_object(gathered, measured)
        row = {name: max(g[name] for g in gathered) for name in measured}
        sent = steps[0].bytes_sent
        assert sent == 2 * k.numel() * k.element_size(), f"step 0 sent {sent} bytes, not K and V"
        rows.append({"tokens_per_device": n, "bytes_per_step": sent, **row})
        if rank == 0:
            print(
                f"  n={n:>6}: compute {row['compute'] * 1e3:8.1f} ms, transfer "
                f"{row['transfer'] * 1e3:8.1f} ms, wait {row['wait'] * 1e3:8.1f} ms",
                flush=True,
            )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _rate_gbps(rate: str) -> float:
    return _multihost()._bits_per_second(rate) / 1e9


def _multihost():
    sys.path.insert(0, str(ROOT / "scripts"))
    import multihost

    return multihost


def _crossover(rows: list[dict]) -> float | None:
    """Tokens per device where the measured transfer and in-ring compute times cross: each is
    smoothed by the least-squares fit of its own form (transfer ``L + bytes / B``, compute
    ``W (1 + h / n) / F``, as single sizes are noisy at these step lengths), and the crossing
    is found by bisection; None outside the measured range."""
    n = [r["tokens_per_device"] for r in rows]
    bytes_per_token = rows[0]["bytes_per_step"] / n[0]
    latency, per_byte = _fit_line(
        [r["bytes_per_step"] for r in rows], [r["transfer"] for r in rows]
    )
    work = [4 * t * t * HEADS * DIM for t in n]
    inverse, small = _fit_line(
        [1 / t for t in n], [r["compute"] / w for r, w in zip(rows, work, strict=True)]
    )

    def gap(tokens: float) -> float:  # transfer - compute
        compute = 4 * tokens * tokens * HEADS * DIM * (inverse + small / tokens)
        return latency + per_byte * bytes_per_token * tokens - compute

    low, high = float(n[0]), float(n[-1])
    if gap(low) < 0 or gap(high) > 0:
        return None
    for _ in range(60):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if gap(middle) > 0 else (low, middle)
    return low


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the line through (xs, ys) with the least squared *relative* error,
    so the small sizes (latency) weigh as much as the large ones (rate)."""
    if len(set(xs)) < 2 or min(ys) <= 0:
        raise ValueError("a fit needs at least two distinct sizes and positive times")
    weights = [1 / (y * y) for y in ys]
    total = sum(weights)
    mx = sum(w * x for w, x in zip(weights, xs, strict=True)) / total
    my = sum(w * y for w, y in zip(weights, ys, strict=True)) / total
    covariance = sum(w * (x - mx) * (y - my) for w, x, y in zip(weights, xs, ys, strict=True))
    variance = sum(w * (x - mx) ** 2 for w, x in zip(weights, xs, strict=True))
    slope = covariance / variance
    return my - slope * mx, slope


def measured_profile(rows: list[dict]):
    """The ``cpu-2core`` profile with this run's kernel and link, each fitted to its own
    measurements, none to the ring's steps: the kernel's FLOP/s and small-block term to the
    compute-alone times (``t / W = 1 / F + (h / F) / n``); the link's rate and latency to the
    transfer times (``t = L + bytes / B``); the link's compute share ``s`` to how much longer the
    kernel ran in the ring than alone, per second of transfer it overlapped
    (``compute - alone = s * min(transfer, compute)``, least squares relative to the compute
    time). The overlap model is the planner's."""
    sys.path.insert(0, str(ROOT / "src"))
    from ringattn.tools.plan import PROFILES, with_link

    n = [r["tokens_per_device"] for r in rows]
    work = [4 * t * t * HEADS * DIM for t in n]
    per_flop = [r["alone"] / w for r, w in zip(rows, work, strict=True)]
    inverse, small_block = _fit_line([1 / t for t in n], per_flop)
    if inverse <= 0:
        raise ValueError("the kernel-alone times do not fit t / W = 1 / F + (h / F) / n")
    rank_flops = 1 / inverse
    latency, seconds_per_byte = _fit_line(
        [r["bytes_per_step"] for r in rows], [r["transfer"] for r in rows]
    )
    # relative to the kernel's time, whose run-to-run noise grows with it
    overlapped = [min(r["transfer"], r["compute"]) / r["compute"] for r in rows]
    extra = [(r["compute"] - r["alone"]) / r["compute"] for r in rows]
    share = sum(e * x for e, x in zip(extra, overlapped, strict=True)) / sum(
        x * x for x in overlapped
    )
    base = PROFILES["cpu-2core"]
    hardware = replace(
        base,
        flops=rank_flops * base.cores,  # the profile shares the machine's rate among its ranks
        half_efficiency_tokens=max(0.0, small_block * rank_flops),
    )
    if seconds_per_byte <= 0:
        raise ValueError("the transfer times do not grow with the bytes: no link rate fits")
    link_gbps = 8 / seconds_per_byte / 1e9
    return with_link(hardware, link_gbps, max(latency, 0.0), min(max(share, 0.0), 0.95)), link_gbps


def _predictions(rows: list[dict]) -> dict:
    from ringattn.engine import Granularity
    from ringattn.tools.plan import Config, predict

    hardware, link_gbps = measured_profile(rows)
    per_size = []
    for row in rows:
        config = Config(
            seq_len=2 * row["tokens_per_device"],
            devices=2,
            heads=HEADS,
            kv_heads=HEADS,
            head_dim=DIM,
            dtype="float32",
            causal=False,
            layout="contiguous",
            backward=False,
            granularity=Granularity(sub_blocks=1),
        )
        prediction = predict(config, hardware)
        per_size.append(
            {
                "tokens_per_device": row["tokens_per_device"],
                "compute": prediction.compute_step_s,
                "transfer": prediction.comm_step_s,
                "step": prediction.busy_step_s,
            }
        )
    return {
        "rows": per_size,
        "crossover": prediction.min_tokens_per_device,
        "link_gbps": link_gbps,
        "latency_s": hardware.latency,
        "compute_share": hardware.comm_compute_share,
        "rank_gflops": hardware.flops / hardware.cores / 1e9,
        "profile": asdict(hardware),
    }


def main() -> None:
    from ringattn.tools.cli import parse_tokens

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100mbit,300mbit,1gbit", help="tc rates, e.g. 1gbit")
    parser.add_argument(
        "--tokens", default="256,512,1K,2K,4K,8K", help="tokens per device, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", default="docs/shaped-links.json")
    parser.add_argument("--plot", default="docs/img/shaped_links.png")
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="measure nothing: predict again for the measurements in --json (no root needed)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = sorted({parse_tokens(t) for t in args.tokens.split(",")})
    if len(tokens) < 2:
        parser.error("--tokens needs at least two sizes (the fits need them)")
    if args.worker:
        _worker(tokens, args.repeats, args.out)
        return
    if args.from_json:
        measured = {
            run["rate"]: run["measured"] for run in json.loads(Path(args.json).read_text())["runs"]
        }
    else:
        measured = _measure(args.rates.split(","), ",".join(map(str, tokens)), args.repeats)
    results = [_compare(rate, rows) for rate, rows in measured.items()]
    summary = {"heads": HEADS, "head_dim": DIM, "runs": results}
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(report(results))
    plot(results, args.plot)
    print(f"wrote {args.json} and {args.plot}")


def _measure(rates: list[str], tokens: str, repeats: int) -> dict[str, list[dict]]:
    """{rate: measured rows} from two simulated hosts, the link shaped to each rate in turn."""
    multihost = _multihost()
    reason = multihost.unavailable_reason()
    if reason:
        raise SystemExit(f"cannot simulate hosts here: {reason}")
    measured = {}
    with multihost.Hosts(2) as hosts, tempfile.TemporaryDirectory() as scratch:
        for rate in rates:
            hosts.shape(rate)
            out = os.path.join(scratch, f"{rate}.json")
            print(f"link {rate} (each host's outgoing veth, tc tbf):", flush=True)
            target = [__file__, "--worker", "--tokens", tokens, "--repeats", str(repeats),
                      "--out", out]  # fmt: skip
            runs = hosts.torchrun(target, nproc_per_node=1, rendezvous="static", timeout=1200)
            failed = [r for r in runs if r.returncode != 0]
            if failed:
                raise SystemExit(f"host {failed[0].host} failed:\n{failed[0].output[-4000:]}")
            print("".join(line for line in runs[0].output.splitlines(True) if "n=" in line))
            measured[rate] = json.loads(Path(out).read_text())
    return measured


def _compare(rate: str, measured: list[dict]) -> dict:
    predicted = _predictions(measured)
    return {
        "rate": rate,
        "shaped_gbps": _rate_gbps(rate),
        "link_gbps": predicted["link_gbps"],
        "latency_s": predicted["latency_s"],
        "compute_share": predicted["compute_share"],
        "rank_gflops": predicted["rank_gflops"],
        "profile": predicted["profile"],
        "measured": measured,
        "predicted": predicted["rows"],
        "measured_crossover": _crossover(measured),
        "predicted_crossover": predicted["crossover"],
    }


def report(results: list[dict]) -> str:
    """Markdown: per rate and size, measured and predicted step times; the crossovers."""
    lines = [
        "| link | tokens/device | compute ms (meas / pred) | transfer ms (meas / pred) | "
        "wait ms | step ms (meas / pred) | step error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results:
        for m, p in zip(run["measured"], run["predicted"], strict=True):
            lines.append(
                f"| {run['rate']} | {m['tokens_per_device']:,} | {m['compute'] * 1e3:.1f} / "
                f"{p['compute'] * 1e3:.1f} | {m['transfer'] * 1e3:.1f} / {p['transfer'] * 1e3:.1f}"
                f" | {m['wait'] * 1e3:.1f} | {m['step'] * 1e3:.1f} / {p['step'] * 1e3:.1f} | "
                f"{100 * (p['step'] / m['step'] - 1):+.0f}% |"
            )
    lines += ["", "| link | crossover measured | predicted | error |", "|---|---:|---:|---:|"]
    for run in results:
        measured, predicted = run["measured_crossover"], run["predicted_crossover"]
        error = f"{100 * (predicted / measured - 1):+.0f}%" if measured else "n/a"
        shown = f"{measured:,.0f}" if measured else "outside the range"
        lines.append(f"| {run['rate']} | {shown} | {predicted:,.0f} | {error} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(results):
        color = f"C{i}"
        n = [m["tokens_per_device"] for m in run["measured"]]
        ax.plot(n, [m["step"] * 1e3 for m in run["measured"]], "o-", color=color,
                label=f"{run['rate']}: measured step")  # fmt: skip
        ax.plot(n, [p["step"] * 1e3 for p in run["predicted"]], "--", color=color,
                label=f"{run['rate']}: predicted")  # fmt: skip
        if run["measured_crossover"]:
            ax.axvline(run["measured_crossover"], color=color, alpha=0.3)
        ax.axvline(run["predicted_crossover"], color=color, alpha=0.3, linestyle=":")
    n = [m["tokens_per_device"] for m in results[0]["measured"]]
    ax.plot(n, [m["alone"] * 1e3 for m in results[0]["measured"]], "k.-", alpha=0.5,
            label="kernel alone (no transfer)")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="tokens per device (lines: crossovers, "
           "solid measured, dotted predicted)", ylabel="ring step (ms)",
           title="2 hosts, shaped links: measured vs `ringattn plan --link-gbps`")  # fmt: skip
    ax.set_xticks(n, [f"{t:,}" for t in n])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
