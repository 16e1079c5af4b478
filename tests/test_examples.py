"""The examples run and do what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run_example(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_generation_matches_single_process():
    out = _run_example(
        "generate_long_context.py", "--prompt-len", "300", "--new-tokens", "8", "--world-size", "3"
    )
    assert "identical: True" in out


def test_hf_generation_matches_hf_generate():
    pytest.importorskip("transformers")
    out = _run_example(
        "hf_generate.py", "--prompt-len", "300", "--new-tokens", "6", "--world-size", "2"
    )
    assert "identical: True" in out
