"""The long-context training recipe: dp=2 x cp=2 matches single-process training, and resumes;
``--local-only`` attention sees exactly the keys of the query's own rank shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ringattn

pytest.importorskip("transformers")  # the recipe uses ringattn.integrations.hf.cp_loss
FSDPModule = pytest.importorskip("torch.distributed.fsdp").FSDPModule
if not hasattr(FSDPModule, "set_gradient_divide_factor"):
    pytest.skip("the recipe needs torch >= 2.8 (FSDP2 divide factor)", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS, SEQ, BATCH, LR, CLIP = 3, 256, 1, 3e-3, 1e9  # no clipping: norms compare exactly


def _train(tmp_path, steps, *extra):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "train_long_context.py"),
            "--dp",
            "2",
            "--cp",
            "2",
            "--steps",
            str(steps),
            "--seq-len",
            str(SEQ),
            "--batch",
            str(BATCH),
            "--lr",
            str(LR),
            "--clip",
            str(CLIP),
            "--checkpoint",
            str(tmp_path / "ckpt.pt"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _example():
    """The example module ``train_long_context``."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_long_context
    finally:
        sys.path.remove(str(EXAMPLES))
    return train_long_context


def _single_process():
    return _example().train_single_process(STEPS, SEQ, 2 * BATCH, LR, CLIP)


def test_dp2_cp2_matches_single_process_and_resumes(tmp_path):
    out = _train(tmp_path, STEPS)
    assert f"step {STEPS}/{STEPS}" in out and "tokens/s per rank" in out
    reference = _single_process()
    losses = json.loads((tmp_path / "train-losses.json").read_text())
    assert losses == pytest.approx(reference["losses"], rel=1e-5)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    # FSDP sums the cp shares and averages dp: gradients equal the single process's (AdamW alone
    # would hide a constant factor)
    assert state["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5)
    params = state["model"]
    for name, value in params.items():
        torch.testing.assert_close(value, reference["params"][name], rtol=1e-4, atol=1e-4)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    _train(resumed, STEPS - 1)
    _train(resumed, STEPS, "--resume")
    again = torch.load(resumed / "ckpt.pt", weights_only=False)
    assert again["step"] == STEPS
    assert json.loads((resumed / "train-losses.json").read_text()) == pytest.approx(losses)
    for name, value in again["model"].items():
        torch.testing.assert_close(value, params[name], rtol=1e-5, atol=1e-6)


def _ring_and_local_logits(rank, world_size, seq_len):
    """Logits ``(batch, seq_len, vocab)`` of the example's model at initialisation on its copy
    task, unsharded: with the ring, and with ``--local-only`` attention."""
    example = _example()
    model = example.make_model()
    tokens = example.make_batch(2, seq_len, step=0)
    local, positions = ringattn.shard(tokens), ringattn.positions(seq_len)
    ring = example.ring_attention_fn(ringattn.create_ring_mask(seq_len, causal=True))
    local_only = example.masked_attention(example.causal_by_position(positions))
    with torch.no_grad():
        return [ringattn.unshard(model(local, positions, attend)) for attend in (ring, local_only)]


def test_local_only_attends_within_the_rank_shard_only(pools):
    cp, seq_len = 2, 64
    ring, local_only = pools(cp).run(_ring_and_local_logits, seq_len)[0]
    example = _example()
    model = example.make_model()
    tokens = example.make_batch(2, seq_len, step=0)
    owner = torch.empty(seq_len, dtype=torch.long)  # the rank holding each global position
    for rank in range(cp):
        owner[ringattn.LAYOUTS["zigzag"].positions(rank, cp, seq_len // cp)] = rank
    pos = torch.arange(seq_len)
    causal = pos[None, :] <= pos[:, None]
    own_shard = causal & (owner[None, :] == owner[:, None])
    with torch.no_grad():
        reference = {
            name: model(tokens, pos, example.masked_attention(allowed))
            for name, allowed in (("ring", causal), ("local", own_shard))
        }
    torch.testing.assert_close(ring, reference["ring"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(local_only, reference["local"], rtol=1e-4, atol=1e-4)
    # every second-half token's keys include the first-half chunk on the other rank
    second_half = slice(seq_len // 2, None)
    assert (ring - local_only)[:, second_half].abs().amax(-1).min() > 1e-3
