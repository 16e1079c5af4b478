"""The ring: double-buffered point-to-point exchange over ``torch.distributed``.

Rank ``r`` sends to ``r + 1`` and receives from ``r - 1`` (modulo the group size). An exchange is
posted before the current block is computed and waited on after it, so communication overlaps
compute. Waits are bounded by a timeout so a dead peer ends in an error, not a hang.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Union

import torch
import torch.distributed as dist

from .layout import Layout, global_order
from .trace import current_trace

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

GroupLike = Union[dist.ProcessGroup, "DeviceMesh", None]
"""A ProcessGroup, a 1-D DeviceMesh, or ``None`` for the default group."""


def default_timeout_s() -> float:
    """Seconds a ring exchange may take before it is declared dead (env ``RINGATTN_TIMEOUT``)."""
    return float(os.environ.get("RINGATTN_TIMEOUT", "600"))


def resolve_group(group: GroupLike) -> dist.ProcessGroup | None:
    """The process group behind ``group`` (a ProcessGroup, a 1-D DeviceMesh or ``None``).

    ``None`` means the default group, or no group at all when ``torch.distributed`` is not
    initialised (a world of one).
    """
    if group is None:
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if isinstance(group, dist.ProcessGroup):
        return group
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without distributed
        DeviceMesh = ()  # type: ignore[assignment]
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"group is a {group.ndim}-D DeviceMesh; pass its context-parallel dimension, "
                f"e.g. mesh['cp'] (dims: {group.mesh_dim_names}); ring_attention, "
                "create_ring_mask, shard, unshard, positions and the HF integration also take a "
                "2-D mesh with dims named 'ulysses' and 'ring' (ringattn.context_mesh)"
            )
        return group.get_group()
    raise TypeError(
        f"group must be a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}"
    )


@dataclass(frozen=True, eq=False)
class UlyssesGroup:
    """The Ulysses dimension of a ``("ulysses", "ring")`` mesh, as this rank sees it: the
    process ``group`` of this rank's Ulysses peers, this rank's index ``rank`` in it and its
    ``size`` (the Ulysses degree). See :mod:`ringattn.ulysses`."""

    group: dist.ProcessGroup
    rank: int
    size: int


MESH_DIMS = ("ulysses", "ring")
"""The dimension names of a 2-D context-parallel mesh (:func:`ringattn.context_mesh`)."""


def split_context(group: GroupLike) -> tuple[dist.ProcessGroup | None, UlyssesGroup | None]:
    """``(ring group, Ulysses group)`` of ``group``: for a 2-D DeviceMesh with dims named
    "ulysses" and "ring", its ring dimension's group and its Ulysses dimension (``None`` when
    the Ulysses degree is 1: the mesh is then a plain ring); for anything else,
    ``(resolve_group(group), None)``."""
    if group is None or isinstance(group, dist.ProcessGroup) or getattr(group, "ndim", 1) == 1:
        return resolve_group(group), None
    names = tuple(getattr(group, "mesh_dim_names", None) or ())
    if group.ndim != 2 or sorted(names) != sorted(MESH_DIMS):
        resolve_group(group)  # raises, naming the dims
    ring = group["ring"].get_group()
    ulysses = group["ulysses"].get_group()
    size = dist.get_world_size(ulysses)
    if size == 1:
        return ring, None
    return ring, UlyssesGroup(ulysses, dist.get_rank(ulysses), size)


def backend_for(group: dist.ProcessGroup, device_type: str) -> str | None:
    """The backend that carries ``device_type`` tensors in ``group`` ("gloo", "nccl", ...), or
    ``None`` when the group has none for that device (e.g. "cpu:gloo,cuda:nccl" maps both)."""
    backend = str(dist.get_backend(group))
    if ":" not in backend:
        return backend
    mapping = dict(part.split(":", 1) for part in backend.split(","))
    return mapping.get(device_type)


def transfer_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where tensors on ``device`` must be for ``group``'s point-to-point and gather calls:
    ``device`` itself, or the CPU when a CUDA tensor meets gloo, which moves host memory only
    (several ranks sharing one GPU, or a platform without NCCL)."""
    if device.type == "cpu" or group is None or backend_for(group, device.type) != "gloo":
        return device
    return torch.device("cpu")


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class PendingExchange:
    """Posted sends/receives; :meth:`wait` returns the received tensors."""

    works: list  # (work, what it is: a send to or a receive from a named peer)
    received: list[torch.Tensor]
    timeout: timedelta | None
    device: torch.device
    bytes_sent: int

    def wait(self) -> list[torch.Tensor]:
        for work, what in self.works:
            wait_bounded(work, self.timeout, what)
        return [t.to(self.device) for t in self.received]


Message = tuple[int, torch.Tensor, int, str]
"""One posted point-to-point message: ``(global rank of the peer, tensor, tag, what it is)``."""


def post_messages(
    group: dist.ProcessGroup | None,
    receives: Sequence[Message],
    sends: Sequence[Message],
    timeout: timedelta | None,
    device: torch.device,
    coalesced: str,
) -> PendingExchange:
    """Post every receive, then every send, in one ``batch_isend_irecv``; :meth:`wait` bounds
    each (named by its message) and returns the receive buffers moved to ``device``.

    Receives go first: gloo sends a message only once its receiver has said the receive is
    posted, and that word travels behind whatever the receiver is already sending on the same
    connection, so a pair that posted its sends first could wait for the peer's whole message
    before its own left (measured between simulated hosts: one exchange in two at half the
    link's rate). ``coalesced`` names the works of a backend that returns fewer than one per
    message."""
    ops = [dist.P2POp(dist.irecv, t, peer, group, tag) for peer, t, tag, _ in receives]
    ops += [dist.P2POp(dist.isend, t, peer, group, tag) for peer, t, tag, _ in sends]
    works = dist.batch_isend_irecv(ops) if ops else []
    if len(works) == len(ops):
        named = [(work, m[3]) for work, m in zip(works, [*receives, *sends], strict=True)]
    else:
        named = [(work, coalesced) for work in works]
    sent = sum(t.numel() * t.element_size() for _, t, _, _ in sends)
    return PendingExchange(named, [t for _, t, _, _ in receives], timeout, device, sent)


class RingPeerError(RuntimeError):
    """A transfer or collective failed because a peer died or closed its connection."""


def wait_bounded(work, timeout: timedelta | None, what: str) -> None:
    """Wait for ``work`` (a posted send, receive or collective).

    Raises :class:`TimeoutError` when it has not completed after ``timeout`` (``None``: the
    process group's own limit, as NCCL enforces; pass :func:`host_timeout`, which is never longer
    than the group's own limit), and :class:`RingPeerError` when the backend reports a failure
    before that (a peer's process died and gloo saw its connection close). Gloo raises the same
    ``RuntimeError`` type for both, with no status to tell them apart, so the time waited does.
    """
    if timeout is None:
        work.wait()
        return
    message = (
        f"{what} did not complete within {timeout}; a peer is dead or stuck, or skipped the "
        "call (set RINGATTN_TIMEOUT in seconds to change the limit). The process group now "
        "holds posted operations that will never complete: destroy it and start again (under "
        "torchrun, let the job fail so that elastic restarts it)"
    )
    started = time.monotonic()
    try:
        completed = work.wait(timeout)
    except RuntimeError as exc:
        waited = time.monotonic() - started
        limit = timeout.total_seconds()
        if waited >= limit - min(0.1 * limit, 1.0):  # the backend's timer fired, not a peer
            raise TimeoutError(message) from exc
        raise RingPeerError(
            f"{what} failed after {waited:.1f} s: a peer died or closed its connection "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if completed is False:
        raise TimeoutError(message)


def all_reduce_bounded(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None,
    what: str,
    op: dist.ReduceOp = dist.ReduceOp.SUM,
) -> None:
    """``dist.all_reduce`` in place, bounded by :func:`wait_bounded`."""
    work = dist.all_reduce(tensor, op=op, group=group, async_op=True)
    wait_bounded(work, host_timeout(transfer_device(group, tensor.device), group), what)


def host_timeout(
    device: torch.device, group: dist.ProcessGroup | None = None, limit_s: float | None = None
) -> timedelta | None:
    """The bound on a wait for ``device`` tensors in ``group``: ``limit_s`` (default
    :func:`default_timeout_s`) or the group's own timeout if shorter, for host (gloo) transfers;
    ``None`` on GPUs, where NCCL's watchdog enforces the group's own timeout."""
    if device.type != "cpu":
        return None
    seconds = default_timeout_s() if limit_s is None else limit_s
    own = _group_timeout_s(group)
    return timedelta(seconds=seconds if own is None else min(seconds, own))


def _group_timeout_s(group: dist.ProcessGroup | None) -> float | None:
    """The timeout ``group``'s gloo backend was created with (seconds), if it can be read;
    ``None`` is the default group, as for ``torch.distributed``'s own calls."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    try:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):  # another backend, or a private API that moved
        return None


def gather_sequence(
    local: torch.Tensor, layout: Layout, dim: int, group: dist.ProcessGroup | None, world_size: int
) -> torch.Tensor:
    """All ranks' shards of ``local`` along ``dim``, put back in global order (no autograd)."""
    if world_size == 1:
        return local
    sent = local.to(transfer_device(group, local.device)).contiguous()
    parts = [torch.empty_like(sent) for _ in range(world_size)]
    wait_bounded(
        dist.all_gather(parts, sent, group=group, async_op=True),
        host_timeout(sent.device, group),
        "gathering a per-token mask",
    )
    stacked = torch.cat(parts, dim).to(local.device)
    order = global_order(layout, world_size, stacked.shape[dim]).to(local.device)
    return torch.empty_like(stacked).index_copy_(dim, order, stacked)


class RingComm:
    """Sends to the next rank and receives from the previous one in ``group``."""

    def __init__(self, group: dist.ProcessGroup | None, timeout_s: float | None = None):
        """``timeout_s``: how long a wait may take; default ``RINGATTN_TIMEOUT`` at the time."""
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self._timeout_s = timeout_s
        self._staging: dict[torch.device, torch.device] = {}  # transfer_device, per device
        if self.world_size > 1:
            self.next_peer = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
            self.prev_peer = dist.get_global_rank(group, (self.rank - 1) % self.world_size)

    def exchange(self, tensors: Sequence[torch.Tensor], tag: int = 0) -> PendingExchange:
        """Post sends of ``tensors`` to the next rank and receives of same-shaped tensors from the
        previous rank. Sent tensors must stay unmodified until :meth:`PendingExchange.wait`."""
        device = tensors[0].device
        if device not in self._staging:
            self._staging[device] = transfer_device(self.group, device)
        staging = self._staging[device]
        tensors = [t.to(staging).contiguous() for t in tensors]
        receiving, sending = self._peer_text("receiving from", -1), self._peer_text("sending to", 1)
        receives = [
            (self.prev_peer, torch.empty_like(t), tag + i, receiving) for i, t in enumerate(tensors)
        ]
        sends = [(self.next_peer, t, tag + i, sending) for i, t in enumerate(tensors)]
        timeout = host_timeout(staging, self.group, self._timeout_s)
        pending = post_messages(
            self.group, receives, sends, timeout, device, "the ring exchange with both neighbours"
        )
        trace = current_trace()
        if trace is not None:
            trace.bytes_sent += pending.bytes_sent
        return pending

    def _peer_text(self, verb: str, offset: int) -> str:
        """E.g. "ring exchange: receiving from rank 2 of the ring (global rank 5)"."""
        rank = (self.rank + offset) % self.world_size
        peer = self.next_peer if offset > 0 else self.prev_peer
        return f"ring exchange: {verb} rank {rank} of the ring (global rank {peer})"
