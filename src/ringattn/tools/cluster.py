"""Node-aware choice of a context-parallel configuration: Ulysses x ring degrees, rotation
(pass-KV, pass-Q or all-gather) and layout, priced by the link each part crosses.

A configuration of ``U x R = devices`` puts the ``U`` ranks of a Ulysses group on consecutive
devices (inside a node when ``U <= gpus_per_node``) and runs the ring over ``R`` ranks that are
``U`` apart (across nodes as soon as the job spans more than one node). A node reaches the
others through ``nics_per_node`` links of the inter-node rate (default one per device, as GPU
clusters give every GPU its own NIC): messages that leave a node at once share its links, and a
device's own messages share its link (:class:`Nodes`). Per attention call:

- **Ulysses**: all-to-alls turn sequence shards into head shards and back — q, k, v and out
  forward, dout, dq, dk and dv backward, each rank sending ``1 / U`` of its tensors to each of
  the ``U - 1`` others — the messages inside a node through the device's path, those between
  nodes over the links, side by side; they do not overlap compute. KV heads are repeated to
  ``lcm(heads_kv, U)`` first when ``U`` does not divide them.
- **Ring** (pass-KV or pass-Q): :func:`ringattn.tools.plan.predict` of ``R`` ranks holding
  ``heads / U`` query heads each; when the ring spans nodes every step waits for its slowest
  hop, an inter-node link shared by the ``U`` rings' hops that leave the node at once.
- **All-gather**: every rank sends its K/V shard to the ``R - 1`` others of its ring while it
  computes on its own and, in the backward, again, and reduce-scatters fp32 dK/dV, one shard
  in flight while the next is computed.

The fastest configuration whose memory fits is chosen; the others are ranked with the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..layout import LAYOUTS
from ..masks import rank_work
from .memory import format_bytes
from .plan import (
    Config,
    Hardware,
    Prediction,
    _element_size,
    _rates,
    _wire,
    across_nodes,
    device_memory,
    predict,
)

ROTATIONS = ("kv", "q", "allgather")


@dataclass(frozen=True)
class Strategy:
    """A way to spread attention over the devices: ``ulysses x ring`` ranks."""

    ulysses: int
    ring: int
    rotation: str
    layout: str

    def __str__(self) -> str:
        rotation = {"kv": "pass-KV", "q": "pass-Q", "allgather": "all-gather"}[self.rotation]
        return f"ulysses {self.ulysses} x ring {self.ring}, {rotation}, {self.layout}"


@dataclass(frozen=True)
class Ranked:
    """The predicted cost of one :class:`Strategy` (seconds per attention call, bytes)."""

    strategy: Strategy
    total_s: float
    all_to_all_s: float
    attention_s: float
    memory_bytes: float
    fits: bool
    reason: str


@dataclass(frozen=True)
class Nodes:
    """Where the devices sit: ``per_node`` consecutive devices per node, each node joined to the
    others by ``nics`` links (of the inter-node rate each)."""

    per_node: int
    nics: int

    def __post_init__(self) -> None:
        if self.per_node < 1 or self.nics < 1:
            raise ValueError(f"nodes need >= 1 device and >= 1 link each, got {self}")

    def loads(self, messages: Iterable[tuple[int, int]]) -> tuple[int, float]:
        """For ``(source, destination)`` device messages of one size, all sent at once: the most
        that one device sends inside its node, and the inter-node load — how many messages'
        time over one link the slowest node needs (a device's messages go one after another
        over its link; a node's share its ``nics``)."""
        inside, leaving, leaving_node = Counter(), Counter(), Counter()
        for source, destination in messages:
            node = source // self.per_node
            if node == destination // self.per_node:
                inside[source] += 1
            else:
                leaving[source] += 1
                leaving_node[node] += 1
        load = max([*leaving.values(), *(n / self.nics for n in leaving_node.values())], default=0)
        return max(inside.values(), default=0), load


def _ring_messages(strategy: Strategy) -> list[tuple[int, int]]:
    """One step of the ``U`` rings: every rank sends to the next of its ring (``U`` apart)."""
    u, r = strategy.ulysses, strategy.ring
    return [(a + u * j, a + u * ((j + 1) % r)) for a in range(u) for j in range(r)]


def _group_messages(groups: Iterable[range]) -> list[tuple[int, int]]:
    """Every rank of each group to every other rank of it (an all-to-all or all-gather)."""
    return [(a, b) for group in groups for a in group for b in group if a != b]


def _ulysses_groups(strategy: Strategy) -> list[range]:
    u, r = strategy.ulysses, strategy.ring
    return [range(i * u, (i + 1) * u) for i in range(r)]


def _ring_groups(strategy: Strategy) -> list[range]:
    u, r = strategy.ulysses, strategy.ring
    return [range(a, u * r, u) for a in range(u)]


def _exchange_seconds(
    message: float,
    messages: Iterable[tuple[int, int]],
    nodes: Nodes,
    hardware: Hardware,
    device_bandwidth: float,
    link: Hardware | None,
    latencies: int = 1,
) -> float:
    """Seconds to send ``message`` bytes for each ``(source, destination)`` of ``messages``, all
    at once: those inside a node at the device's rate (``hardware``'s path, ``device_bandwidth``)
    side by side with those over the inter-node ``link`` (:meth:`Nodes.loads`), plus
    ``latencies`` message latencies of the slower kind."""
    inside, load = nodes.loads(messages)
    rate = _wire(hardware, device_bandwidth)
    seconds = inside * message / rate
    if load:
        assert link is not None and link.link_bandwidth, "messages between nodes need a link"
        seconds = max(seconds, load * message / _wire(link, rate))
    return seconds + latencies * (link if load else hardware).latency


def strategies(config: Config) -> list[Strategy]:
    """Every ``U x R`` split of ``config.devices`` whose Ulysses degree divides the query heads
    and whose shards split evenly, with each rotation and layout (a ring of one has nothing to
    rotate or balance: one pass-KV, zigzag entry stands for it)."""
    found = []
    for ulysses in range(1, config.devices + 1):
        if config.devices % ulysses or config.heads % ulysses:
            continue
        ring = config.devices // ulysses
        layouts = [
            layout
            for layout in LAYOUTS
            if config.seq_len % (LAYOUTS[layout].seq_multiple(ring) * ulysses) == 0
        ]
        if not layouts:
            continue
        if ring == 1:
            found += [Strategy(ulysses, 1, "kv", "zigzag" if "zigzag" in layouts else layouts[0])]
            continue
        found += [Strategy(ulysses, ring, r, layout) for layout in layouts for r in ROTATIONS]
    return found


def ring_config(config: Config, strategy: Strategy) -> Config:
    """The ring part of ``strategy``: ``R`` ranks, each with ``heads / U`` query heads and
    ``lcm(heads_kv, U) / U`` KV heads (repeated when ``U`` does not divide them)."""
    kv_heads = math.lcm(config.kv_heads, strategy.ulysses) // strategy.ulysses
    rotation = "kv" if strategy.rotation == "allgather" else strategy.rotation
    return replace(
        config,
        devices=strategy.ring,
        heads=config.heads // strategy.ulysses,
        kv_heads=kv_heads,
        layout=strategy.layout,
        rotation=rotation,
    )


def all_to_all_seconds(
    config: Config,
    strategy: Strategy,
    hardware: Hardware,
    nodes: Nodes | None = None,
    link: Hardware | None = None,
) -> float:
    """Seconds of one call's Ulysses all-to-alls (forward, and backward when training):
    ``hardware`` inside a node, ``link`` (its inter-node link) between the ``nodes``, if the
    groups span nodes (default: one node)."""
    u = strategy.ulysses
    if u == 1:
        return 0.0
    e = _element_size(config.dtype)
    tokens = config.seq_len // config.devices  # per rank, before the exchange
    kv_heads = math.lcm(config.kv_heads, u)
    qk, v = config.head_dim, config.value_dim
    forward = config.heads * qk + kv_heads * (qk + v) + config.heads * v  # q, k, v, out
    backward = config.heads * v + config.heads * qk + kv_heads * (qk + v)  # dout, dq, dk, dv
    rows = forward + (backward if config.backward else 0)
    calls = 4 + (4 if config.backward else 0)
    _, _, device_bandwidth = _rates(hardware, config.devices, tokens)
    message = config.batch * tokens * rows * e / u  # to each peer, all calls together
    messages = _group_messages(_ulysses_groups(strategy))
    nodes = nodes or Nodes(config.devices, 1)
    return _exchange_seconds(
        message, messages, nodes, hardware, device_bandwidth, link, calls * (u - 1)
    )


def _allgather(
    config: Config, hardware: Hardware, strategy: Strategy, nodes: Nodes, link: Hardware | None
) -> tuple[float, float]:
    """Seconds and bytes per device of the ring part (``config``) of ``strategy`` done by
    all-gather, as the engine runs it: the gather (every peer at once) hides behind the rank's
    own shard's compute, the other shards' compute follows; in the backward each other shard's
    fp32 dK/dV goes to its owner while the next shard is computed, the last one waited for.
    ``link`` is the inter-node link between the ``nodes``, if any."""
    p = config.devices
    seq_local = config.seq_len // p
    work = rank_work(
        config.layout, p, seq_local, config.causal, diagonal_block=hardware.diagonal_block
    )
    machine_flops, rank_flops, device_bandwidth = _rates(hardware, p, config.seq_len)
    forward = max(
        config.flops_per_pair * max(work) / rank_flops,
        config.flops_per_pair * sum(work) / machine_flops,
    )
    e = _element_size(config.dtype)
    shard = config.batch * seq_local * config.kv_heads * (config.head_dim + config.value_dim)
    gather = _exchange_seconds(
        shard * e, _group_messages(_ring_groups(strategy)), nodes, hardware, device_bandwidth,
        link, p - 1,
    )  # fmt: skip
    total = max(forward / p, gather) + forward * (p - 1) / p
    if config.backward:
        backward = hardware.backward_ratio * forward
        scatters = [
            _exchange_seconds(
                shard * 4, _shift_messages(strategy, s), nodes, hardware, device_bandwidth, link
            )
            for s in range(1, p)
        ]
        total += max(backward / p, gather) + backward / p + scatters[-1]
        total += sum(max(backward / p, scatter) for scatter in scatters[:-1])
    one = replace(config, devices=1, seq_len=seq_local)  # this rank's own tensors
    memory = device_memory(one) + (p - 1) * shard * e + (p * shard * 4 if config.backward else 0)
    return total, memory


def _shift_messages(strategy: Strategy, shift: int) -> list[tuple[int, int]]:
    """Every rank of each ring to the rank ``shift`` places before it (a reduce-scatter
    step)."""
    return [
        (group[i], group[(i - shift) % len(group)])
        for group in _ring_groups(strategy)
        for i in range(len(group))
    ]


def rank(
    config: Config,
    hardware: Hardware,
    gpus_per_node: int | None = None,
    inter_node_gbps: float | None = None,
    nics_per_node: int | None = None,
) -> list[Ranked]:
    """Every strategy of ``config`` (its ``devices``, heads, lengths), fastest first among
    those that fit ``hardware.memory``, then the ones that do not fit. Nodes hold
    ``gpus_per_node`` devices (default: all in one node) and reach each other over
    ``nics_per_node`` links (default one per device) of ``inter_node_gbps`` each (default: the
    profile paired with ``hardware``, :func:`~ringattn.tools.plan.across_nodes`)."""
    per_node = gpus_per_node or config.devices
    nodes = Nodes(per_node, nics_per_node or per_node)
    link = None
    if config.devices > per_node:
        link = across_nodes(hardware, config.devices, per_node, inter_node_gbps)
        if link.link_bandwidth is None:  # an inter-node profile: its bandwidth is the link's
            link = replace(link, link_bandwidth=link.bandwidth)
    ranked = []
    for strategy in strategies(config):
        ring = ring_config(config, strategy)
        _, ring_load = nodes.loads(_ring_messages(strategy))
        ring_hw = _one_ring(hardware if not ring_load else _shared(link, ring_load), strategy)
        exchange = all_to_all_seconds(config, strategy, hardware, nodes, link)
        if strategy.rotation == "allgather":
            attention, memory = _allgather(
                ring, _one_ring(hardware, strategy), strategy, nodes, link
            )
            ring_prediction: Prediction | None = None
        else:
            ring_prediction = predict(ring, ring_hw)
            attention, memory = ring_prediction.total_s, ring_prediction.memory_bytes
        group_crosses = nodes.loads(_group_messages(_ulysses_groups(strategy)))[1] > 0
        reason = _reason(strategy, ring_prediction, exchange, ring_load > 0, group_crosses)
        fits = memory <= hardware.memory
        if not fits:
            reason += f"; needs {format_bytes(memory)} of {format_bytes(hardware.memory)}"
        ranked.append(
            Ranked(strategy, exchange + attention, exchange, attention, memory, fits, reason)
        )
    return sorted(ranked, key=lambda r: (not r.fits, r.total_s))


def _shared(link: Hardware | None, load: float) -> Hardware:
    """``link`` when every ring step sends ``load`` messages' worth over it (:meth:`Nodes.loads`)
    at once."""
    assert link is not None and link.link_bandwidth, "a ring between nodes needs a link"
    return link if load <= 1 else replace(link, link_bandwidth=link.link_bandwidth / load)


def _one_ring(hardware: Hardware, strategy: Strategy) -> Hardware:
    """What one of the ``U`` rings runs on: a device each, or, where the ranks share one
    machine (CPU), ``1 / U`` of its cores, compute and copy bandwidth (the ``U`` rings run at
    once)."""
    u = strategy.ulysses
    if not hardware.ranks_share_device or u == 1:
        return hardware
    return replace(
        hardware,
        flops=hardware.flops / u,
        bandwidth=hardware.bandwidth / u,
        cores=max(1, hardware.cores // u),
    )


def _reason(strategy, ring_prediction, exchange, ring_crosses, group_crosses) -> str:
    parts = []
    if strategy.ulysses > 1:
        where = "across nodes" if group_crosses else "within a node"
        parts.append(f"all-to-all {where} {exchange * 1e3:.2f} ms")
    if strategy.ring > 1:
        link = "inter-node" if ring_crosses else "intra-node"
        if ring_prediction is None:
            parts.append(f"all-gather over the {link} link, hidden behind the own shard only")
        elif ring_prediction.overlapped:
            parts.append(f"ring over the {link} link hides its transfers")
        else:
            step = ring_prediction
            parts.append(
                f"ring over the {link} link waits: transfer {step.comm_step_s * 1e3:.2f} ms > "
                f"compute {step.compute_step_s * 1e3:.2f} ms per step"
            )
    else:
        parts.append("no ring")
    return "; ".join(parts)


def ranking_table(ranked: list[Ranked], limit: int = 10) -> str:
    """The ranked strategies as a markdown table (the first ``limit``)."""
    best = ranked[0].total_s
    lines = [
        "| rank | configuration | predicted s | vs best | memory/device | why |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for i, r in enumerate(ranked[:limit], 1):
        lines.append(
            f"| {i} | {r.strategy} | {r.total_s:.4f} | {r.total_s / best:.2f}x | "
            f"{format_bytes(r.memory_bytes)}{'' if r.fits else ' (does not fit)'} | {r.reason} |"
        )
    if len(ranked) > limit:
        lines.append(f"| | ... {len(ranked) - limit} more | | | | |")
    return "\n".join(lines)
