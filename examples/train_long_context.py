"""Train a small Llama-style model on a long-range retrieval task with data parallel x context
parallel (a 2-D DeviceMesh), on CPU by default.

    torchrun --nproc-per-node 4 examples/train_long_context.py --dp 2 --cp 2 --seq-len 12K
    python examples/train_long_context.py --dp 2 --cp 2         # starts the 4 local ranks itself
    # multi-node: torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
    #             --rdzv-endpoint HOST:PORT examples/train_long_context.py --dp 4 --cp 4

The task: a sequence of random filler tokens holds (key, value) pairs near its start; the last
token repeats one key, and the model must predict its value — 10K+ tokens back, so only attention
across the whole sequence can solve it. Only the answer position is trained.

The model is wrapped with FSDP2 (``fully_shard``) on the whole 2-D mesh, i.e. hybrid sharding:
parameters, gradients and optimizer state are sharded over "cp" (whose ranks need the same
weights anyway) and replicated over "dp". Context parallelism shards every sequence over "cp" in
the zigzag layout; ``cp_loss`` gives each rank its share of the global mean loss, so gradients
must be *summed* over "cp" and averaged over "dp": FSDP's gradient divide factor is set to dp
instead of its default dp x cp. Checkpoints hold the full (unsharded) model and optimizer state,
written by rank 0 after every step (atomically: to a temporary file, then renamed, so a rank
killed mid-save leaves the previous checkpoint intact) and loaded through
``torch.distributed.checkpoint.state_dict``.

Elastic recovery: when torchrun restarts the workers (``--max-restarts N``, after a rank died),
the job resumes from ``--checkpoint`` by itself, as if ``--resume`` were given. Set
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: otherwise the restarted workers share the first round's
store, read its stale keys and fail or hang while joining (pytorch/pytorch#135712, #167288):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nproc-per-node 4 --max-restarts 1 \\
        examples/train_long_context.py --dp 2 --cp 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from generate_long_context import TinyDecoder
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

import ringattn
from ringattn.integrations.hf import cp_loss
from ringattn.tools.cli import parse_tokens
from ringattn.tools.launch import cpu_threads_per_rank, init_worker, run_on_ranks

VOCAB = 512
KEYS = range(256, 384)  # key tokens; values are in 384..511, filler in 0..255
SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch/pytorch#135712)"


def make_batch(batch: int, seq_len: int, step: int, seed: int = 0):
    """(tokens (batch, seq_len), answer (batch,)): pairs at the start, the query at the end."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    tokens = torch.randint(0, 256, (batch, seq_len), generator=gen)
    answers = torch.empty(batch, dtype=torch.long)
    for row in range(batch):
        keys = torch.randperm(len(KEYS), generator=gen)[:8] + KEYS.start
        values = torch.randint(384, 512, (8,), generator=gen)
        tokens[row, 1:17:2], tokens[row, 2:18:2] = keys, values
        pick = int(torch.randint(0, 8, (1,), generator=gen))
        tokens[row, -1] = keys[pick]
        answers[row] = values[pick]
    return tokens, answers


def answer_labels(tokens: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: only the last position is trained (-100 elsewhere)."""
    labels = torch.full_like(tokens, -100)
    labels[:, -1] = answers
    return labels


def ring_attention_fn(mask: ringattn.RingMask):
    """Every layer's attention: the ring, with the mask planned once (causal only here, so one
    mask serves every batch; a batch with documents or padding would plan its own)."""

    def attend(layer, q, k, v):
        return ringattn.ring_attention(q, k, v, mask=mask)

    return attend


def dense_attention(layer, q, k, v):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (over all shards); returns the norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _save_atomically(state: dict, path: str) -> None:
    """Write to a temporary file next to ``path``, then rename it over ``path``: a process killed
    mid-write leaves the previous checkpoint whole."""
    partial = f"{path}.partial"
    torch.save(state, partial)
    os.replace(partial, path)


def train(
    dp: int,
    cp: int,
    steps: int,
    seq_len: int,
    batch: int,
    lr: float,
    clip: float,
    checkpoint: str | None,
    resume: bool,
    layout: str = "zigzag",
    log_every: int = 1,
) -> dict:
    """Every rank of a dp x cp job. Returns the per-step losses and final parameters (rank 0)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # set by torchrun
    shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if restart and shared_store and os.environ.get("LOCAL_RANK") == "0":
        print(
            f"restart on torchrun's shared store: if joining fails, set {SHARED_STORE_FIX}",
            flush=True,
        )
    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    mesh = init_device_mesh("cpu", (dp, cp), mesh_dim_names=("dp", "cp"))
    dp_group, cp_group = mesh["dp"].get_group(), mesh["cp"].get_group()
    dp_rank, rank = mesh["dp"].get_local_rank(), dist.get_rank()
    model = TinyDecoder(vocab=VOCAB, dim=64, layers=2, heads=4, kv_heads=2, seed=0)
    fully_shard(model, mesh=mesh)  # 2-D mesh: replicate over dp, shard over cp
    model.set_gradient_divide_factor(dp)  # sum the cp shares, average the dp replicas
    if hasattr(model, "set_force_sum_reduction_for_comms"):
        # a factor other than the cp size needs NCCL's PREMUL_SUM, which gloo lacks: sum, divide
        model.set_force_sum_reduction_for_comms(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start_step, losses, grad_norms = 0, [], []
    resume = resume or restart > 0
    found = [bool(resume and checkpoint and rank == 0 and Path(checkpoint).exists())]
    dist.broadcast_object_list(found, src=0)  # only rank 0 needs to see the file
    if found[0]:
        state = torch.load(checkpoint, weights_only=False) if rank == 0 else {}
        loading = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, state.get("model", {}), options=loading)
        set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=loading)
        progress = [state.get("step"), state.get("losses"), state.get("grad_norms")]
        dist.broadcast_object_list(progress, src=0)
        start_step, losses, grad_norms = progress
        if rank == 0:
            print(f"resumed from {checkpoint} at step {start_step} (restart {restart})", flush=True)
    padded = ringattn.padded_length(seq_len, layout, cp)
    mask = ringattn.create_ring_mask(padded, causal=True, layout=layout, group=cp_group)
    attend = ring_attention_fn(mask)
    started = time.perf_counter()
    for step in range(start_step, steps):
        tokens, answers = make_batch(batch * dp, seq_len, step)
        mine = slice(dp_rank * batch, (dp_rank + 1) * batch)  # this replica's sequences
        local = ringattn.shard(tokens[mine], layout, group=cp_group)
        labels = ringattn.shard(answer_labels(tokens[mine], answers[mine]), layout, group=cp_group)
        positions = ringattn.positions(seq_len, layout, group=cp_group)
        logits = model(local, positions, attend)
        loss = cp_loss(logits, labels, group=cp_group)
        optimizer.zero_grad()
        loss.backward()  # FSDP reduces: sum over cp, mean over dp
        grad_norms.append(_clip(model, clip))
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=dp_group)
        losses.append(float(global_loss) / dp)
        if rank == 0 and (step % log_every == 0 or step == steps - 1):
            rate = (step + 1 - start_step) * batch * dp * seq_len / (time.perf_counter() - started)
            print(
                f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  grad norm {grad_norms[-1]:.4f}  "
                f"{rate / (dp * cp):,.0f} tokens/s per rank",
                flush=True,
            )
        if checkpoint:  # every rank takes part in gathering the full state
            state = {
                "model": get_model_state_dict(model, options=full),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=full),
                "step": step + 1,
                "losses": losses,
                "grad_norms": grad_norms,
            }
            if rank == 0:
                _save_atomically(state, checkpoint)
            dist.barrier()
    params = get_model_state_dict(model, options=full)
    dist.destroy_process_group()
    result = {"losses": losses, "grad_norms": grad_norms, "params": params}
    return result if rank == 0 else None


def train_single_process(steps: int, seq_len: int, batch: int, lr: float, clip: float) -> dict:
    """The same training on one process: the whole global batch, dense attention."""
    model = TinyDecoder(vocab=VOCAB, dim=64, layers=2, heads=4, kv_heads=2, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, grad_norms = [], []
    for step in range(steps):
        tokens, answers = make_batch(batch, seq_len, step)
        logits = model(tokens, torch.arange(seq_len), dense_attention)
        loss = F.cross_entropy(logits[:, -1].float(), answers)
        optimizer.zero_grad()
        loss.backward()
        grad_norms.append(_clip(model, clip))
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "grad_norms": grad_norms, "params": model.state_dict()}


def main() -> None:
    if not hasattr(FSDPModule, "set_gradient_divide_factor"):
        raise SystemExit(f"this recipe needs torch >= 2.8 (FSDP2), got {torch.__version__}")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=parse_tokens, default=12 * 1024)
    parser.add_argument("--batch", type=int, default=1, help="sequences per data-parallel replica")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="max global gradient norm")
    parser.add_argument("--checkpoint", default="train-checkpoint.pt")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint (implied when torchrun restarts the workers; for "
        f"torchrun --max-restarts set {SHARED_STORE_FIX})",
    )
    parser.add_argument("--plot", default=None, help="write the loss curve to this PNG")
    args = parser.parse_args()
    run_args = (
        args.dp,
        args.cp,
        args.steps,
        args.seq_len,
        args.batch,
        args.lr,
        args.clip,
        args.checkpoint,
        args.resume,
    )
    results = run_on_ranks(train, run_args, args.dp * args.cp)
    result = next((r for r in results.values() if r), None)
    if result is None:
        return
    Path("train-losses.json").write_text(json.dumps(result["losses"]))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(result["losses"]) + 1), result["losses"], marker=".")
        ax.set(
            xlabel="step",
            ylabel="loss (answer token)",
            title=f"dp={args.dp} x cp={args.cp}, {args.seq_len} tokens",
        )
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
