"""Public API: ring attention over a sharded sequence, and the helpers to shard it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from .checks import (
    MaskArgs,
    call_signature,
    call_values_problem,
    local_problem,
    mask_signature,
    needs_grad,
    sinks_problem,
)
from .comm import (
    GroupLike,
    all_reduce_bounded,
    gather_sequence,
    group_rank_and_size,
    split_context,
)
from .dropout import Dropout, draw_seed
from .engine import Granularity, RingAttentionFunction, RingPlan
from .kernels import AttentionKernel, masked_kernel_for, select_kernel
from .layout import Layout, LayoutName, checked_layout, get_layout
from .masks import MaskMod, ScoreMod
from .ops import compiled_ring_attention
from .ring_mask import RingMask, agree_call, build_ring_mask, padding_anywhere
from .rotation import choose_rotation
from .ulysses import gather_pieces, input_problem, stand_ins, ulysses_attention


@dataclass(frozen=True)
class CallOptions:
    """The options of a :func:`ring_attention` call besides its tensors and masks (see there);
    ``needs_grad``: whether a backward pass follows (``None``: from q, k, v and the grad mode).
    Hashable: a compiled graph refers to one by a constant key."""

    scale: float | None = None
    score_mod: ScoreMod | None = None
    granularity: Granularity = field(default_factory=Granularity)
    rotation: str = "auto"
    kernel: str | AttentionKernel = "auto"
    check_across_ranks: bool = True
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    max_logits: bool = False
    deterministic: bool = False
    needs_grad: bool | None = None

    @classmethod
    def of(cls, scale, score_mod, granularity, *rest) -> CallOptions:
        """The options of :func:`ring_attention`'s arguments of the same names, in this order
        (``granularity`` ``None``: the default)."""
        return cls(scale, score_mod, Granularity() if granularity is None else granularity, *rest)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: RingMask | None = None,
    scale: float | None = None,
    score_mod: ScoreMod | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    return_lse: bool = False,
    return_max_logits: bool = False,
    deterministic: bool = False,
    rotation: Literal["kv", "q", "auto", "allgather"] = "auto",
    kernel: str | AttentionKernel = "auto",
    granularity: Granularity | None = None,
    check_across_ranks: bool = True,
    causal: bool = False,
    layout: LayoutName | Layout | None = None,
    group: GroupLike = None,
    window: int | tuple[int | None, int | None] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    seq_len: int | None = None,
    mask_mod: MaskMod | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of this rank's queries against the keys/values of every rank in the group.

    Every rank passes its own shard of the sequence, in the layout's order (see :func:`shard`).
    Keys/values travel around the ring (pass-KV) while each rank keeps its queries; results are
    merged with an fp32 online softmax, so the output equals single-device attention over the
    whole sequence. All masks use *global* token positions. Inside ``torch.compile`` a call with
    a ``mask`` (on a 1-D group) is the custom op of :mod:`ringattn.ops`, traced without a graph
    break (``fullgraph=True`` works; make the mask and any ``score_mod`` that captures tensors
    outside the compiled function); a call with mask keywords is a graph break that runs
    eagerly.

    The masks come either as ``mask``, a :class:`ringattn.RingMask` that
    :func:`ringattn.create_ring_mask` built once for the batch (the way to call it from every
    layer of a model: no collective, no host sync, no planning per call), or, for a single call,
    as the keywords from ``causal`` on, which build one inside.

    Args:
        q: ``(batch, seq_q_local, heads_q, head_dim)``.
        k, v: ``(batch, seq_kv_local, heads_kv, head_dim)`` with ``heads_q % heads_kv == 0``
            (MHA, GQA, MQA). Only the ``heads_kv`` heads travel. ``v`` may have its own head
            dim ``head_dim_v`` (MLA, e.g. 192 for q/k and 128 for v); kernels that need one
            head dim then run on zero-padded copies, exactly. Queries and keys may differ in
            length (cross-attention, chunked prefill); each is sharded in the layout over its own
            length, and the queries are the *last* ``seq_q`` positions of the key sequence
            (bottom-right alignment, as in flash-attn) for ``causal`` and the other masks.
        mask: the batch's :class:`ringattn.RingMask`; then leave the mask keywords, ``layout``
            and ``group`` out (they are the mask's).
        scale: score scale; default ``head_dim ** -0.5``.
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, e.g.
            :func:`ringattn.softcap` or :func:`ringattn.alibi`. Gradients flow through it to
            q and k (not to tensors it captures).
        sinks: learnable attention sinks (gpt-oss): ``(heads_q,)`` logits, one per query head,
            that join every row's softmax denominator as a key with a zero value. Gradients
            flow to them; each rank's gradient covers its own rows, summed over the group by
            the usual reduction of parameters shared by the ranks (e.g. FSDP over the
            context-parallel dimension). The returned lse then includes the sink.
        dropout_p: attention dropout on the softmax probabilities (as flash-attn's
            ``dropout_p``; pass 0 in evaluation). The keep mask is a hash of ``(seed, batch
            index, query head, global query position, global key position)``, so it is the same
            on any world size and layout and equals :func:`ringattn.dropout.keep_mask` in a
            single process; the backward regenerates it. Dropout tiles run on the dense
            reference kernel. See :mod:`ringattn.dropout` for the RNG contract.
        dropout_seed: the seed of the dropout mask; default: drawn from torch's default CPU
            generator on every call (equal on ranks seeded alike).
        return_lse: also return the log-sum-exp ``(batch, heads_q, seq_local)`` in float32,
            float64 for float64 inputs (natural log, ``-inf`` for a row that sees no key).
            It carries no gradient.
        return_max_logits: also return the largest score (scaled, after ``score_mod``, over
            visible pairs; sinks excluded) of every query head over the whole sequence and
            batch, ``(heads_q,)`` in the accumulator dtype, the same on every rank (what
            QK-clip needs); ``-inf`` for a head that sees no key. It costs one more ``q k^T``
            per tile and one small all-reduce, and carries no gradient.
        deterministic: bitwise-identical outputs and gradients when the call is repeated on
            the same inputs with the same world size, layout, granularity and kernel: the
            kernel choice is limited to deterministic kernels (not ``cuda_cudnn``) and the
            passes run under ``torch.use_deterministic_algorithms(True)`` (on CUDA set
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for masked tiles). A different world size,
            layout or granularity sums the same terms in another order, which may change
            the last bits (never more than the stated tolerances).
        rotation: "kv" moves keys/values around the ring (training, full prefill), "q" moves
            queries and returns partial outputs (few queries against many keys); "auto" picks
            the one that moves fewer bytes, see :func:`ringattn.choose_rotation`, from values
            every rank has agreed on (never "allgather"). "allgather" all-gathers every rank's
            K/V and reduce-scatters fp32 dK/dV (TransformerEngine's all-gather mode; holds all
            K/V). All are exact, forward and backward.
        kernel: "auto", "cpu_flash", "cuda_flash", "cuda_efficient", "cuda_cudnn", "reference",
            or an :class:`~ringattn.kernels.AttentionKernel`.
        granularity: how finely blocks are pipelined through the ring (memory against kernel-call
            size); the default :class:`ringattn.Granularity` cuts each block into up to 8
            sub-blocks of pieces of at least 512 tokens (the backward of 16-bit inputs, whose
            returning gradients are fp32, 4 times finer: up to 32, of at least 128).
        check_across_ranks: compare shapes, dtypes and flags across ranks with one small
            all-gather before the ring starts, so mismatches raise everywhere instead of hanging.
            With a ``mask`` this happens once per distinct call (once per batch in a model);
            with keywords, on every call.
        causal: mask keys at later global positions than the query.
        layout: "contiguous", "zigzag" (the default; balanced causal work), "striped", or a
            :class:`ringattn.Layout`.
        group: a ProcessGroup, a 1-D DeviceMesh, or ``None`` for the default group (a world of
            one when ``torch.distributed`` is not initialised: plain attention). A 2-D
            DeviceMesh with dims named "ulysses" and "ring" (:func:`ringattn.context_mesh`)
            runs Ulysses x ring: q, k, v (and per-token masks) are this rank's piece of its ring
            shard (see :func:`shard`), all-to-alls over "ulysses" trade sequence for heads, the
            ring runs over "ring"; ``sinks``, ``score_mod``, ``mask_mod`` and dropout see global
            head indices (:mod:`ringattn.ulysses`). Under ``torch.compile`` such a call is a
            graph break.
        window: ``(left, right)``: query ``i`` sees keys ``i - left <= j <= i + right`` (a side
            may be ``None``: unbounded); an int ``w`` means ``(w, 0)``, a causal left window.
        cu_seqlens: packed documents as global cumulative lengths ``[0, l1, l1 + l2, ...]``
            (1-D, any int dtype, as in flash-attn's varlen API); tokens attend within their
            document only. Tokens past ``cu_seqlens[-1]`` are padding.
        document_ids: packed documents as per-token ids of *this rank's shard*, shaped
            ``(seq_kv_local,)`` or ``(batch, seq_kv_local)``. Use either this or ``cu_seqlens``.
        attention_mask: ``(batch, seq_kv_local)`` of this rank's shard, nonzero/True for real
            tokens and 0/False for padding (the Hugging Face convention). Padding queries get
            zero output and zero gradients; padding keys are seen by nobody.
        seq_len: the real global length when :func:`shard` padded the sequence; positions at or
            past it are padding.
        mask_mod: FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` over global
            indices, called with broadcastable index tensors.

    Returns:
        ``out`` ``(batch, seq_local, heads_q, head_dim_v)`` in ``q.dtype``; with
        ``return_lse`` and/or ``return_max_logits`` the tuple ``(out, lse, max_logits)`` of
        those asked for, in that order.

    Raises:
        RingInputError: (a ``ValueError``) on every rank when any rank's inputs cannot work.
    """
    options = (scale, score_mod, granularity, rotation, kernel, check_across_ranks, dropout_p)
    options += (dropout_seed, return_max_logits, deterministic)  # CallOptions' fields, in order
    only_mask = (
        isinstance(mask, RingMask)
        and causal is False
        and window is None
        and cu_seqlens is None
        and document_ids is None
        and attention_mask is None
        and seq_len is None
        and mask_mod is None
        and layout is None
        and group is None
    )
    if torch.compiler.is_compiling() and only_mask and mask.ulysses is None:
        out, lse, peak = compiled_ring_attention(q, k, v, sinks, mask, options)
    else:
        keywords = MaskArgs(
            causal, window, cu_seqlens, document_ids, attention_mask, seq_len, mask_mod
        )
        call = CallOptions.of(*options)
        out, lse, peak = _eager_ring_attention(q, k, v, sinks, mask, keywords, layout, group, call)
    results = (out, *((lse,) if return_lse else ()), *((peak,) if return_max_logits else ()))
    return results if len(results) > 1 else out


@torch.compiler.disable
def _eager_ring_attention(q, k, v, sinks, mask, keywords, layout, group, call: CallOptions):
    """:func:`ring_attention` outside a compiled graph (a graph break inside one)."""
    conflict = None
    if isinstance(mask, RingMask):
        conflict = _mask_problem_of_call(mask, keywords, layout, group)
        if mask.ulysses is not None:
            if conflict:
                mask.agree_call(conflict, None, call.check_across_ranks)
            return ulysses_attention(q, k, v, sinks, mask, keywords, layout, group, call)
    elif mask is None and split_context(group)[1] is not None:
        return ulysses_attention(q, k, v, sinks, None, keywords, layout, group, call)
    if mask is None:
        mask = mask_for_options(q, k, v, keywords, layout, group, sinks, call)
    elif not isinstance(mask, RingMask):  # raise on every rank of the group named
        conflict = _mask_problem_of_call(mask, keywords, layout, group)
        process_group, ulysses = split_context(group)
        _, world_size = group_rank_and_size(process_group)
        agree_call(
            conflict, None, None, process_group, world_size, call.check_across_ranks, set(), ulysses
        )
    plan = plan_call(q, k, v, sinks, mask, call, conflict=conflict)
    return RingAttentionFunction.apply(q, k, v, sinks, plan, call.max_logits)


def plan_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    mask: RingMask,
    call: CallOptions,
    conflict: str | None = None,
    seed: int | None = None,
    head_offset: int = 0,
) -> RingPlan:
    """The :class:`RingPlan` of a call with ``mask``, after its check across ranks (none when
    the mask agreed this call's signature before). ``seed``: the dropout seed to use (default:
    ``call.dropout_seed``, else drawn from torch's default generator). ``head_offset``: the
    global index of ``q``'s first head (a Ulysses rank's share)."""
    problem, signature = _check_call(q, k, v, mask.layout, mask.world_size, mask.group, sinks, call)
    problem = conflict or problem or mask.call_problem(q, k)
    mask.agree_call(problem, None if problem else signature, call.check_across_ranks)
    main_kernel = select_kernel(call.kernel, q, v.shape[-1], call.deterministic)
    rotation = call.rotation
    if rotation == "auto":  # from values the check above found equal on every rank
        rotation = choose_rotation(
            q.shape[1],
            k.shape[1],
            q.shape[2],
            k.shape[2],
            q.shape[3],
            q.dtype,
            _needs_grad(q, k, v, call),
            head_dim_v=v.shape[3],
        )
    dropout = None
    if call.dropout_p > 0:
        if seed is None:
            seed = draw_seed() if call.dropout_seed is None else call.dropout_seed
        dropout = Dropout(call.dropout_p, seed)
    return RingPlan(
        mask=mask,
        kernel=main_kernel,
        masked_kernel=masked_kernel_for(
            main_kernel, call.score_mod is not None, dropout is not None
        ),
        scale=_scale(q, call.scale),
        rotation=rotation,
        granularity=call.granularity,
        score_mod=call.score_mod,
        batch=q.shape[0],
        heads=q.shape[2],
        dropout=dropout,
        deterministic=call.deterministic,
        head_offset=head_offset,
    )


def _kernel_problem(q: torch.Tensor, v: torch.Tensor, call: CallOptions) -> str | None:
    """Why the call's kernel cannot run these inputs (checked with the others, so that every
    rank raises), or ``None``."""
    try:
        select_kernel(call.kernel, q, v.shape[-1], call.deterministic)
    except ValueError as exc:
        return str(exc)
    return None


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _needs_grad(q, k, v, call: CallOptions) -> bool:
    return needs_grad(q, k, v) if call.needs_grad is None else call.needs_grad


def _check_call(
    q, k, v, layout, world_size, group, sinks, call: CallOptions
) -> tuple[str | None, tuple[float, ...] | None]:
    """This rank's problem with a call, or else ``None`` and the call's signature."""
    problem = local_problem(q, k, v, layout, world_size, group)
    problem = problem or call_values_problem(
        call.scale, call.rotation, call.granularity, call.dropout_p, call.dropout_seed
    )
    problem = problem or _kernel_problem(q, v, call)
    problem = problem or sinks_problem(sinks, q)
    if problem:
        return problem, None
    return None, call_signature(
        q,
        k,
        v,
        _scale(q, call.scale),
        call.score_mod,
        call.granularity,
        call.rotation,
        sinks,
        call.dropout_p,
        call.max_logits,
        _needs_grad(q, k, v, call),
    )


def _mask_problem_of_call(
    mask: object, keywords: MaskArgs, layout: object, group: GroupLike
) -> str | None:
    """What is wrong with passing ``mask`` together with these keywords, or ``None``."""
    if not isinstance(mask, RingMask):
        return f"mask must be a ringattn.RingMask (see create_ring_mask), got {type(mask).__name__}"
    given = [
        name
        for name, value in vars(keywords).items()
        if name != "tile_size" and value is not (False if name == "causal" else None)
    ]
    if layout is not None and _layout_or_none(layout) != mask.layout:
        given.append("layout")
    if group is not None:
        try:
            ring, ulysses = split_context(group)
        except (TypeError, ValueError):
            ring, ulysses = None, None
        mask_ulysses = mask.ulysses.group if mask.ulysses else None
        if ring is not mask.group or (ulysses.group if ulysses else None) is not mask_ulysses:
            given.append("group")
    if given:
        return (
            "pass the masks either as a RingMask or as keywords, not both: got mask= and "
            f"{', '.join(name + '=' for name in given)} (the mask already holds them)"
        )
    return None


def _layout_or_none(layout: object) -> Layout | None:
    try:
        return get_layout(layout)
    except ValueError:
        return None


def mask_for_options(q, k, v, masks: MaskArgs, layout, group, sinks, call: CallOptions) -> RingMask:
    """:func:`mask_for_call` with the call's options as one :class:`CallOptions`."""
    return mask_for_call(
        q,
        k,
        v,
        masks,
        layout,
        group,
        call.scale,
        call.score_mod,
        call.granularity,
        call.rotation,
        call.check_across_ranks,
        sinks,
        call,
    )


def mask_for_call(
    q,
    k,
    v,
    masks: MaskArgs,
    layout,
    group,
    scale,
    score_mod,
    granularity,
    rotation,
    across_ranks,
    sinks=None,
    options: CallOptions | None = None,
) -> RingMask:
    """The :class:`RingMask` of a call that passes its masks as keywords, after one check of
    the call and the mask together across ranks (the only collective besides the gathers of
    per-token masks). The mask remembers the call as agreed: reused by calls with the same
    signature (the other layers of a model), it costs no further check. ``options`` gives the
    call's other options (its scale, score_mod, granularity, rotation and check flag are
    replaced by the arguments of the same meaning)."""
    options = replace(
        options or CallOptions(),
        scale=scale,
        score_mod=score_mod,
        granularity=granularity,
        rotation=rotation,
        check_across_ranks=across_ranks,
    )
    process_group, ulysses = split_context(group)
    _, world_size = group_rank_and_size(process_group)
    pieces = ulysses.size if ulysses else 1  # a 2-D mesh: q, k, v are pieces of ring shards
    try:
        chosen = get_layout("zigzag" if layout is None else layout)
    except ValueError as exc:
        problem, call = str(exc), None
    else:
        checked, problem, call = (q, k, v, sinks), None, None
        if ulysses is not None:  # check the call as the ring will see it, after the all-to-all
            problem = input_problem(q, k, v, sinks, ulysses)
            if problem is None:
                options = replace(options, needs_grad=_needs_grad(q, k, v, options))
                checked = stand_ins(q, k, v, sinks, ulysses)
        if problem is None:
            q_, k_, v_, sinks_ = checked
            problem, call = _check_call(
                q_, k_, v_, chosen, world_size, process_group, sinks_, options
            )
    if problem is None:
        problem = masks.problem(q.shape[0], q.shape[1], k.shape[1], world_size * pieces)
    mask_values = None
    if problem is None:
        # heads matter only to a mask_mod: without one the mask serves any head count
        heads = q.shape[2] if masks.mask_mod is not None else None
        everyone = world_size * pieces
        shape = (q.shape[1] * everyone, k.shape[1] * everyone, q.shape[0], heads, q.device)
        mask_values = mask_signature(masks, chosen, world_size, *shape)
    shared = agree_call(
        problem, call, mask_values, process_group, world_size, across_ranks, set(), ulysses
    )
    padding = padding_anywhere(shared, masks)
    mask = build_ring_mask(masks, chosen, process_group, *shape, mask_values, padding, ulysses)
    mask.agreed_calls.add(call)
    return mask


def padded_length(
    seq_len: int, layout: LayoutName | Layout, world_size: int, *, ulysses: int = 1
) -> int:
    """The smallest length ``>= seq_len`` that ``layout`` can split over ``world_size`` ranks;
    on a ``(ulysses, ring)`` mesh pass the ring degree as ``world_size`` and the Ulysses degree
    as ``ulysses`` (every ring shard must then split into ``ulysses`` equal pieces)."""
    multiple = get_layout(layout).seq_multiple(world_size)
    multiple = math.lcm(multiple, world_size * ulysses)
    return -(-seq_len // multiple) * multiple


def _context(group: GroupLike) -> tuple:
    """``(ring group, Ulysses group or None, ring rank, ring size, Ulysses degree)``."""
    process_group, ulysses = split_context(group)
    rank, world_size = group_rank_and_size(process_group)
    return process_group, ulysses, rank, world_size, ulysses.size if ulysses else 1


def _piece(index: torch.Tensor, ulysses) -> torch.Tensor:
    """This rank's contiguous piece of a ring shard's ``index`` (all of it without Ulysses)."""
    if ulysses is None:
        return index
    length = index.shape[0] // ulysses.size
    return index[ulysses.rank * length : (ulysses.rank + 1) * length]


def positions(
    seq_len: int,
    layout: LayoutName | Layout = "zigzag",
    group: GroupLike = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global positions (int64, ``(seq_local,)``) of this rank's tokens — feed them to RoPE so
    rotary phases match the unsharded sequence.

    With ``cu_seqlens`` the positions restart at 0 in every packed document. ``seq_local`` is
    ``padded_length(seq_len, layout, world_size) // world_size``; padding positions continue
    past ``seq_len`` (they are masked anyway). On a ``(ulysses, ring)`` mesh: the positions of
    this rank's piece of its ring shard (see :mod:`ringattn.ulysses`).
    """
    _, ulysses, rank, world_size, pieces = _context(group)
    seq_local = padded_length(seq_len, layout, world_size, ulysses=pieces) // world_size
    pos = checked_layout(layout, world_size, seq_local).positions(rank, world_size, seq_local)
    pos = _piece(pos, ulysses)
    if cu_seqlens is None:
        return pos
    starts = cu_seqlens.to(torch.long)
    doc = torch.searchsorted(starts[1:], pos, right=True).clamp(max=len(starts) - 1)
    return pos - starts[doc]


def shard(
    x: torch.Tensor, layout: LayoutName | Layout = "zigzag", dim: int = 1, group: GroupLike = None
) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (a copy; differentiable).

    Any length works: ``x`` is padded with zeros to :func:`padded_length` first. Pass the real
    length as ``ring_attention(..., seq_len=)`` (or a ``cu_seqlens`` / ``attention_mask``) so the
    padding is masked, and to :func:`unshard` to drop it again. On a ``(ulysses, ring)`` mesh
    (:func:`ringattn.context_mesh`) the layout splits the sequence over the ring ranks and each
    ring shard is cut contiguously into ``ulysses`` pieces: mesh rank ``(u, r)`` gets piece
    ``u`` of ring shard ``r``.
    """
    _, ulysses, rank, world_size, pieces = _context(group)
    seq_len = x.shape[dim]
    padded = padded_length(seq_len, layout, world_size, ulysses=pieces)
    chosen = checked_layout(layout, world_size, padded // world_size)
    if padded != seq_len:
        pad_shape = list(x.shape)
        pad_shape[dim] = padded - seq_len
        x = torch.cat([x, x.new_zeros(pad_shape)], dim)
    index = _piece(chosen.positions(rank, world_size, padded // world_size), ulysses)
    return x.index_select(dim, index.to(x.device))


@torch.compiler.disable
def unshard(
    local: torch.Tensor,
    layout: LayoutName | Layout = "zigzag",
    dim: int = 1,
    group: GroupLike = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Gather every rank's shard into the full tensor, in global order (inverse of :func:`shard`).

    ``seq_len`` drops the padding that :func:`shard` added. Differentiable: the gradient of each
    rank's shard is the sum over ranks of the gradients flowing into their copies of the full
    tensor (on a ``(ulysses, ring)`` mesh: over every rank of the mesh).
    """
    process_group, ulysses, _, world_size, _ = _context(group)
    chosen = get_layout(layout)
    dim = dim % local.dim()
    if ulysses is not None:  # this rank's ring shard, from the pieces of its Ulysses group
        local = gather_pieces(local, dim, ulysses)
    if local.shape[dim] % chosen.local_multiple(world_size):
        raise ValueError(
            f"a {chosen.name!r} shard must have a multiple of "
            f"{chosen.local_multiple(world_size)} tokens along dim {dim}, got {local.shape[dim]}"
        )
    checked_layout(chosen, world_size, local.shape[dim])
    full = local if world_size == 1 else _Unshard.apply(local, chosen, dim, process_group)
    return full if seq_len is None else full.narrow(dim, 0, seq_len)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, layout: Layout, dim: int, group):
        rank, world_size = group_rank_and_size(group)
        ctx.layout, ctx.dim, ctx.group = layout, dim, group
        ctx.rank, ctx.world_size = rank, world_size
        return gather_sequence(local, layout, dim, group, world_size)

    @staticmethod
    def backward(ctx, grad_full):
        grad_full = grad_full.clone(memory_format=torch.contiguous_format)  # reduced in place
        all_reduce_bounded(grad_full, ctx.group, "summing unshard's gradients")
        seq_local = grad_full.shape[ctx.dim] // ctx.world_size
        index = ctx.layout.positions(ctx.rank, ctx.world_size, seq_local).to(grad_full.device)
        return grad_full.index_select(ctx.dim, index), None, None, None
