"""``ring_attention`` as registered custom ops, for ``torch.compile(fullgraph=True)``.

Inside a compiled graph a call with a :class:`ringattn.RingMask` becomes the op
``ringattn::ring_attention`` (and its backward ``ringattn::ring_attention_backward``): the
graph holds the tensors, the mask's key (a tensor, so a new mask per batch needs no
recompilation), the values that may change from call to call (scale, dropout probability and
seed: op arguments) and a constant key of the call's other options (score_mod, granularity,
rotation, kernel, flags); the op runs the eager engine —
check across ranks, ring, merges — when the graph runs. Its fake implementation gives the
output shapes without running anything, and its autograd formula calls the backward op, so a
whole model compiles without a graph break. Eager calls do not go through the ops.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .engine import attention_backward, attention_forward
from .merge import accumulator_dtype

if TYPE_CHECKING:
    from .api import CallOptions
    from .ring_mask import RingMask

_MASKS: weakref.WeakValueDictionary[int, RingMask] = weakref.WeakValueDictionary()
_MASK_KEYS = itertools.count()
_CALLS: dict[int, CallOptions] = {}
_CALL_KEYS: dict[CallOptions, int] = {}


def register_mask(mask: RingMask) -> torch.Tensor:
    """A key for ``mask`` (an int64 scalar tensor) under which the ops find it while it lives."""
    key = next(_MASK_KEYS)
    _MASKS[key] = mask
    return torch.tensor(key)


def _mask(key: torch.Tensor) -> RingMask:
    mask = _MASKS.get(int(key))
    if mask is None:
        raise RuntimeError(
            "ringattn: the RingMask of this compiled call no longer exists; inside a compiled "
            "graph the call refers to its mask by key, so keep the mask alive (a variable, "
            "not a temporary) until the backward pass of the batch that uses it"
        )
    return mask


@torch.compiler.assume_constant_result
def _call_key(options: tuple, needs_grad: bool) -> int:
    """A constant key of the call's ``options`` (:meth:`CallOptions.of`'s arguments) with
    ``needs_grad``, computed when the graph is traced."""
    from .api import CallOptions

    call = replace(CallOptions.of(*options), needs_grad=needs_grad)
    if call not in _CALL_KEYS:
        _CALL_KEYS[call] = len(_CALLS)
        _CALLS[len(_CALLS)] = call
    return _CALL_KEYS[call]


def compiled_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    mask: RingMask,
    options: tuple,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ringattn.ring_attention` traced as the custom op: ``(out, lse, max_logits)``;
    ``options``: the arguments of :meth:`CallOptions.of`."""
    scale, score_mod, granularity, rotation, kernel, check, dropout_p, seed, *flags = options
    structure = (None, score_mod, granularity, rotation, kernel, check, 0.0, None, *flags)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = _call_key(structure, grad)
    out, lse, peak, _ = torch.ops.ringattn.ring_attention(
        q, k, v, sinks, mask.key, key, scale, dropout_p, seed
    )
    return out, lse, peak


def _call(key: int, scale: float | None, dropout_p: float, seed: int | None) -> CallOptions:
    return replace(_CALLS[key], scale=scale, dropout_p=dropout_p, dropout_seed=seed)


@torch.library.custom_op(
    "ringattn::ring_attention", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    mask_key: torch.Tensor,
    call_key: int,
    scale: float | None,
    dropout_p: float,
    dropout_seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, max_logits or empty, dropout seed)`` of the call (a seed is drawn from
    torch's default generator when dropout has none)."""
    from .api import plan_call

    call = _call(call_key, scale, dropout_p, dropout_seed)
    plan = plan_call(q, k, v, sinks, _mask(mask_key), call)
    out, lse, peak = attention_forward(q, k, v, sinks, plan, call.max_logits)
    seed = plan.dropout.seed if plan.dropout is not None else 0
    return out.contiguous(), lse.contiguous(), peak, torch.tensor(seed)


@_forward_op.register_fake
def _(q, k, v, sinks, mask_key, call_key, scale, dropout_p, dropout_seed):
    call = _CALLS[call_key]
    batch, seq, heads, _ = q.shape
    dtype = accumulator_dtype(q.dtype)
    return (
        q.new_empty((batch, seq, heads, v.shape[-1])),
        q.new_empty((batch, heads, seq), dtype=dtype),
        q.new_empty((heads if call.max_logits else 0,), dtype=dtype),
        torch.empty((), dtype=torch.long),
    )


@torch.library.custom_op("ringattn::ring_attention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sinks: torch.Tensor | None,
    mask_key: torch.Tensor,
    seed: torch.Tensor,
    call_key: int,
    scale: float | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dsinks or empty)`` of the call, with the forward's dropout seed."""
    from .api import plan_call

    call = _call(call_key, scale, dropout_p, int(seed))
    plan = plan_call(q, k, v, sinks, _mask(mask_key), call, seed=int(seed))
    grads = attention_backward(dout, q, k, v, out, lse, sinks, plan)
    dq, dk, dv, dsinks = (g if g is None else g.contiguous() for g in grads)
    return dq, dk, dv, q.new_empty(0) if dsinks is None else dsinks


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, sinks, mask_key, seed, call_key, scale, dropout_p):
    dsinks = q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, sinks, mask_key, call_key, scale, dropout_p, _ = inputs
    out, lse, _, seed = output
    ctx.call_key, ctx.has_sinks = call_key, sinks is not None
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.save_for_backward(q, k, v, out, lse, mask_key, seed, *((sinks,) if ctx.has_sinks else ()))


def _backward(ctx, dout, _dlse, _dpeak, _dseed):
    q, k, v, out, lse, mask_key, seed, *rest = ctx.saved_tensors
    sinks = rest[0] if ctx.has_sinks else None
    dq, dk, dv, dsinks = torch.ops.ringattn.ring_attention_backward(
        dout.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        sinks,
        mask_key,
        seed,
        ctx.call_key,
        ctx.scale,
        ctx.dropout_p,
    )
    return dq, dk, dv, dsinks if ctx.has_sinks else None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
