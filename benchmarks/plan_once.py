"""What planning once per batch saves: a stack of attention layers with mask keywords on every
call against one RingMask made by create_ring_mask and reused by every layer.

For each mask it runs ``--layers`` forward calls of ring attention on the same shards, first
with the masks as keywords (every call checks across ranks, gathers per-token masks and
classifies its tiles), then with one ``create_ring_mask`` per batch and ``mask=`` per layer. It
prints, side by side from one run, the seconds per layer of each, the mask's one-off creation
cost, and the collectives each way issued (counted on rank 0).

    python benchmarks/plan_once.py --seq-len 16K --world-size 2 --layers 8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn.tools.cli import parse_tokens
from ringattn.tools.launch import cpu_threads_per_rank, init_worker, run_on_ranks

HEADS, KV_HEADS, DIM, BATCH = 8, 2, 64, 1
COLLECTIVES = ("all_gather", "all_gather_object", "all_reduce", "broadcast", "barrier")


def _every_other_chunk(b, h, q_idx, kv_idx):
    """A mask_mod: keys in every other 1K chunk before the query's chunk stay visible."""
    return ((kv_idx // 1024) % 2 == 0) | (kv_idx // 1024 == q_idx // 1024)


def _masks(name: str, seq_len: int, layout: str) -> dict:
    """Keyword masks of a case (per-token tensors already this rank's shard)."""
    if name == "causal":
        return {"causal": True}
    documents = torch.tensor([0, seq_len // 8, seq_len // 3, seq_len // 2, seq_len])
    if name == "documents + padding":
        valid = torch.ones(BATCH, seq_len, dtype=torch.bool)
        valid[:, seq_len - seq_len // 16 :] = False
        return {
            "causal": True,
            "cu_seqlens": documents,
            "attention_mask": ringattn.shard(valid, layout),
        }
    return {"causal": True, "mask_mod": _every_other_chunk}


class _Counter:
    """Counts torch.distributed collectives while active."""

    def __init__(self):
        self.count = 0
        self._originals = {}

    def __enter__(self):
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _worker(seq_len: int, layers: int, repeats: int, layout: str) -> list[dict] | None:
    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    q = ringattn.shard(torch.randn(BATCH, seq_len, HEADS, DIM, generator=gen), layout)
    k, v = (
        ringattn.shard(torch.randn(BATCH, seq_len, KV_HEADS, DIM, generator=gen), layout)
        for _ in range(2)
    )
    rows = []
    for name in ("causal", "documents + padding", "mask_mod"):
        masks = _masks(name, seq_len, layout)
        best = {"keywords": float("inf"), "mask": float("inf"), "create": float("inf")}
        counts = {}
        for _ in range(repeats):
            dist.barrier()
            with _Counter() as counter, torch.no_grad():
                start = time.perf_counter()
                for _ in range(layers):
                    ringattn.ring_attention(q, k, v, layout=layout, **masks)
                best["keywords"] = min(best["keywords"], time.perf_counter() - start)
            counts["keywords"] = counter.count
            dist.barrier()
            with _Counter() as counter, torch.no_grad():
                start = time.perf_counter()
                mask = ringattn.create_ring_mask(seq_len, layout=layout, **masks)
                created = time.perf_counter()
                for _ in range(layers):
                    ringattn.ring_attention(q, k, v, mask=mask)
                best["create"] = min(best["create"], created - start)
                best["mask"] = min(best["mask"], time.perf_counter() - start)
            counts["mask"] = counter.count
        rows.append({"case": name, **best, **{f"{k}_collectives": n for k, n in counts.items()}})
    dist.destroy_process_group()
    return rows if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=parse_tokens, default=16384, help="total tokens")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--layout", default="zigzag")
    args = parser.parse_args()
    results = run_on_ranks(
        _worker, (args.seq_len, args.layers, args.repeats, args.layout), args.world_size
    )
    rows = results[0]
    print(
        f"{args.layers} layers, {args.seq_len:,} tokens over {args.world_size} ranks "
        f"({args.layout}), {HEADS}:{KV_HEADS} heads, d={DIM}, forward, best of {args.repeats}"
    )
    print(
        "| mask | keywords, s/layer | RingMask, s/layer (incl. creation) | create_ring_mask, s "
        "| ratio | collectives keywords / RingMask |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        keywords, mask = row["keywords"] / args.layers, row["mask"] / args.layers
        print(
            f"| {row['case']} | {keywords:.3f} | {mask:.3f} | {row['create']:.3f} | "
            f"{keywords / mask:.2f}x | {row['keywords_collectives']} / {row['mask_collectives']} |"
        )


if __name__ == "__main__":
    main()
