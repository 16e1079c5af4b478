"""Input validation that fails on every rank before any ring step can hang.

Each rank first checks its own inputs. Then one small all-gather compares a numeric signature
across ranks (and carries a "this rank has a problem" flag), so a mistake on a single rank, or
shards that differ between ranks, is raised everywhere with the same message.

There are two signatures. The *mask signature* describes a :class:`ringattn.RingMask`: lengths,
layout, causality, window, a hash of the global document boundaries, which per-token masks and
mods exist. It is agreed once, when the mask is created. The *call signature* describes one
``ring_attention`` call: shapes, dtype, scale, rotation, granularity and whether gradients flow —
everything ``rotation="auto"`` depends on. A mask remembers the call signatures already agreed,
so the layers of a model that share one cost a single check per batch, not one per layer.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import backend_for, host_timeout, wait_bounded
from .engine import Granularity
from .layout import LAYOUTS, Layout, global_order, layout_problem

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ROTATIONS = ("kv", "q", "auto", "allgather")  # appended: call signatures index it
_ABSENT = -2.0
_UNBOUNDED = -1.0

Fields = tuple[tuple[str, str | None], ...]
"""Signature fields compared across ranks, with the advice given when they differ; a field
without advice is not compared but shared: :func:`agree` returns every rank's value."""

CALL_FIELDS: Fields = (
    ("batch", "every rank must pass the same batch size"),
    ("seq_local", "every rank must hold an equal shard of the sequence; use ringattn.shard"),
    ("heads_q", "every rank must pass the same number of query heads"),
    ("head_dim", "every rank must pass the same head_dim"),
    ("head_dim_v", "every rank must pass the same value head_dim"),
    ("seq_local_kv", "every rank must hold an equal shard of the keys/values"),
    ("heads_kv", "every rank must pass the same number of key/value heads"),
    ("dtype", "every rank must use the same dtype"),
    ("device_type", "every rank must use the same device type"),
    ("scale", "every rank must pass the same scale"),
    ("score_mod", "every rank must pass a score_mod, or none"),
    ("sub_blocks", "every rank must pass the same granularity"),
    ("min_tokens", "every rank must pass the same granularity"),
    ("accumulator_split", "every rank must pass the same granularity"),
    ("rotation", "every rank must pass the same rotation"),
    ("sinks", "every rank must pass sinks, or none"),
    ("dropout_p", "every rank must pass the same dropout_p"),
    ("max_logits", "every rank must ask for the max logits (return_max_logits), or none"),
    (
        "needs_grad",
        "every rank must agree on whether gradients flow (requires_grad of q, k, v and grad "
        "mode): the backward pass and rotation='auto' involve every rank",
    ),
)
MASK_FIELDS: Fields = (
    ("layout", "every rank must pass the same layout"),
    ("q_len", "every rank must pass the same q_len"),
    ("kv_len", "every rank must pass the same kv_len"),
    ("batch", "every rank must pass the same batch size"),
    ("heads", "every rank must pass the same heads"),
    ("causal", "every rank must pass the same causal flag"),
    ("window_left", "every rank must pass the same window"),
    ("window_right", "every rank must pass the same window"),
    ("documents", "every rank must pass the same kind of document description"),
    ("cu_seqlens_end", "every rank must pass the same cu_seqlens"),
    ("cu_seqlens", "every rank must pass the same cu_seqlens (global document boundaries)"),
    ("attention_mask", "every rank must pass an attention_mask, or none"),
    ("seq_len", "every rank must pass the same seq_len"),
    ("mask_mod", "every rank must pass a mask_mod, or none"),
    ("tile_size", "every rank must pass the same tile_size"),
    ("device_type", "every rank must build its mask on the same device type"),
    ("padding", None),  # whether this rank's attention_mask hides any token
)


class RingInputError(ValueError):
    """Inputs to a ring call that cannot work, raised on every rank of the group."""


@dataclass(frozen=True)
class MaskArgs:
    """The mask arguments of :func:`ringattn.create_ring_mask`, as the user passed them."""

    causal: object = False
    window: object = None
    cu_seqlens: object = None
    document_ids: object = None
    attention_mask: object = None
    seq_len: object = None
    mask_mod: object = None
    tile_size: object = 512

    @property
    def window_sides(self) -> tuple[object, object] | None:
        """``window`` as ``(left, right)`` (an int ``w`` is ``(w, 0)``), ``None`` for none."""
        window = self.window
        if window is None:
            return None
        return (window, 0) if isinstance(window, int) else tuple(window)

    def problem(
        self, batch: int | None, seq_q_local: int, seq_kv_local: int, world_size: int
    ) -> str | None:
        """What is wrong with the mask arguments for shards of ``seq_q_local`` queries and
        ``seq_kv_local`` keys (``batch`` rows, ``None``: any), or ``None``."""
        total = seq_kv_local * world_size
        if not isinstance(self.causal, bool):
            return f"causal must be a bool, got {self.causal!r}"
        window = self.window
        if window is not None:
            if (
                not isinstance(window, int | tuple | list)
                or len(sides := self.window_sides) != 2
                or not all(s is None or (isinstance(s, int) and s >= 0) for s in sides)
            ):
                return f"window must be an int >= 0 or a (left, right) pair of them, got {window!r}"
        if self.cu_seqlens is not None and self.document_ids is not None:
            return "pass either cu_seqlens or document_ids, not both"
        cu = self.cu_seqlens
        if cu is not None:
            if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
                return "cu_seqlens must be a 1-D tensor [0, l1, l1 + l2, ...] of global lengths"
            if cu.is_floating_point() or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
                return "cu_seqlens must be integers that start at 0 and never decrease"
            if int(cu[-1]) > total:
                return (
                    f"cu_seqlens ends at {int(cu[-1])} but the ranks hold only {total} tokens "
                    f"({world_size} x {seq_kv_local})"
                )
        rows = "batch" if batch is None else batch
        ids = self.document_ids
        if ids is not None and (
            not isinstance(ids, torch.Tensor)
            or ids.is_floating_point()
            or ids.shape[-1:] != (seq_kv_local,)
            or ids.dim() not in (1, 2)
            or (ids.dim() == 2 and batch is not None and ids.shape[0] != batch)
        ):
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            return (
                f"document_ids must be an integer tensor of shape ({seq_kv_local},) or "
                f"({rows}, {seq_kv_local}) for this rank's shard, got {shape}"
            )
        mask = self.attention_mask
        if mask is not None and (
            not isinstance(mask, torch.Tensor)
            or mask.dim() != 2
            or mask.shape[1] != seq_kv_local
            or (batch is not None and mask.shape[0] != batch)
        ):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            return (
                f"attention_mask must have shape (batch, seq_local) = ({rows}, {seq_kv_local}) "
                f"for this rank's shard, got {shape}"
            )
        if self.seq_len is not None and seq_q_local != seq_kv_local:
            return "seq_len (padding) needs queries and keys of the same length"
        if self.seq_len is not None and (
            not isinstance(self.seq_len, int) or not 0 < self.seq_len <= total
        ):
            return f"seq_len must be an int in 1..{total} (the padded total), got {self.seq_len!r}"
        if self.mask_mod is not None and not isinstance(self.mask_mod, Callable):
            return f"mask_mod must be callable, got {type(self.mask_mod).__name__}"
        if not isinstance(self.tile_size, int) or self.tile_size < 1:
            return f"tile_size must be a positive int, got {self.tile_size!r}"
        return None

    def signature(self) -> list[float]:
        """The fields of :data:`MASK_FIELDS` from ``causal`` on."""
        if self.window_sides is None:
            left = right = _ABSENT
        else:
            left_side, right_side = self.window_sides
            left = _UNBOUNDED if left_side is None else float(left_side)
            right = _UNBOUNDED if right_side is None else float(right_side)
        documents = (
            1.0 if self.cu_seqlens is not None else 2.0 if self.document_ids is not None else 0.0
        )
        return [
            float(self.causal),
            left,
            right,
            documents,
            float(self.cu_seqlens[-1]) if self.cu_seqlens is not None else _ABSENT,
            _fingerprint(self.cu_seqlens) if self.cu_seqlens is not None else _ABSENT,
            float(self.attention_mask is not None),
            float(self.seq_len) if self.seq_len is not None else _ABSENT,
            float(self.mask_mod is not None),
            float(self.tile_size),
        ]


def mask_signature(
    masks: MaskArgs,
    layout: Layout,
    world_size: int,
    q_len: int,
    kv_len: int,
    batch: int | None,
    heads: int | None,
    device: torch.device,
) -> list[float]:
    """The values of :data:`MASK_FIELDS` for a mask (valid arguments only)."""
    return [
        _layout_fingerprint(layout, world_size, kv_len // world_size),
        q_len,
        kv_len,
        _ABSENT if batch is None else batch,
        _ABSENT if heads is None else heads,
        *masks.signature(),
        0 if device.type == "cpu" else 1,
        float(masks.attention_mask is not None and not bool(masks.attention_mask.all())),
    ]


def _fingerprint(values: torch.Tensor, prefix: bytes = b"") -> float:
    """A 48-bit hash of an integer tensor's values (exact in float64), whatever its dtype."""
    numbers = values.detach().to("cpu", torch.int64).tolist()
    data = prefix + struct.pack(f"<{len(numbers)}q", *numbers)
    return float(int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "little"))


@functools.lru_cache(maxsize=64)
def _layout_fingerprint(layout: Layout, world_size: int, seq_local: int) -> float:
    """Equal on two ranks when their layouts have the same name and, for layouts that are not
    built in, put the same positions on every rank."""
    if layout in LAYOUTS.values():
        return _fingerprint(torch.empty(0, dtype=torch.long), layout.name.encode())
    order = global_order(layout, world_size, seq_local * world_size)
    return _fingerprint(order, layout.name.encode())


def local_problem(
    q: object,
    k: object,
    v: object,
    layout: Layout,
    world_size: int,
    group: dist.ProcessGroup | None,
) -> str | None:
    """What is wrong with this rank's ``q``, ``k``, ``v`` on their own, or ``None``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}"
        if t.dtype not in _DTYPES:
            return f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64"
    assert (
        isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    )
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
    if k.shape[:3] != v.shape[:3]:
        return (
            "k and v must have the same batch, length and heads (only the head_dim may differ), "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0]:
        return f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}"
    if q.shape[3] != k.shape[3]:
        return f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}"
    heads_q, heads_kv = q.shape[2], k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        return (
            f"heads_q={heads_q} is not a multiple of heads_kv={heads_kv}; grouped-query attention "
            "needs every key/value head to serve the same number of query heads"
        )
    if q.shape[1] > k.shape[1]:
        return (
            f"q has {q.shape[1]} local tokens but k/v only {k.shape[1]}; queries are the last "
            "tokens of the key sequence, so there cannot be more of them"
        )
    problem = lengths_problem(layout, world_size, q.shape[1], k.shape[1])
    if problem is None and world_size > 1:
        problem = backend_problem(q.device.type, group)
    return problem


def lengths_problem(
    layout: Layout, world_size: int, seq_q_local: int, seq_kv_local: int
) -> str | None:
    """What is wrong with shards of these local lengths under ``layout``, or ``None``."""
    for name, length in (("q", seq_q_local), ("k/v", seq_kv_local)):
        multiple = layout.local_multiple(world_size)
        if length % multiple:
            return (
                f"the {layout.name!r} layout needs a multiple of {multiple} local tokens per "
                f"rank, got {length} for {name}; shard with ringattn.shard, which pads as needed"
            )
        problem = layout_problem(layout, world_size, length)
        if problem:
            return problem
    return None


def backend_problem(device_type: str, group: dist.ProcessGroup | None) -> str | None:
    """What keeps ``group`` from moving ``device_type`` tensors, or ``None``."""
    backend = backend_for(group, device_type) if group is not None else None
    if backend is None:
        return f"the process group has no backend for {device_type} tensors"
    if device_type == "cpu" and backend not in ("gloo", "mpi"):
        return f"CPU tensors need a gloo process group, but the group's backend is {backend!r}"
    if device_type == "cuda" and backend not in ("nccl", "gloo"):
        return (
            f"CUDA tensors need an NCCL (or gloo) process group, but the group's backend "
            f"for CUDA is {backend!r}"
        )
    return None


def call_values_problem(
    scale: object,
    rotation: object,
    granularity: object,
    dropout_p: object = 0.0,
    dropout_seed: object = None,
) -> str | None:
    """What is wrong with the non-tensor arguments of a call, or ``None``."""
    if not isinstance(dropout_p, int | float) or not 0 <= dropout_p < 1:
        return f"dropout_p must be a number in [0, 1), got {dropout_p!r}"
    if dropout_seed is not None and (
        not isinstance(dropout_seed, int) or isinstance(dropout_seed, bool)
    ):
        return f"dropout_seed must be an int or None, got {dropout_seed!r}"
    if scale is not None and (not isinstance(scale, int | float) or scale != scale):
        return f"scale must be a number, got {scale!r}"
    if rotation not in _ROTATIONS:
        return f"rotation must be one of {_ROTATIONS}, got {rotation!r}"
    if not isinstance(granularity, Granularity):
        return f"granularity must be a ringattn.Granularity, got {granularity!r}"
    return None


def sinks_problem(sinks: object, q: torch.Tensor) -> str | None:
    """What is wrong with attention-sink logits for queries ``q``, or ``None``."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        return f"sinks must be a floating-point tensor, got {type(sinks).__name__}"
    if tuple(sinks.shape) != (q.shape[2],):
        return f"sinks must have shape (heads_q,) = ({q.shape[2]},), got {tuple(sinks.shape)}"
    if sinks.device != q.device:
        return f"sinks must be on q's device {q.device}, got {sinks.device}"
    return None


def needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a ring call on these inputs will run a backward ring."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


def call_signature(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    score_mod: object,
    granularity: Granularity,
    rotation: str,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    max_logits: bool = False,
    grad: bool | None = None,
) -> tuple[float, ...]:
    """The values of :data:`CALL_FIELDS` for a call whose inputs have no local problem
    (``grad``: whether a backward follows, default from the inputs and the grad mode)."""
    return (
        q.shape[0],
        q.shape[1],
        q.shape[2],
        q.shape[3],
        v.shape[3],
        k.shape[1],
        k.shape[2],
        _DTYPES.index(q.dtype),
        0 if q.device.type == "cpu" else 1,
        scale,
        float(score_mod is not None),
        granularity.sub_blocks,
        granularity.min_tokens,
        granularity.accumulator_split,
        _ROTATIONS.index(rotation),
        float(sinks is not None),
        float(dropout_p),
        float(max_logits),
        float(needs_grad(q, k, v) if grad is None else grad),
    )


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where the check's all-gather runs, the same on every rank whatever its inputs: the CPU
    when the group has a host backend for it (gloo, also in a "cpu:gloo,cuda:nccl" group),
    else this rank's GPU."""
    if backend_for(group, "cpu") in ("gloo", "mpi"):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


_CALLERS = ("ring_attention", "create_ring_mask")
_MESSAGE_BYTES = 4096  # of one rank's problem, as gathered (longer ones are cut)


def _gather_messages(
    message: str | None,
    group: dist.ProcessGroup,
    world_size: int,
    device: torch.device,
    caller: str,
) -> list[str | None]:
    """Every rank's ``message`` (None where a rank has none), through one bounded all-gather of
    fixed-size UTF-8 buffers."""
    encoded = (message or "").encode()[:_MESSAGE_BYTES]
    local = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if encoded:
        local[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    gathered = [torch.empty_like(local, device=device) for _ in range(world_size)]
    work = dist.all_gather(gathered, local.to(device), group=group, async_op=True)
    wait_bounded(work, host_timeout(device, group), f"{caller}'s check across ranks")
    texts = [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in gathered]
    return [text or None for text in texts]


def agree(
    caller: str,
    problem: str | None,
    fields: Fields,
    signature: list[float] | tuple[float, ...] | None,
    group: dist.ProcessGroup,
    world_size: int,
) -> dict[str, list[float]]:
    """Raise :class:`RingInputError` on every rank of ``group`` if any rank has a ``problem`` or
    the ranks' ``signature`` s (values of ``fields``) differ; one all-gather, bounded by
    ``RINGATTN_TIMEOUT`` on the host. Returns every rank's value of the shared fields (those
    without advice).

    Every check gathers the same number of values, tagged with its ``caller``, so ranks that
    are in different checks (one creating a mask, another calling ``ring_attention``) learn it
    from each other instead of mismatching the collective."""
    width = len(CALL_FIELDS) + len(MASK_FIELDS)
    values = [0.0] * len(fields) if problem else list(signature)
    values += [0.0] * (width - len(values))
    tag = float(_CALLERS.index(caller))
    local = torch.tensor([float(problem is not None), tag, *values], dtype=torch.float64)
    device = _collective_device(group)
    gathered = [torch.empty_like(local, device=device) for _ in range(world_size)]
    work = dist.all_gather(gathered, local.to(device), group=group, async_op=True)
    wait_bounded(work, host_timeout(device, group), f"{caller}'s check across ranks")
    rows = torch.stack(gathered).cpu()
    callers = [_CALLERS[int(x)] for x in rows[:, 1].tolist()]
    if len(set(callers)) > 1:
        raise RingInputError(
            f"ringattn: the ranks are in different calls {callers} (by rank); every rank of the "
            "group must call create_ring_mask and ring_attention together, in the same order"
        )
    if rows[:, 0].any():
        problems = _gather_messages(problem, group, world_size, device, caller)
        listed = "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p)
        raise RingInputError(f"{caller}: invalid input on {listed}")
    shared = {}
    for i, (name, advice) in enumerate(fields, start=2):
        column = rows[:, i]
        if advice is None:
            shared[name] = column.tolist()
        elif not torch.all(column == column[0]):
            shown = [
                None if x == _ABSENT else int(x) if float(x).is_integer() else float(x)
                for x in column.tolist()
            ]
            if name == "dtype":
                shown = [str(_DTYPES[int(x)]) for x in column.tolist()]
            raise RingInputError(
                f"{caller}: {name} differs between ranks {shown} (by rank); {advice}"
            )
    return shared
