"""Command line: ``ringattn demo``, ``bench`` and ``plan``. Run ``ringattn --help``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..layout import LAYOUTS


def parse_tokens(text: str) -> int:
    """'32768', '32K', '1M' -> tokens (K = 1024, M = 1024**2)."""
    units = {"k": 1024, "m": 1024**2}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a token count: {text!r} (try 32768 or 32K)"
        ) from None


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for flags and options whose default is ``None``
    (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _demo_parser(sub) -> None:
    from .demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="ring attention over a long sequence on local processes, verified and measured",
        description=(
            "Runs ring attention (causal unless --no-causal) forward+backward (or forward only) "
            "over a long sequence "
            "on several local processes (or the ranks of a torchrun job), verifies every rank's "
            "output, log-sum-exp and gradients, and reports time, tokens/s, per-rank "
            "compute/wait, per-rank peak memory including the inputs and the context scaling. "
            "Verification: 'full' compares with a single-process run of the same kernel over "
            "the whole sequence; 'sampled' compares sampled rows (out, lse, dq) and columns "
            "(dk, dv) with a float64 reference that no rank computes over the whole sequence "
            "(for lengths one process cannot hold or takes too long on); 'auto' runs 'full' "
            "unless one process would take more than 3 minutes or half the available memory."
        ),
        formatter_class=_DefaultsHelpFormatter,
    )
    p.add_argument(
        "--seq-len", type=parse_tokens, default=d.seq_len, help="total tokens (32K, 1M ok)"
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=d.world_size,
        help="local ranks to start (ignored under torchrun)",
    )
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per batch")
    p.add_argument("--heads", type=int, default=d.heads, help="query heads")
    p.add_argument(
        "--kv-heads", type=int, default=d.kv_heads, help="key/value heads (GQA when fewer)"
    )
    p.add_argument("--head-dim", type=int, default=d.head_dim, help="dimension of a head")
    p.add_argument(
        "--layout", choices=sorted(LAYOUTS), default=d.layout, help="how tokens map to ranks"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        default=d.dtype,
        help="dtype of q, k, v (accumulation is float32 or wider)",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=d.device, help="cuda: one GPU per rank"
    )
    p.add_argument(
        "--no-causal", dest="causal", action="store_false", help="full (non-causal) attention"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=d.repeats,
        help="timed runs (median reported) after one run that counts memory; 0: a single run "
        "counts memory and is timed (for runs that take many minutes)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per rank (default: cores / local ranks)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random inputs")
    p.add_argument(
        "--forward-only",
        action="store_true",
        help="inference: the forward pass only, verified on out and lse",
    )
    p.add_argument(
        "--verify",
        choices=["auto", "full", "sampled", "none"],
        default=d.verify,
        help="how to check the results (see above)",
    )
    p.add_argument(
        "--no-verify", dest="verify", action="store_const", const="none", help="--verify none"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=d.samples,
        help="positions checked by --verify sampled (rows, and columns of dk/dv)",
    )
    p.add_argument(
        "--json", dest="json_path", default=None, help="also write the report as JSON here"
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, demo_worker
    from .launch import launched_by_torchrun, run_on_ranks

    fields = DemoConfig.__dataclass_fields__
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if not launched_by_torchrun():
        try:
            cfg.validate(cfg.world_size)
        except ValueError as exc:
            print(f"ringattn demo: error: {exc}", file=sys.stderr)
            return 2
    results = run_on_ranks(demo_worker, (cfg,), cfg.world_size)
    report = next((r for r in results.values() if r is not None), None)
    if report is None:  # a non-zero rank under torchrun
        return 0
    return 0 if report.get("passed", True) else 1


def _comma_list(convert):
    def parse(text: str) -> list:
        try:
            return [convert(part) for part in text.split(",") if part.strip()]
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {exc}") from None

    return parse


def _heads_pair(text: str) -> tuple[int, int]:
    heads, _, kv_heads = text.partition(":")
    return int(heads), int(kv_heads or heads)


def _bench_parser(sub) -> None:
    from .max_context import MaxContextSearch
    from .memory import format_bytes
    from .plan import memory_size

    d = MaxContextSearch()
    budget = format_bytes(d.budget_bytes).replace(" ", "").replace(".0", "")
    p = sub.add_parser(
        "bench",
        help="measure the ring against one process with the same kernel; JSON, table, plots",
        description=(
            "Runs a grid of sequence length x world size x layout x mask x heads x dtype. For\n"
            "every point it measures, in the same run, ring and single-process forward and\n"
            "forward+backward time (median of repeats), per-rank compute/wait time, per-rank\n"
            "peak memory including the rank's inputs next to the single process's (and the\n"
            "context scaling mem(1) / (p x mem(p))) and bytes sent per ring step, and writes\n"
            "bench.json, bench.md and PNG plots to --out.\n\n"
            "With --max-context it instead finds, by real runs, the longest sequence whose\n"
            "per-rank peak memory (inputs included) fits --memory at each world size, and\n"
            "writes max_context.json, max_context.md and max_context.png."
        ),
        epilog=(
            "examples:\n"
            "  ringattn bench --quick                  # under 3 minutes on 2 cores\n"
            f"  ringattn bench --max-context            # {budget} per rank, p = 1, 2, 4: about 3 "
            "minutes on 2 cores\n"
            "  ringattn bench --max-context --memory 256MiB --world-sizes 1,2 --inference"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small grid, under 3 minutes on 2 cores")
    p.add_argument(
        "--max-context",
        action="store_true",
        help="find the longest sequence that fits --memory per rank at each world size, by "
        "real forward+backward runs (p=1: one process over the whole sequence); the default "
        f"run ({budget}, heads 4:2, d=64, float32, causal zigzag, p=1,2,4) takes about 3 "
        "minutes on 2 cores (longer when other jobs share them), most of it in the p=4 probes",
    )
    p.add_argument(
        "--memory",
        type=memory_size,
        default=None,
        help="with --max-context: budget per rank including its inputs, e.g. 64MiB or 2GiB "
        f"(default {budget})",
    )
    p.add_argument(
        "--resolution",
        type=float,
        default=d.resolution,
        help="with --max-context: stop when the longest fitting and the shortest failing "
        f"length are this fraction apart (or one layout multiple) (default {d.resolution})",
    )
    p.add_argument(
        "--inference",
        action="store_true",
        help="with --max-context: forward only, under torch.no_grad (inputs q, k, v)",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="only measure this machine for `ringattn plan --hardware local`",
    )
    p.add_argument(
        "--seq-lens",
        type=_comma_list(parse_tokens),
        default=None,
        help="total tokens, e.g. 4K,16K (default 4K,16K)",
    )
    p.add_argument("--world-sizes", type=_comma_list(int), default=None, help="default 1,2,4")
    p.add_argument(
        "--layouts",
        type=_comma_list(str),
        default=None,
        help="default zigzag,contiguous,striped; with --max-context zigzag",
    )
    p.add_argument(
        "--mask",
        choices=["both", "causal", "full"],
        default=None,
        help="default both (--quick and --max-context: causal)",
    )
    p.add_argument(
        "--heads",
        type=_comma_list(_heads_pair),
        default=None,
        help="query:kv heads pairs, e.g. 8:8,8:2 (default 8:8; with --max-context 4:2)",
    )
    p.add_argument("--dtypes", type=_comma_list(str), default=None, help="default float32")
    p.add_argument(
        "--sub-blocks",
        type=_comma_list(int),
        default=None,
        help="ringattn.Granularity(sub_blocks=) values to compare, e.g. 1,8,16: memory against "
        "kernel-call size (default 8)",
    )
    p.add_argument("--head-dim", type=int, default=64, help="default 64")
    p.add_argument(
        "--head-dim-v",
        type=int,
        default=None,
        help="head dim of the values when it differs from --head-dim (MLA, e.g. 128 with 192)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads shared by the ranks (default: all cores)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="default cpu; cuda: one GPU per rank, efficiency = single-GPU time / (p x ring time)",
    )
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import BenchGrid, run_bench

    if args.calibrate:
        return _calibrate()

    def error(message: str) -> int:
        print(f"ringattn bench: error: {message}", file=sys.stderr)
        return 2

    if args.max_context:
        from .max_context import MaxContextSearch

        grid = MaxContextSearch(inference=args.inference, resolution=args.resolution)
        if args.memory is not None:
            grid.budget_bytes = args.memory
        grid.causal = args.mask != "full"
        wrong = [
            flag
            for flag in ("seq_lens", "repeats", "sub_blocks")
            if getattr(args, flag) is not None
        ]
        wrong += ["quick"] if args.quick else []
        if wrong or args.mask == "both":
            flags = ", ".join("--" + f.replace("_", "-") for f in wrong) or "--mask both"
            return error(f"{flags} do(es) not apply to --max-context")
        if not 0 < args.resolution < 1:
            return error("--resolution must be a fraction between 0 and 1")
    elif args.memory is not None or args.inference:
        return error("--memory and --inference need --max-context")
    else:
        grid = BenchGrid.quick() if args.quick else BenchGrid()
        if args.mask is not None:
            grid.causal = {"both": [True, False], "causal": [True], "full": [False]}[args.mask]
    for name in ("seq_lens", "world_sizes", "layouts", "heads", "dtypes", "sub_blocks", "repeats"):
        if getattr(args, name) is not None:
            setattr(grid, name, getattr(args, name))
    grid.head_dim, grid.threads, grid.device = args.head_dim, args.threads, args.device
    grid.head_dim_v = args.head_dim_v
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return error("torch sees no CUDA device")
    unknown = sorted(set(grid.layouts) - set(LAYOUTS))
    if unknown:
        return error(f"unknown layouts {unknown}")
    out = Path(args.out)
    if args.max_context:
        from .max_context import run_max_context

        run_max_context(grid, out)
        print((out / "max_context.md").read_text())
        print(f"wrote {out / 'max_context.json'}, {out / 'max_context.md'} and a plot in {out}/")
        return 0
    run_bench(grid, out)
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and plots in {out}/")
    return 0


def _plan_parser(sub) -> None:
    from .plan import PROFILES, Config, memory_size

    d = Config(seq_len=0, devices=0)
    p = sub.add_parser(
        "plan",
        help="predict time, overlap and memory of a ring configuration on given hardware",
        description=(
            "A cost model of the ring: per-step compute and transfer time, whether the transfer "
            "is hidden, total time and efficiency, memory per device, the minimum tokens per "
            "device for full overlap and the longest sequence that fits, plus the best layout "
            f"and rotation. Hardware profiles: {', '.join(sorted(PROFILES))}, 'local' "
            "(after --calibrate) or a profile JSON path."
        ),
        formatter_class=_DefaultsHelpFormatter,
    )
    p.add_argument("--seq-len", type=parse_tokens, default=1024**2, help="total tokens (1M ok)")
    p.add_argument("--devices", type=int, default=64, help="ranks in the ring")
    p.add_argument("--hardware", default="h100-nvlink", help="a profile name or JSON path")
    p.add_argument(
        "--memory",
        type=memory_size,
        default=None,
        help="memory per device, e.g. 64MiB or 80GiB, instead of the hardware profile's: what "
        "the longest fitting sequence is computed for (compare `ringattn bench --max-context "
        "--memory ...`)",
    )
    p.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        help="ring neighbours talk over a network link of this many gigabits/s per direction "
        "(e.g. 100 for 100 Gb/s InfiniBand, 0.5 for a shaped link) instead of the profile's "
        "bandwidth",
    )
    p.add_argument(
        "--link-latency-us",
        type=float,
        default=None,
        help="with --link-gbps: microseconds per message (default: the profile's latency)",
    )
    p.add_argument(
        "--link-compute-share",
        type=float,
        default=None,
        help="with --link-gbps: share of a transfer's time also taken from compute (default 0: "
        "the NIC moves the data; a software network stack on the compute cores costs some, "
        "0.15-0.36 measured over gloo/TCP between this machine's simulated hosts)",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="devices per node: a ring of more devices spans nodes, and every step then waits "
        "for the inter-node link (the profile's paired InfiniBand link for a100-nvlink and "
        "h100-nvlink, or --inter-node-gbps); also ranks every Ulysses x ring configuration "
        "(all-to-alls inside a node, the ring across nodes), pass-KV/pass-Q/all-gather and layout",
    )
    p.add_argument(
        "--configurations",
        action="store_true",
        help="rank every Ulysses x ring configuration, rotation and layout of --devices by "
        "predicted time (implied by --gpus-per-node)",
    )
    p.add_argument(
        "--inter-node-gbps",
        type=float,
        default=None,
        help="with --gpus-per-node: gigabits/s per direction of one inter-node link (NIC)",
    )
    p.add_argument(
        "--nics-per-node",
        type=int,
        default=None,
        help="with --gpus-per-node: inter-node links per node (default one per device, as GPU "
        "clusters give every GPU its NIC); fewer are shared by the ranks that send at once",
    )
    p.add_argument("--heads", type=int, default=d.heads, help="query heads")
    p.add_argument("--kv-heads", type=int, default=d.kv_heads, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=d.head_dim, help="dimension of a head")
    p.add_argument(
        "--head-dim-v",
        type=int,
        default=None,
        help="head dim of the values when it differs from --head-dim (MLA, e.g. 128 with 192)",
    )
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per batch")
    p.add_argument(
        "--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"], help="of q, k, v"
    )
    p.add_argument(
        "--layout", default=d.layout, choices=sorted(LAYOUTS), help="how tokens map to ranks"
    )
    p.add_argument(
        "--rotation", default=d.rotation, choices=["kv", "q"], help="what travels: K/V or Q"
    )
    p.add_argument(
        "--no-causal", dest="causal", action="store_false", help="full (non-causal) attention"
    )
    p.add_argument("--inference", action="store_true", help="forward only")
    p.add_argument(
        "--calibrate", action="store_true", help="measure this machine and save the 'local' profile"
    )
    p.add_argument(
        "--paper-table",
        action="store_true",
        help="reproduce the Ring Attention paper's minimal sequence lengths",
    )
    p.add_argument(
        "--validate",
        metavar="BENCH_JSON",
        help="predicted vs measured time for the rows of a `ringattn bench` run",
    )
    p.set_defaults(run=_run_plan)


def _calibrate() -> int:
    from .plan import CALIBRATION_PATH, calibrate, save_profile

    print("calibrating: kernel FLOP/s, gloo bandwidth/latency, transfer cost (about 1 min)")
    hardware = calibrate()
    path = save_profile(hardware, CALIBRATION_PATH)
    print(json.dumps(asdict(hardware), indent=2))
    print(f"saved to {path}; use `ringattn plan --hardware local`")
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .plan import (
        PROFILES,
        Config,
        across_nodes,
        best_configuration,
        load_hardware,
        paper_minimal_sequence,
        predict,
        validate,
        with_link,
    )

    if args.calibrate:
        return _calibrate()
    if args.paper_table:
        print("| hardware | peak TFLOPS | link GB/s | minimal tokens/device (6 F/B) | paper |")
        print("|---|---:|---:|---:|---:|")
        for name, paper in (("a100-nvlink", "6.2K"), ("a100-infiniband", "149.5K")):
            hw = PROFILES[name]
            minimal = paper_minimal_sequence(hw.peak_flops, hw.bandwidth)
            print(
                f"| {name} | {hw.peak_flops / 1e12:.0f} | {hw.bandwidth / 1e9:g} | "
                f"{minimal / 1e3:.1f}K | {paper} |"
            )
        return 0
    try:
        hardware = load_hardware(args.hardware)
    except ValueError as exc:
        print(f"ringattn plan: error: {exc}", file=sys.stderr)
        return 2
    if args.memory is not None:
        hardware = replace(hardware, memory=float(args.memory))
    if args.link_gbps is not None:
        latency = None if args.link_latency_us is None else args.link_latency_us * 1e-6
        try:
            hardware = with_link(hardware, args.link_gbps, latency, args.link_compute_share or 0.0)
        except ValueError as exc:
            print(f"ringattn plan: error: {exc}", file=sys.stderr)
            return 2
    elif args.link_latency_us is not None or args.link_compute_share is not None:
        print(
            "ringattn plan: error: --link-latency-us and --link-compute-share need --link-gbps",
            file=sys.stderr,
        )
        return 2
    one_device = hardware  # the parts of a 2-D configuration are priced link by link
    if args.gpus_per_node is not None:
        if args.link_gbps is not None:
            print("ringattn plan: error: give --link-gbps or --gpus-per-node", file=sys.stderr)
            return 2
        try:
            hardware = across_nodes(
                hardware, args.devices, args.gpus_per_node, args.inter_node_gbps
            )
        except ValueError as exc:
            print(f"ringattn plan: error: {exc}", file=sys.stderr)
            return 2
        if args.devices > args.gpus_per_node:
            nodes = -(-args.devices // args.gpus_per_node)
            print(
                f"the ring spans {nodes} nodes: every step waits for the inter-node link "
                f"({(hardware.link_bandwidth or hardware.bandwidth) * 8 / 1e9:g} Gbit/s per "
                "device)"
            )
    elif args.inter_node_gbps is not None or args.nics_per_node is not None:
        print(
            "ringattn plan: error: --inter-node-gbps and --nics-per-node need --gpus-per-node",
            file=sys.stderr,
        )
        return 2
    if args.nics_per_node is not None and args.nics_per_node < 1:
        print("ringattn plan: error: --nics-per-node must be >= 1", file=sys.stderr)
        return 2
    if args.validate:
        rows = json.loads(open(args.validate).read())["rows"]
        print("| tokens | p | layout | mask | predicted s | measured s | error |")
        print("|---:|---:|---|---|---:|---:|---:|")
        for r in validate(rows, hardware):
            c = r["config"]
            print(
                f"| {c.seq_len} | {c.devices} | {c.layout} | "
                f"{'causal' if c.causal else 'full'} | {r['predicted_s']:.3f} | "
                f"{r['measured_s']:.3f} | {100 * r['error']:+.0f}% |"
            )
        return 0
    config = Config(
        seq_len=args.seq_len,
        devices=args.devices,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        head_dim_v=args.head_dim_v,
        batch=args.batch,
        dtype=args.dtype,
        causal=args.causal,
        layout=args.layout,
        rotation=args.rotation,
        backward=not args.inference,
    )
    multiple = LAYOUTS[config.layout].seq_multiple(config.devices)
    if config.seq_len % multiple or config.heads % config.kv_heads:
        print(
            f"ringattn plan: error: --seq-len must be a multiple of {multiple} for this layout "
            "and --heads a multiple of --kv-heads",
            file=sys.stderr,
        )
        return 2
    print(predict(config, hardware).summary())
    best = best_configuration(config, hardware)
    print(
        f"best known configuration: {best.config.layout} layout, pass-"
        f"{best.config.rotation.upper()}, {best.total_s:.4f} s (efficiency "
        f"{best.efficiency:.2f})"
    )
    if args.gpus_per_node is not None or args.configurations:
        _print_ranking(
            config, one_device, args.gpus_per_node, args.inter_node_gbps, args.nics_per_node
        )
    print(f"hardware source: {hardware.source}")
    return 0


def _print_ranking(
    config, hardware, gpus_per_node: int | None, inter_node_gbps, nics_per_node: int | None
) -> None:
    """The node-aware ranking of Ulysses x ring configurations (:mod:`.cluster`)."""
    from .cluster import rank, ranking_table

    ranked = rank(config, hardware, gpus_per_node, inter_node_gbps, nics_per_node)
    nodes = "" if gpus_per_node is None else f", {gpus_per_node} per node"
    if nics_per_node is not None:
        nodes += f" sharing {nics_per_node} inter-node link(s)"
    print(f"\nconfigurations of {config.devices} devices{nodes}, fastest that fits first:")
    print(ranking_table(ranked))
    best = ranked[0]
    fits = "fits" if best.fits else "does not fit: nothing does"
    print(f"choice: {best.strategy} ({best.total_s:.4f} s per call, {fits}; {best.reason})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringattn",
        description="Exact ring attention (context parallelism) for PyTorch.",
        epilog=(
            "examples:\n"
            "  ringattn demo                          # 32K tokens on 4 local ranks, verified\n"
            "  ringattn demo --seq-len 64K --world-size 2 --layout striped\n"
            "  torchrun --nproc-per-node 4 -m ringattn demo   # the same under torchrun\n"
            "  ringattn bench --quick                 # ring vs one process, JSON/table/plots\n"
            "  ringattn plan --seq-len 1M --devices 64 --hardware h100-nvlink"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(sub)
    _bench_parser(sub)
    _plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
