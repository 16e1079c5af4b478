"""Prefill a long prompt with ring attention across local ranks, then decode greedily from the
sharded KV cache — and check the tokens equal a single-process run of the same model.

    python examples/generate_long_context.py --prompt-len 4096 --new-tokens 32 --world-size 4
    torchrun --nproc-per-node 4 examples/generate_long_context.py     # same, under torchrun

The model is a small Llama-style decoder (RMSNorm, rotary positions, grouped-query attention,
SwiGLU) with random weights; only its attention differs between the two runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import ringattn
from ringattn.tools.launch import cpu_threads_per_rank, init_worker, run_on_ranks


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> torch.Tensor:
    """PyTorch's fused attention on ``(batch, seq, heads, head_dim)`` tensors (GQA allowed);
    ``options`` go to ``F.scaled_dot_product_attention`` (``is_causal``, ``attn_mask``)."""
    heads_first = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(*heads_first, enable_gqa=True, **options).transpose(1, 2)


class TinyDecoder(nn.Module):
    def __init__(self, vocab=512, dim=128, layers=2, heads=4, kv_heads=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.RMSNorm(dim),
                    "qkv": nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False),
                    "proj": nn.Linear(dim, dim, bias=False),
                    "norm2": nn.RMSNorm(dim),
                    "up": nn.Linear(dim, 4 * dim, bias=False),
                    "gate": nn.Linear(dim, 4 * dim, bias=False),
                    "down": nn.Linear(4 * dim, dim, bias=False),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def rotate(self, x, positions):
        """Rotary embedding at global ``positions`` ``(seq,)``; x: (batch, seq, heads, dim)."""
        half = self.head_dim // 2
        freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = positions.float()[:, None] * freqs[None, :]
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def forward(self, tokens, positions, attend):
        """tokens (batch, seq); attend(layer, q, k, v) -> (batch, seq, heads, head_dim)."""
        x = self.embed(tokens)
        b, s, _ = x.shape
        for i, blk in enumerate(self.blocks):
            qkv = blk["qkv"](blk["norm1"](x))
            q, k, v = qkv.split(
                [
                    self.heads * self.head_dim,
                    self.kv_heads * self.head_dim,
                    self.kv_heads * self.head_dim,
                ],
                dim=-1,
            )
            q = self.rotate(q.view(b, s, self.heads, self.head_dim), positions)
            k = self.rotate(k.view(b, s, self.kv_heads, self.head_dim), positions)
            v = v.view(b, s, self.kv_heads, self.head_dim)
            x = x + blk["proj"](attend(i, q, k, v).reshape(b, s, -1))
            h = blk["norm2"](x)
            x = x + blk["down"](F.silu(blk["gate"](h)) * blk["up"](h))
        return self.head(self.norm(x))


def generate_single_process(model, prompt, new_tokens):
    """Reference: plain attention over a per-layer list cache."""
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(layer, q, k, v):
        if layer in cache:
            k = torch.cat([cache[layer][0], k], 1)
            v = torch.cat([cache[layer][1], v], 1)
        cache[layer] = (k, v)
        return sdpa(q, k, v, is_causal=q.shape[1] == k.shape[1])

    logits = model(prompt, torch.arange(prompt.shape[1]), attend)
    tokens = [logits[:, -1].argmax(-1)]
    for step in range(new_tokens - 1):
        position = torch.tensor([prompt.shape[1] + step])
        logits = model(tokens[-1][:, None], position, attend)
        tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


def generate_ring(model, prompt, new_tokens, layout="zigzag"):
    """Ring prefill over the sharded prompt, then decoding from the sharded KV cache."""
    cache = ringattn.KVCache(len(model.blocks), prompt.shape[0], model.kv_heads, model.head_dim)
    local_prompt = ringattn.shard(prompt, layout)  # padded to what the layout needs
    local_positions = ringattn.positions(prompt.shape[1], layout)
    lengths = torch.full((prompt.shape[0],), prompt.shape[1])  # the padding is masked
    logits = model(
        local_prompt,
        local_positions,
        lambda layer, q, k, v: cache.prefill(layer, q, k, v, lengths=lengths, layout=layout),
    )
    last = ringattn.unshard(logits, layout)[:, prompt.shape[1] - 1]
    tokens = [last.argmax(-1)]
    for step in range(new_tokens - 1):
        position = torch.tensor([prompt.shape[1] + step])
        logits = model(tokens[-1][:, None], position, cache.extend)
        tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1), cache


def worker(prompt_len: int, new_tokens: int, layout: str) -> dict | None:
    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    rank, world = dist.get_rank(), dist.get_world_size()
    model = TinyDecoder().eval()
    prompt = torch.randint(0, 512, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = time.perf_counter()
        ring_tokens, cache = generate_ring(model, prompt, new_tokens, layout)
        ring_s = time.perf_counter() - start
        held = cache.local_tokens()
        all_held = [None] * world
        dist.all_gather_object(all_held, held)
        result = None
        if rank == 0:
            start = time.perf_counter()
            single_tokens = generate_single_process(model, prompt, new_tokens)
            single_s = time.perf_counter() - start
            same = torch.equal(ring_tokens, single_tokens)
            print(
                f"ring ({world} ranks, {layout}): {ring_s:.2f} s; single process: {single_s:.2f} s"
            )
            print(f"cache tokens per rank (sequence 0): {[h[0] for h in all_held]}")
            print("ring tokens  :", ring_tokens[0].tolist())
            print("single tokens:", single_tokens[0].tolist())
            print("identical:", same)
            result = {"identical": same}
    dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--layout", default="zigzag", choices=sorted(ringattn.LAYOUTS))
    args = parser.parse_args()
    results = run_on_ranks(worker, (args.prompt_len, args.new_tokens, args.layout), args.world_size)
    report = next((r for r in results.values() if r), None)
    if report is not None and not report["identical"]:
        raise SystemExit("ring and single-process tokens differ")


if __name__ == "__main__":
    main()
