"""Train a small Llama-style model on a copy task whose answers lie on other ranks, with data
parallel x context parallel (a 2-D DeviceMesh), on CPU by default.

    python examples/train_long_context.py --compare-local --plot copy.png   # ring vs local-only
    python examples/train_long_context.py --dp 2 --cp 2     # starts the 4 local ranks itself
    torchrun --nproc-per-node 4 examples/train_long_context.py --dp 2 --cp 2
    # multi-node: torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
    #             --rdzv-endpoint HOST:PORT examples/train_long_context.py --dp 4 --cp 4

The task: a random sequence of ``seq_len / 2`` tokens followed by its repetition. Each token of
the second half (after its first) is predictable — it is the token that followed the same token
half a sequence back — and only those tokens are trained and reported; a model that cannot see
that far back is at chance, ln(vocabulary). In the zigzag layout over an even number of ranks,
the token a second-half token copies sits on another rank for all but one token per sequence,
so the loss falls only if attention crosses ranks: ``--local-only`` runs the same model, shards
and data with attention restricted to each rank's own shard (causal by global position), and
stays at chance; ``--compare-local`` runs both and plots the two curves.

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
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from generate_long_context import TinyDecoder, sdpa
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
from ringattn.tools.launch import (
    cpu_threads_per_rank,
    init_worker,
    launched_by_torchrun,
    run_on_ranks,
)

VOCAB = 64
CHANCE = math.log(VOCAB)  # the loss of a uniform guess
SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch/pytorch#135712)"
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``attend(layer, q, k, v)``: q ``(batch, seq, heads, head_dim)``, k and v ``(batch, seq,
kv_heads, head_dim)`` -> ``(batch, seq, heads, head_dim)``."""


def make_model() -> TinyDecoder:
    """2 layers, 4 query heads over 2 KV heads, width 64, RoPE; the same weights every time."""
    return TinyDecoder(vocab=VOCAB, dim=64, layers=2, heads=4, kv_heads=2, seed=0)


def make_batch(batch: int, seq_len: int, step: int, seed: int = 0) -> torch.Tensor:
    """Tokens ``(batch, seq_len)``: ``seq_len - seq_len // 2`` random tokens, then their first
    ``seq_len // 2`` again."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    first = torch.randint(0, VOCAB, (batch, seq_len - seq_len // 2), generator=gen)
    return torch.cat([first, first[:, : seq_len // 2]], dim=1)


def copy_labels(tokens: torch.Tensor) -> torch.Tensor:
    """Labels ``(batch, seq_len)`` aligned with the logits: position ``t`` predicts token
    ``t + 1`` where that token is a copy with its predecessor copied too (from the second
    half's second token on); -100 elsewhere, so only predictable tokens are trained."""
    start = tokens.shape[1] - tokens.shape[1] // 2  # the second half's first position
    labels = torch.full_like(tokens, -100)
    labels[:, start:-1] = tokens[:, start + 1 :]
    return labels


def ring_attention_fn(mask: ringattn.RingMask) -> Attend:
    """Every layer's attention: the ring, with the mask planned once (causal only here, so one
    mask serves every batch; a batch with documents or padding would plan its own)."""

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ringattn.ring_attention(q, k, v, mask=mask)

    return attend


def masked_attention(allowed: torch.Tensor) -> Attend:
    """Plain attention where query ``i`` sees key ``j`` iff ``allowed[i, j]`` (``(seq, seq)``
    bool), within whatever tokens it is given: no communication."""

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, attn_mask=allowed)

    return attend


def causal_by_position(positions: torch.Tensor) -> torch.Tensor:
    """``(seq, seq)`` bool: key ``j`` is at or before query ``i`` in global position. On a rank's
    zigzag shard (two chunks, far apart) this is the causal mask of its own tokens."""
    return positions[None, :] <= positions[:, None]


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
    local_only: bool = False,
    log_every: int = 1,
    layout: str = "zigzag",
) -> dict | None:
    """Every rank of a dp x cp job; ``local_only`` restricts attention to each rank's own shard.

    Returns (rank 0; None elsewhere) the per-step losses on the predictable tokens, gradient
    norms, final parameters (full state) and tokens/s per rank."""
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
    model = make_model()
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
    positions = ringattn.positions(seq_len, layout, group=cp_group)
    if local_only:
        attend = masked_attention(causal_by_position(positions))
    else:
        padded = ringattn.padded_length(seq_len, layout, cp)
        mask = ringattn.create_ring_mask(padded, causal=True, layout=layout, group=cp_group)
        attend = ring_attention_fn(mask)
    started, rate = time.perf_counter(), 0.0
    for step in range(start_step, steps):
        tokens = make_batch(batch * dp, seq_len, step)
        mine = tokens[dp_rank * batch : (dp_rank + 1) * batch]  # this replica's sequences
        local = ringattn.shard(mine, layout, group=cp_group)
        # padding the layout adds at the end is not trained (shard alone would pad with 0)
        padding = ringattn.padded_length(seq_len, layout, cp) - seq_len
        labels = F.pad(copy_labels(mine), (0, padding), value=-100)
        labels = ringattn.shard(labels, layout, group=cp_group)
        logits = model(local, positions, attend)
        loss = cp_loss(logits, labels, group=cp_group)
        optimizer.zero_grad()
        loss.backward()  # FSDP reduces: sum over cp, mean over dp
        grad_norms.append(_clip(model, clip))
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=dp_group)
        losses.append(float(global_loss) / dp)
        elapsed = time.perf_counter() - started
        rate = (step + 1 - start_step) * batch * dp * seq_len / elapsed / (dp * cp)
        if rank == 0 and ((step + 1) % log_every == 0 or step in (start_step, steps - 1)):
            print(
                f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  grad norm {grad_norms[-1]:.4f}  "
                f"{rate:,.0f} tokens/s per rank",
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
    result = {"losses": losses, "grad_norms": grad_norms, "params": params, "rate": rate}
    return result if rank == 0 else None


def train_single_process(steps: int, seq_len: int, batch: int, lr: float, clip: float) -> dict:
    """The same training (with the ring) on one process: the whole global batch, dense causal
    attention."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    positions = torch.arange(seq_len)
    attend = masked_attention(causal_by_position(positions))
    losses, grad_norms = [], []
    for step in range(steps):
        tokens = make_batch(batch, seq_len, step)
        logits = model(tokens, positions, attend)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), copy_labels(tokens).flatten())
        optimizer.zero_grad()
        loss.backward()
        grad_norms.append(_clip(model, clip))
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "grad_norms": grad_norms, "params": model.state_dict()}


def _plot(runs: dict[str, list[float]], path: str, title: str) -> None:
    """Loss on the predictable tokens per step, one curve per run, chance as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, losses in runs.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.axhline(CHANCE, color="grey", linestyle="--", label=f"chance, ln {VOCAB} = {CHANCE:.2f}")
    ax.set(xlabel="step", ylabel="loss on the predictable tokens", yscale="log", title=title)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def main() -> None:
    if not hasattr(FSDPModule, "set_gradient_divide_factor"):
        raise SystemExit(f"this recipe needs torch >= 2.8 (FSDP2), got {torch.__version__}")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks per sequence")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument(
        "--seq-len", type=parse_tokens, default=512, help="tokens: a random half, then its copy"
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per data-parallel replica")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="max global gradient norm")
    parser.add_argument(
        "--checkpoint",
        default="train-checkpoint.pt",
        help="saved after every step (a --local-only run inserts '.local-only' before the suffix)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint (implied when torchrun restarts the workers; for "
        f"torchrun --max-restarts set {SHARED_STORE_FIX})",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--local-only",
        action="store_true",
        help="attend only within each rank's own shard (no ring): the copy cannot be learnt",
    )
    mode.add_argument(
        "--compare-local",
        action="store_true",
        help="run with the ring, then --local-only (local ranks it starts itself, not torchrun)",
    )
    parser.add_argument("--log-every", type=int, default=50, help="print every N steps")
    parser.add_argument("--plot", default=None, help="write the loss curve(s) to this PNG")
    args = parser.parse_args()
    if (args.local_only or args.compare_local) and args.cp % 2:
        parser.error(
            "--local-only needs an even --cp: with an odd one, zigzag keeps a third of the tokens "
            "each second-half token copies on its own rank"
        )
    if args.compare_local and launched_by_torchrun():
        parser.error(
            "--compare-local starts its own local ranks twice; under torchrun run the job once "
            "as it is and once with --local-only"
        )
    runs = {}
    for local_only in [False, True] if args.compare_local else [args.local_only]:
        name = "local-only" if local_only else "ring"
        checkpoint = args.checkpoint
        if local_only and checkpoint:
            checkpoint = str(Path(checkpoint).with_suffix(f".local-only{Path(checkpoint).suffix}"))
        run_args = (
            args.dp,
            args.cp,
            args.steps,
            args.seq_len,
            args.batch,
            args.lr,
            args.clip,
            checkpoint,
            args.resume,
            local_only,
            args.log_every,
        )
        if args.compare_local:
            print(f"--- {name} ---", flush=True)
        results = run_on_ranks(train, run_args, args.dp * args.cp)
        result = next((r for r in results.values() if r), None)
        if result is None:
            return
        runs[name] = result["losses"]
        Path(f"train-losses{'-local-only' if local_only else ''}.json").write_text(
            json.dumps(result["losses"])
        )
        print(
            f"{name}: final loss on the predictable tokens {result['losses'][-1]:.4f} "
            f"({result['losses'][-1] / CHANCE:.1%} of chance), {result['rate']:,.0f} tokens/s "
            "per rank",
            flush=True,
        )
    if args.plot:
        title = f"copy task, {args.seq_len} tokens, dp={args.dp} x cp={args.cp}"
        _plot(runs, args.plot, title)


if __name__ == "__main__":
    main()
