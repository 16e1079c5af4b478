"""ringattn against the public ring-attention implementations that run here, in one run.

Every implementation gets the same inputs on the same ranks: its error against a float64
single-device reference (output and the three gradients, on a short sequence), then its forward
and forward+backward time on a long one (median of repeats after a warm-up, slowest rank).

- ringattn (zigzag and contiguous layouts);
- lucidrains' ring-attention-pytorch (``ring_flash_attn``, contiguous shards), when installed
  (``pip install ring-attention-pytorch``; it is not a dependency of this project);
- PyTorch's ``context_parallel`` is tried and reported as not runnable when it refuses the CPU.

    python benchmarks/compare_public.py --seq-len 16K --world-size 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn.tools.cli import parse_tokens
from ringattn.tools.launch import cpu_threads_per_rank, init_worker, run_on_ranks

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _ringattn(layout: str) -> tuple[str, Attention]:
    def attend(q, k, v):
        return ringattn.ring_attention(q, k, v, causal=True, layout=layout)

    return layout, attend


def _lucidrains() -> tuple[str, Attention] | None:
    try:
        from ring_attention_pytorch import ring_flash_attn
    except ImportError:
        return None

    def attend(q, k, v):
        return ring_flash_attn(q, k, v, causal=True, ring_reduce_col=True)

    return "contiguous", attend


def _native_context_parallel_error() -> str:
    """Why PyTorch's own context_parallel does not run here ("" if it does)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    q, k, v = (torch.randn(1, 2, 8 * dist.get_world_size(), 16) for _ in range(3))
    try:
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    except Exception as exc:  # any refusal is the finding
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return ""


def _inputs(seq_len: int, heads: int, dim: int, layout: str, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    full = [torch.randn(1, seq_len, heads, dim, generator=gen, dtype=torch.float64) for _ in "qkvd"]
    local = [ringattn.shard(t, layout).to(dtype) for t in full]
    return full, local


def _errors(attend: Attention, layout: str, seq_len: int, heads: int, dim: int) -> dict:
    """Relative errors (max |err| / max |ref|) of out, dq, dk, dv against float64."""
    full, local = _inputs(seq_len, heads, dim, layout, seed=1)
    q, k, v, dout = (t.requires_grad_() if i < 3 else t for i, t in enumerate(full))
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    ref = ref.transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    leaves = [t.requires_grad_() for t in local[:3]]
    out = attend(*leaves)
    grads = torch.autograd.grad(out, leaves, local[3])
    errors = {}
    pairs = zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True)
    for name, got, want in pairs:
        want = ringattn.shard(want.detach(), layout)
        errors[name] = ((got.double() - want).abs().max() / want.abs().max()).item()
    return errors


def _times(attend: Attention, layout: str, args) -> tuple[float, float]:
    _, local = _inputs(args.seq_len, args.heads, args.head_dim, layout, seed=2)
    leaves = [t.requires_grad_() for t in local[:3]]
    warm = [t[:, :256].detach().requires_grad_() for t in local[:3]]
    torch.autograd.grad(attend(*warm), warm, torch.ones_like(warm[0]))
    forward, total = [], []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        out = attend(*leaves)
        t1 = time.perf_counter()
        torch.autograd.grad(out, leaves, local[3])
        t2 = time.perf_counter()
        forward.append(t1 - t0)
        total.append(t2 - t0)
    return statistics.median(forward), statistics.median(total)


def _worker(args) -> dict | None:
    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    rank, world = dist.get_rank(), dist.get_world_size()
    candidates = {
        "ringattn zigzag": _ringattn("zigzag"),
        "ringattn contiguous": _ringattn("contiguous"),
        "lucidrains ring-attention-pytorch": _lucidrains(),
    }
    results: dict[str, dict] = {}
    for name, entry in candidates.items():
        if entry is None:
            results[name] = {"skipped": "not installed (pip install ring-attention-pytorch)"}
            continue
        layout, attend = entry
        if rank == 0:
            print(f"[compare p={world}] {name}", flush=True)
        try:
            errors = _errors(attend, layout, 256 * world, args.heads, args.head_dim)
            forward, total = _times(attend, layout, args)
        except Exception as exc:  # e.g. a library that cannot run a world of one
            results[name] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        stats = [None] * world
        dist.all_gather_object(stats, (errors, forward, total))
        results[name] = {
            "errors": {k: max(s[0][k] for s in stats) for k in errors},
            "forward_s": max(s[1] for s in stats),
            "total_s": max(s[2] for s in stats),
        }
    refusal = _native_context_parallel_error()
    results["torch context_parallel"] = {"skipped": refusal or "runs here, not timed yet"}
    dist.destroy_process_group()
    return results if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=parse_tokens, default=16384)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results = run_on_ranks(_worker, (args,), args.world_size)
    report = next(r for r in results.values() if r is not None)
    print(
        f"\n{args.seq_len:,} tokens, {args.world_size} ranks, {args.heads} heads, "
        f"d={args.head_dim}, fp32, causal; errors on {256 * args.world_size} tokens vs float64\n"
    )
    print("| implementation | fwd s | fwd+bwd s | err out | err dq | err dk | err dv |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in report.items():
        if "skipped" in row:
            print(f"| {name} | does not run: {row['skipped']} | | | | | |")
            continue
        e = row["errors"]
        print(
            f"| {name} | {row['forward_s']:.2f} | {row['total_s']:.2f} | {e['out']:.1e} | "
            f"{e['dq']:.1e} | {e['dk']:.1e} | {e['dv']:.1e} |"
        )


if __name__ == "__main__":
    main()
