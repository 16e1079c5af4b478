"""Jobs across simulated hosts: network namespaces joined through a private switch, each one a
node of a ``torchrun --nnodes N`` job (``scripts/multihost.py``). Run by ``make test-multihost``
(root and Linux network namespaces needed; skipped with the reason otherwise).

The ring crosses hosts on every run: the demo (c10d rendezvous), the exactness suite on 2 hosts x
2 ranks (static rendezvous) and on 3 hosts x 1 rank (an odd ring, c10d), and the training
example (dp x cp) equal to single-process training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import multihost  # noqa: E402

pytestmark = pytest.mark.multihost


@pytest.fixture(autouse=True)
def _hosts_possible():
    """Skip (with the reason) where hosts cannot be simulated; tried once, when first needed."""
    reason = multihost.unavailable_reason()
    if reason:
        pytest.skip(f"cannot simulate hosts: {reason}")


def _passed(runs) -> str:
    """Every host's output, after asserting every host's torchrun succeeded."""
    text = "\n".join(f"--- host {r.host} (rc {r.returncode}) ---\n{r.output}" for r in runs)
    assert all(r.returncode == 0 for r in runs), text[-6000:]
    return text


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def two_hosts():
    with multihost.Hosts(2) as hosts:
        yield hosts


def test_demo_passes_across_hosts_with_c10d_rendezvous(two_hosts):
    runs = two_hosts.torchrun(["-m", "ringattn", "demo", "--seq-len", "8K"], 2, "c10d", 300)
    text = _passed(runs)
    assert "4 ranks" in text and "PASS" in text


def test_exact_across_two_hosts_with_static_rendezvous(two_hosts):
    runs = two_hosts.torchrun([str(ROOT / "tests" / "multihost_job.py")], 2, "static", 400)
    text = _passed(runs)
    assert sum(f"rank {r}/4: EXACT" in text for r in range(4)) == 4


def test_exact_on_an_odd_ring_of_three_hosts():
    with multihost.Hosts(3) as hosts:
        runs = hosts.torchrun([str(ROOT / "tests" / "multihost_job.py")], 1, "c10d", 400)
    text = _passed(runs)
    assert sum(f"rank {r}/3: EXACT" in text for r in range(3)) == 3


@pytest.mark.parametrize("dp, cp", [(2, 2), (1, 4)], ids=["dp-across-hosts", "ring-across-hosts"])
def test_training_across_hosts_equals_single_process(two_hosts, tmp_path, dp, cp):
    """2 hosts x 2 ranks, FSDP over the 2-D mesh: dp=2 x cp=2 (each host one cp ring, the dp
    reductions cross hosts) and dp=1 x cp=4 (the ring crosses hosts), global batch 2."""
    steps, seq, lr, clip = 3, 256, 3e-3, 1e9
    example = ROOT / "examples" / "train_long_context.py"
    args = ["--dp", str(dp), "--cp", str(cp), "--batch", str(2 // dp), "--steps", str(steps),
            "--seq-len", str(seq), "--lr", str(lr), "--clip", str(clip), "--checkpoint",
            str(tmp_path / "ckpt.pt")]  # fmt: skip
    _passed(two_hosts.torchrun([str(example), *args], 2, "c10d", 300, cwd=tmp_path))
    sys.path.insert(0, str(example.parent))
    try:
        import train_long_context
    finally:
        sys.path.remove(str(example.parent))
    reference = train_long_context.train_single_process(steps, seq, 2, lr, clip)
    losses = json.loads((tmp_path / "train-losses.json").read_text())
    assert losses == pytest.approx(reference["losses"], rel=1e-5)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    for name, value in state["model"].items():
        torch.testing.assert_close(value, reference["params"][name], rtol=1e-4, atol=1e-4)


def test_hosts_are_removed_when_the_harness_is_terminated(tmp_path):
    """SIGTERM (a CI timeout, `kill`) to a script holding hosts: they are removed all the same."""
    script = tmp_path / "hold.py"
    script.write_text(
        f"import sys, time\nsys.path.insert(0, {str(ROOT / 'scripts')!r})\nimport multihost\n"
        "try:\n"
        "    with multihost.Hosts(2) as hosts:\n"
        "        hosts.popen(1, ['sleep', '600'])\n"
        "        print(' '.join(hosts.namespaces), flush=True)\n"
        "        time.sleep(600)\n"
        "except multihost.Terminated:\n"
        "    sys.exit(143)\n"
    )
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        made = holder.stdout.readline().split()
        assert len(made) == 2 and set(made) <= _namespaces()
        holder.terminate()
        assert holder.wait(timeout=30) == 128 + 15
    finally:
        holder.kill()
    assert not set(made) & _namespaces()


def test_hosts_are_removed_even_on_failure():
    with pytest.raises(RuntimeError, match="boom"):
        with multihost.Hosts(2, rate="100mbit") as hosts:
            made = set(hosts.namespaces) | {hosts.switch}
            assert made <= _namespaces()
            hosts.popen(0, ["sleep", "600"])
            # a process in a session of its own, as torchrun starts its workers
            hosts.popen(1, ["setsid", "sleep", "6071"])
            raise RuntimeError("boom")
    assert not made & _namespaces()
    assert not _processes_running("sleep\x006071"), "a process outlived its host"


def _processes_running(cmdline: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().decode(errors="replace").startswith(cmdline):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found
