"""Simulated hosts on one Linux machine: network namespaces joined through a private switch, each
running ``torchrun`` as one node of a multi-node job.

    sudo python scripts/multihost.py --hosts 2 --nproc-per-node 2 -- -m ringattn demo --seq-len 8K
    sudo python scripts/multihost.py --hosts 2 --rate 200mbit -- -m ringattn bench --quick
    sudo python scripts/multihost.py --hosts 3 --nproc-per-node 1 --rendezvous static -- job.py

Each host is a network namespace with its own network stack: loopback, and one veth whose other
end sits on a bridge inside a separate "switch" namespace; the host's address (10.213.0.N/24)
lives only on that veth. Nothing is created in, or addressed from, the machine's own namespace;
everything is removed on exit, also on failure or Ctrl-C. ``--rate`` shapes every host's outgoing
link with a token-bucket filter (``tc tbf``): traffic between ranks of one host stays on its
loopback (the "NVLink" of this simulation), traffic between hosts crosses the shaped veths (the
"InfiniBand"). The hosts share the machine's CPUs and file system.

Rendezvous across these hosts (and what a real cluster needs):
- ``static``: ``--master-addr`` host 0's address, ``--node-rank`` per host. Always works.
- ``c10d``: works when each agent can tell that the endpoint is itself, and tells the others an
  address they can reach. The namespaces share the machine's hostname, which resolves to
  127.0.0.1, so by default (1) no agent recognises the endpoint's address as its own and none
  hosts the rendezvous store: every agent waits to connect to a store nobody serves (the hang
  seen without the fix), and (2) the workers are told to meet at the first agent's hostname,
  which resolves to each host's own loopback. The harness passes ``--rdzv-conf is_host=1`` to the
  endpoint's host (``0`` to the others) and ``--local-addr`` (the host's veth address) to every
  agent. On a real cluster whose hostnames resolve to the hosts' reachable addresses neither is
  needed; where they do not (containers, several NICs), pass the same two options.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SUBNET = "10.213.0"  # private; exists only inside the namespaces this script creates
INTERFACE = "veth0"  # every host's link to the switch has this name inside its namespace
FAILED_HOST_GRACE_S = 30.0  # how long the other hosts may take to fail after one has


@functools.cache
def unavailable_reason() -> str | None:
    """Why simulated hosts cannot be made here (None when they can): tried once per process by
    making two of them, with a shaped link."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not installed"
    try:
        with Hosts(2, rate="100mbit"):
            pass
    except RuntimeError as exc:
        return str(exc)
    return None


def _ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", *args] if namespace is None else ["ip", "-n", namespace, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")


@dataclass
class HostRun:
    """One host's torchrun: its return code and its output (stdout and stderr, interleaved)."""

    host: int
    returncode: int
    output: str


class Hosts:
    """``count`` simulated hosts; a context manager that creates them and always removes them.

    ``rate`` (a tc rate such as ``"500mbit"``, or None) shapes each host's outgoing link."""

    def __init__(self, count: int, rate: str | None = None) -> None:
        if count < 1:
            raise ValueError(f"need at least one host, got {count}")
        self.count = count
        tag = uuid.uuid4().hex[:6]
        self.switch = f"ra-{tag}-sw"
        self.namespaces = [f"ra-{tag}-h{i}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]
        self.rate = rate
        self._created: list[str] = []
        self._running: list[subprocess.Popen] = []
        self._jobs = 0  # each job's rendezvous gets a port of its own
        self._hosts: dict[int, int] = {}  # pid of a process started by popen -> its host
        self._handles_sigterm = False
        self._previous_sigterm: Any = signal.SIG_DFL

    def __enter__(self) -> Hosts:
        # SIGTERM (a CI timeout, `kill`) unwinds through __exit__ like Ctrl-C does
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
            self._handles_sigterm = True
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        for namespace in (self.switch, *self.namespaces):
            _ip("netns", "add", namespace)
            self._created.append(namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)
        _ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
        _ip("link", "set", "br0", "up", namespace=self.switch)
        for i, (namespace, address) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            port = f"port{i}"
            # created inside the host's namespace, so no interface ever appears in the machine's
            _ip("link", "add", INTERFACE, "type", "veth", "peer", "name", port, "netns",
                self.switch, namespace=namespace)  # fmt: skip
            _ip("link", "set", port, "master", "br0", namespace=self.switch)
            _ip("link", "set", port, "up", namespace=self.switch)
            _ip("addr", "add", f"{address}/24", "dev", INTERFACE, namespace=namespace)
            _ip("link", "set", INTERFACE, "up", namespace=namespace)
        if self.rate:
            self.shape(self.rate)

    def shape(self, rate: str | None) -> None:
        """Limit every host's outgoing link to ``rate`` (tc syntax, e.g. ``"1gbit"``); None
        removes the limit."""
        for namespace in self.namespaces:
            subprocess.run(
                ["tc", "-n", namespace, "qdisc", "del", "dev", INTERFACE, "root"],
                capture_output=True,
            )
            if rate:
                # burst: 1 ms of traffic (at least 16 KiB): a link that starts at its rate, not
                # with a bucket's worth at line speed; a deep queue (1 s) instead of drops keeps
                # TCP smooth
                burst = max(16 * 1024, int(_bits_per_second(rate) / 8 * 0.001))
                command = ["tc", "-n", namespace, "qdisc", "add", "dev", INTERFACE, "root",
                           "tbf", "rate", rate, "burst", str(burst), "latency", "1s"]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
        self.rate = rate

    def close(self) -> None:
        """Stop every process started here, then delete the namespaces (and with them their
        veths, bridge and qdiscs). Signals wait until it is done."""
        held = {}
        if threading.current_thread() is threading.main_thread():
            held = {
                sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
            }
        try:
            self._stop(self._running)
            self._running.clear()
            left = []
            for namespace in reversed(self._created):
                _kill_inside(namespace)
                deleted = subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
                if deleted.returncode != 0:
                    left.append(namespace)
            self._created.clear()
            if left:
                print(f"multihost: could not delete namespaces {left}", file=sys.stderr)
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)
            if self._handles_sigterm:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._handles_sigterm = False

    def _stop(self, processes: Sequence[subprocess.Popen]) -> None:
        """Kill ``processes`` (started by :meth:`popen`) and everything in their hosts: torchrun
        starts each worker in a session of its own, out of reach of its agent's process group."""
        for process in processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
            if process.stdout is not None:
                process.stdout.close()
        for host in {self._hosts[process.pid] for process in processes}:
            _kill_inside(self.namespaces[host])

    def popen(
        self,
        host: int,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.Popen:
        """Start ``command`` inside host ``host``'s namespace (its own process group)."""
        environment = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": INTERFACE}
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespaces[host], *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
            cwd=cwd,
            start_new_session=True,
        )
        self._running.append(process)
        self._hosts[process.pid] = host
        return process

    def torchrun_command(
        self,
        host: int,
        target: Sequence[str],
        nproc_per_node: int,
        rendezvous: str = "c10d",
        port: int = 29400,
        max_restarts: int = 0,
    ) -> list[str]:
        """The ``torchrun`` command line host ``host`` runs to join the job."""
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.count),
                   "--nproc-per-node", str(nproc_per_node), "--max-restarts", str(max_restarts),
                   "--local-addr", self.addresses[host]]  # fmt: skip
        if rendezvous == "static":
            command += ["--node-rank", str(host), "--master-addr", self.addresses[0],
                        "--master-port", str(port)]  # fmt: skip
        elif rendezvous == "c10d":
            endpoint = f"{self.addresses[0]}:{port}"
            command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id",
                        self.switch, "--rdzv-conf", f"is_host={int(host == 0)}"]  # fmt: skip
        else:
            raise ValueError(f"rendezvous must be 'static' or 'c10d', got {rendezvous!r}")
        return [*command, *target]

    def torchrun(
        self,
        target: Sequence[str],
        nproc_per_node: int = 2,
        rendezvous: str = "c10d",
        timeout: float = 600.0,
        env: dict[str, str] | None = None,
        echo: bool = False,
        cwd: str | os.PathLike | None = None,
    ) -> list[HostRun]:
        """Run ``torchrun [options] *target`` on every host as one job, from directory ``cwd``;
        wait at most ``timeout`` seconds, and at most ``FAILED_HOST_GRACE_S`` after a host has
        failed (the others could wait for it for the process group's whole timeout); then every
        host's processes are killed (return code -9). ``echo`` prints each host's output as it
        comes, prefixed with the host."""
        port = 29400 + self._jobs  # the namespaces are new: nothing else listens in them
        self._jobs += 1
        processes = [
            self.popen(
                i, self.torchrun_command(i, target, nproc_per_node, rendezvous, port), env, cwd
            )
            for i in range(self.count)
        ]
        outputs: list[list[str]] = [[] for _ in processes]

        def drain(i: int) -> None:
            for line in processes[i].stdout:
                outputs[i].append(line)
                if echo:
                    print(f"[host {i}] {line}", end="", flush=True)

        readers = [
            threading.Thread(target=drain, args=(i,), daemon=True) for i in range(self.count)
        ]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            if any(p.poll() not in (None, 0) for p in processes):
                deadline = min(deadline, time.monotonic() + FAILED_HOST_GRACE_S)
            time.sleep(0.1)
        self._stop(processes)
        for reader in readers:
            reader.join(timeout=5)
        return [HostRun(i, p.returncode, "".join(outputs[i])) for i, p in enumerate(processes)]


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process left in ``namespace``: torchrun starts each worker in a session of
    its own, so killing the agent's process group can leave workers behind."""
    for _ in range(10):
        listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        pids = [int(pid) for pid in listed.stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that everything unwinds (pytest stops the session, not
    just the current test) and the hosts are removed."""


def _interrupt_on_sigterm(signum: int, frame) -> None:
    raise Terminated(f"signal {signum}")


def _bits_per_second(rate: str) -> float:
    """A tc rate (``"500mbit"``, ``"1gbit"``, ``"100kbit"``, ``"80mbps"`` = bytes) in bits/s."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "bit": 1}
    text = rate.strip().lower()
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Everything after `--` is passed to torchrun as its training script and arguments.",
    )
    parser.add_argument("--hosts", type=int, default=2, help="simulated hosts (nodes)")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="ranks on each host")
    parser.add_argument("--rendezvous", choices=("c10d", "static"), default="c10d")
    parser.add_argument("--rate", default=None, help="shape each host's link, e.g. 500mbit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before all is killed")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="-- script.py args...")
    args = parser.parse_args()
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    if not target:
        parser.error("give the torchrun target after `--`, e.g. -- -m ringattn demo")
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"cannot simulate hosts here: {reason}")
    try:
        with Hosts(args.hosts, rate=args.rate) as hosts:
            runs = hosts.torchrun(
                target, args.nproc_per_node, args.rendezvous, timeout=args.timeout, echo=True
            )
    except Terminated:
        raise SystemExit(128 + signal.SIGTERM) from None
    failed = [run.host for run in runs if run.returncode != 0]
    if failed:
        raise SystemExit(f"hosts {failed} failed (return codes {[r.returncode for r in runs]})")


if __name__ == "__main__":
    main()
