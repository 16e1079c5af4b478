"""The examples run and do what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_generation_matches_single_process():
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "generate_long_context.py"),
            "--prompt-len",
            "300",
            "--new-tokens",
            "8",
            "--world-size",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical: True" in result.stdout


def test_hf_generation_matches_hf_generate():
    pytest.importorskip("transformers")
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "hf_generate.py"),
            "--prompt-len",
            "300",
            "--new-tokens",
            "6",
            "--world-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical: True" in result.stdout
