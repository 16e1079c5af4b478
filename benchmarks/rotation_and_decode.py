"""Pass-KV against pass-Q as queries get fewer than keys, and decode latency against world size.

For each world size and query/key length ratio it times ring attention (forward, and forward +
backward) with ``rotation="kv"`` and ``rotation="q"`` on the same inputs, and prints which won next
to what ``rotation="auto"`` would pick. Then it times one decode step (``KVCache.extend`` of one
token per layer) against a long sharded cache.

    python benchmarks/rotation_and_decode.py --kv-len 16K --world-sizes 2,4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn.tools.cli import parse_tokens
from ringattn.tools.launch import cpu_threads_per_rank, init_worker, run_on_ranks

HEADS, KV_HEADS, DIM = 8, 2, 64
RATIOS = (1 / 64, 1 / 16, 1 / 4, 1 / 2, 1)


TIE = 0.10  # differences below 10% are within this machine's run-to-run noise (see p=1 rows)


def winner(kv_s: float, q_s: float) -> str:
    """The faster rotation, or "tie" when they differ by less than TIE."""
    if abs(kv_s - q_s) < TIE * min(kv_s, q_s):
        return "tie"
    return "q" if q_s < kv_s else "kv"


def _median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function; repeats are interleaved so no function always runs
    first after a shape change (allocator warm-up would bias it)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _worker(kv_len: int, repeats: int, decode_cache: int) -> dict | None:
    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    rows = []
    for ratio in RATIOS:
        q_local = max(2, int(kv_len * ratio) // world // 2 * 2)
        kv_local = kv_len // world
        q = torch.randn(1, q_local, HEADS, DIM, generator=gen)
        k = torch.randn(1, kv_local, KV_HEADS, DIM, generator=gen)
        v = torch.randn_like(k)
        row = {"q_len": q_local * world, "kv_len": kv_len}
        for grad in (False, True):
            phase = "fwdbwd" if grad else "fwd"
            calls = {}
            for rotation in ("kv", "q"):
                leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]

                def call(leaves=leaves, rotation=rotation, grad=grad):
                    out = ringattn.ring_attention(*leaves, causal=True, rotation=rotation)
                    if grad:
                        torch.autograd.grad(out, leaves, torch.ones_like(out))

                calls[f"{rotation}_{phase}_s"] = call
            row.update(_median_times(calls, repeats))
            row[f"auto_{phase}"] = ringattn.choose_rotation(
                q_local, kv_local, HEADS, KV_HEADS, DIM, torch.float32, grad
            )
        rows.append(row)

    cache = ringattn.KVCache(1, 1, KV_HEADS, DIM, capacity=decode_cache // world + 64)
    prompt = decode_cache // world
    with torch.no_grad():
        cache.prefill(
            0,
            torch.randn(1, prompt, HEADS, DIM),
            torch.randn(1, prompt, KV_HEADS, DIM),
            torch.randn(1, prompt, KV_HEADS, DIM),
        )
        token = [torch.randn(1, 1, h, DIM) for h in (HEADS, KV_HEADS, KV_HEADS)]
        decode_s = _median_times({"decode": lambda: cache.extend(0, *token)}, repeats * 10)
        decode_s = decode_s["decode"]
    dist.destroy_process_group()
    return {"rows": rows, "decode_s": decode_s} if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-len", type=parse_tokens, default=16384)
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--decode-cache", type=parse_tokens, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        "| p | q_len / kv_len | kv fwd s | q fwd s | winner | auto | kv fwd+bwd s | q fwd+bwd s"
        " | winner | auto |"
    )
    print("|---:|---:|---:|---:|---|---|---:|---:|---|---|")
    decode = {}
    for world in (int(w) for w in args.world_sizes.split(",")):
        result = next(
            r
            for r in run_on_ranks(
                _worker, (args.kv_len, args.repeats, args.decode_cache), world
            ).values()
            if r
        )
        decode[world] = result["decode_s"]
        for r in result["rows"]:
            cells = [f"{world}", f"{r['q_len']}/{r['kv_len']}"]
            for phase in ("fwd", "fwdbwd"):
                kv_s, q_s = r[f"kv_{phase}_s"], r[f"q_{phase}_s"]
                cells += [f"{kv_s:.4f}", f"{q_s:.4f}", winner(kv_s, q_s), r[f"auto_{phase}"]]
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\ndecode step (1 token, cache of {args.decode_cache} tokens, 1 layer):")
    for world, seconds in decode.items():
        print(f"- p={world}: {seconds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
