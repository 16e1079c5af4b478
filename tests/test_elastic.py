"""Elastic recovery: a rank of the training recipe SIGKILLed mid-run under ``torchrun
--max-restarts 1``; torchrun restarts the workers, they resume from the last checkpoint, and the
job ends with the losses and parameters of an uninterrupted run.

The rendezvous is c10d on ``127.0.0.1:0`` (as ``ringattn.tools.launch.run_on_ranks``): the agent
binds a free port itself, so there is no port to pick and race for, and no dependence on how
``localhost`` resolves (``--standalone``). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives every
restart a fresh store: on the agent's shared one the restarted gloo ranks read the first round's
addresses and fail to connect (pytorch/pytorch#135712)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the recipe uses ringattn.integrations.hf.cp_loss
FSDPModule = pytest.importorskip("torch.distributed.fsdp").FSDPModule
if not hasattr(FSDPModule, "set_gradient_divide_factor"):
    pytest.skip("the recipe needs torch >= 2.8 (FSDP2 divide factor)", allow_module_level=True)
if not Path("/proc/self/environ").exists():
    pytest.skip("finds the worker to kill through /proc", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS, SEQ, BATCH, LR, CLIP = 6, 256, 1, 3e-3, 1e9  # no clipping: norms compare exactly
KILL_AT, KILL_RANK, TIMEOUT_S = 2, 1, 240
JOB_TAG = "RINGATTN_TEST_JOB"  # in the environment of torchrun and its workers, to find them


def _job_processes(tag: str) -> dict[int, dict[str, str]]:
    """{pid: environment} of the processes whose environment holds ``JOB_TAG=tag``: torchrun and
    its workers, wherever they are (torchrun starts each worker in a session of its own, out of
    reach of a ``killpg`` on torchrun's group, and orphans them when it dies)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # processes come and go while we look
                items = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                env = dict(item.split("=", 1) for item in items if "=" in item)
                if env.get(JOB_TAG) == tag:
                    found[int(entry.name)] = env
    return found


def _kill_job(agent: subprocess.Popen, tag: str) -> None:
    """SIGKILL torchrun first, so that it starts no more workers, then every worker left."""
    agent.kill()
    for pid in _job_processes(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_killed_rank_restarts_and_resumes_exactly(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "4",
        "--max-restarts",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",  # the agent's store binds a free port: no port to pick, no race for it
        str(EXAMPLES / "train_long_context.py"),
        *("--dp", "2", "--cp", "2", "--steps", str(STEPS), "--seq-len", str(SEQ)),
        *("--batch", str(BATCH), "--lr", str(LR), "--clip", str(CLIP)),
        *("--checkpoint", str(tmp_path / "ckpt.pt"), "--log-every", "1"),
    ]
    tag = str(tmp_path)
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", JOB_TAG: tag}
    job = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    watchdog = threading.Timer(TIMEOUT_S, _kill_job, (job, tag))
    watchdog.start()
    lines, victim, killed = [], None, False
    try:
        for line in job.stdout:
            lines.append(line)
            if line.startswith(f"step {KILL_AT - 1}/{STEPS} ") and victim is None:
                # found a step early, so that the kill lands as soon as step KILL_AT is printed
                (victim,) = (
                    pid
                    for pid, worker in _job_processes(tag).items()
                    if worker.get("RANK") == str(KILL_RANK)
                    and worker.get("TORCHELASTIC_RESTART_COUNT") == "0"
                )
            if line.startswith(f"step {KILL_AT}/{STEPS} ") and not killed:
                os.kill(victim, signal.SIGKILL)
                killed = True
        returncode = job.wait()
    finally:
        watchdog.cancel()
        _kill_job(job, tag)  # nothing left after a success; everything after a failure
        job.stdout.close()
    out = "".join(lines)
    assert killed, out
    assert returncode == 0, out
    # the step line comes before that step's checkpoint, whose predecessor is saved: the restart
    # resumes from step KILL_AT - 1 or later (the kill may land mid-step, mid-save or between)
    resumed = re.search(r"resumed from \S+ at step (\d+) \(restart 1\)", out)
    assert resumed and KILL_AT - 1 <= int(resumed[1]) < STEPS, out
    assert f"step {STEPS}/{STEPS} " in out, out
    assert not (tmp_path / "ckpt.pt.partial").exists()  # every save ends renamed into place

    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_long_context
    finally:
        sys.path.remove(str(EXAMPLES))
    reference = train_long_context.train_single_process(STEPS, SEQ, 2 * BATCH, LR, CLIP)
    # steps run before the kill and again after the restart count once: the losses come from
    # the checkpoint up to the step it holds, then from the resumed run
    losses = json.loads((tmp_path / "train-losses.json").read_text())
    assert losses == pytest.approx(reference["losses"], rel=1e-5)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert state["step"] == STEPS
    assert state["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5)
    for name, value in state["model"].items():
        torch.testing.assert_close(value, reference["params"][name], rtol=1e-4, atol=1e-4)
