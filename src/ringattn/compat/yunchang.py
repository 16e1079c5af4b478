"""yunchang's (long-context-attention's) unified sequence parallelism (USP) API: Ulysses x ring.

Replace ``from yunchang import LongContextAttention, set_seq_parallel_pg, EXTRACT_FUNC_DICT``
(and ``from yunchang.kernels import AttnType``) with
``from ringattn.compat.yunchang import ...`` and keep the calls::

    set_seq_parallel_pg(ulysses_degree, ring_degree, rank, world_size)   # U x R = world_size
    attn = LongContextAttention(ring_impl_type="zigzag")
    local_q = EXTRACT_FUNC_DICT["zigzag"](q, rank, world_size=world_size, rd=ring_degree,
                                          ud=ulysses_degree)
    out = attn(local_q, local_k, local_v, causal=True)    # (batch, seq_local, heads, head_dim)

Process groups, as in yunchang's ``set_seq_parallel_pg``: every block of ``U x R``
consecutive ranks is one sequence-parallel group (several blocks are data-parallel replicas).
With ``use_ulysses_low=True`` (the default) rank ``g`` of a block is Ulysses rank ``g % U`` of
ring rank ``g // U`` (the Ulysses peers are consecutive ranks); with ``use_ulysses_low=False`` it
is ring rank ``g % R`` of Ulysses rank ``g // R``. A Ulysses degree above 1 becomes a
``(ulysses, ring)`` DeviceMesh of that placement (one per replica), and
:class:`LongContextAttention` calls ``ring_attention(..., group=mesh)``: an all-to-all over heads
in the Ulysses group (rank ``u`` gets query heads ``u * heads_q / U ..``, as yunchang's
``scatter_idx=2, gather_idx=1``), the ring over the ring group, and the inverse all-to-all
(:mod:`ringattn.ulysses`). With a Ulysses degree of 1 the ring runs over a plain process group.

Shards: ``EXTRACT_FUNC_DICT`` cuts what yunchang's functions cut, token for token. ``"basic"``:
chunk ``rank`` of ``world_size``; ``"zigzag"``: the zigzag shard (chunks ``r`` and ``2R-1-r`` of
``2R``) of the rank's ring rank ``r``, cut into ``U`` contiguous pieces, of which it holds the
one of its Ulysses rank; ``"strip"``: the striped shard ``rank // U`` (tokens ``j, j+R, ...``),
cut into ``U`` pieces, piece ``rank % U``. These are ``ringattn.shard(x, layout, group=mesh)``
of the contiguous, zigzag and striped layouts, except ``basic`` and ``strip`` with
``use_ulysses_low=False`` (and ``U, R > 1``), whose tokens follow the global rank, not the mesh
position: there the layer uses a :class:`UlyssesHighLayout` that names exactly those tokens, so
the results are still exact. ``LongContextAttention.layout`` and ``.group`` can be passed to
``ringattn.shard`` / ``positions`` / ``unshard``.

``ring_impl_type`` picks the layout: ``"basic"`` (and the ``basic_*`` kernel variants),
``"zigzag"`` (and ``"zigzag_npu"``), ``"strip"`` (or ``"stripe"``). ``attn_type`` names a kernel
in yunchang; ringattn chooses its own (``kernel="auto"``), exact for every ``AttnType``. The
forward's arguments are flash-attn's, as in :mod:`ringattn.compat.ring_flash_attn`, plus
``softcap``; like yunchang it returns the output only, also with ``return_attn_probs=True``.
Where yunchang's all-to-all cannot split the key/value heads (fewer than, or not a multiple of,
the Ulysses degree), ringattn repeats them to ``lcm(heads_kv, U)``; the query heads must be a
multiple of ``U`` (as upstream).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from .. import LAYOUTS, Layout, Segment
from ..comm import GroupLike, backend_for
from ..layout import segment_positions
from ._flash import FlashArgs, flash_attention

__all__ = [
    "EXTRACT_FUNC_DICT",
    "AttnType",
    "LongContextAttention",
    "LongContextAttentionQKVPacked",
    "UlyssesHighLayout",
    "basic_extract_local",
    "set_seq_parallel_pg",
    "stripe_extract_local",
    "zigzag_extract_local",
]

_RING_LAYOUTS = {
    "basic": "contiguous",
    "basic_pytorch": "contiguous",
    "basic_flashinfer": "contiguous",
    "basic_npu": "contiguous",
    "basic_xpu": "contiguous",
    "zigzag": "zigzag",
    "zigzag_npu": "zigzag",
    "strip": "striped",
    "stripe": "striped",
}


class AttnType(enum.Enum):
    """yunchang's kernel names. ringattn picks its kernel itself; every one is exact."""

    FA = "fa"
    FA3 = "fa3"
    TORCH = "torch"
    SAGE_FP16 = "sage_fp16"
    SAGE_FP8 = "sage_fp8"

    @classmethod
    def from_string(cls, name: str) -> AttnType:
        """The member whose value is ``name`` (e.g. ``"fa"``); ``ValueError`` for others."""
        return cls(name)


@dataclass
class _SequenceParallel:
    """What :func:`set_seq_parallel_pg` set up: this rank's ring group (Ulysses degree 1) or
    its ``(ulysses, ring)`` mesh, the degrees and the placement."""

    configured: bool = False
    group: GroupLike = None
    ulysses: int = 1
    ring: int = 1
    ulysses_low: bool = True


_STATE = _SequenceParallel()


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def set_seq_parallel_pg(
    sp_ulysses_degree: int,
    sp_ring_degree: int,
    rank: int,
    world_size: int,
    use_ulysses_low: bool = True,
) -> None:
    """Set up the process groups of :class:`LongContextAttention` (call on every rank).

    Args:
        sp_ulysses_degree, sp_ring_degree: ``U`` and ``R``; ``U x R`` must divide
            ``world_size``. Every block of ``U x R`` consecutive ranks is one sequence-parallel
            group; more than one block are data-parallel replicas, each with its own groups.
        rank, world_size: this process's rank and the world size of ``torch.distributed``
            (``0`` and ``1`` without it).
        use_ulysses_low: ``True``: rank ``g`` of a block is Ulysses rank ``g % U`` of ring rank
            ``g // U`` (Ulysses groups of consecutive ranks, e.g. inside a node); ``False``:
            ring rank ``g % R`` of Ulysses rank ``g // R`` (rings of consecutive ranks). Without
            Ulysses (``U == 1``) it changes nothing.
    """
    ulysses = _positive_int("sp_ulysses_degree", sp_ulysses_degree)
    if not isinstance(sp_ring_degree, int) or isinstance(sp_ring_degree, bool):
        sp_ring_degree = 0  # refused just below
    initialised = dist.is_available() and dist.is_initialized()
    actual = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
    if (rank, world_size) != actual:
        raise ValueError(
            f"rank={rank}, world_size={world_size} do not match torch.distributed's "
            f"rank {actual[0]} of {actual[1]}"
        )
    if sp_ring_degree < 1 or world_size % (ulysses * sp_ring_degree):
        raise ValueError(
            f"sp_ring_degree must be a positive int with sp_ulysses_degree x sp_ring_degree "
            f"dividing world_size={world_size}, got sp_ulysses_degree={sp_ulysses_degree}, "
            f"sp_ring_degree={sp_ring_degree!r}"
        )
    ring = sp_ring_degree
    if ulysses > 1:
        group: GroupLike = _sequence_parallel_mesh(
            ulysses, ring, world_size // (ulysses * ring), bool(use_ulysses_low)
        )
    else:
        group = None  # the default group when one ring spans the world
        if ring < world_size:
            for first in range(0, world_size, ring):  # every rank creates every group
                ranks = list(range(first, first + ring))
                created = dist.new_group(ranks)
                if rank in ranks:
                    group = created
    _STATE.group, _STATE.ulysses, _STATE.ring = group, ulysses, ring
    _STATE.ulysses_low, _STATE.configured = bool(use_ulysses_low), True


def _sequence_parallel_mesh(ulysses: int, ring: int, replicas: int, ulysses_low: bool):
    """This rank's ``(ulysses, ring)`` DeviceMesh in yunchang's placement: a row-major mesh
    ``(replica, ring, ulysses)`` (Ulysses low) or ``(replica, ulysses, ring)``, sliced to the
    replica of this rank. Every rank creates every group (``init_device_mesh``)."""
    from torch.distributed.device_mesh import init_device_mesh

    inner = ("ring", "ulysses") if ulysses_low else ("ulysses", "ring")
    sizes = {"ring": ring, "ulysses": ulysses}
    shape = tuple(sizes[name] for name in inner)
    device_type = _mesh_device_type()
    if replicas == 1:
        return init_device_mesh(device_type, shape, mesh_dim_names=inner)
    mesh = init_device_mesh(device_type, (replicas, *shape), mesh_dim_names=("replica", *inner))
    return mesh[inner]


def _mesh_device_type() -> str:
    """``"cuda"`` when the default group moves CUDA tensors with NCCL, else ``"cpu"`` (the
    mesh's device type only decides which device torch may select; the groups are the same)."""
    if torch.cuda.is_available() and backend_for(dist.group.WORLD, "cuda") == "nccl":
        return "cuda"
    return "cpu"


def _configured() -> _SequenceParallel:
    if not _STATE.configured:
        raise RuntimeError(
            "call set_seq_parallel_pg(ulysses_degree, ring_degree, rank, world_size) before "
            "creating a LongContextAttention, as with yunchang"
        )
    return _STATE


@dataclass(frozen=True)
class UlyssesHighLayout(Layout):
    """The ring shards that yunchang's ``basic`` / ``strip`` extraction makes when the Ulysses
    groups are strided (``use_ulysses_low=False``): ring rank ``r`` of ``R`` holds, for
    ``u = 0 .. U-1``, the tokens that ``EXTRACT_FUNC_DICT`` gives the rank ``g = r + u * R``
    of its block — chunk ``g`` of ``U x R`` (``split="contiguous"``), or piece ``g % U`` of the
    striped shard ``g // U`` (``split="striped"``) — in that order, as the Ulysses all-to-all
    concatenates them. Rank ``(u, r)`` of the mesh so holds exactly yunchang's shard of ``g``.
    """

    split: Literal["contiguous", "striped"]
    ulysses: int

    @property
    def name(self) -> str:
        return f"yunchang {self.split}, use_ulysses_low=False, ulysses={self.ulysses}"

    def local_multiple(self, world_size: int) -> int:
        return self.ulysses

    def segments(self, rank: int, world_size: int, seq_local: int) -> tuple[Segment, ...]:
        piece = seq_local // self.ulysses
        return tuple(
            _extract_segment(self.split, rank + u * world_size, world_size, self.ulysses, piece)
            for u in range(self.ulysses)
        )


def _extract_segment(split: str, rank: int, rd: int, ud: int, piece: int) -> Segment:
    """The tokens yunchang's ``basic`` (``"contiguous"``) or ``strip`` (``"striped"``)
    extraction gives ``rank`` of a block of ``rd x ud`` ranks, ``piece`` tokens each."""
    if split == "contiguous":  # chunk `rank` of rd * ud
        return Segment(rank * piece, 1, piece)
    # the sequence reordered as the rd striped shards, one after the other, then chunked
    return Segment(rank // ud + rd * (rank % ud) * piece, rd, piece)


def _ring_layout(ring_impl_type: str) -> str:
    if ring_impl_type not in _RING_LAYOUTS:
        raise ValueError(
            f"unknown ring_impl_type {ring_impl_type!r}; choose one of {sorted(_RING_LAYOUTS)}"
        )
    return _RING_LAYOUTS[ring_impl_type]


def _mesh_layout(ring_impl_type: str, state: _SequenceParallel) -> str | Layout:
    """The layout whose ``shard(group=state.group)`` equals ``EXTRACT_FUNC_DICT``'s shards."""
    name = _ring_layout(ring_impl_type)
    if name == "zigzag" or state.ulysses_low or state.ulysses == 1 or state.ring == 1:
        return name
    return UlyssesHighLayout(name, state.ulysses)  # type: ignore[arg-type]


def _check_kernel_choice(attn_type: object, attn_processor: object) -> None:
    if getattr(attn_type, "value", attn_type) not in {member.value for member in AttnType}:
        raise ValueError(f"unknown attn_type {attn_type!r}; use an AttnType")
    if attn_processor is not None:
        raise NotImplementedError(
            "attn_processor: ringattn computes every block with its own kernels and cannot call "
            "a custom attention module; pass attn_processor=None"
        )


def _check_all_to_all(scatter_idx: object, gather_idx: object, heads_dim: int, ulysses: int):
    if ulysses > 1 and (scatter_idx, gather_idx) != (heads_dim, 1):
        raise ValueError(
            f"scatter_idx={scatter_idx!r}, gather_idx={gather_idx!r}: with a Ulysses degree of "
            f"{ulysses} the all-to-all scatters the heads (dim {heads_dim}) and gathers the "
            f"sequence (dim 1), yunchang's default; pass scatter_idx={heads_dim}, gather_idx=1"
        )


class LongContextAttention(torch.nn.Module):
    """yunchang's sequence-parallel attention layer over the groups that
    :func:`set_seq_parallel_pg` set up (captured when the layer is created): the ring's process
    group (Ulysses degree 1) or the ``(ulysses, ring)`` mesh, in :attr:`group`, with the shard
    layout in :attr:`layout`.

    ``scatter_idx`` and ``gather_idx`` must be yunchang's defaults (2 and 1) when the Ulysses
    degree is above 1 (any value is accepted without Ulysses, where there is no all-to-all);
    ``use_sync`` and ``use_pack_qkv`` tune upstream's all-to-all and change nothing here.
    """

    def __init__(
        self,
        scatter_idx: int = 2,
        gather_idx: int = 1,
        ring_impl_type: str = "basic",
        use_pack_qkv: bool = False,
        use_sync: bool = False,
        attn_type: AttnType = AttnType.FA,
        attn_processor: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        state = _configured()
        self.group, self.layout = state.group, _mesh_layout(ring_impl_type, state)
        _check_kernel_choice(attn_type, attn_processor)
        _check_all_to_all(scatter_idx, gather_idx, 2, state.ulysses)
        self.scatter_idx, self.gather_idx = scatter_idx, gather_idx
        self.use_pack_qkv, self.use_sync, self.attn_type = use_pack_qkv, use_sync, attn_type

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        dropout_p: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        alibi_slopes: torch.Tensor | None = None,
        deterministic: bool = False,
        return_attn_probs: bool = False,
        *args: object,
    ) -> torch.Tensor:
        """Attention of this rank's shard: ``query`` ``(batch, seq_local, heads_q, head_dim)``,
        ``key``/``value`` ``(batch, seq_local, heads_kv, head_dim)`` as ``EXTRACT_FUNC_DICT``
        cuts them for ``ring_impl_type``; returns ``(batch, seq_local, heads_q, head_dim)`` (the
        output only, as yunchang does even with ``return_attn_probs=True``)."""
        _no_extra_arguments(args)
        flash = FlashArgs(
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            alibi_slopes,
            deterministic,
            False,
            softcap,
        )
        return flash_attention(query, key, value, flash, layout=self.layout, group=self.group)


class LongContextAttentionQKVPacked(torch.nn.Module):
    """:class:`LongContextAttention` for ``qkv`` packed as ``(batch, seq_local, 3, heads,
    head_dim)`` (``scatter_idx=3, gather_idx=1`` with a Ulysses degree above 1)."""

    def __init__(
        self,
        scatter_idx: int = 3,
        gather_idx: int = 1,
        ring_impl_type: str = "basic",
        use_sync: bool = False,
        attn_type: AttnType = AttnType.FA,
    ) -> None:
        super().__init__()
        state = _configured()
        self.group, self.layout = state.group, _mesh_layout(ring_impl_type, state)
        _check_kernel_choice(attn_type, None)
        _check_all_to_all(scatter_idx, gather_idx, 3, state.ulysses)
        self.scatter_idx, self.gather_idx = scatter_idx, gather_idx
        self.use_sync, self.attn_type = use_sync, attn_type

    def forward(
        self,
        qkv: torch.Tensor,
        dropout_p: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        alibi_slopes: torch.Tensor | None = None,
        deterministic: bool = False,
        return_attn_probs: bool = False,
        *args: object,
    ) -> torch.Tensor:
        """Attention of this rank's shard ``qkv`` ``(batch, seq_local, 3, heads, head_dim)``;
        returns ``(batch, seq_local, heads, head_dim)``."""
        _no_extra_arguments(args)
        if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
            shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
            raise ValueError(f"qkv must be (batch, seq_local, 3, heads, head_dim), got {shape}")
        q, k, v = qkv.unbind(2)
        flash = FlashArgs(
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            alibi_slopes,
            deterministic,
            False,
            softcap,
        )
        return flash_attention(q, k, v, flash, layout=self.layout, group=self.group)


def _no_extra_arguments(args: Sequence[object]) -> None:
    if args:
        raise TypeError(
            f"forward() got {len(args)} positional argument(s) after return_attn_probs, which "
            "yunchang ignores; ringattn takes none"
        )


def _extract_positions(layout_name: str, rank: int, rd: int, ud: int, seq_len: int):
    """Global positions of the tokens yunchang's extraction gives ``rank`` of ``rd x ud``."""
    piece = seq_len // (rd * ud)
    if layout_name != "zigzag":
        return segment_positions((_extract_segment(layout_name, rank, rd, ud, piece),))
    # zigzag: the piece of the rank's Ulysses rank of the zigzag shard of its ring rank
    # (upstream reads both from the groups of set_seq_parallel_pg)
    low = _STATE.ulysses_low if _STATE.configured else True
    u, r = (rank % ud, rank // ud) if low else (rank // rd, rank % rd)
    ring_shard = LAYOUTS["zigzag"].positions(r, rd, seq_len // rd)
    return ring_shard[u * piece : (u + 1) * piece]


def _extractor(layout_name: str, upstream: str) -> Callable[..., torch.Tensor]:
    def extract_local(
        value: torch.Tensor,
        rank: int,
        world_size: int,
        rd: int | None = None,
        ud: int = 1,
        dim: int = 1,
    ) -> torch.Tensor:
        ud = _positive_int("ud", ud)
        rd = world_size // ud if rd is None else rd
        if rd * ud != world_size:
            raise ValueError(
                f"rd={rd} x ud={ud} must equal world_size={world_size} (pass the "
                "sequence-parallel group's rank and size: with data-parallel replicas, the rank "
                "within the replica and sp_ulysses_degree x sp_ring_degree)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in 0 .. world_size - 1 = {world_size - 1}")
        if ud > 1 and _STATE.configured and (_STATE.ulysses, _STATE.ring) != (ud, rd):
            raise ValueError(
                f"rd={rd}, ud={ud} differ from set_seq_parallel_pg's sp_ring_degree="
                f"{_STATE.ring}, sp_ulysses_degree={_STATE.ulysses} (yunchang asserts them equal)"
            )
        seq_len = value.shape[dim]
        multiple = math.lcm(LAYOUTS[layout_name].seq_multiple(rd), world_size)
        if seq_len % multiple:
            raise ValueError(
                f"sequence length {seq_len} is not divisible by {multiple}, which {upstream} "
                f"needs for rd={rd}, ud={ud}; pad it to {-(-seq_len // multiple) * multiple}"
            )
        index = _extract_positions(layout_name, rank, rd, ud, seq_len).to(value.device)
        return value.index_select(dim, index)

    extract_local.__name__ = extract_local.__qualname__ = upstream
    extract_local.__doc__ = (
        "This rank's shard of the full ``value`` along ``dim`` (a copy), token for token "
        f"yunchang's ``{upstream}(value, rank, world_size, rd, ud)``: ``rank`` and "
        "``world_size = rd x ud`` of the sequence-parallel group; see the module docstring."
    )
    return extract_local


basic_extract_local = _extractor("contiguous", "basic_extract_local")
zigzag_extract_local = _extractor("zigzag", "zigzag_extract_local")
stripe_extract_local = _extractor("striped", "stripe_extract_local")
EXTRACT_FUNC_DICT: dict[str, Callable[..., torch.Tensor]] = {
    "basic": basic_extract_local,
    "strip": stripe_extract_local,
    "zigzag": zigzag_extract_local,
    "basic_pytorch": basic_extract_local,
}
