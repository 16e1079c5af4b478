"""ringattn.compat: ring-flash-attention's and yunchang's calls, made as those projects document
them (each rank extracts its shard the way their tests do), against a float64 single-device
reference and against ring_attention itself: outputs, softmax_lse and the gradients of q, k, v;
every layout, the packed and varlen forms, llama3's slices, world sizes 1-3; yunchang's Ulysses x
ring on 4 ranks (2x2 in both placements, 4x1, 1x4, two replicas of 2x1), its shards checked
against upstream's extraction and its mesh positions against upstream's groups. Then every
refusal.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_close, masked_reference, random_qkv

import ringattn
from ringattn.compat import ring_flash_attn as rfa
from ringattn.compat import yunchang

TOL = 1e-6  # float64 inputs; softmax_lse comes back in float32
BATCH, HEADS_Q, HEADS_KV, DIM = 2, 4, 2, 8
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])

# ---- how their tests cut a rank's shard from the full tensor ----


def _contiguous(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    return x.chunk(world, dim=dim)[rank]


def _zigzag(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def _stripe(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    return x.transpose(0, dim)[rank::world].transpose(0, dim)


EXTRACT = {"contiguous": _contiguous, "zigzag": _zigzag, "striped": _stripe}
FUNCS = {
    "contiguous": "ring_flash_attn",
    "zigzag": "zigzag_ring_flash_attn",
    "striped": "stripe_flash_attn",
}


def _per_document(extract: Callable, cu: list[int]) -> Callable:
    """Their varlen extraction: every packed document cut on its own, along ``dim``."""

    def cut(x: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
        docs = [x.narrow(dim, a, b - a) for a, b in itertools.pairwise(cu)]
        return torch.cat([extract(d, rank, world, dim) for d in docs], dim=dim)

    return cut


def _reference(q, k, v, dout, allowed, score_mod=None, scale=None):
    """float64 single-device out, lse and (dq, dk, dv), ``scale`` folded into q."""
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    factor = 1.0 if scale is None else scale / q.shape[-1] ** -0.5
    out, lse = masked_reference(full[0] * factor, full[1], full[2], allowed, score_mod)
    return out.detach(), lse.detach(), torch.autograd.grad(out, full, dout)


def _check(label, got, ref, cut, lse_dim):
    """Compare a compat call's ``(out, lse, grads)`` with the reference's, cut to this rank."""
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = got, ref
    assert lse.dtype == torch.float32, f"{label}: softmax_lse in {lse.dtype}"
    assert_close(f"{label} out", out, cut(ref_out), TOL)
    assert_close(f"{label} lse", lse, cut(ref_lse, dim=lse_dim), TOL)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert_close(f"{label} d{name}", g, cut(r), TOL)


# ---- batch forms ----


def _batch_case(name: str, n: int):
    """(compat keywords, allowed mask, reference score_mod, softmax_scale) over ``n`` tokens."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal = j <= i
    if name == "causal":
        return {"causal": True}, causal, None, None
    if name == "full":
        return {"causal": False}, torch.ones_like(causal), None, None
    if name == "causal_window":
        return {"causal": True, "window_size": (3, -1)}, causal & (j >= i - 3), None, None
    if name == "local_window":
        return {"window_size": (2, 1)}, (j >= i - 2) & (j <= i + 1), None, None
    if name == "alibi_scale":  # flash-attn's bias -slope * |i - j| is ringattn.alibi's when causal
        kwargs = {"causal": True, "alibi_slopes": SLOPES, "softmax_scale": 0.3}
        return kwargs, causal, ringattn.alibi(SLOPES), 0.3
    raise KeyError(name)


def _batch_job(rank, world):
    n = 12 * world
    q, k, v, dout = random_qkv(BATCH, n, HEADS_Q, HEADS_KV, DIM, seed=1)
    for layout, cut_fn in EXTRACT.items():
        func = getattr(rfa, FUNCS[layout] + "_func")

        def cut(x, dim=1, cut_fn=cut_fn):
            return cut_fn(x, rank, world, dim)

        for name in ("causal", "full", "causal_window", "local_window", "alibi_scale"):
            kwargs, allowed, score_mod, scale = _batch_case(name, n)
            ref = _reference(q, k, v, dout, allowed[None, None], score_mod, scale)
            local = [cut(t).requires_grad_() for t in (q, k, v)]
            out, lse, probs = func(*local, return_attn_probs=True, **kwargs)
            assert probs is None
            _check(
                f"{func.__name__} {name} p={world}",
                (out, lse, torch.autograd.grad(out, local, cut(dout))),
                ref,
                cut,
                2,
            )
            window = kwargs.get("window_size", (-1, -1))
            ours = ringattn.ring_attention(
                *(t.detach() for t in local),
                layout=layout,
                causal=kwargs.get("causal", False),
                window=None if window == (-1, -1) else tuple(None if s < 0 else s for s in window),
                score_mod=score_mod,
                scale=scale,
            )
            assert_close(f"{func.__name__} {name} vs ring_attention", out, ours, 1e-12)
        # the packed forms, as their tests call them (MHA for qkv)
        kv = torch.stack([k, v], dim=2)
        qkv = torch.stack([q[:, :, :HEADS_KV], k, v], dim=2)
        allowed = (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None, None]
        for packed, args in (("kvpacked", (q, kv)), ("qkvpacked", (qkv,))):
            ref_inputs = (q, k, v) if packed == "kvpacked" else (q[:, :, :HEADS_KV], k, v)
            ref_dout = dout if packed == "kvpacked" else dout[:, :, :HEADS_KV]
            ref = _reference(*ref_inputs, ref_dout, allowed)
            local = [cut(t).requires_grad_() for t in args]
            out, lse, _ = getattr(rfa, f"{FUNCS[layout]}_{packed}_func")(
                *local,
                dropout_p=0.0,
                causal=True,
                window_size=(-1, -1),
                alibi_slopes=None,
                deterministic=False,
                return_attn_probs=True,
            )
            grads = torch.autograd.grad(out, local, cut(ref_dout))
            unpacked = [*grads[:-1], *grads[-1].unbind(2)]  # d(q), d(kv) or d(qkv)
            _check(f"{layout} {packed} p={world}", (out, lse, unpacked), ref, cut, 2)
    # dropout is ring_attention's: the same seed drops the same probabilities
    local = [_zigzag(t, rank, world) for t in (q, k, v)]
    torch.manual_seed(11)
    dropped = rfa.zigzag_ring_flash_attn_func(*local, dropout_p=0.3, causal=True)
    torch.manual_seed(11)
    ours = ringattn.ring_attention(*local, dropout_p=0.3, causal=True, layout="zigzag")
    assert torch.equal(dropped, ours)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batch_forms_match_reference_and_ring_attention(pools, world):
    pools(world).run(_batch_job)


# ---- varlen forms: every packed document split on its own; local cu_seqlens ----


def _varlen_job(rank, world):
    cu = [0, 2 * world, 8 * world, 12 * world]  # documents of 2p, 6p and 4p tokens
    n = cu[-1]
    q, k, v, dout = (t[0] for t in random_qkv(1, n, HEADS_Q, HEADS_KV, DIM, seed=2))
    docs = torch.searchsorted(torch.tensor(cu[1:]), torch.arange(n), right=True)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    same_doc = docs[:, None] == docs[None, :]
    local_cu = torch.tensor(cu, dtype=torch.int32) // world
    local_max = max(b - a for a, b in itertools.pairwise(cu)) // world
    cases = {  # form -> (keywords, allowed)
        "func": ({"causal": True}, same_doc & (j <= i)),
        "kvpacked": ({"causal": True, "window_size": (2, -1)}, same_doc & (j <= i) & (j >= i - 2)),
        "qkvpacked": ({"causal": False, "alibi_slopes": SLOPES[:HEADS_KV]}, same_doc),
    }
    for layout, cut_fn in EXTRACT.items():
        cut_doc = _per_document(cut_fn, cu)

        def cut(x, dim=0, cut_doc=cut_doc):
            return cut_doc(x, rank, world, dim)

        for form, (kwargs, allowed) in cases.items():
            mha = form == "qkvpacked"
            ref_q, ref_dout = (q[:, :HEADS_KV], dout[:, :HEADS_KV]) if mha else (q, dout)
            ref_mod = None
            if "alibi_slopes" in kwargs:
                slopes = kwargs["alibi_slopes"]

                def ref_mod(score, b, h, qi, ki, slopes=slopes):
                    return score - slopes[h] * (qi - ki).abs()

            ref = _reference(
                *(t[None] for t in (ref_q, k, v, ref_dout)), allowed[None, None], ref_mod
            )
            ref = (ref[0][0], ref[1][0], [g[0] for g in ref[2]])
            if form == "func":
                inputs = [cut(t).requires_grad_() for t in (q, k, v)]
            elif form == "kvpacked":
                inputs = [cut(q).requires_grad_(), cut(torch.stack([k, v], 1)).requires_grad_()]
            else:
                inputs = [cut(torch.stack([ref_q, k, v], 1)).requires_grad_()]
            suffix = "" if form == "func" else f"_{form}"
            func = getattr(rfa, f"{FUNCS[layout]}_varlen{suffix}_func")
            out, lse, _ = func(*inputs, local_cu, local_max, return_attn_probs=True, **kwargs)
            grads = torch.autograd.grad(out, inputs, cut(ref_dout))
            unpacked = [*grads[:-1], *grads[-1].unbind(1)] if form != "func" else grads
            _check(f"{func.__name__} p={world}", (out, lse, unpacked), ref, cut, 1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_varlen_forms_match_reference(pools, world):
    pools(world).run(_varlen_job)


# ---- llama3: contiguous slices of the packed sequence, documents across ranks ----


def test_llama3_prepare_cu_seqlens_slices_the_documents_per_rank():
    cu = torch.tensor([0, 5, 33, 36], dtype=torch.int32)  # 3 ranks of 12 tokens
    expected = {  # rank -> with causal: cu_q, cu_k, max_q, max_k, k slice; without: cu_k, k slice
        0: ([0, 5, 12], [0, 5, 12], 7, 7, slice(0, 12), [0, 5, 33], slice(0, 33)),
        1: ([0, 12], [0, 19], 12, 19, slice(5, 24), [0, 28], slice(5, 33)),
        2: ([0, 9, 12], [0, 28, 31], 9, 28, slice(5, 36), [0, 28, 31], slice(5, 36)),
    }
    for rank, (cu_q, cu_k, max_q, max_k, k_slice, cu_k_full, k_slice_full) in expected.items():
        got = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, 3)
        assert [got[0].tolist(), got[1].tolist(), *got[2:]] == [cu_q, cu_k, max_q, max_k, k_slice]
        assert got[0].dtype == got[1].dtype == torch.int32
        got = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, False, rank, 3)
        assert got[1].tolist() == cu_k_full and got[4] == k_slice_full


def _llama3_job(rank, world):
    n = 12 * world
    cu = torch.tensor([0, 5, n - 3, n], dtype=torch.int32)  # the middle document spans ranks
    q, k, v, dout = (t[0] for t in random_qkv(1, n, HEADS_Q, HEADS_KV, DIM, seed=3))
    docs = torch.searchsorted(cu[1:].long(), torch.arange(n), right=True)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for causal in (True, False):
        allowed = (docs[:, None] == docs[None, :]) & ((j <= i) | (not causal))
        ref = _reference(*(t[None] for t in (q, k, v, dout)), allowed[None, None])
        ref = (ref[0][0], ref[1][0], [g[0] for g in ref[2]])
        cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(
            cu, causal, rank, world
        )

        def cut(x, dim=0):
            return _contiguous(x, rank, world, dim)

        local = [cut(t).requires_grad_() for t in (q, k, v)]
        for stride in (1, HEADS_KV):
            out, lse, _ = rfa.llama3_flash_attn_varlen_func(
                *local,
                cu_q,
                cu_k,
                max_q,
                max_k,
                heads_k_stride=stride,
                local_k_slice=k_slice,
                causal=causal,
                return_attn_probs=True,
            )
            grads = torch.autograd.grad(out, local, cut(dout))
            _check(f"llama3 causal={causal} p={world}", (out, lse, grads), ref, cut, 1)
        kv = cut(torch.stack([k, v], 1))
        packed = rfa.llama3_flash_attn_varlen_kvpacked_func(
            local[0].detach(), kv, cu_q, cu_k, max_q, max_k, 1, k_slice, causal=causal
        )
        assert_close("llama3 kvpacked", packed, cut(ref[0]), TOL)
    qkv = cut(torch.stack([q[:, :HEADS_KV], k, v], 1))
    allowed = (docs[:, None] == docs[None, :]) & (j <= i)
    ref_out, _ = masked_reference(*(t[None] for t in (q[:, :HEADS_KV], k, v)), allowed[None, None])
    args = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
    out = rfa.llama3_flash_attn_varlen_qkvpacked_func(qkv, *args[:4], 1, args[4], causal=True)
    assert_close("llama3 qkvpacked", out, cut(ref_out[0]), TOL)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_llama3_matches_reference(pools, world):
    pools(world).run(_llama3_job)


# ---- yunchang ----


def _yunchang_job(rank, world):
    n = 12 * world
    q, k, v, dout = random_qkv(BATCH, n, HEADS_Q, HEADS_KV, DIM, seed=4)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    yunchang.set_seq_parallel_pg(1, world, rank, world)
    for impl, layout in (("basic", "contiguous"), ("zigzag", "zigzag"), ("strip", "striped")):
        extract = yunchang.EXTRACT_FUNC_DICT[impl]

        def cut(x, dim=1, extract=extract):
            return extract(x, rank, world_size=world, rd=world, ud=1, dim=dim)

        assert torch.equal(cut(q), ringattn.shard(q, layout)), impl
        attn = yunchang.LongContextAttention(ring_impl_type=impl, attn_type=yunchang.AttnType.FA)
        for softcap in (0.0, 2.0):
            score_mod = ringattn.softcap(softcap) if softcap else None
            ref = _reference(q, k, v, dout, (j <= i)[None, None], score_mod)
            local = [cut(t).requires_grad_() for t in (q, k, v)]
            out = attn(
                *local,
                dropout_p=0.0,
                softmax_scale=None,
                causal=True,
                window_size=(-1, -1),
                softcap=softcap,
                alibi_slopes=None,
                deterministic=False,
                return_attn_probs=True,
            )
            grads = torch.autograd.grad(out, local, cut(dout))
            label = f"yunchang {impl} softcap={softcap} p={world}"
            assert_close(f"{label} out", out, cut(ref[0]), TOL)
            for name, g, r in zip("qkv", grads, ref[2], strict=True):
                assert_close(f"{label} d{name}", g, cut(r), TOL)
        packed = yunchang.LongContextAttentionQKVPacked(ring_impl_type=impl)
        qkv = torch.stack([q[:, :, :HEADS_KV], k, v], dim=2)
        ref_out, _ = masked_reference(q[:, :, :HEADS_KV], k, v, (j <= i)[None, None])
        assert_close(f"yunchang qkvpacked {impl}", packed(cut(qkv), causal=True), cut(ref_out), TOL)
    # data-parallel replicas: rings of one rank, each attending over its own whole sequence
    yunchang.set_seq_parallel_pg(1, 1, rank, world)
    mine = [t[:, :12] + rank for t in (q, k, v)]
    ref_out, _ = masked_reference(*mine, torch.ones(12, 12, dtype=torch.bool)[None, None])
    assert_close("yunchang replicas", yunchang.LongContextAttention()(*mine), ref_out, TOL)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_yunchang_long_context_attention_matches_reference(pools, world):
    pools(world).run(_yunchang_job)


# ---- yunchang with Ulysses: 4 ranks as ulysses x ring, both placements, replicas ----


def _their_coordinates(rank: int, ud: int, rd: int, low: bool) -> tuple[int, int]:
    """(Ulysses rank, ring rank) of ``rank`` in the groups of one block of ``ud x rd`` ranks as
    yunchang's set_seq_parallel_pg lists them (a group's ranks are in increasing order)."""
    sp = ud * rd
    if low:
        ulysses_groups = [range(i * ud, (i + 1) * ud) for i in range(rd)]
        ring_groups = [range(i, sp, ud) for i in range(ud)]
    else:
        ring_groups = [range(i * rd, (i + 1) * rd) for i in range(ud)]
        ulysses_groups = [range(i, sp, rd) for i in range(rd)]
    u = next(group.index(rank) for group in ulysses_groups if rank in group)
    r = next(group.index(rank) for group in ring_groups if rank in group)
    return u, r


def _their_extract(impl, x, rank, world, rd, ud, low):
    """yunchang's EXTRACT_FUNC_DICT[impl](x, rank, world, rd, ud), with their tensor operations
    (zigzag reads the ring and Ulysses ranks from their groups)."""
    if impl == "basic":
        return x.chunk(world, dim=1)[rank]
    if impl == "strip":
        b, n = x.shape[:2]
        grouped = x.reshape(b, n // rd, rd, -1).transpose(1, 2).reshape(x.shape)
        return grouped.chunk(world, dim=1)[rank]
    u, r = _their_coordinates(rank, ud, rd, low)
    chunks = x.chunk(2 * rd, dim=1)
    return torch.cat([chunks[r], chunks[2 * rd - 1 - r]], dim=1).chunk(ud, dim=1)[u]


_CONTEXT_MESHES: dict[tuple[int, int], object] = {}


def _yunchang_ulysses_job(rank, world, ud, rd, low):
    sp = ud * rd
    replica, sp_rank = divmod(rank, sp)  # several blocks: data-parallel replicas
    n = 8 * sp
    q, k, v, dout = (t + replica for t in random_qkv(BATCH, n, HEADS_Q, HEADS_KV, DIM, seed=5))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal_ref = _reference(q, k, v, dout, (j <= i)[None, None])
    cap = ringattn.softcap(2.0)

    def capped_alibi(score, b, h, qi, ki):
        return cap(score, b, h, qi, ki) - SLOPES[h] * (qi - ki).abs()

    window = {"window_size": (3, 2), "alibi_slopes": SLOPES, "softcap": 2.0}
    window_ref = _reference(q, k, v, dout, ((j >= i - 3) & (j <= i + 2))[None, None], capped_alibi)
    yunchang.set_seq_parallel_pg(ud, rd, rank, world, use_ulysses_low=low)
    for impl, layout in (("basic", "contiguous"), ("zigzag", "zigzag"), ("strip", "striped")):

        def cut(x, impl=impl):
            return yunchang.EXTRACT_FUNC_DICT[impl](x, sp_rank, world_size=sp, rd=rd, ud=ud)

        label = f"yunchang {impl} ulysses={ud} ring={rd} low={low} replica={replica}"
        theirs = _their_extract(impl, q, sp_rank, sp, rd, ud, low)
        assert torch.equal(cut(q), theirs), label
        attn = yunchang.LongContextAttention(ring_impl_type=impl, attn_type=yunchang.AttnType.FA)
        assert torch.equal(ringattn.shard(q, attn.layout, group=attn.group), theirs), label
        if ud > 1:  # the mesh position of this rank is its place in yunchang's groups
            mesh = attn.group
            got = (mesh.get_local_rank("ulysses"), mesh.get_local_rank("ring"))
            assert got == _their_coordinates(sp_rank, ud, rd, low), label
        cases = [({"causal": True}, causal_ref)] + ([(window, window_ref)] * (impl == "zigzag"))
        outs = []
        for kwargs, ref in cases:
            local = [cut(t).requires_grad_() for t in (q, k, v)]
            out = attn(*local, dropout_p=0.0, return_attn_probs=True, **kwargs)
            outs.append(out.detach())
            grads = torch.autograd.grad(out, local, cut(dout))
            assert_close(f"{label} {kwargs} out", out, cut(ref[0]), TOL)
            for name, g, r in zip("qkv", grads, ref[2], strict=True):
                assert_close(f"{label} {kwargs} d{name}", g, cut(r), TOL)
        if low and replica == 0 and sp == world:  # the same call on ringattn's own mesh
            if (ud, rd) not in _CONTEXT_MESHES:
                _CONTEXT_MESHES[ud, rd] = ringattn.context_mesh(ud, rd)
            group = _CONTEXT_MESHES[ud, rd] if ud > 1 else None
            plain = [cut(t) for t in (q, k, v)]
            ours = ringattn.ring_attention(*plain, causal=True, layout=layout, group=group)
            assert_close(f"{label} vs ring_attention", outs[0], ours, 1e-12)
    packed = yunchang.LongContextAttentionQKVPacked(ring_impl_type="zigzag")
    qkv = torch.stack([q, *(t.repeat_interleave(2, dim=2) for t in (k, v))], dim=2)
    got = packed(yunchang.zigzag_extract_local(qkv, sp_rank, sp, rd, ud), causal=True)
    ref_out = yunchang.zigzag_extract_local(causal_ref[0], sp_rank, sp, rd, ud)
    assert_close(f"yunchang qkvpacked ulysses={ud} ring={rd} low={low}", got, ref_out, TOL)
    if ud > 1:  # query heads the Ulysses degree cannot split: refused on every rank
        small = [t[:, : n // sp, : ud // 2] for t in (q, k, v)]
        with pytest.raises(ValueError, match=f"Ulysses degree of {ud}"):
            attn(*small, causal=True)


@pytest.mark.parametrize(
    ("ud", "rd", "low"),
    [(2, 2, True), (2, 2, False), (4, 1, True), (1, 4, True), (2, 1, True)],
    ids=["2x2", "2x2-ulysses-high", "4x1", "1x4", "2x1-two-replicas"],
)
def test_yunchang_ulysses_matches_reference(pools, ud, rd, low):
    pools(4).run(_yunchang_ulysses_job, ud, rd, low)


# ---- what is honoured without a ring, and every refusal ----


def test_dropout_and_deterministic_are_ring_attentions():
    q = torch.randn(1, 8, 2, 8)
    plain = rfa.ring_flash_attn_func(q, q, q, causal=True)
    assert torch.equal(rfa.ring_flash_attn_func(q, q, q, causal=True, deterministic=True), plain)
    torch.manual_seed(7)
    dropped = rfa.ring_flash_attn_func(q, q, q, dropout_p=0.5, causal=True)
    torch.manual_seed(7)  # the mask's seed is drawn from torch's generator, as in ring_attention
    ours = ringattn.ring_attention(q, q, q, dropout_p=0.5, causal=True, layout="contiguous")
    assert torch.equal(dropped, ours) and not torch.equal(dropped, plain)


def _refusals():
    q = torch.randn(1, 8, 2, 8)
    t = q[0]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 1)
    return {
        "dropout_p out of range": (
            lambda: rfa.ring_flash_attn_func(q, q, q, dropout_p=1.5),
            ValueError,
            "dropout_p",
        ),
        "window_size below -1": (
            lambda: rfa.zigzag_ring_flash_attn_func(q, q, q, window_size=(-2, 0)),
            ValueError,
            "window_size",
        ),
        "window_size not a pair": (
            lambda: rfa.stripe_flash_attn_func(q, q, q, window_size=(4,)),
            ValueError,
            "window_size",
        ),
        "alibi_slopes of the wrong heads": (
            lambda: rfa.ring_flash_attn_func(q, q, q, alibi_slopes=torch.ones(3)),
            ValueError,
            "alibi_slopes",
        ),
        "alibi_slopes per varlen sequence": (
            lambda: rfa.ring_flash_attn_varlen_func(t, t, t, cu, 5, alibi_slopes=torch.ones(2, 2)),
            ValueError,
            "alibi_slopes",
        ),
        "qkv not packed": (
            lambda: rfa.ring_flash_attn_qkvpacked_func(q),
            ValueError,
            "qkv must be",
        ),
        "batch q to a varlen form": (
            lambda: rfa.ring_flash_attn_varlen_func(q, q, q, cu, 5),
            ValueError,
            "q must be",
        ),
        "global cu_seqlens": (
            lambda: rfa.ring_flash_attn_varlen_func(t, t, t, cu * 2, 10),
            ValueError,
            "local",
        ),
        "cu_seqlens not from 0": (
            lambda: rfa.ring_flash_attn_varlen_func(t, t, t, cu + 1, 5),
            ValueError,
            "start at 0",
        ),
        "zigzag varlen, odd document": (
            lambda: rfa.zigzag_ring_flash_attn_varlen_func(t, t, t, cu, 5),
            ValueError,
            "even",
        ),
        "llama3 arguments of another rank": (
            lambda: rfa.llama3_flash_attn_varlen_func(
                t, t, t, cu_q, cu_k, max_q, max_k, 1, slice(1, 8)
            ),
            ValueError,
            "llama3_flash_attn_prepare_cu_seqlens",
        ),
        "llama3 heads_k_stride": (
            lambda: rfa.llama3_flash_attn_varlen_func(
                t, t, t, cu_q, cu_k, max_q, max_k, 3, k_slice
            ),
            ValueError,
            "heads_k_stride",
        ),
        "llama3 length not divisible": (
            lambda: rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 3),
            ValueError,
            "multiple",
        ),
        "softcap below 0": (
            lambda: _long_context("basic")(q, q, q, softcap=-1.0),
            ValueError,
            "softcap",
        ),
        "Ulysses x ring not dividing the world": (
            lambda: yunchang.set_seq_parallel_pg(2, 1, 0, 1),
            ValueError,
            "sp_ulysses_degree x sp_ring_degree",
        ),
        "Ulysses degree below 1": (
            lambda: yunchang.set_seq_parallel_pg(0, 1, 0, 1),
            ValueError,
            "sp_ulysses_degree",
        ),
        "rank not torch.distributed's": (
            lambda: yunchang.set_seq_parallel_pg(1, 2, 1, 2),
            ValueError,
            "do not match",
        ),
        "ring degree not a divisor": (
            lambda: yunchang.set_seq_parallel_pg(1, 2, 0, 1),
            ValueError,
            "sp_ring_degree",
        ),
        "ring_impl_type": (lambda: _long_context("ring"), ValueError, "ring_impl_type"),
        "attn_type": (lambda: _long_context("basic", attn_type="flash"), ValueError, "attn_type"),
        "attn_processor": (
            lambda: _long_context("basic", attn_processor=torch.nn.Identity()),
            NotImplementedError,
            "attn_processor",
        ),
        "forward's extra arguments": (
            lambda: _long_context("basic")(
                q, q, q, 0.0, None, False, (-1, -1), 0.0, None, False, False, 1
            ),
            TypeError,
            "positional",
        ),
        "extract, rd x ud not world_size": (
            lambda: yunchang.EXTRACT_FUNC_DICT["zigzag"](q, 0, 2, rd=2, ud=2),
            ValueError,
            "rd=2 x ud=2",
        ),
        "extract, degrees not set_seq_parallel_pg's": (
            lambda: _extract_after(yunchang.set_seq_parallel_pg(1, 1, 0, 1), q),
            ValueError,
            "differ from set_seq_parallel_pg",
        ),
        "extract, rd not world_size": (
            lambda: yunchang.EXTRACT_FUNC_DICT["basic"](q, 0, 2, rd=1, ud=1),
            ValueError,
            "rd=1",
        ),
        "extract, length not divisible": (
            lambda: yunchang.EXTRACT_FUNC_DICT["zigzag"](q, 0, 3, rd=3, ud=1),
            ValueError,
            "divisible",
        ),
        "AttnType name": (lambda: yunchang.AttnType.from_string("flash"), ValueError, "flash"),
    }


def _extract_after(_setup: None, x: torch.Tensor) -> torch.Tensor:
    """A 2 x 2 extraction after the call ``_setup`` (set_seq_parallel_pg of other degrees)."""
    return yunchang.EXTRACT_FUNC_DICT["strip"](x, 0, 4, rd=2, ud=2)


def _long_context(impl: str, **kwargs) -> yunchang.LongContextAttention:
    yunchang.set_seq_parallel_pg(1, 1, 0, 1)
    return yunchang.LongContextAttention(ring_impl_type=impl, **kwargs)


@pytest.mark.parametrize("case", list(_refusals()))
def test_refusals_name_the_argument(case):
    call, error, match = _refusals()[case]
    with pytest.raises(error, match=match):
        call()


def test_long_context_attention_needs_set_seq_parallel_pg(monkeypatch):
    monkeypatch.setattr(yunchang, "_STATE", yunchang._SequenceParallel())
    with pytest.raises(RuntimeError, match="set_seq_parallel_pg"):
        yunchang.LongContextAttention()
    assert yunchang.AttnType.from_string("fa3") is yunchang.AttnType.FA3


def test_yunchang_ulysses_layer_arguments(monkeypatch):
    """With a Ulysses degree above 1 (state set by hand: no groups are needed to build a layer)
    the all-to-all dims must be yunchang's defaults, and the layout is the one whose mesh shards
    are EXTRACT_FUNC_DICT's: the built-in ones but for basic/strip with use_ulysses_low=False."""
    state = yunchang._SequenceParallel(configured=True, ulysses=2, ring=2, ulysses_low=False)
    monkeypatch.setattr(yunchang, "_STATE", state)
    for make in (
        lambda: yunchang.LongContextAttention(scatter_idx=1, gather_idx=2),
        lambda: yunchang.LongContextAttentionQKVPacked(scatter_idx=2),
    ):
        with pytest.raises(ValueError, match="scatter_idx"):
            make()
    layouts = {
        impl: yunchang.LongContextAttention(ring_impl_type=impl).layout
        for impl in ("basic", "zigzag", "strip")
    }
    assert layouts == {
        "basic": yunchang.UlyssesHighLayout("contiguous", 2),
        "zigzag": "zigzag",
        "strip": yunchang.UlyssesHighLayout("striped", 2),
    }
    state.ulysses_low = True
    assert yunchang.LongContextAttentionQKVPacked(ring_impl_type="strip").layout == "striped"
    # the ring shards of the strided placement: ranks g = r + u * R of their block, in order
    assert [layouts["strip"].positions(r, 2, 8).tolist() for r in range(2)] == [
        [0, 2, 4, 6, 1, 3, 5, 7],
        [8, 10, 12, 14, 9, 11, 13, 15],
    ]


def test_importing_ringattn_leaves_compat_unimported():
    init = Path(ringattn.__file__).read_text()
    imported = [n for n in ast.walk(ast.parse(init)) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imported and not any("compat" in ast.unparse(node) for node in imported)
