"""A persistent pool of real ``torch.distributed`` processes for tests.

Starting a process that imports torch costs seconds, so each world size gets one pool of worker
processes for the whole session, joined in a real gloo process group through a FileStore. A test
sends a module-level function to every rank; each rank runs it with ``(rank, world_size, *args)``
and the results (or the first rank's traceback) come back. A job that fails or times out tears the
pool down, so the next job starts from a fresh group instead of a broken one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

JOB_TIMEOUT_S = 300.0
KILLED = "killed"
"""The result of a rank whose process died during a job run with ``deaths_expected``."""
GROUP_TIMEOUT_S = 60.0
FAILURE_GRACE_S = 10.0


class RemoteError(AssertionError):
    """A job raised on one or more ranks; the message holds each failing rank's traceback."""


def _worker(rank: int, world_size: int, device: str, store_path: str, jobs, results) -> None:
    import torch
    import torch.distributed as dist

    from ringattn.tools.launch import cuda_backend

    torch.set_num_threads(1)
    backend = "gloo"
    if device == "cuda":
        gpus = torch.cuda.device_count()
        backend = cuda_backend(world_size, gpus)
        torch.cuda.set_device(rank % gpus)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException as exc:
            results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class ProcessGroupPool:
    """``world_size`` worker processes in one group: gloo on CPU; with ``device="cuda"``, NCCL
    when there is a GPU per rank, else gloo with the ranks sharing the GPUs."""

    def __init__(self, world_size: int, device: str = "cpu"):
        self.world_size = world_size
        self.device = device
        self._procs: list = []
        self._store_path: str | None = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        fd, store_path = tempfile.mkstemp(prefix="ringattn-store-")
        os.close(fd)
        os.unlink(store_path)
        self._store_path = store_path
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    rank,
                    self.world_size,
                    self.device,
                    store_path,
                    self._jobs[rank],
                    self._results,
                ),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = JOB_TIMEOUT_S,
        deaths_expected: bool = False,
    ) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; return the per-rank results.

        With ``deaths_expected``, a rank whose process dies during the job (a fault test kills
        it) reports :data:`KILLED` instead of failing the job; the pool restarts on next use."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for jobs in self._jobs:
            jobs.put((fn, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=0.2)
            except queue.Empty:
                if deaths_expected:
                    for rank, proc in enumerate(self._procs):
                        if rank not in outcomes and not proc.is_alive():
                            outcomes[rank] = (True, KILLED)
                if time.monotonic() < deadline:
                    continue
                self.close()
                if not any(not ok for ok, _ in outcomes.values()):
                    missing = sorted(set(range(self.world_size)) - set(outcomes))
                    message = f"ranks {missing} did not finish within {timeout} s"
                    raise RemoteError(message) from None
                break
            outcomes[rank] = (ok, value)
            if not ok:  # the others may be stuck waiting for the failed rank
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        failures = {r: v for r, (ok, v) in outcomes.items() if not ok}
        if failures:
            self.close()
            raise RemoteError(
                "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items()))
            )
        return [outcomes[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
        self._procs = []
        if self._store_path is not None:  # the FileStore's file, left by the ranks
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._store_path)
            self._store_path = None
