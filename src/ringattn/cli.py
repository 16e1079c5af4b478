"""Command line: ``ringattn demo`` (and later verbs). Run ``ringattn --help``."""

from __future__ import annotations

import argparse
import sys

from .layout import LAYOUTS


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


def _demo_parser(sub) -> None:
    from .demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="ring attention over a long sequence on local processes, verified and measured",
        description=(
            "Runs causal ring attention forward+backward over a long sequence on several local "
            "processes (or the ranks of a torchrun job), checks every rank's output, log-sum-exp "
            "and gradients against a single-process run of the same kernel, and reports time, "
            "tokens/s, per-rank compute/wait and per-rank peak memory."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--heads", type=int, default=d.heads, help="query heads")
    p.add_argument(
        "--kv-heads", type=int, default=d.kv_heads, help="key/value heads (GQA when fewer)"
    )
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default=d.layout)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=d.dtype
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument(
        "--no-causal", dest="causal", action="store_false", help="full (non-causal) attention"
    )
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs (median reported)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per rank (default: cores / local ranks)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the single-process check"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringattn",
        description="Exact ring attention (context parallelism) for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
