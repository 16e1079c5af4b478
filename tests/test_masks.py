"""Every mask in ring mode against a dense fp64 reference, forward and all gradients.

World sizes 1-4, every layout, tiles both smaller and larger than the shards, total lengths that
no layout divides (primes), so the padding that ``shard`` adds is masked internally; travelling
blocks cut into 2 or 3 sub-blocks.
"""

from __future__ import annotations

import pytest
import torch
from helpers import MixedLayout, ReversedLayout, assert_close, masked_reference, random_qkv

import ringattn

FP32_TOL = 1e-5
BATCH, HEADS_Q, HEADS_KV, DIM = 2, 4, 2, 16


def _case(name: str, seq_len: int):
    """(ring_attention kwargs over the full sequence, allowed mask (b|1, h|1, n, n), score_mod,
    per-token tensors to shard: name -> (tensor, shard dim))."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    causal = j <= i
    to_shard = {}
    score_mod = None
    if name == "window_one":
        kwargs, allowed = {"window": (1, 1)}, (j >= i - 1) & (j <= i + 1)
    elif name == "window_small":
        kwargs, allowed = {"window": (3, 2)}, (j >= i - 3) & (j <= i + 2)
    elif name == "window_larger_than_sequence":
        kwargs, allowed = {"window": (10_000, 10_000)}, torch.ones_like(causal)
    elif name == "causal_window":
        kwargs, allowed = {"window": 5, "causal": True}, causal & (j >= i - 5)
    elif name == "one_sided_window":
        kwargs, allowed = {"window": (None, 4)}, j <= i + 4
    elif name == "documents_cu_seqlens":
        lengths = [1, 6, 1, 2]
        lengths.append(seq_len - sum(lengths))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        docs = torch.searchsorted(cu[1:].long(), torch.arange(seq_len), right=True)
        kwargs = {"cu_seqlens": cu, "causal": True}
        allowed = causal & (docs[:, None] == docs[None, :])
    elif name == "documents_ids_window":
        # batch row 0: one document spanning everything; row 1: three documents
        docs = torch.zeros(BATCH, seq_len, dtype=torch.long)
        docs[1, seq_len // 3 :] = 1
        docs[1, 2 * seq_len // 3 :] = 2
        to_shard["document_ids"] = (docs, 1)
        kwargs = {"window": (4, 0)}
        allowed = (docs[:, None, :, None] == docs[:, None, None, :]) & causal & (j >= i - 4)
    elif name == "padding":
        valid = torch.ones(BATCH, seq_len, dtype=torch.bool)
        valid[1, seq_len - seq_len // 3 :] = False
        to_shard["attention_mask"] = (valid, 1)
        kwargs = {"causal": True}
        allowed = causal & valid[:, None, :, None] & valid[:, None, None, :]
    elif name == "softcap":
        score_mod = ringattn.softcap(0.7)
        kwargs, allowed = {"causal": True, "score_mod": score_mod}, causal
    elif name == "alibi":
        score_mod = ringattn.alibi(ringattn.alibi_slopes(HEADS_Q))
        kwargs, allowed = {"causal": True, "score_mod": score_mod}, causal
    elif name == "prefix_lm":
        kwargs, allowed = {"mask_mod": ringattn.prefix_lm(5)}, causal | (j < 5)
    else:
        raise KeyError(name)
    if allowed.dim() == 2:
        allowed = allowed[None, None]
    return kwargs, allowed, score_mod, to_shard


CASES = (
    "window_one",
    "window_small",
    "window_larger_than_sequence",
    "causal_window",
    "one_sided_window",
    "documents_cu_seqlens",
    "documents_ids_window",
    "padding",
    "softcap",
    "alibi",
    "prefix_lm",
)


def _check_case(name, layout, seq_len, tile_size, seed, world, device="cpu", rotation="auto"):
    """Tiles of 4 go through a RingMask built by create_ring_mask, tiles of 512 through the
    keywords of ring_attention (which build one inside)."""
    granularity = ringattn.Granularity(sub_blocks=3 if tile_size < 8 else 2, min_tokens=1)
    kwargs, allowed, score_mod, to_shard = _case(name, seq_len)
    kwargs.pop("score_mod", None)
    q, k, v, dout = random_qkv(BATCH, seq_len, HEADS_Q, HEADS_KV, DIM, seed)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = masked_reference(*full, allowed, score_mod)
    ref_grads = torch.autograd.grad(ref_out, full, dout)
    local = [
        ringattn.shard(t, layout).to(device, torch.float32).requires_grad_() for t in (q, k, v)
    ]
    for key, (tensor, dim) in to_shard.items():
        kwargs[key] = ringattn.shard(tensor, layout, dim=dim).to(device)
    call = {"granularity": granularity, "return_lse": True, "rotation": rotation}
    call["score_mod"] = score_mod
    if tile_size == 512:
        out, lse = ringattn.ring_attention(*local, layout=layout, seq_len=seq_len, **call, **kwargs)
    else:
        mask = ringattn.create_ring_mask(
            local[0].shape[1] * world,
            layout=layout,
            seq_len=seq_len,
            tile_size=tile_size,
            batch=BATCH,
            heads=HEADS_Q,
            device=device,
            **kwargs,
        )
        out, lse = ringattn.ring_attention(*local, mask=mask, **call)
    grads = torch.autograd.grad(out, local, ringattn.shard(dout, layout).to(device, torch.float32))
    out, lse, grads = out.cpu(), lse.cpu(), [g.cpu() for g in grads]
    label = f"{name} n={seq_len} tile={tile_size} rotation={rotation}"
    assert_close(f"{label} out", out, ringattn.shard(ref_out, layout), FP32_TOL)
    for got, ref, g in zip(grads, ref_grads, "qkv", strict=True):
        assert torch.isfinite(got).all(), f"{label} d{g} not finite"
        assert_close(f"{label} d{g}", got, ringattn.shard(ref, layout), FP32_TOL)
    ref_lse_local = ringattn.shard(ref_lse, layout, dim=2)
    # shard pads with 0; padding rows must come back as -inf
    padded_rows = ringattn.shard(torch.ones(seq_len), layout, dim=0) == 0
    ref_lse_local[:, :, padded_rows] = float("-inf")
    empty = torch.isinf(ref_lse_local)
    assert torch.equal(torch.isinf(lse), empty), f"{label} lse -inf rows differ"
    assert_close(f"{label} lse", lse[~empty], ref_lse_local[~empty], FP32_TOL)
    full_out = ringattn.unshard(out.detach().to(device), layout, seq_len=seq_len).cpu()
    assert_close(f"{label} unshard", full_out, ref_out, FP32_TOL)


def _masks_job(rank, world, layout, seq_lens, device="cpu", rotation="auto"):
    for seed, name in enumerate(CASES):
        for seq_len in seq_lens:
            for tile_size in (4, 512):
                _check_case(name, layout, seq_len, tile_size, seed, world, device, rotation)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_masks_match_dense_reference(pools, world, layout):
    pools(world).run(_masks_job, layout, (37, 48))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_masks_under_pass_q(pools, world, layout):
    """Every mask with queries travelling (rotation "q"), forward and backward."""
    pools(world).run(_masks_job, layout, (37,), "cpu", "q")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", [ReversedLayout(), MixedLayout()], ids=lambda x: x.name)
def test_masks_with_user_defined_layouts(pools, world, layout):
    """Every mask with layouts defined outside ringattn; MixedLayout pairs segments of
    different strides, whose causal tiles are classified tile by tile."""
    pools(world).run(_masks_job, layout, (37,))


def _mixed_document_id_shapes_job(rank, world):
    """One rank passes document_ids as (seq_local,), another as (batch, seq_local)."""
    seq_len, docs = 24, torch.tensor([[0] * 7 + [1] * 11 + [2] * 6])
    q, k, v, _ = random_qkv(1, seq_len, 2, 1, 8, 3)
    local_docs = ringattn.shard(docs, "zigzag", dim=1)
    ids = local_docs[0] if rank % 2 else local_docs
    local = [ringattn.shard(t, "zigzag").float() for t in (q, k, v)]
    out = ringattn.ring_attention(*local, causal=True, document_ids=ids)
    same = ringattn.ring_attention(*local, causal=True, document_ids=local_docs)
    return torch.equal(out, same)


def test_document_id_shapes_may_differ_between_ranks(pools):
    assert all(pools(2).run(_mixed_document_id_shapes_job))


def test_fully_masked_rows_are_zero_in_low_precision():
    """A window that reaches nothing (and padding) gives 0 output, -inf lse, 0 grads: no NaN."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, k, v, dout = (t.to(dtype) for t in random_qkv(1, 12, 2, 2, 8, 0))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        mask = torch.ones(1, 12, dtype=torch.bool)
        mask[0, 9:] = False
        out, lse = ringattn.ring_attention(
            q, k, v, attention_mask=mask, causal=True, return_lse=True
        )
        grads = torch.autograd.grad(out, (q, k, v), dout)
        assert torch.isinf(lse[..., 9:]).all() and (out[:, 9:] == 0).all()
        for g in grads:
            assert torch.isfinite(g).all()
        assert (grads[0][:, 9:] == 0).all() and (grads[1][:, 9:] == 0).all()


def test_positions_restart_in_every_document():
    cu = torch.tensor([0, 3, 10, 11])
    assert ringattn.positions(11, cu_seqlens=cu).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0]


def test_packed_documents_balance_best_striped():
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([100, 700, 50, 900, 298]))[None]
    spec = ringattn.MaskSpec(causal=True, doc_ids=ids, tile_size=32)
    work = ringattn.rank_work("striped", 4, 512, True, spec)
    assert max(work) / min(work) <= 1.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": (5,)}, r"window must be an int >= 0 or a \(left, right\) pair"),
        ({"window": -1}, r"window must be an int >= 0"),
        ({"cu_seqlens": torch.tensor([1, 4])}, r"start at 0 and never decrease"),
        ({"cu_seqlens": torch.tensor([0, 40])}, r"cu_seqlens ends at 40 but the ranks hold only 8"),
        ({"document_ids": torch.zeros(3, dtype=torch.long)}, r"document_ids must be an integer"),
        (
            {"attention_mask": torch.ones(1, 8)},
            r"attention_mask must have shape \(batch, seq_local\)",
        ),
        (
            {"cu_seqlens": torch.tensor([0, 8]), "document_ids": torch.zeros(8, dtype=torch.long)},
            r"either cu_seqlens or document_ids",
        ),
        ({"seq_len": 9}, r"seq_len must be an int in 1\.\.8"),
        ({"mask_mod": 3}, r"mask_mod must be callable"),
        ({"rotation": "sideways"}, r"rotation must be one of"),
    ],
)
def test_bad_mask_arguments_say_what_is_wrong(kwargs, message):
    q, k, v, _ = random_qkv(2, 8, 2, 2, 8, 0)
    with pytest.raises(ringattn.RingInputError, match=message):
        ringattn.ring_attention(q, k, v, **kwargs)
    if "rotation" not in kwargs:  # the same mistakes, made while creating a RingMask
        with pytest.raises(ringattn.RingInputError, match="^create_ring_mask: .*" + message):
            ringattn.create_ring_mask(8, batch=2, **kwargs)


def test_tile_size_belongs_to_the_mask():
    with pytest.raises(ringattn.RingInputError, match="tile_size must be a positive int"):
        ringattn.create_ring_mask(8, tile_size=0)
    with pytest.raises(TypeError, match="tile_size"):
        ringattn.ring_attention(*random_qkv(1, 8, 2, 2, 8, 0)[:3], tile_size=4)
