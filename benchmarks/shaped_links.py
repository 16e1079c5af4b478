"""Shaped links check the planner: the ring between two simulated hosts whose link is rate-limited
(tc token-bucket filter), measured at several bandwidths and block sizes, next to what
``ringattn plan --link-gbps`` predicts for the same link.

    sudo .venv/bin/python benchmarks/shaped_links.py                      # about 6 minutes
    sudo .venv/bin/python benchmarks/shaped_links.py --rates 100mbit,1gbit --tokens 512,2K,8K

Two hosts (``scripts/multihost.py``), one rank each, one thread each, ring forward of full
(non-causal) attention with pass-KV and whole blocks (``Granularity(sub_blocks=1)``), so a ring of
2 has one step whose transfer can hide behind compute. For every rate and tokens-per-device ``n``
it measures (medians of ``--repeats``):

- compute: the kernel time of a step (the trace's compute time per step);
- transfer: the time to exchange one K/V block between the hosts with nothing else running;
- wait: the time the step waited for its block after computing (the trace's wait time);
- step: compute + wait of the step that overlaps the transfer.

The predictions use the ``cpu-2core`` profile with the link's rate: per-step compute and transfer,
the step time ``max(compute + s * copy, transfer)``, and the fewest tokens per device whose
compute hides the transfer. The measured crossover is where the measured transfer and compute
times cross (interpolated on a log scale between the measured sizes). Writes a JSON file and a
plot of measured against predicted step times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADS, DIM = 2, 64


def _worker(tokens: list[int], repeats: int, out: str) -> None:
    """One rank of the two-host job: measure every block size, rank 0 writes ``out``."""
    import torch
    import torch.distributed as dist

    import ringattn

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    whole = ringattn.Granularity(sub_blocks=1)
    rows = []
    for n in tokens:
        gen = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, n, HEADS, DIM, generator=gen) for _ in range(3))
        mask = ringattn.create_ring_mask(2 * n, layout="contiguous", batch=1, heads=HEADS)
        samples = {"compute": [], "wait": [], "step": [], "transfer": [], "forward": []}
        for repeat in range(repeats + 1):  # the first run warms up
            dist.barrier()
            with ringattn.record_ring() as trace:
                started = time.perf_counter()
                ringattn.ring_attention(q, k, v, mask=mask, granularity=whole)
                forward = time.perf_counter() - started
            steps = trace.steps
            dist.barrier()
            started = time.perf_counter()
            sends = [dist.P2POp(dist.isend, t, 1 - rank) for t in (k, v)]
            receives = [dist.P2POp(dist.irecv, torch.empty_like(t), 1 - rank) for t in (k, v)]
            for request in dist.batch_isend_irecv(sends + receives):
                request.wait()
            transfer = time.perf_counter() - started
            if repeat:
                samples["compute"].append(statistics.mean(s.compute_s for s in steps))
                samples["wait"].append(sum(s.wait_s for s in steps))
                samples["step"].append(steps[0].compute_s + sum(s.wait_s for s in steps))
                samples["transfer"].append(transfer)
                samples["forward"].append(forward)
        measured = {name: statistics.median(values) for name, values in samples.items()}
        # the slower rank sets the pace of the ring
        gathered = [None, None]
        dist.all_gather_object(gathered, measured)
        row = {name: max(g[name] for g in gathered) for name in measured}
        rows.append({"tokens_per_device": n, "bytes_per_step": 2 * k.numel() * 4, **row})
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
    """Tokens per device where the measured transfer and compute times cross (log-log
    interpolation between neighbouring sizes); None if they do not cross in the range."""
    for a, b in itertools.pairwise(rows):
        da = math.log(a["transfer"] / a["compute"])
        db = math.log(b["transfer"] / b["compute"])
        if da >= 0 > db:
            x = da / (da - db)
            la, lb = math.log(a["tokens_per_device"]), math.log(b["tokens_per_device"])
            return math.exp(la + x * (lb - la))
    return None


def _predictions(rows: list[dict], gbps: float) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from ringattn.engine import Granularity
    from ringattn.tools.plan import PROFILES, Config, predict, with_link

    hardware = with_link(PROFILES["cpu-2core"], gbps)
    per_size = []
    for row in rows:
        n = row["tokens_per_device"]
        config = Config(
            seq_len=2 * n,
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
                "tokens_per_device": n,
                "compute": prediction.compute_step_s,
                "transfer": prediction.comm_step_s,
                "step": prediction.busy_step_s,
                "forward": prediction.forward_s,
            }
        )
    crossover = predict(replace(config, seq_len=2 * rows[0]["tokens_per_device"]), hardware)
    return {"rows": per_size, "crossover": crossover.min_tokens_per_device}


def main() -> None:
    from ringattn.tools.cli import parse_tokens

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100mbit,300mbit,1gbit", help="tc rates, e.g. 1gbit")
    parser.add_argument(
        "--tokens", default="256,512,1K,2K,4K,8K", help="tokens per device, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="docs/shaped-links.json")
    parser.add_argument("--plot", default="docs/img/shaped_links.png")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = [parse_tokens(t) for t in args.tokens.split(",")]
    if args.worker:
        _worker(tokens, args.repeats, args.out)
        return
    multihost = _multihost()
    reason = multihost.unavailable_reason()
    if reason:
        raise SystemExit(f"cannot simulate hosts here: {reason}")
    results = []
    with multihost.Hosts(2) as hosts, tempfile.TemporaryDirectory() as scratch:
        for rate in args.rates.split(","):
            hosts.shape(rate)
            out = os.path.join(scratch, f"{rate}.json")
            print(f"link {rate} (each host's outgoing veth, tc tbf):", flush=True)
            target = [__file__, "--worker", "--tokens", args.tokens, "--repeats",
                      str(args.repeats), "--out", out]  # fmt: skip
            runs = hosts.torchrun(target, nproc_per_node=1, rendezvous="static", timeout=1200)
            failed = [r for r in runs if r.returncode != 0]
            if failed:
                raise SystemExit(f"host {failed[0].host} failed:\n{failed[0].output[-4000:]}")
            print("".join(line for line in runs[0].output.splitlines(True) if "n=" in line))
            measured = json.loads(Path(out).read_text())
            gbps = _rate_gbps(rate)
            predicted = _predictions(measured, gbps)
            results.append(
                {
                    "rate": rate,
                    "gbps": gbps,
                    "measured": measured,
                    "predicted": predicted["rows"],
                    "measured_crossover": _crossover(measured),
                    "predicted_crossover": predicted["crossover"],
                }
            )
    summary = {"heads": HEADS, "head_dim": DIM, "runs": results}
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(report(results))
    plot(results, args.plot)
    print(f"wrote {args.json} and {args.plot}")


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
    ax.plot(n, [m["compute"] * 1e3 for m in results[0]["measured"]], "k.-", alpha=0.5,
            label="compute alone")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="tokens per device",
           ylabel="ring step (ms)",
           title="2 hosts, shaped links: measured vs `ringattn plan --link-gbps`")  # fmt: skip
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
