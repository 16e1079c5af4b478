"""Per-rank attention work (scored query-key pairs) by layout, for causal attention over one long
sequence and over packed documents of random lengths. Pure arithmetic on the tile plans: no
processes are started.

    python benchmarks/load_balance.py --seq-len 131072 --world-size 8
"""

from __future__ import annotations

import argparse

import torch

import ringattn
from ringattn.masks import MaskSpec


def packed_document_ids(seq_len: int, min_len: int, max_len: int, seed: int) -> torch.Tensor:
    """(1, seq_len) document ids of documents with uniform random lengths in [min_len, max_len)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(min_len, max_len, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - seq_len
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, p = args.seq_len, args.world_size
    workloads = {
        "one causal sequence": MaskSpec(causal=True),
        "packed docs 256..8K": MaskSpec(
            causal=True,
            doc_ids=packed_document_ids(n, 256, 8192, args.seed),
            tile_size=args.tile_size,
        ),
        "packed docs 4K..32K": MaskSpec(
            causal=True,
            doc_ids=packed_document_ids(n, 4096, 32768, args.seed),
            tile_size=args.tile_size,
        ),
        "sliding window 4K": MaskSpec(causal=True, window=(4096, 0), tile_size=args.tile_size),
    }
    print(f"max/min per-rank work, {n} tokens over {p} ranks, tile {args.tile_size}")
    print(f"| workload | {' | '.join(ringattn.LAYOUTS)} |")
    print("|---|" + "---|" * len(ringattn.LAYOUTS))
    for name, spec in workloads.items():
        ratios = []
        for layout in ringattn.LAYOUTS:
            work = ringattn.rank_work(layout, p, n // p, True, spec)
            ratios.append(f"{max(work) / min(work):.3f}")
        print(f"| {name} | {' | '.join(ratios)} |")


if __name__ == "__main__":
    main()
