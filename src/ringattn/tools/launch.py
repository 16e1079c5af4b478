"""Run a function on ``p`` ranks: under ``torchrun`` as they are, or by starting local workers
through PyTorch's elastic launcher (the API behind ``torchrun``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run_on_ranks(fn: Callable[..., Any], args: tuple, nproc: int) -> dict[int, Any]:
    """``fn(*args)`` on every rank; returns ``{local_rank: result}`` (only this process's result
    when already running under ``torchrun``)."""
    if launched_by_torchrun():
        return {int(os.environ.get("LOCAL_RANK", 0)): fn(*args)}
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"ringattn-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    return elastic_launch(config, fn)(*args)


def cuda_backend(local_world_size: int, gpus: int) -> str:
    """NCCL when every local rank has a GPU of its own; otherwise gloo, which NCCL's one-rank-
    per-GPU rule leaves as the only way for several ranks to share a GPU (the ring then moves
    blocks through host memory: correct, for testing, not fast). Each node decides for itself;
    set ``RINGATTN_CUDA_BACKEND`` (``nccl`` or ``gloo``) where nodes differ in GPU count."""
    chosen = os.environ.get("RINGATTN_CUDA_BACKEND")
    if chosen:
        if chosen not in ("nccl", "gloo"):
            raise ValueError(f"RINGATTN_CUDA_BACKEND must be 'nccl' or 'gloo', got {chosen!r}")
        return chosen
    return "nccl" if gpus >= local_world_size else "gloo"


def init_worker(device: str, timeout_s: float = 600.0) -> torch.device:
    """Join the process group set up by the launcher; returns this rank's device."""
    timeout = timedelta(seconds=timeout_s)
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
        backend = cuda_backend(local_world, gpus)
        if backend == "gloo" and local_rank == 0:
            print(
                f"[ringattn] {local_world} ranks share {gpus} GPU(s); NCCL needs one GPU per "
                "rank, so the ring runs over gloo through host memory (correct, not fast)",
                flush=True,
            )
        torch.cuda.set_device(local_rank % gpus)
        dist.init_process_group(backend, timeout=timeout)
        return torch.device("cuda", local_rank % gpus)
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


def cpu_threads_per_rank(requested: int | None = None) -> int:
    """``requested``, or the machine's cores divided among the ranks on this node."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (cores or 1) // local_world)
