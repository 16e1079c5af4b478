"""2-D context parallelism, Ulysses x ring, on real gloo groups: ``ring_attention(group=mesh)``
against a float64 single process (out, lse, dq, dk, dv, the sinks' summed gradient) on 2x2,
4x1 and 1x4 meshes of 4 ranks and 2x3 / 3x2 meshes of 6, every layout, the five masks, both
rotations (and the all-gather mode), GQA/MQA with fewer KV heads than the Ulysses degree; a
RingMask with per-piece document ids and padding, a head-dependent mask_mod, dropout and
max logits over global head indices; shard/unshard/positions round trips; a head count that
cannot be split, refused on every rank; a Hugging Face model on a 2x2 mesh."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import MASK_CASES, assert_close, mask_case, masked_reference, random_qkv

import ringattn
from ringattn.checks import _ROTATIONS
from ringattn.dropout import keep_mask
from ringattn.layout import get_layout

FP32_TOL = 1e-5
BATCH, DIM = 2, 8
FINE = ringattn.Granularity(sub_blocks=3, min_tokens=1)
ROTATIONS = [r for r in ("kv", "q", "allgather") if r in _ROTATIONS]  # allgather: if there

_MESHES: dict[tuple[int, int], object] = {}


def _mesh(ulysses: int, ring: int):
    """One (ulysses, ring) mesh per shape and worker process (meshes create groups)."""
    if (ulysses, ring) not in _MESHES:
        _MESHES[(ulysses, ring)] = ringattn.context_mesh(ulysses, ring)
    return _MESHES[(ulysses, ring)]


def _sum_over_world(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _exact_job(rank, world, shape, layout, rotation, heads_q):
    mesh = _mesh(*shape)
    errors = []
    for seed, name in enumerate((*MASK_CASES, "alibi")):
        heads_kv = (2, 1)[seed % 2]  # GQA / MQA: fewer KV heads than a Ulysses degree of 4
        seq_len = 6 * world
        if name == "alibi":  # a score_mod that depends on the (global) head
            alibi = ringattn.alibi(ringattn.alibi_slopes(heads_q))
            _, allowed, _ = mask_case("causal", seq_len)
            kwargs, score_mod = {"causal": True, "score_mod": alibi}, alibi
        else:
            kwargs, allowed, score_mod = mask_case(name, seq_len)
        q, k, v, dout = random_qkv(BATCH, seq_len, heads_q, heads_kv, DIM, seed)
        sinks = torch.linspace(-1.0, 2.0, heads_q, dtype=torch.float64) if seed % 2 else None
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        full_sinks = None if sinks is None else sinks.clone().requires_grad_()
        ref_out, ref_lse = masked_reference(
            *full, allowed[None, None], score_mod=score_mod, sinks=full_sinks
        )
        wrt = full + ([full_sinks] if sinks is not None else [])
        ref_grads = torch.autograd.grad(ref_out, wrt, dout)
        local = [ringattn.shard(t, layout, group=mesh).float().requires_grad_() for t in (q, k, v)]
        local_sinks = None if sinks is None else sinks.float().requires_grad_()
        out, lse = ringattn.ring_attention(
            *local,
            group=mesh,
            layout=layout,
            rotation=rotation,
            sinks=local_sinks,
            return_lse=True,
            granularity=FINE if seed % 2 else None,
            **kwargs,
        )
        wrt = local + ([local_sinks] if sinks is not None else [])
        grads = torch.autograd.grad(out, wrt, ringattn.shard(dout, layout, group=mesh).float())
        label = f"{name} {layout} {rotation} mesh={shape} heads={heads_q}/{heads_kv}"

        for what, got, ref, dim in (
            ("out", out, ref_out, 1),
            ("lse", lse, ref_lse, 2),
            *((f"d{g}", a, b, 1) for g, a, b in zip("qkv", grads, ref_grads, strict=False)),
        ):
            ref = ringattn.shard(ref, layout, dim, group=mesh)
            errors.append(assert_close(f"{label} {what}", got, ref, FP32_TOL))
        if sinks is not None:  # each rank's covers its own rows and heads: summed, exact
            dsinks = _sum_over_world(grads[3])
            errors.append(assert_close(f"{label} dsinks", dsinks, ref_grads[3], FP32_TOL))
    return max(errors)


@pytest.mark.parametrize("shape", [(2, 2), (4, 1), (1, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_mesh_of_4_matches_float64(pools, shape, layout):
    pools(4).run(_exact_job, shape, layout, "kv", 4)


@pytest.mark.parametrize("rotation", ROTATIONS[1:])
def test_mesh_of_4_other_rotations(pools, rotation):
    pools(4).run(_exact_job, (2, 2), "zigzag", rotation, 4)


@pytest.mark.slow  # a 6-rank pool of its own: about 20 s on 2 cores (`make test-slow`)
@pytest.mark.parametrize(
    ("shape", "layout", "rotation"),
    [((2, 3), "zigzag", "kv"), ((3, 2), "striped", "q")],
    ids=["2x3", "3x2"],
)
def test_mesh_of_6_matches_float64(pools, shape, layout, rotation):
    # 6 query heads: Ulysses 3 repeats each of 2 KV heads 3 times (1 KV head: 3 times too)
    pools(6).run(_exact_job, shape, layout, rotation, 6)


def _head_mask(b, h, q_idx, kv_idx):
    """A mask_mod whose verdict depends on the (global) head: head h sees keys j <= i - h."""
    return kv_idx <= q_idx - h


def _dropout_reference(q, k, v, allowed, seed, p):
    """Float64 attention under ``allowed``, probabilities dropped by :func:`keep_mask` of the
    global heads and positions; rows that see nothing give 0 and lse -inf."""
    k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    positions = torch.arange(q.shape[1])
    keep = keep_mask(seed, p, q.shape[0], q.shape[2], positions, positions)
    return torch.einsum("bhqk,bkhd->bqhd", probs * keep / (1 - p), v), lse


def _ring_mask_job(rank, world, shape):
    """A RingMask on the mesh with per-piece document ids and padding, a head-dependent
    mask_mod, dropout keyed on the global head and max logits, reused by two calls."""
    mesh = _mesh(*shape)
    seq_len, heads_q, heads_kv, layout = 8 * world, 4, 2, "zigzag"
    i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    docs = (torch.arange(seq_len) >= seq_len // 3).long() + (torch.arange(seq_len) >= seq_len - 5)
    padding = torch.ones(BATCH, seq_len, dtype=torch.bool)
    padding[1, seq_len - 7 :] = False
    heads = torch.arange(heads_q)[None, :, None, None]
    allowed = (j <= i) & (docs[:, None] == docs[None, :])
    allowed = allowed[None, None] & (padding[:, None, :, None] & padding[:, None, None, :])
    with_heads = allowed & (j <= i - heads)
    q, k, v, dout = random_qkv(BATCH, seq_len, heads_q, heads_kv, DIM, 7)
    local_docs = ringattn.shard(docs, layout, 0, group=mesh)
    local_padding = ringattn.shard(padding, layout, group=mesh)
    masks = {
        "documents+padding": dict(document_ids=local_docs, attention_mask=local_padding),
        "mask_mod by head": dict(
            document_ids=local_docs, attention_mask=local_padding, mask_mod=_head_mask
        ),
    }
    errors = []
    for label, mask_args in masks.items():
        by_head = "mask_mod" in mask_args
        mask = ringattn.create_ring_mask(
            seq_len, causal=True, layout=layout, group=mesh, heads=heads_q, **mask_args
        )
        assert mask.ulysses is not None and mask.world_size == shape[1]
        shown = with_heads if by_head else allowed
        for dropout in (0.0, 0.25):
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = _dropout_reference(*full, shown, 5, dropout)
            ref_grads = torch.autograd.grad(ref_out, full, dout)
            local = [
                ringattn.shard(t, layout, group=mesh).float().requires_grad_() for t in (q, k, v)
            ]
            out, lse, peak = ringattn.ring_attention(
                *local,
                mask=mask,
                **({"group": mesh, "layout": layout} if dropout else {}),  # the mask's: allowed
                dropout_p=dropout,
                dropout_seed=5,
                return_lse=True,
                return_max_logits=True,
            )
            grads = torch.autograd.grad(
                out, local, ringattn.shard(dout, layout, group=mesh).float()
            )
            name = f"{label} dropout={dropout} mesh={shape}"
            for what, got, ref, dim in (
                ("out", out, ref_out, 1),
                ("lse", lse, ref_lse, 2),
                *((f"d{g}", a, b, 1) for g, a, b in zip("qkv", grads, ref_grads, strict=True)),
            ):
                ref = ringattn.shard(ref.detach(), layout, dim, group=mesh)
                if what == "lse":  # rows that see nothing: -inf in both
                    hidden = torch.isinf(ref)
                    assert torch.equal(torch.isinf(lse), hidden), f"{name} lse -inf rows"
                    got, ref = got.masked_fill(hidden, 0), ref.masked_fill(hidden, 0)
                errors.append(assert_close(f"{name} {what}", got, ref, FP32_TOL))
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) * DIM**-0.5
            ref_peak = scores.masked_fill(~shown, float("-inf")).amax((0, 2, 3))
            errors.append(assert_close(f"{name} max logits", peak, ref_peak, FP32_TOL))
    return max(errors)


@pytest.mark.parametrize("shape", [(2, 2), (4, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_ring_mask_on_mesh(pools, shape):
    pools(4).run(_ring_mask_job, shape)


def _round_trip_job(rank, world, shape, layout):
    mesh = _mesh(*shape)
    ulysses, ring = shape
    for seq_len in (4 * world, 4 * world + 3, 1):
        x = torch.randn(BATCH, seq_len, 3, generator=torch.Generator().manual_seed(seq_len))
        local = ringattn.shard(x, layout, group=mesh)
        padded = ringattn.padded_length(seq_len, layout, ring, ulysses=ulysses)
        assert local.shape[1] == padded // world
        pos = ringattn.positions(seq_len, layout, group=mesh)
        x_padded = torch.cat([x, x.new_zeros(BATCH, padded - seq_len, 3)], 1)
        assert torch.equal(local, x_padded[:, pos]), (shape, layout, seq_len)
        # the contract: piece u (mesh coordinate) of ring shard r of the ring's layout
        u, r = mesh.get_local_rank("ulysses"), mesh.get_local_rank("ring")
        ring_shard = get_layout(layout).positions(r, ring, padded // ring)
        piece = padded // world
        assert torch.equal(pos, ring_shard[u * piece : (u + 1) * piece])
        local.requires_grad_()
        full = ringattn.unshard(local, layout, group=mesh, seq_len=seq_len)
        assert torch.equal(full, x)
        (grad,) = torch.autograd.grad(full, local, torch.ones_like(full) * (rank + 1))
        total = world * (world + 1) / 2  # every rank's copy of the full tensor
        real = (pos < seq_len).float()[None, :, None].expand_as(grad)
        assert torch.equal(grad, real * total)
    return True


@pytest.mark.parametrize("shape", [(2, 2), (4, 1), (1, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_shard_unshard_positions_round_trip(pools, shape, layout):
    pools(4).run(_round_trip_job, shape, layout)


def _bad_heads_job(rank, world, shape, bad_rank, bad_heads):
    mesh = _mesh(*shape)
    heads = bad_heads if bad_rank in (None, rank) else 4
    q = torch.randn(1, 4, heads, 8)
    try:
        ringattn.ring_attention(q, q, q, group=mesh, causal=True)
    except ringattn.RingInputError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    ("shape", "bad_rank", "heads", "expected"),
    [((4, 1), None, 6, "1, 2, 3, 6"), ((2, 2), 3, 3, "1, 3"), ((2, 2), 0, 5, "1, 5")],
    ids=["everywhere-4x1", "rank-3-of-2x2", "rank-0-of-2x2"],
)
def test_heads_that_cannot_be_split_raise_on_every_rank(pools, shape, bad_rank, heads, expected):
    messages = pools(4).run(_bad_heads_job, shape, bad_rank, heads)
    for message in messages:
        assert message and f"valid Ulysses degrees for {heads} heads: {expected}" in message, (
            messages
        )


def test_context_mesh_refuses_a_wrong_size():
    with pytest.raises(ValueError, match="needs 4 ranks"):
        ringattn.context_mesh(2, 2)
    assert ringattn.ulysses_degrees(12) == [1, 2, 3, 4, 6, 12]


def _hf_job(rank, world, shape):
    transformers = pytest.importorskip("transformers")
    from test_hf import SEQ, VOCAB, _batch, _model, _set_attention

    from ringattn.integrations import hf

    mesh = _mesh(*shape)
    name = hf.register("ring_mesh", group=mesh)
    model = _model("llama")
    input_ids, attention_mask = _batch(True)
    valid = attention_mask.bool()
    _set_attention(model, "eager")
    model.zero_grad()
    ref_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    labels = input_ids.masked_fill(~valid, -100)
    ref_loss = torch.nn.functional.cross_entropy(
        ref_logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _set_attention(model, name)
    model.zero_grad()
    local = hf.shard_batch(
        {"input_ids": input_ids, "attention_mask": attention_mask}, group=mesh, shift_labels=True
    )
    logits = model(
        input_ids=local["input_ids"],
        attention_mask=local["attention_mask"],
        position_ids=local["position_ids"],
        use_cache=False,
    ).logits
    loss = hf.cp_loss(logits, local["labels"], group=mesh)
    loss.backward()
    full = ringattn.unshard(logits.detach(), group=mesh, seq_len=SEQ)
    logit_err = ((full - ref_logits.detach())[valid].abs().max() / ref_logits.abs().max()).item()
    grad_err = max(
        assert_close(n, _sum_over_world(p.grad), ref_grads[n], 1e-5)
        for n, p in model.named_parameters()
    )
    assert logit_err < 1e-5, logit_err
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    del transformers
    return logit_err, grad_err


def test_hf_llama_on_a_2x2_mesh(pools):
    pytest.importorskip("transformers")
    pools(4).run(_hf_job, (2, 2))
