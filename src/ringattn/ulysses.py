"""2-D context parallelism: Ulysses (all-to-all over heads) x ring.

A ``(ulysses, ring)`` DeviceMesh (:func:`context_mesh`) splits the sequence twice. The layout
splits the global sequence over the ``ring`` ranks (zigzag balance at the ring level), and each
ring rank's shard is cut contiguously into ``ulysses`` equal pieces: mesh rank ``(u, r)`` holds
piece ``u`` of ring shard ``r`` (:func:`ringattn.shard`, :func:`ringattn.unshard` and
:func:`ringattn.positions` implement this with ``group=mesh``).

A ``ring_attention(q, k, v, group=mesh)`` call then

1. all-to-alls q, k, v over the "ulysses" group: every rank of it gets the *whole* ring shard
   ``r`` (in layout order) for ``heads_q / ulysses`` query heads, rank ``u`` heads
   ``u * heads_q / ulysses ..``; key/value heads are first repeated to
   ``lcm(heads_kv, ulysses)`` when the Ulysses degree does not divide them (their gradients sum
   back through the repeat);
2. runs the ring engine over the "ring" group on those heads, with *global* head indices for
   ``score_mod``, ``mask_mod``, dropout and sinks;
3. all-to-alls the output (and lse) back to the sequence pieces; the backward pass runs the
   inverse all-to-alls of the gradients.

The checks across ranks cover the whole mesh (one check over the Ulysses group, then one over
the ring), so a mistake on any rank raises on every rank before an all-to-all can hang; every
all-to-all wait is bounded like the ring's (``RINGATTN_TIMEOUT``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .checks import _DTYPES, RingInputError, agree, sinks_problem
from .comm import (
    MESH_DIMS,
    GroupLike,
    UlyssesGroup,
    all_reduce_bounded,
    host_timeout,
    post_messages,
    split_context,
    transfer_device,
    wait_bounded,
)
from .trace import current_trace

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from .api import CallOptions
    from .checks import Fields, MaskArgs
    from .ring_mask import RingMask

__all__ = ["context_mesh", "ulysses_degrees"]


def context_mesh(ulysses: int, ring: int, device_type: str = "cpu") -> DeviceMesh:
    """A 2-D DeviceMesh of ``ulysses x ring`` ranks with dims named "ulysses" and "ring", for
    ``ring_attention(..., group=mesh)``, ``create_ring_mask(..., group=mesh)``,
    ``shard`` / ``unshard`` / ``positions`` and ``hf.register(group=mesh)``.

    Rank ``g`` of the default group is mesh rank ``(u, r) = (g % ulysses, g // ulysses)``: the
    Ulysses peers of a rank are consecutive ranks, so with ``ulysses`` at most the GPUs of a
    node the all-to-alls stay on the node's fast link and the ring crosses nodes (what
    ``ringattn plan --gpus-per-node`` assumes, as USP and LoongTrain do). For the other
    placement build the mesh yourself, e.g. ``init_device_mesh(device_type, (ulysses, ring),
    mesh_dim_names=("ulysses", "ring"))``; either order of the names is accepted. Every rank
    calls it (it creates process groups).
    """
    from torch.distributed.device_mesh import init_device_mesh

    for name, value in (("ulysses", ulysses), ("ring", ring)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if ulysses * ring != world:
        raise ValueError(
            f"a {ulysses} x {ring} (ulysses x ring) mesh needs {ulysses * ring} ranks, but the "
            f"default process group has {world}"
        )
    return init_device_mesh(device_type, (ring, ulysses), mesh_dim_names=MESH_DIMS[::-1])


def ulysses_degrees(heads_q: int) -> list[int]:
    """The Ulysses degrees that can split ``heads_q`` query heads: its divisors."""
    return [d for d in range(1, heads_q + 1) if heads_q % d == 0]


def kv_repeats(heads_kv: int, ulysses: int) -> int:
    """How often each key/value head is repeated so that the Ulysses degree divides them:
    ``lcm(heads_kv, ulysses) / heads_kv`` (1 when it divides them already)."""
    return math.lcm(heads_kv, ulysses) // heads_kv


def input_problem(q, k, v, sinks, ulysses: UlyssesGroup) -> str | None:
    """What keeps this rank's q, k, v (and sinks) from being split over the Ulysses group, or
    ``None``. Shapes across ranks are compared afterwards, by the call's check."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}"
        if t.dtype not in _DTYPES:
            return f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64"
    if k.shape[:3] != v.shape[:3]:
        return (
            "k and v must have the same batch, length and heads (only the head_dim may differ), "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    heads_q, heads_kv = q.shape[2], k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        return (
            f"heads_q={heads_q} is not a multiple of heads_kv={heads_kv}; grouped-query attention "
            "needs every key/value head to serve the same number of query heads"
        )
    if heads_q % ulysses.size:
        return (
            f"heads_q={heads_q} cannot be split over a Ulysses degree of {ulysses.size}: the "
            f"degree must divide the query heads (valid Ulysses degrees for {heads_q} heads: "
            f"{', '.join(map(str, ulysses_degrees(heads_q)))})"
        )
    return sinks_problem(sinks, q)


def stand_ins(q, k, v, sinks, ulysses: UlyssesGroup):
    """Tensors shaped as q, k, v will be after the all-to-all (no storage: expanded scalars),
    and this rank's slice of the sinks, for the checks and the plan of a call."""
    size, rank = ulysses.size, ulysses.rank
    batch, seq_q, heads_q, _ = q.shape
    heads_kv = k.shape[2] * kv_repeats(k.shape[2], size)

    def like(t: torch.Tensor, seq: int, heads: int) -> torch.Tensor:
        return t.new_empty(()).expand(batch, seq * size, heads // size, t.shape[3])

    per_rank = heads_q // size
    local_sinks = None if sinks is None else sinks[rank * per_rank : (rank + 1) * per_rank]
    return (
        like(q, seq_q, heads_q),
        like(k, k.shape[1], heads_kv),
        like(v, v.shape[1], heads_kv),
        local_sinks,
    )


def agree_on_mesh(
    caller: str,
    problem: str | None,
    fields: Fields,
    signature,
    ring_group: dist.ProcessGroup | None,
    ring_size: int,
    ulysses: UlyssesGroup | None,
) -> dict[str, list[float]] | None:
    """:func:`ringattn.checks.agree` over a whole mesh: first over this rank's Ulysses group,
    whose outcome (a problem, a mismatch, the shared fields) is then part of the check over the
    ring. Every rank of the mesh so raises the same way, after the same two collectives."""
    shared = None
    if ulysses is not None:
        try:
            shared = agree(caller, problem, fields, signature, ulysses.group, ulysses.size)
        except RingInputError as exc:
            if ring_size == 1:
                raise
            problem = "in its Ulysses group, " + str(exc).removeprefix(f"{caller}: ")
        else:
            if problem is None:  # fold the peers' shared values (e.g. padding) in
                signature = list(signature)
                for i, (name, advice) in enumerate(fields):
                    if advice is None:
                        signature[i] = max(shared[name])
    if ring_size > 1:
        return agree(caller, problem, fields, signature, ring_group, ring_size)
    if problem:
        raise RingInputError(f"{caller}: {problem}")
    return shared


def _all_to_all(x: torch.Tensor, ulysses: UlyssesGroup, what: str) -> torch.Tensor:
    """All-to-all of ``x`` over the Ulysses group (chunk ``i`` along dim 0 goes to Ulysses rank
    ``i``; chunk ``j`` of the result came from rank ``j``), as pairwise messages posted by
    :func:`ringattn.comm.post_messages` (receives first; gloo's ``all_to_all_single`` posts its
    sends first and took up to 1.7x the time between simulated hosts), each wait bounded by
    ``RINGATTN_TIMEOUT`` as the ring's are."""
    device = x.device
    staging = transfer_device(ulysses.group, device)
    sent = x.to(staging).contiguous()
    received = torch.empty_like(sent)
    received[ulysses.rank].copy_(sent[ulysses.rank])
    size, rank = ulysses.size, ulysses.rank
    over = f"all-to-all of {what} over the {size} ranks of the Ulysses group"
    peers = [(p, dist.get_global_rank(ulysses.group, p)) for p in range(size) if p != rank]
    receives = [(g, received[p], 0, f"{over}: receiving from rank {p}") for p, g in peers]
    sends = [(g, sent[p], 0, f"{over}: sending to rank {p}") for p, g in peers]
    timeout = host_timeout(staging, ulysses.group)
    pending = post_messages(ulysses.group, receives, sends, timeout, staging, over)
    trace = current_trace()
    if trace is not None:
        trace.bytes_sent += pending.bytes_sent
    pending.wait()
    return received.to(device)


def seq_to_heads(x: torch.Tensor, ulysses: UlyssesGroup, what: str = "q/k/v") -> torch.Tensor:
    """``(batch, seq_piece, heads, dim)`` -> ``(batch, size * seq_piece, heads / size, dim)``:
    this rank's piece of the ring shard for all heads becomes the whole ring shard for its
    share of the heads (no autograd)."""
    size = ulysses.size
    batch, seq, heads, dim = x.shape
    chunks = x.reshape(batch, seq, size, heads // size, dim).permute(2, 0, 1, 3, 4)
    received = _all_to_all(chunks, ulysses, what)  # [j]: piece j, this rank's heads
    return received.permute(1, 0, 2, 3, 4).reshape(batch, size * seq, heads // size, dim)


def heads_to_seq(x: torch.Tensor, ulysses: UlyssesGroup, what: str = "outputs") -> torch.Tensor:
    """The inverse of :func:`seq_to_heads` (no autograd)."""
    size = ulysses.size
    batch, seq, heads, dim = x.shape
    chunks = x.reshape(batch, size, seq // size, heads, dim).permute(1, 0, 2, 3, 4)
    received = _all_to_all(chunks, ulysses, what)  # [i]: this rank's piece, heads of rank i
    return received.permute(1, 2, 0, 3, 4).reshape(batch, seq // size, size * heads, dim)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ulysses: UlyssesGroup):
        ctx.ulysses = ulysses
        return seq_to_heads(x, ulysses)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad, ctx.ulysses, "q/k/v gradients"), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ulysses: UlyssesGroup):
        ctx.ulysses = ulysses
        return heads_to_seq(x, ulysses)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad, ctx.ulysses, "output gradients"), None


def ulysses_attention(
    q, k, v, sinks, mask: RingMask | None, keywords: MaskArgs, layout, group, call: CallOptions
):
    """:func:`ringattn.ring_attention` on a ``(ulysses, ring)`` mesh (``group``, or the
    ``mask``'s): ``(out, lse, max_logits)`` of this rank's sequence piece, all heads."""
    from .api import _needs_grad, mask_for_options, plan_call

    if mask is None:  # checks the call on the whole mesh first, raising everywhere
        mask = mask_for_options(q, k, v, keywords, layout, group, sinks, call)
    ulysses = mask.ulysses
    problem = input_problem(q, k, v, sinks, ulysses)
    if problem:
        mask.agree_call(problem, None, call.check_across_ranks)
    call = replace(call, needs_grad=_needs_grad(q, k, v, call))
    sq, sk, sv, local_sinks = stand_ins(q, k, v, sinks, ulysses)
    per_rank = q.shape[2] // ulysses.size
    plan = plan_call(sq, sk, sv, local_sinks, mask, call, head_offset=ulysses.rank * per_rank)

    from .engine import RingAttentionFunction

    repeats = kv_repeats(k.shape[2], ulysses.size)
    if repeats > 1:  # autograd sums the copies' gradients back
        k, v = (t.repeat_interleave(repeats, dim=2) for t in (k, v))
    q_h, k_h, v_h = (_SeqToHeads.apply(t, ulysses) for t in (q, k, v))
    out_h, lse_h, peak = RingAttentionFunction.apply(
        q_h, k_h, v_h, local_sinks, plan, call.max_logits
    )
    out = _HeadsToSeq.apply(out_h, ulysses)
    with torch.no_grad():
        lse = heads_to_seq(lse_h.transpose(1, 2).unsqueeze(-1), ulysses, "lse")
        lse = lse.squeeze(-1).transpose(1, 2).contiguous()
        if call.max_logits:
            peak = _gather_heads(peak, ulysses)
    return out, lse, peak


def _gather_heads(values: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """Every Ulysses rank's ``(heads / size,)`` values, concatenated in head order."""
    staging = transfer_device(ulysses.group, values.device)
    sent = values.to(staging).contiguous()
    parts = [torch.empty_like(sent) for _ in range(ulysses.size)]
    work = dist.all_gather(parts, sent, group=ulysses.group, async_op=True)
    wait_bounded(work, host_timeout(staging, ulysses.group), "gathering the max logits")
    return torch.cat(parts).to(values.device)


def all_reduce_context(tensor: torch.Tensor, group: GroupLike, what: str) -> None:
    """Sum ``tensor`` in place over every rank of ``group`` (a ProcessGroup, a 1-D mesh or a
    ``(ulysses, ring)`` mesh: over both dims), each wait bounded."""
    ring, ulysses = split_context(group)
    if ulysses is not None:
        all_reduce_bounded(tensor, ulysses.group, what)
    if ring is not None and dist.get_world_size(ring) > 1:
        all_reduce_bounded(tensor, ring, what)


def gather_pieces(local: torch.Tensor, dim: int, ulysses: UlyssesGroup) -> torch.Tensor:
    """The Ulysses group's pieces of ``local`` concatenated along ``dim``: this rank's whole
    ring shard; differentiable (the gradient of a piece is the sum of its copies')."""
    return _GatherPieces.apply(local, dim, ulysses)


def _concat_pieces(local: torch.Tensor, dim: int, ulysses: UlyssesGroup) -> torch.Tensor:
    staging = transfer_device(ulysses.group, local.device)
    sent = local.to(staging).contiguous()
    parts = [torch.empty_like(sent) for _ in range(ulysses.size)]
    work = dist.all_gather(parts, sent, group=ulysses.group, async_op=True)
    wait_bounded(work, host_timeout(staging, ulysses.group), "gathering the Ulysses pieces")
    return torch.cat(parts, dim).to(local.device)


class _GatherPieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, dim: int, ulysses: UlyssesGroup):
        ctx.dim, ctx.ulysses, ctx.length = dim, ulysses, local.shape[dim]
        return _concat_pieces(local, dim, ulysses)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        all_reduce_bounded(grad, ctx.ulysses.group, "summing unshard's gradients")
        piece = grad.narrow(ctx.dim, ctx.ulysses.rank * ctx.length, ctx.length)
        return piece, None, None


def concat_pieces(local: torch.Tensor, dim: int, ulysses: UlyssesGroup) -> torch.Tensor:
    """:func:`gather_pieces` without autograd (per-token masks)."""
    return _concat_pieces(local, dim, ulysses)
