"""Shared test utilities: an independent fp64 attention reference and error checks."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

import ringattn


def reference_attention(q, k, v, causal: bool, scale: float | None = None):
    """Plain float64 attention over full sequences; returns (out, lse), autograd-enabled.

    q: (batch, seq, heads_q, dim); k, v: (batch, seq, heads_kv, dim).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        hidden = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
    return out, lse


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| divided by the tensor's scale, max(max |ref|, 1).

    Inputs are unit-normal, so a reference that is ~0 (e.g. dq of a row that sees a single key)
    is judged on the scale of its inputs instead of its own."""
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = relative_error(got, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
    return err


def random_qkv(batch, seq, heads_q, heads_kv, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads_q, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seq, heads_kv, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seq, heads_kv, dim, generator=gen, dtype=dtype)
    dout = torch.randn(batch, seq, heads_q, dim, generator=gen, dtype=dtype)
    return q, k, v, dout


def index_grids(batch: int, heads: int, seq_q: int, seq_k: int, q_offset: int = 0):
    """FlexAttention-style broadcastable (b, h, q_idx, kv_idx) index tensors; queries sit at
    ``q_offset ..`` (the last ``seq_q`` key positions when ``q_offset = seq_k - seq_q``)."""
    return (
        torch.arange(batch)[:, None, None, None],
        torch.arange(heads)[None, :, None, None],
        torch.arange(q_offset, q_offset + seq_q)[None, None, :, None],
        torch.arange(seq_k)[None, None, None, :],
    )


def masked_reference(q, k, v, allowed: torch.Tensor, score_mod=None, sinks=None):
    """Dense float64 attention with a boolean ``allowed`` mask broadcastable to
    ``(batch, heads, seq_q, seq_k)``, an optional FlexAttention ``score_mod`` (queries are the
    last ``seq_q`` key positions) and optional attention ``sinks`` ``(heads,)``: logits of one
    more key, seen by every row, whose value is zero. Rows that see no key give zero output and
    ``lse = -inf`` (the sink's logit with sinks). Returns (out, lse), autograd-enabled."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if score_mod is not None:
        offset = k.shape[1] - q.shape[1]
        grids = index_grids(q.shape[0], q.shape[2], q.shape[1], k.shape[1], offset)
        scores = score_mod(scores, *grids)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        with_sink = torch.cat([scores, sink], dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(with_sink, -1)[..., :-1], v), (
            torch.logsumexp(with_sink, dim=-1)
        )
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


MASK_CASES = ("full", "causal", "window", "documents", "softcap", "mask_mod")


def _every_third_key_hidden(b, h, q_idx, kv_idx):
    """A FlexAttention mask_mod over global indices: causal, and key ``j`` hidden from query
    ``i`` when ``(i - j) % 3 == 2``."""
    return (kv_idx <= q_idx) & ((q_idx - kv_idx) % 3 != 2)


def mask_case(name: str, seq_len: int):
    """One of :data:`MASK_CASES` over a sequence of ``seq_len`` tokens: the keywords of
    ``ring_attention``, the boolean ``(seq_len, seq_len)`` mask a single process applies and
    the ``score_mod`` (or ``None``). Packed documents include a 1-token one."""
    i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    if name == "full":
        return {}, torch.ones(seq_len, seq_len, dtype=torch.bool), None
    if name == "causal":
        return {"causal": True}, j <= i, None
    if name == "window":
        return {"window": (5, 2)}, (j >= i - 5) & (j <= i + 2), None
    if name == "softcap":
        return {"causal": True, "score_mod": ringattn.softcap(2.0)}, j <= i, ringattn.softcap(2.0)
    if name == "mask_mod":
        return {"mask_mod": _every_third_key_hidden}, (j <= i) & ((i - j) % 3 != 2), None
    assert name == "documents", name
    cu = torch.tensor([0, 3, 4, seq_len - 5, seq_len])
    docs = torch.searchsorted(cu[1:], torch.arange(seq_len), right=True)
    allowed = (j <= i) & (docs[:, None] == docs[None, :])
    return {"causal": True, "cu_seqlens": cu}, allowed, None


class ReversedLayout(ringattn.Layout):
    """A user-defined layout: rank ``r`` holds chunk ``p - 1 - r``."""

    name = "reversed"

    def segments(self, rank, world_size, seq_local):
        return (ringattn.Segment((world_size - 1 - rank) * seq_local, 1, seq_local),)


class MixedLayout(ringattn.Layout):
    """A user-defined layout with segments of different strides: rank ``r`` holds chunk ``r``
    of the first half, then every ``p``-th token of the second half (from ``r``)."""

    name = "mixed"

    def local_multiple(self, world_size):
        return 2

    def segments(self, rank, world_size, seq_local):
        half = seq_local // 2
        return (
            ringattn.Segment(rank * half, 1, half),
            ringattn.Segment(half * world_size + rank, world_size, half),
        )


class OverlappingLayout(ringattn.Layout):
    """A broken layout: every rank claims the first chunk."""

    name = "overlapping"

    def segments(self, rank, world_size, seq_local):
        return (ringattn.Segment(0, 1, seq_local),)


COLLECTIVES = (
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


@contextlib.contextmanager
def counting(counts: dict[str, int]):
    """Count calls of ``torch.distributed`` collectives and of tensor methods that copy a value
    to the host (on a GPU each would stall the stream) while the block runs."""
    originals = []

    def wrap(owner, name, key):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counts[key] = counts.get(key, 0) + 1
            return original(*args, **kwargs)

        originals.append((owner, name, original))
        setattr(owner, name, counted)

    for name in COLLECTIVES:
        if hasattr(dist, name):
            wrap(dist, name, f"collective {name}")
    for name in HOST_SYNCS:
        wrap(torch.Tensor, name, f"host sync {name}")
    try:
        yield counts
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)
