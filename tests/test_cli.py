"""The command line: help texts, argument errors, and a small end-to-end demo run."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from ringattn.tools.cli import build_parser, parse_tokens


def _ringattn(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ringattn", *args], capture_output=True, text=True, timeout=timeout
    )


def test_token_counts_accept_suffixes():
    assert parse_tokens("32K") == 32768
    assert parse_tokens("1M") == 1024**2
    assert parse_tokens("1000") == 1000


def test_help_lists_demo_flags():
    help_text = build_parser()._subparsers._group_actions[0].choices["demo"].format_help()
    for flag in (
        "--seq-len",
        "--world-size",
        "--heads",
        "--kv-heads",
        "--layout",
        "--dtype",
        "--device",
        "--verify",
        "--forward-only",
        "--samples",
    ):
        assert flag in help_text


def test_no_verify_still_means_none():
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    assert demo.parse_args(["--no-verify"]).verify == "none"
    assert demo.parse_args(["--verify", "sampled"]).verify == "sampled"
    assert demo.parse_args([]).verify == "auto"


def test_auto_verification_samples_when_one_process_is_too_slow_or_too_big():
    from ringattn.tools.demo import DemoConfig, choose_verification, single_process_bytes

    cfg = DemoConfig(seq_len=1024**2, heads=1, kv_heads=1, forward_only=True)
    assert single_process_bytes(cfg.workload, False) == 1024**2 * (4 * 64 * 4 + 4)
    method, reason = choose_verification(cfg, ring_seconds=10.0, available_bytes=2**40)
    assert method == "full" and "one process takes ~10 s" in reason
    method, reason = choose_verification(cfg, ring_seconds=900.0, available_bytes=2**40)
    assert method == "sampled" and "would take ~15 min" in reason
    method, reason = choose_verification(cfg, ring_seconds=10.0, available_bytes=2**30)
    assert method == "sampled" and "more than 50% of the 1.0 GiB available" in reason
    forced = replace(cfg, verify="full")
    assert choose_verification(forced, 900.0, 2**30)[0] == "full"


def test_bad_sequence_length_is_refused_before_launch():
    result = _ringattn("demo", "--seq-len", "1001", "--world-size", "2")
    assert result.returncode == 2
    assert "not divisible by 4" in result.stderr and "pad the sequence to 1004" in result.stderr


def test_bad_head_ratio_is_refused_before_launch():
    result = _ringattn("demo", "--heads", "6", "--kv-heads", "4")
    assert result.returncode == 2
    assert "--heads 6 must be a multiple of --kv-heads 4" in result.stderr


@pytest.mark.parametrize(
    "layout, options, method",
    [("zigzag", (), "full"), ("striped", ("--verify", "sampled", "--samples", "64"), "sampled")],
)
def test_small_demo_passes_and_reports(tmp_path, layout, options, method):
    """The default (a full check at this size) and the sampled check; the forward-only demo
    runs under torchrun below, sampled forward-only checks in test_verify.py."""
    report_path = tmp_path / "report.json"
    result = _ringattn(
        "demo", "--seq-len", "768", "--world-size", "3", "--layout", layout, *options,
        "--json", str(report_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "context scaling mem(1) / (p * mem(p))" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["world_size"] == 3
    assert report["verification"]["method"] == method
    assert tuple(report["max_relative_error"]) == ("out", "lse", "dq", "dk", "dv")
    for name, error in report["max_relative_error"].items():
        assert error <= report["tolerance"][name] == 1e-5
    ranks = report["ranks"]
    assert len(ranks) == 3 and all(r["peak_bytes"] > 0 for r in ranks)
    assert all(r["total_peak_bytes"] == r["peak_bytes"] + r["input_bytes"] for r in ranks)
    scaling = report["context_scaling"]
    if method == "full":
        assert "efficiency" in result.stdout and scaling["measured"]
        single = report["single_process"]["total_peak_bytes"]
    else:
        assert "64 sampled positions" in result.stdout and not scaling["measured"]
        assert report["verification"]["positions"] == 64
        single = scaling["single_process_min_bytes"]
    per_rank = max(r["total_peak_bytes"] for r in ranks)
    assert scaling["value"] == pytest.approx(single / (3 * per_rank))


def test_bf16_demo_is_judged_against_float32(tmp_path):
    report_path = tmp_path / "report.json"
    result = _ringattn(
        "demo", "--seq-len", "512", "--world-size", "2", "--dtype", "bfloat16",
        "--json", str(report_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "float32 single process" in result.stdout and "PASS" in result.stdout
    report = json.loads(report_path.read_text())
    single = report["single_process"]["errors"]
    for name, error in report["max_relative_error"].items():
        assert error <= max(2 * single[name], 1e-3) == report["tolerance"][name]


def test_bench_runs_a_tiny_grid_and_writes_reports(tmp_path):
    result = _ringattn(
        "bench",
        "--seq-lens",
        "256",
        "--world-sizes",
        "1,2",
        "--layouts",
        "zigzag,contiguous",
        "--mask",
        "causal",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert len(report["rows"]) == 4
    inputs = 256 * 3 * 8 * 64 * 4  # q, k, v, dout of 8 heads (MHA), fp32
    for row in report["rows"]:
        assert row["efficiency_total"] > 0 and min(row["peak_bytes"]) >= 0
        if row["world_size"] > 1:  # exactly one K/V block of KV heads per step
            assert row["step_bytes_max"] == row["step_bytes_min"] == row["step_bytes_minimum"]
        # peaks include the inputs: the whole sequence's for the single process, a shard's
        world = row["world_size"]
        assert row["single_total_peak_bytes"] == row["single_peak_bytes"] + 4 * inputs // 3
        totals = zip(row["total_peak_bytes"], row["peak_bytes"], strict=True)
        assert all(total == peak + 4 * inputs // 3 // world for total, peak in totals)
        scaling = row["single_total_peak_bytes"] / (world * max(row["total_peak_bytes"]))
        assert row["context_scaling"] == pytest.approx(scaling)
    markdown = (tmp_path / "bench.md").read_text()
    assert markdown.startswith("Machine:") and "context scaling" in markdown
    assert (tmp_path / "efficiency.png").exists() and (tmp_path / "memory.png").exists()


def test_bench_efficiency_counts_gpus_but_not_shared_cores():
    """On CPU the ranks share the single process's cores; on CUDA each rank adds a GPU."""
    from ringattn.tools.bench import _row
    from ringattn.tools.workload import Workload

    ranks = [
        {"forward_s": 1.0, "backward_s": 2.0, "compute_s": 3.0, "wait_s": 0.0, "peak_bytes": 1}
        | {"forward_step_bytes": [8], "total_peak_bytes": 4}
    ] * 4
    single = {"forward_s": 4.0, "total_s": 12.0, "peak_bytes": 1, "total_peak_bytes": 12}
    workload = Workload(seq_len=64, heads=2, kv_heads=1)
    assert _row(workload, 4, ranks, single, "cpu")["efficiency_total"] == 4.0
    assert _row(workload, 4, ranks, single, "cuda")["efficiency_total"] == 1.0
    assert _row(workload, 4, ranks, single, "cpu")["context_scaling"] == 12 / (4 * 4)


def test_bench_help_describes_max_context():
    help_text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    for flag in ("--max-context", "--memory", "--inference", "--resolution", "--world-sizes"):
        assert flag in help_text
    assert "(48MiB, heads 4:2, d=64, float32, causal zigzag, p=1,2,4) takes about 3 minutes" in (
        " ".join(help_text.split())
    )  # the default run and its time


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "64MiB"], "--memory and --inference need --max-context"),
        (["--max-context", "--seq-lens", "4K"], "--seq-lens do(es) not apply"),
        (["--max-context", "--mask", "both"], "--mask both do(es) not apply"),
        (["--max-context", "--resolution", "2"], "--resolution must be a fraction"),
    ],
)
def test_bench_refuses_flags_that_do_not_apply(capsys, args, message):
    from ringattn.tools.cli import main

    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_max_context_parses_its_flags(monkeypatch, tmp_path):
    """The flags reach the search unchanged; the run itself is tested in test_max_context.py."""
    import ringattn.tools.max_context as max_context
    from ringattn.tools.cli import main

    seen = {}

    def fake_run(search, out_dir):
        seen["search"] = search
        (out_dir / "max_context.md").write_text("table")
        return []

    monkeypatch.setattr(max_context, "run_max_context", fake_run)
    args = ["bench", "--max-context", "--memory", "2GiB", "--world-sizes", "2,3", "--heads"]
    args += ["8:2", "--inference", "--mask", "full", "--out", str(tmp_path)]
    assert main(args) == 0
    search = seen["search"]
    assert search.budget_bytes == 2 * 2**30 and search.world_sizes == [2, 3]
    assert search.heads == [(8, 2)] and search.inference and not search.causal
    assert search.layouts == ["zigzag"] and search.dtypes == ["float32"]


def test_bench_memory_must_be_a_size(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["bench", "--max-context", "--memory", "lots"])
    assert exited.value.code == 2
    assert "invalid memory_size value: 'lots'" in capsys.readouterr().err


def test_bench_on_cuda_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _ringattn("bench", "--device", "cuda", "--quick")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_plan_prints_prediction_and_best_configuration(capsys):
    from ringattn.tools.cli import main

    assert main(["plan", "--seq-len", "1M", "--devices", "64", "--hardware", "h100-nvlink"]) == 0
    out = capsys.readouterr().out
    assert "1,048,576 tokens on 64 x h100-nvlink" in out and "best known configuration" in out
    assert main(["plan", "--paper-table"]) == 0
    assert "149.8K | 149.5K" in capsys.readouterr().out


def test_plan_memory_overrides_the_profile(capsys):
    from ringattn.tools.cli import main
    from ringattn.tools.plan import Config, longest_sequence

    args = ["plan", "--hardware", "cpu-2core", "--devices", "4", "--seq-len", "32K"]
    args += ["--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--dtype", "float32"]
    assert main([*args, "--memory", "64MiB"]) == 0
    config = Config(seq_len=0, devices=4, heads=4, kv_heads=2, head_dim=64, dtype="float32")
    longest = longest_sequence(config, 64 * 2**20)
    assert f"fits 64.0 MiB per device: {longest:,} tokens" in capsys.readouterr().out
    assert main(args) == 0  # the profile's 24 GiB
    assert "fits 24.0 GiB per device" in capsys.readouterr().out


def test_plan_link_options(capsys):
    from ringattn.tools.cli import main

    args = ["plan", "--hardware", "cpu-2core", "--devices", "2", "--seq-len", "8K"]
    assert main([*args, "--link-gbps", "0.3", "--link-latency-us", "500"]) == 0
    out = capsys.readouterr().out
    assert "2 x cpu-2core over a 0.3 Gbit/s link" in out and "--link-gbps" in out
    assert main([*args, "--link-latency-us", "500"]) == 2
    assert "need --link-gbps" in capsys.readouterr().err
    assert main([*args, "--link-gbps", "1", "--link-compute-share", "0.16"]) == 0
    assert "compute share 0.16" in capsys.readouterr().out
    assert main([*args, "--link-gbps", "-1"]) == 2
    assert "positive rate" in capsys.readouterr().err
    assert main([*args, "--link-gbps", "nan"]) == 2
    assert "positive rate" in capsys.readouterr().err
    assert main([*args, "--link-gbps", "1", "--link-latency-us", "-5"]) == 2
    assert "latency must be >= 0" in capsys.readouterr().err


def test_plan_gpus_per_node(capsys):
    from ringattn.tools.cli import main

    args = ["plan", "--hardware", "h100-nvlink", "--devices", "64", "--kv-heads", "32"]
    assert main([*args, "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "the ring spans 8 nodes" in out and "400 Gbit/s" in out and "communication-bound" in out
    assert "configurations of 64 devices, 8 per node" in out and "choice: ulysses" in out
    assert main([*args, "--gpus-per-node", "64"]) == 0
    assert "spans" not in capsys.readouterr().out
    assert main([*args, "--inter-node-gbps", "100"]) == 2
    assert "need --gpus-per-node" in capsys.readouterr().err
    assert main([*args, "--gpus-per-node", "8", "--nics-per-node", "1"]) == 0
    assert "8 per node sharing 1 inter-node link(s)" in capsys.readouterr().out
    assert main([*args, "--gpus-per-node", "8", "--nics-per-node", "0"]) == 2
    assert "--nics-per-node must be >= 1" in capsys.readouterr().err
    assert main(["plan", "--hardware", "cpu-2core", "--devices", "4", "--gpus-per-node", "2"]) == 2
    assert "--inter-node-gbps" in capsys.readouterr().err


def test_plan_ranks_configurations_on_one_node(capsys):
    from ringattn.tools.cli import main

    args = ["plan", "--hardware", "cpu-2core", "--devices", "4", "--seq-len", "16K"]
    assert main([*args, "--heads", "8", "--kv-heads", "8", "--configurations"]) == 0
    out = capsys.readouterr().out
    for name in ("ulysses 4 x ring 1", "ulysses 2 x ring 2", "ulysses 1 x ring 4", "all-gather"):
        assert name in out, name


def test_plan_refuses_unknown_hardware(capsys):
    from ringattn.tools.cli import main

    assert main(["plan", "--hardware", "tpu-v9"]) == 2
    assert "unknown hardware 'tpu-v9'" in capsys.readouterr().err


def test_demo_runs_under_torchrun(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ringattn",
            "demo",
            "--seq-len",
            "512",
            "--forward-only",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 ranks" in result.stdout and "forward only (inference)" in result.stdout
    assert "max error vs single process (relative to max |ref|): out" in result.stdout
    assert "dq" not in result.stdout and "PASS" in result.stdout
