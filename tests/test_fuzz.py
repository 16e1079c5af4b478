"""Property-based fuzzing of ring attention against a dense float64 reference (hypothesis).

A valid case draws a world size (1-4), a layout (built in, or user-defined with one or mixed
strides), self- or cross-attention lengths (primes, 1-token shards, padding that ``shard`` adds),
GQA ratios, batch, head_dim, every mask (causal, window, cu_seqlens or document_ids, padding,
mask_mod, score_mod) in combination, the rotation (pass-KV, pass-Q, auto or all-gather), tile
size, sub-blocks, fp32 or fp64, and whether the masks come as a ``RingMask`` or as keywords.
Output, log-sum-exp and dq/dk/dv must match the reference, with no NaN anywhere. An invalid case
corrupts one argument on one rank or all of them: every rank must raise ``RingInputError``, and
the same processes must then still run a valid ring.

CI runs a fixed-seed budget (40 valid and 20 invalid examples, about a minute);
``RINGATTN_FUZZ_EXAMPLES=N`` runs N of each with random seeds (``make fuzz``: 10,000).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")

from helpers import MixedLayout, ReversedLayout, masked_reference, relative_error  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ringattn  # noqa: E402

FIXED_SEED = "RINGATTN_FUZZ_EXAMPLES" not in os.environ
EXAMPLES = int(os.environ.get("RINGATTN_FUZZ_EXAMPLES", "40"))
LAYOUTS = {"reversed": ReversedLayout(), "mixed": MixedLayout()}
TOLERANCE = {"float32": 2e-5, "float64": 1e-10}


_RUN = {"valid": 0, "invalid": 0}


def _count(kind: str) -> None:
    """Progress of a long run (``make fuzz`` shows it): a line every 500 examples."""
    _RUN[kind] += 1
    if not FIXED_SEED and _RUN[kind] % 500 == 0:
        print(f"fuzz: {_RUN[kind]:,} {kind} examples run", file=sys.stderr, flush=True)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=FIXED_SEED,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _layout(name: str):
    return LAYOUTS.get(name, name)


def _multiple(name: str, world: int) -> int:
    return ringattn.padded_length(1, _layout(name), world) // world


@st.composite
def valid_cases(draw) -> dict:
    world = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["contiguous", "zigzag", "striped", "reversed", "mixed"]))
    multiple = _multiple(layout, world)
    cross = draw(st.booleans())
    if cross:  # queries are the last positions of a longer key sequence; no padding
        kv_local = multiple * draw(st.integers(1, 5))
        q_local = multiple * draw(st.integers(1, kv_local // multiple))
        seq_q, seq_kv, seq_len = q_local * world, kv_local * world, None
    else:  # any length: shard pads, seq_len masks the padding
        seq_len = draw(st.integers(1, 37))
        seq_q = seq_kv = seq_len
    heads_kv = draw(st.integers(1, 2))
    case = {
        "world": world,
        "layout": layout,
        "seq_q": seq_q,
        "seq_kv": seq_kv,
        "seq_len": seq_len,
        "batch": draw(st.integers(1, 2)),
        "heads_kv": heads_kv,
        "heads_q": heads_kv * draw(st.integers(1, 3)),
        "dim": draw(st.sampled_from([4, 8])),
        "dtype": draw(st.sampled_from(["float32", "float64"])),
        "causal": draw(st.booleans()),
        "window": draw(
            st.none()
            | st.integers(0, 6)
            | st.tuples(st.none() | st.integers(0, 6), st.none() | st.integers(0, 6))
        ),
        "documents": draw(st.sampled_from([None, "cu_seqlens", "document_ids"])),
        "padding": draw(st.booleans()),
        "mask_mod": draw(st.sampled_from([None, "prefix_lm", "every_third"])),
        "score_mod": draw(st.sampled_from([None, "softcap", "alibi"])),
        "rotation": draw(st.sampled_from(["kv", "q", "auto", "allgather"])),
        "tile_size": draw(st.sampled_from([1, 2, 3, 5, 8, 512])),
        "sub_blocks": draw(st.integers(1, 3)),
        "via_mask": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }
    gen = torch.Generator().manual_seed(case["seed"])
    if case["documents"] == "cu_seqlens":  # boundaries over the key positions, maybe short
        cuts = torch.randint(0, seq_kv + 1, (draw(st.integers(0, 4)),), generator=gen)
        end = seq_kv - draw(st.integers(0, min(3, seq_kv - 1)))
        case["cu"] = sorted({0, end, *(min(int(c), end) for c in cuts)})
    return case


def _every_third(b, h, q_idx, kv_idx):
    return (q_idx + 2 * kv_idx + b) % 3 != 0


def _mods(case):
    mask_mod = {"prefix_lm": ringattn.prefix_lm(4), "every_third": _every_third}.get(
        case["mask_mod"]
    )
    score_mod = None
    if case["score_mod"] == "softcap":
        score_mod = ringattn.softcap(0.9)
    elif case["score_mod"] == "alibi":
        score_mod = ringattn.alibi(ringattn.alibi_slopes(case["heads_q"]))
    return mask_mod, score_mod


def _per_token(case):
    """Full-length (batch, seq_kv) document ids and validity, as the case draws them."""
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    batch, n = case["batch"], case["seq_kv"]
    ids = valid = None
    if case["documents"] == "document_ids":
        ids = torch.randint(0, 3, (batch, n), generator=gen).cumsum(1) // 2
    if case["padding"]:
        valid = torch.rand(batch, n, generator=gen) > 0.25
    return ids, valid


def _allowed(case) -> torch.Tensor:
    """The dense (batch, heads, seq_q, seq_kv) mask of the case, from global positions."""
    nq, nkv = case["seq_q"], case["seq_kv"]
    i = torch.arange(nkv - nq, nkv)[:, None]
    j = torch.arange(nkv)[None, :]
    allowed = torch.ones(nq, nkv, dtype=torch.bool)
    if case["causal"]:
        allowed &= j <= i
    window = case["window"]
    if window is not None:
        left, right = (window, 0) if isinstance(window, int) else window
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
    allowed = allowed[None, None].expand(case["batch"], case["heads_q"], nq, nkv).clone()
    ids, valid = _per_token(case)
    if case["documents"] == "cu_seqlens":
        cu = torch.tensor(case["cu"])
        ids = torch.searchsorted(cu[1:], torch.arange(nkv), right=True)[None]
        in_range = (torch.arange(nkv) < case["cu"][-1])[None]
        valid = in_range if valid is None else valid & in_range
    q_pos = torch.arange(nkv - nq, nkv)
    if ids is not None:
        allowed &= (ids[:, q_pos, None] == ids[:, None, :])[:, None]
    if valid is not None:
        allowed &= (valid[:, q_pos, None] & valid[:, None, :])[:, None]
    mask_mod, _ = _mods(case)
    if mask_mod is not None:
        b = torch.arange(case["batch"])[:, None, None, None]
        h = torch.arange(case["heads_q"])[None, :, None, None]
        allowed &= mask_mod(b, h, q_pos[None, None, :, None], torch.arange(nkv)[None, None, None])
    return allowed


def _valid_job(rank, world, case):
    """Run the case on this rank; return (worst relative error, all finite, description)."""
    layout = _layout(case["layout"])
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(case["seed"])
    shape_q = (case["batch"], case["seq_q"], case["heads_q"], case["dim"])
    shape_kv = (case["batch"], case["seq_kv"], case["heads_kv"], case["dim"])
    q, dout = (torch.randn(shape_q, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(shape_kv, generator=gen, dtype=torch.float64) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    mask_mod, score_mod = _mods(case)
    ref_out, ref_lse = masked_reference(*full, _allowed(case), score_mod)
    ref_grads = torch.autograd.grad(ref_out, full, dout)

    local = [ringattn.shard(t, layout).to(dtype).requires_grad_() for t in (q, k, v)]
    ids, valid = _per_token(case)
    masks = {"causal": case["causal"], "window": case["window"], "mask_mod": mask_mod}
    if case["seq_len"] is not None and case["seq_len"] < ringattn.padded_length(
        case["seq_len"], layout, world
    ):
        masks["seq_len"] = case["seq_len"]
    if case["documents"] == "cu_seqlens":
        masks["cu_seqlens"] = torch.tensor(case["cu"])
    if ids is not None:
        masks["document_ids"] = ringattn.shard(ids, layout, dim=1)
    if valid is not None:
        masks["attention_mask"] = ringattn.shard(valid, layout, dim=1)
    call = {
        "rotation": case["rotation"],
        "score_mod": score_mod,
        "return_lse": True,
        "granularity": ringattn.Granularity(sub_blocks=case["sub_blocks"], min_tokens=1),
    }
    if case["via_mask"]:
        mask = ringattn.create_ring_mask(
            local[0].shape[1] * world,
            local[1].shape[1] * world,
            layout=layout,
            batch=case["batch"],
            heads=case["heads_q"],
            tile_size=case["tile_size"],
            **masks,
        )
        out, lse = ringattn.ring_attention(*local, mask=mask, **call)
    else:
        out, lse = ringattn.ring_attention(*local, layout=layout, **masks, **call)
    grads = torch.autograd.grad(out, local, ringattn.shard(dout, layout).to(dtype))
    finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads))
    finite &= not bool(torch.isnan(lse).any())
    n_q, n_kv = case["seq_q"], case["seq_kv"]
    got = [
        ringattn.unshard(out.detach(), layout, seq_len=n_q),
        ringattn.unshard(lse, layout, dim=2, seq_len=n_q),
        ringattn.unshard(grads[0], layout, seq_len=n_q),
        ringattn.unshard(grads[1], layout, seq_len=n_kv),
        ringattn.unshard(grads[2], layout, seq_len=n_kv),
    ]
    refs = [ref_out.detach(), ref_lse.detach(), *ref_grads]
    empty = torch.isinf(refs[1])
    if not torch.equal(torch.isinf(got[1]), empty):
        return float("inf"), finite
    got[1], refs[1] = got[1][~empty], refs[1][~empty]
    pairs = [(g, r) for g, r in zip(got, refs, strict=True) if r.numel()]
    return max((relative_error(g, r) for g, r in pairs), default=0.0), finite


@_settings(EXAMPLES)
@given(case=valid_cases())
def test_fuzz_valid_cases_match_float64(pools, case):
    _count("valid")
    for worst, finite in pools(case["world"]).run(_valid_job, case):
        assert finite, f"NaN or inf in {case}"
        assert worst <= TOLERANCE[case["dtype"]], f"error {worst:.2e} in {case}"


CORRUPTIONS = (
    "negative_window",
    "decreasing_cu_seqlens",
    "cu_seqlens_too_long",
    "heads_not_multiple",
    "q_longer_than_k",
    "int_dtype",
    "seq_len_too_long",
    "mask_and_keyword",
    "bad_rotation",
    "nan_scale",
    "causal_differs",
    "dtype_differs",
    "heads_differ",
)


@st.composite
def invalid_cases(draw) -> dict:
    world = draw(st.integers(1, 4))
    corruption = draw(st.sampled_from(CORRUPTIONS))
    if corruption in ("causal_differs", "dtype_differs", "heads_differ"):
        world = max(world, 2)  # a difference between ranks needs two of them
    return {
        "world": world,
        "corruption": corruption,
        "layout": draw(st.sampled_from(["contiguous", "zigzag", "striped"])),
        "local": 2 * draw(st.integers(1, 4)),
        "via_mask": draw(st.booleans()),
        "on_every_rank": draw(st.booleans()),
    }


def _invalid_job(rank, world, case):
    """The corrupted call on this rank; returns (exception type name, message)."""
    n, layout, bad = case["local"], case["layout"], case["corruption"]
    if not bad.endswith(("_differs", "_differ")) and not case["on_every_rank"]:
        bad = bad if rank == world - 1 else None  # one rank at fault
    q, k, v = torch.randn(1, n, 4, 8), torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8)
    masks: dict = {"causal": True}
    call: dict = {}
    if bad == "negative_window":
        masks["window"] = -1
    elif bad == "decreasing_cu_seqlens":
        masks["cu_seqlens"] = torch.tensor([0, 3, 1])
    elif bad == "cu_seqlens_too_long":
        masks["cu_seqlens"] = torch.tensor([0, n * world + 1])
    elif bad == "heads_not_multiple":
        q = torch.randn(1, n, 3, 8)
    elif bad == "q_longer_than_k":
        q = torch.randn(1, 2 * n, 4, 8)
    elif bad == "int_dtype":
        q = torch.ones(1, n, 4, 8, dtype=torch.int64)
    elif bad == "seq_len_too_long":
        masks["seq_len"] = n * world + 1
    elif bad == "bad_rotation":
        call["rotation"] = "sideways"
    elif bad == "nan_scale":
        call["scale"] = float("nan")
    elif bad == "causal_differs" and rank == 0:
        masks["causal"] = False
    elif bad == "dtype_differs" and rank == 0:
        q, k, v = q.double(), k.double(), v.double()
    elif bad == "heads_differ" and rank == 0:
        q, k, v = torch.randn(1, n, 2, 8), torch.randn(1, n, 1, 8), torch.randn(1, n, 1, 8)
    try:
        if case["via_mask"]:
            mask = ringattn.create_ring_mask(n * world, layout=layout, **masks)
            if bad == "mask_and_keyword":
                call["window"] = 2
            ringattn.ring_attention(q, k, v, mask=mask, **call)
        else:
            if bad == "mask_and_keyword":
                call["mask"] = ringattn.create_ring_mask(n * world, layout=layout, **masks)
            ringattn.ring_attention(q, k, v, layout=layout, **masks, **call)
    except Exception as exc:  # every rank reports what it raised
        return type(exc).__name__, str(exc)
    return None, ""


def _still_works_job(rank, world):
    """A valid ring on the same processes, against the reference."""
    x = torch.randn(1, 4 * world, 2, 8, generator=torch.Generator().manual_seed(3))
    local = ringattn.shard(x, "zigzag")
    out = ringattn.ring_attention(local, local, local, causal=True)
    causal = torch.ones(4 * world, 4 * world, dtype=torch.bool).tril()
    ref, _ = masked_reference(x, x, x, causal)
    return relative_error(out, ringattn.shard(ref, "zigzag"))


@_settings(EXAMPLES // 2 if FIXED_SEED else EXAMPLES)
@given(case=invalid_cases())
def test_fuzz_invalid_cases_raise_on_every_rank(pools, case):
    _count("invalid")
    pool = pools(case["world"])
    results = pool.run(_invalid_job, case)
    assert {name for name, _ in results} == {"RingInputError"}, f"{case}: {results}"
    if case["world"] > 1:  # the check across ranks gives every rank the same message
        assert len({message for _, message in results}) == 1, results
    assert max(pool.run(_still_works_job)) < 1e-5
