"""Input validation that fails on every rank before any ring step can hang.

Each rank first checks its own inputs. Then one small all-gather compares a numeric signature of
the call across ranks (and carries a "this rank has a problem" flag), so a mistake on a single rank,
or shards that differ between ranks, is raised everywhere with the same message.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import backend_for
from .engine import Granularity
from .layout import LAYOUTS, Layout, get_layout, global_order, layout_problem

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Signature fields compared across ranks, with the advice given when they differ.
_FIELDS = (
    ("batch", "every rank must pass the same batch size"),
    ("seq_local", "every rank must hold an equal shard of the sequence; use ringattn.shard"),
    ("heads_q", "every rank must pass the same number of query heads"),
    ("head_dim", "every rank must pass the same head_dim"),
    ("seq_local_kv", "every rank must hold an equal shard of the keys/values"),
    ("heads_kv", "every rank must pass the same number of key/value heads"),
    ("dtype", "every rank must use the same dtype"),
    ("device_type", "every rank must use the same device type"),
    ("causal", "every rank must pass the same causal flag"),
    ("layout", "every rank must pass the same layout"),
    ("scale", "every rank must pass the same scale"),
    ("window_left", "every rank must pass the same window"),
    ("window_right", "every rank must pass the same window"),
    ("documents", "every rank must pass the same kind of document description"),
    ("cu_seqlens_end", "every rank must pass the same cu_seqlens"),
    ("cu_seqlens", "every rank must pass the same cu_seqlens (global document boundaries)"),
    ("attention_mask", "every rank must pass an attention_mask, or none"),
    ("seq_len", "every rank must pass the same seq_len"),
    ("mask_mod", "every rank must pass a mask_mod, or none"),
    ("score_mod", "every rank must pass a score_mod, or none"),
    ("tile_size", "every rank must pass the same tile_size"),
    ("sub_blocks", "every rank must pass the same granularity"),
    ("min_tokens", "every rank must pass the same granularity"),
    ("rotation", "every rank must pass the same rotation"),
    (
        "needs_grad",
        "every rank must agree on whether gradients flow (requires_grad of q, k, v and grad "
        "mode): the backward pass and rotation='auto' involve every rank",
    ),
)
_ROTATIONS = ("kv", "q", "auto")
_ABSENT = -2.0
_UNBOUNDED = -1.0


@dataclass(frozen=True)
class MaskArgs:
    """The mask arguments of :func:`ringattn.ring_attention`, as the user passed them."""

    window: object = None
    cu_seqlens: object = None
    document_ids: object = None
    attention_mask: object = None
    seq_len: object = None
    mask_mod: object = None
    score_mod: object = None

    @property
    def window_sides(self) -> tuple[object, object] | None:
        """``window`` as ``(left, right)`` (an int ``w`` is ``(w, 0)``), ``None`` for none."""
        window = self.window
        if window is None:
            return None
        return (window, 0) if isinstance(window, int) else tuple(window)

    def problem(self, q: torch.Tensor, k: torch.Tensor, world_size: int) -> str | None:
        """What is wrong with the mask arguments for this rank's ``q``/``k``, or ``None``."""
        batch, seq_local = k.shape[0], k.shape[1]
        total = seq_local * world_size
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
                    f"({world_size} x {seq_local})"
                )
        ids = self.document_ids
        if ids is not None and (
            not isinstance(ids, torch.Tensor)
            or ids.is_floating_point()
            or tuple(ids.shape) not in ((seq_local,), (batch, seq_local))
        ):
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            return (
                f"document_ids must be an integer tensor of shape ({seq_local},) or "
                f"({batch}, {seq_local}) for this rank's shard, got {shape}"
            )
        mask = self.attention_mask
        if mask is not None and (
            not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, seq_local)
        ):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            return (
                f"attention_mask must have shape (batch, seq_local) = ({batch}, {seq_local}) "
                f"for this rank's shard, got {shape}"
            )
        if self.seq_len is not None and q.shape[1] != k.shape[1]:
            return "seq_len (padding) needs queries and keys of the same length"
        if self.seq_len is not None and (
            not isinstance(self.seq_len, int) or not 0 < self.seq_len <= total
        ):
            return f"seq_len must be an int in 1..{total} (the padded total), got {self.seq_len!r}"
        for name in ("mask_mod", "score_mod"):
            mod = getattr(self, name)
            if mod is not None and not isinstance(mod, Callable):
                return f"{name} must be callable, got {type(mod).__name__}"
        return None

    def signature(self) -> list[float]:
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
            left,
            right,
            documents,
            float(self.cu_seqlens[-1]) if self.cu_seqlens is not None else _ABSENT,
            _fingerprint(self.cu_seqlens) if self.cu_seqlens is not None else _ABSENT,
            float(self.attention_mask is not None),
            float(self.seq_len) if self.seq_len is not None else _ABSENT,
            float(self.mask_mod is not None),
            float(self.score_mod is not None),
        ]


def _fingerprint(values: torch.Tensor, prefix: bytes = b"") -> float:
    """A 48-bit hash of an integer tensor's values (exact in float64), whatever its dtype."""
    numbers = values.detach().to("cpu", torch.int64).tolist()
    data = prefix + struct.pack(f"<{len(numbers)}q", *numbers)
    return float(int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "little"))


class RingInputError(ValueError):
    """Inputs to a ring call that cannot work, raised on every rank of the group."""


def local_problem(
    q: object,
    k: object,
    v: object,
    layout: Layout,
    world_size: int,
    backend: str | None,
) -> str | None:
    """What is wrong with this rank's inputs, or ``None``. ``backend`` is the group's backend for
    the inputs' device (``None`` if it has none or there is no group, a world of one)."""
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
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
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
    for name, length in (("q", q.shape[1]), ("k/v", k.shape[1])):
        multiple = layout.local_multiple(world_size)
        if length % multiple:
            return (
                f"the {layout.name!r} layout needs a multiple of {multiple} local tokens per "
                f"rank, got {length} for {name}; shard with ringattn.shard, which pads as needed"
            )
        problem = layout_problem(layout, world_size, length)
        if problem:
            return problem
    if world_size > 1:
        device_type = q.device.type
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


def needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a ring call on these inputs will run a backward ring."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


@functools.lru_cache(maxsize=64)
def _layout_fingerprint(layout: Layout, world_size: int, seq_local: int) -> float:
    """Equal on two ranks when their layouts have the same name and, for layouts that are not
    built in, put the same positions on every rank."""
    if layout in LAYOUTS.values():
        return _fingerprint(torch.empty(0, dtype=torch.long), layout.name.encode())
    order = global_order(layout, world_size, seq_local * world_size)
    return _fingerprint(order, layout.name.encode())


def _signature(
    q, k, v, causal, layout, scale, masks: MaskArgs, tile_size, granularity, rotation, world_size
) -> list[float]:
    return [
        q.shape[0],
        q.shape[1],
        q.shape[2],
        q.shape[3],
        k.shape[1],
        k.shape[2],
        _DTYPES.index(q.dtype),
        0 if q.device.type == "cpu" else 1,
        float(causal),
        _layout_fingerprint(layout, world_size, k.shape[1]),
        scale,
        *masks.signature(),
        tile_size,
        granularity.sub_blocks,
        granularity.min_tokens,
        rotation,
        float(needs_grad(q, k, v)),
    ]


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where the check's all-gather runs, the same on every rank whatever its inputs: the CPU
    when the group has a host backend for it (gloo, also in a "cpu:gloo,cuda:nccl" group),
    else this rank's GPU."""
    if backend_for(group, "cpu") in ("gloo", "mpi"):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def check_inputs(
    q: object,
    k: object,
    v: object,
    *,
    causal: bool,
    layout: str | Layout,
    scale: float | None,
    group: dist.ProcessGroup | None,
    world_size: int,
    masks: MaskArgs | None = None,
    tile_size: int = 512,
    granularity: Granularity | None = None,
    rotation: str = "auto",
    across_ranks: bool = True,
) -> Layout:
    """Raise :class:`RingInputError` on every rank if any rank's inputs cannot work together;
    return the resolved layout."""
    masks = masks or MaskArgs()
    device_type = q.device.type if isinstance(q, torch.Tensor) else "cpu"
    backend = backend_for(group, device_type) if group is not None else None
    try:
        layout = get_layout(layout)
    except ValueError as exc:
        problem = str(exc)
        layout = LAYOUTS["contiguous"]
    else:
        problem = local_problem(q, k, v, layout, world_size, backend)
    if problem is None and scale is None:
        scale = q.shape[-1] ** -0.5
    if problem is None and (not isinstance(scale, int | float) or scale != scale):
        problem = f"scale must be a number, got {scale!r}"
    if problem is None:
        problem = masks.problem(q, k, world_size)
    if problem is None and rotation not in _ROTATIONS:
        problem = f"rotation must be one of {_ROTATIONS}, got {rotation!r}"
    if problem is None and (not isinstance(tile_size, int) or tile_size < 1):
        problem = f"tile_size must be a positive int, got {tile_size!r}"
    granularity = Granularity() if granularity is None else granularity
    if problem is None and not isinstance(granularity, Granularity):
        problem = f"granularity must be a ringattn.Granularity, got {granularity!r}"
    if world_size == 1 or not across_ranks:
        if problem:
            raise RingInputError(f"ring_attention: {problem}")
        return layout
    signature = (
        [0.0] * len(_FIELDS)
        if problem
        else _signature(
            q,
            k,
            v,
            causal,
            layout,
            scale or 0.0,
            masks,
            tile_size,
            granularity,
            _ROTATIONS.index(rotation),
            world_size,
        )
    )
    local = torch.tensor([float(problem is not None), *signature], dtype=torch.float64)
    device = _collective_device(group)
    gathered = [torch.empty_like(local, device=device) for _ in range(world_size)]
    dist.all_gather(gathered, local.to(device), group=group)
    rows = torch.stack(gathered).cpu()
    if rows[:, 0].any():
        problems: list[str | None] = [None] * world_size
        dist.all_gather_object(problems, problem, group=group)
        listed = "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p)
        raise RingInputError(f"ring_attention: invalid input on {listed}")
    for i, (name, advice) in enumerate(_FIELDS, start=1):
        values = rows[:, i]
        if not torch.all(values == values[0]):
            shown = [int(x) if float(x).is_integer() else float(x) for x in values.tolist()]
            if name == "dtype":
                shown = [str(_DTYPES[int(x)]) for x in values.tolist()]
            raise RingInputError(
                f"ring_attention: {name} differs between ranks {shown} (by rank); {advice}"
            )
    return layout
