"""yunchang's (long-context-attention's) unified sequence parallelism API, ring degree only.

Replace ``from yunchang import LongContextAttention, set_seq_parallel_pg, EXTRACT_FUNC_DICT``
(and ``from yunchang.kernels import AttnType``) with
``from ringattn.compat.yunchang import ...`` and keep the calls::

    set_seq_parallel_pg(1, world_size, rank, world_size)   # Ulysses degree 1, ring degree p
    attn = LongContextAttention(ring_impl_type="zigzag")
    local_q = EXTRACT_FUNC_DICT["zigzag"](q, rank, world_size=world_size, rd=world_size, ud=1)
    out = attn(local_q, local_k, local_v, causal=True)    # (batch, seq_local, heads, head_dim)

ringattn has no Ulysses mode (the all-to-all over heads) yet: ``sp_ulysses_degree`` must be 1.
The ring degree may be the world size or a divisor of it (then every block of ``sp_ring_degree``
consecutive ranks is one ring, the blocks being data-parallel replicas). ``ring_impl_type``
picks the layout: ``"basic"`` (and the ``basic_*`` kernel variants) is contiguous, ``"zigzag"``
(and ``"zigzag_npu"``) zigzag, ``"strip"`` (or ``"stripe"``) striped — the shards that
``EXTRACT_FUNC_DICT`` cuts. ``attn_type`` names a kernel in yunchang; ringattn chooses its own
(``kernel="auto"``), exact for every ``AttnType``. The forward's arguments are flash-attn's, as
in :mod:`ringattn.compat.ring_flash_attn`, plus ``softcap``; like yunchang it returns the output
only, also with ``return_attn_probs=True``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import LAYOUTS
from ..comm import GroupLike
from ._flash import FlashArgs, flash_attention

__all__ = [
    "EXTRACT_FUNC_DICT",
    "AttnType",
    "LongContextAttention",
    "LongContextAttentionQKVPacked",
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
_NO_ULYSSES = (
    "ringattn has no Ulysses (all-to-all over heads) mode yet: only sp_ulysses_degree=1 works "
    "for now, with the ring degree the whole sequence-parallel degree, e.g. "
    "set_seq_parallel_pg(1, world_size, rank, world_size)"
)


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
    """What :func:`set_seq_parallel_pg` set up: this rank's ring group."""

    configured: bool = False
    ring_group: dist.ProcessGroup | None = None


_STATE = _SequenceParallel()


def set_seq_parallel_pg(
    sp_ulysses_degree: int,
    sp_ring_degree: int,
    rank: int,
    world_size: int,
    use_ulysses_low: bool = True,
) -> None:
    """Set up the process groups of :class:`LongContextAttention` (call on every rank).

    Args:
        sp_ulysses_degree: must be 1 (no Ulysses mode yet).
        sp_ring_degree: ranks per ring: ``world_size`` or a divisor of it; ranks
            ``i * sp_ring_degree .. (i + 1) * sp_ring_degree - 1`` form ring ``i``.
        rank, world_size: this process's rank and the world size of ``torch.distributed``
            (``0`` and ``1`` without it).
        use_ulysses_low: where Ulysses groups would go; without them it changes nothing.
    """
    if sp_ulysses_degree != 1:
        raise NotImplementedError(f"sp_ulysses_degree={sp_ulysses_degree}: {_NO_ULYSSES}")
    initialised = dist.is_available() and dist.is_initialized()
    actual = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
    if (rank, world_size) != actual:
        raise ValueError(
            f"rank={rank}, world_size={world_size} do not match torch.distributed's "
            f"rank {actual[0]} of {actual[1]}"
        )
    if not isinstance(sp_ring_degree, int) or sp_ring_degree < 1 or world_size % sp_ring_degree:
        raise ValueError(
            f"sp_ring_degree must be a positive divisor of world_size={world_size}, "
            f"got {sp_ring_degree!r}"
        )
    group = None  # the default group when one ring spans the world
    if sp_ring_degree < world_size:
        for first in range(0, world_size, sp_ring_degree):  # every rank creates every group
            ranks = list(range(first, first + sp_ring_degree))
            created = dist.new_group(ranks)
            if rank in ranks:
                group = created
    _STATE.ring_group, _STATE.configured = group, True


def _ring_group() -> GroupLike:
    if not _STATE.configured:
        raise RuntimeError(
            "call set_seq_parallel_pg(1, ring_degree, rank, world_size) before creating a "
            "LongContextAttention, as with yunchang"
        )
    return _STATE.ring_group


def _ring_layout(ring_impl_type: str) -> str:
    if ring_impl_type not in _RING_LAYOUTS:
        raise ValueError(
            f"unknown ring_impl_type {ring_impl_type!r}; choose one of {sorted(_RING_LAYOUTS)}"
        )
    return _RING_LAYOUTS[ring_impl_type]


def _check_kernel_choice(attn_type: object, attn_processor: object) -> None:
    if getattr(attn_type, "value", attn_type) not in {member.value for member in AttnType}:
        raise ValueError(f"unknown attn_type {attn_type!r}; use an AttnType")
    if attn_processor is not None:
        raise NotImplementedError(
            "attn_processor: ringattn computes every block with its own kernels and cannot call "
            "a custom attention module; pass attn_processor=None"
        )


class LongContextAttention(torch.nn.Module):
    """yunchang's sequence-parallel attention layer, as a ring over the group that
    :func:`set_seq_parallel_pg` set up (captured when the layer is created).

    ``scatter_idx``, ``gather_idx`` and ``use_sync`` configure the Ulysses all-to-all and
    ``use_pack_qkv`` packs it; with a Ulysses degree of 1 there is none, so they change nothing.
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
        self.ring_group = _ring_group()
        self.layout = _ring_layout(ring_impl_type)
        _check_kernel_choice(attn_type, attn_processor)
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
        ``key``/``value`` ``(batch, seq_local, heads_kv, head_dim)`` in the layout of
        ``ring_impl_type``; returns ``(batch, seq_local, heads_q, head_dim)`` (the output only,
        as yunchang does even with ``return_attn_probs=True``)."""
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
        return flash_attention(query, key, value, flash, layout=self.layout, group=self.ring_group)


class LongContextAttentionQKVPacked(torch.nn.Module):
    """:class:`LongContextAttention` for ``qkv`` packed as ``(batch, seq_local, 3, heads,
    head_dim)``."""

    def __init__(
        self,
        scatter_idx: int = 3,
        gather_idx: int = 1,
        ring_impl_type: str = "basic",
        use_sync: bool = False,
        attn_type: AttnType = AttnType.FA,
    ) -> None:
        super().__init__()
        self.ring_group = _ring_group()
        self.layout = _ring_layout(ring_impl_type)
        _check_kernel_choice(attn_type, None)
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
        return flash_attention(q, k, v, flash, layout=self.layout, group=self.ring_group)


def _no_extra_arguments(args: Sequence[object]) -> None:
    if args:
        raise TypeError(
            f"forward() got {len(args)} positional argument(s) after return_attn_probs, which "
            "yunchang ignores; ringattn takes none"
        )


def _extractor(layout_name: str) -> Callable[..., torch.Tensor]:
    layout = LAYOUTS[layout_name]

    def extract_local(
        value: torch.Tensor,
        rank: int,
        world_size: int,
        rd: int | None = None,
        ud: int = 1,
        dim: int = 1,
    ) -> torch.Tensor:
        if ud != 1:
            raise NotImplementedError(f"ud={ud}: {_NO_ULYSSES}")
        rd = world_size if rd is None else rd
        if rd != world_size:
            raise ValueError(
                f"rd={rd} must equal world_size={world_size} (pass the sequence-parallel "
                "group's rank and size)"
            )
        seq_len = value.shape[dim]
        layout.check_seq_len(seq_len, rd)
        index = layout.positions(rank, rd, seq_len // rd).to(value.device)
        return value.index_select(dim, index)

    extract_local.__name__ = extract_local.__qualname__ = f"{layout_name}_extract_local"
    extract_local.__doc__ = (
        f"This rank's {layout_name} shard of the full ``value`` along ``dim`` (a copy): "
        "``(value, rank, world_size, rd, ud, dim=1)`` as in yunchang, with ``ud=1`` and "
        "``rd=world_size``; the sequence length must be a multiple of what the layout needs."
    )
    return extract_local


basic_extract_local = _extractor("contiguous")
zigzag_extract_local = _extractor("zigzag")
stripe_extract_local = _extractor("striped")
EXTRACT_FUNC_DICT: dict[str, Callable[..., torch.Tensor]] = {
    "basic": basic_extract_local,
    "strip": stripe_extract_local,
    "zigzag": zigzag_extract_local,
}
