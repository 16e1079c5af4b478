"""The command line: help texts, argument errors, and a small end-to-end demo run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ringattn.cli import build_parser, parse_tokens


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
    ):
        assert flag in help_text


def test_bad_sequence_length_is_refused_before_launch():
    result = _ringattn("demo", "--seq-len", "1001", "--world-size", "2")
    assert result.returncode == 2
    assert "not divisible by 4" in result.stderr and "pad the sequence to 1004" in result.stderr


def test_bad_head_ratio_is_refused_before_launch():
    result = _ringattn("demo", "--heads", "6", "--kv-heads", "4")
    assert result.returncode == 2
    assert "--heads 6 must be a multiple of --kv-heads 4" in result.stderr


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_small_demo_passes_and_reports(tmp_path, layout):
    report_path = tmp_path / "report.json"
    result = _ringattn(
        "demo",
        "--seq-len",
        "768",
        "--world-size",
        "3",
        "--layout",
        layout,
        "--json",
        str(report_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "efficiency" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["world_size"] == 3
    for name, error in report["max_relative_error"].items():
        assert error <= report["tolerance"][name]
    assert len(report["ranks"]) == 3 and all(r["peak_bytes"] > 0 for r in report["ranks"])


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
    for row in report["rows"]:
        assert row["efficiency_total"] > 0 and min(row["peak_bytes"]) >= 0
        if row["world_size"] > 1:  # exactly one K/V block of KV heads per step
            assert row["step_bytes_max"] == row["step_bytes_min"] == row["step_bytes_minimum"]
    assert (tmp_path / "bench.md").read_text().startswith("Machine:")
    assert (tmp_path / "efficiency.png").exists() and (tmp_path / "memory.png").exists()


def test_bench_efficiency_counts_gpus_but_not_shared_cores():
    """On CPU the ranks share the single process's cores; on CUDA each rank adds a GPU."""
    from ringattn.bench import _row
    from ringattn.workload import Workload

    ranks = [
        {"forward_s": 1.0, "backward_s": 2.0, "compute_s": 3.0, "wait_s": 0.0, "peak_bytes": 1}
        | {"forward_step_bytes": [8]}
    ] * 4
    single = {"forward_s": 4.0, "total_s": 12.0, "peak_bytes": 1}
    workload = Workload(seq_len=64, heads=2, kv_heads=1)
    assert _row(workload, 4, ranks, single, "cpu")["efficiency_total"] == 4.0
    assert _row(workload, 4, ranks, single, "cuda")["efficiency_total"] == 1.0


def test_bench_on_cuda_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _ringattn("bench", "--device", "cuda", "--quick")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_plan_prints_prediction_and_best_configuration(capsys):
    from ringattn.cli import main

    assert main(["plan", "--seq-len", "1M", "--devices", "64", "--hardware", "h100-nvlink"]) == 0
    out = capsys.readouterr().out
    assert "1,048,576 tokens on 64 x h100-nvlink" in out and "best known configuration" in out
    assert main(["plan", "--paper-table"]) == 0
    assert "149.8K | 149.5K" in capsys.readouterr().out


def test_plan_refuses_unknown_hardware(capsys):
    from ringattn.cli import main

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
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 ranks" in result.stdout and "PASS" in result.stdout
