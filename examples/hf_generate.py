"""Greedy generation with a Hugging Face model under context parallelism: the prompt is sharded
over local ranks and prefilled with ring attention, new tokens are decoded from the sharded
``ringattn.KVCache``; the tokens must equal the single-process model's.

    python examples/hf_generate.py --prompt-len 4096 --new-tokens 16 --world-size 4
    torchrun --nproc-per-node 4 examples/hf_generate.py                # same, under torchrun

The model is a small Llama built from a config with random weights (no download).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import transformers

from ringattn.integrations import hf
from ringattn.tools.launch import cpu_threads_per_rank, init_worker, run_on_ranks


def build_model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=65536,
    )
    torch.manual_seed(0)  # the same weights on every rank
    return transformers.LlamaForCausalLM(config).eval()


def worker(prompt_len: int, new_tokens: int, layout: str) -> bool | None:
    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    model = build_model()
    prompt = torch.randint(0, 1024, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = time.perf_counter()
        ring = hf.generate_greedy(model, prompt, new_tokens, layout=layout)
        ring_s = time.perf_counter() - start
        same = None
        if dist.get_rank() == 0:
            model.set_attn_implementation("sdpa")
            start = time.perf_counter()
            single = model.generate(
                prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
            )[:, prompt_len:]
            single_s = time.perf_counter() - start
            same = torch.equal(ring, single)
            print(
                f"ring, {dist.get_world_size()} ranks ({layout}): {ring_s:.2f} s; "
                f"single process (HF generate): {single_s:.2f} s"
            )
            print("ring tokens  :", ring[0].tolist())
            print("single tokens:", single[0].tolist())
            print("identical:", same)
    dist.destroy_process_group()
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--layout", default="zigzag")
    args = parser.parse_args()
    results = run_on_ranks(worker, (args.prompt_len, args.new_tokens, args.layout), args.world_size)
    if any(r is False for r in results.values()):
        raise SystemExit("ring and single-process tokens differ")


if __name__ == "__main__":
    main()
