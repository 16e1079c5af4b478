"""Node-aware choice of a context-parallel configuration: Ulysses x ring degrees, rotation
(pass-KV, pass-Q or all-gather) and layout, priced by the link each part crosses.

A configuration of ``U x R = devices`` puts the ``U`` ranks of a Ulysses group on consecutive
devices (inside a node when ``U <= gpus_per_node``) and runs the ring over ``R`` ranks that are
``U`` apart (across nodes as soon as the job spans more than one node). Per attention call:

- **Ulysses**: all-to-alls turn sequence shards into head shards and back — q, k, v and out
  forward, dout, dq, dk and dv backward, each rank sending ``(U - 1) / U`` of its tensors, in
  ``U - 1`` messages — at the rate of the link the group spans; they do not overlap compute.
  KV heads are repeated to ``lcm(heads_kv, U)`` first when ``U`` does not divide them.
- **Ring** (pass-KV or pass-Q): :func:`ringattn.tools.plan.predict` of ``R`` ranks holding
  ``heads / U`` query heads each, at the inter-node rate when the ring spans nodes (every step
  waits for its slowest hop).
- **All-gather**: every rank gathers the ``R - 1`` other K/V shards before computing and, in
  the backward, gathers them again and reduce-scatters fp32 dK/dV; nothing overlaps.

The fastest configuration whose memory fits is chosen; the others are ranked with the reason.
"""

from __future__ import annotations

import math
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


def all_to_all_seconds(config: Config, strategy: Strategy, hardware: Hardware) -> float:
    """Seconds of one call's Ulysses all-to-alls (forward, and backward when training) on
    ``hardware``'s link (the caller gives the link the group spans)."""
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
    sent = config.batch * tokens * rows * e * (u - 1) / u
    return sent / _wire(hardware, device_bandwidth) + calls * (u - 1) * hardware.latency


def _allgather(config: Config, hardware: Hardware) -> tuple[float, float]:
    """Seconds and bytes per device of the ring part done by all-gather: all of the pass's
    compute, plus the gathers (and the backward's reduce-scatter), none of it overlapped."""
    p = config.devices
    seq_local = config.seq_len // p
    work = rank_work(
        config.layout, p, seq_local, config.causal, diagonal_block=hardware.diagonal_block
    )
    machine_flops, rank_flops, device_bandwidth = _rates(hardware, p, config.seq_len)
    scale = 1 + (hardware.backward_ratio if config.backward else 0.0)
    compute = scale * max(
        config.flops_per_pair * max(work) / rank_flops,
        config.flops_per_pair * sum(work) / machine_flops,
    )
    e = _element_size(config.dtype)
    shard = config.batch * seq_local * config.kv_heads * (config.head_dim + config.value_dim)
    gathered = (p - 1) * shard * e * (2 if config.backward else 1)
    reduced = (p - 1) * shard * 4 if config.backward else 0
    wire = _wire(hardware, device_bandwidth)
    messages = (p - 1) * (3 if config.backward else 1)
    transfer = (gathered + reduced) / wire + messages * hardware.latency
    one = replace(config, devices=1, seq_len=seq_local)  # this rank's own tensors
    memory = device_memory(one) + (p - 1) * shard * e + (p * shard * 4 if config.backward else 0)
    return compute + transfer, memory


def rank(
    config: Config,
    hardware: Hardware,
    gpus_per_node: int | None = None,
    inter_node_gbps: float | None = None,
) -> list[Ranked]:
    """Every strategy of ``config`` (its ``devices``, heads, lengths), fastest first among
    those that fit ``hardware.memory``, then the ones that do not fit."""
    per_node = gpus_per_node or config.devices
    ranked = []
    for strategy in strategies(config):
        ring = ring_config(config, strategy)
        spans = config.devices if strategy.ring > 1 else 1
        ring_hw = across_nodes(_one_ring(hardware, strategy), spans, per_node, inter_node_gbps)
        group_hw = across_nodes(hardware, strategy.ulysses, per_node, inter_node_gbps)
        exchange = all_to_all_seconds(config, strategy, group_hw)
        if strategy.rotation == "allgather":
            attention, memory = _allgather(ring, ring_hw)
            ring_prediction: Prediction | None = None
        else:
            ring_prediction = predict(ring, ring_hw)
            attention, memory = ring_prediction.total_s, ring_prediction.memory_bytes
        reason = _reason(strategy, ring_prediction, exchange, attention, ring_hw, group_hw)
        fits = memory <= hardware.memory
        if not fits:
            reason += f"; needs {format_bytes(memory)} of {format_bytes(hardware.memory)}"
        ranked.append(
            Ranked(strategy, exchange + attention, exchange, attention, memory, fits, reason)
        )
    return sorted(ranked, key=lambda r: (not r.fits, r.total_s))


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


def _reason(strategy, ring_prediction, exchange, attention, ring_hw, group_hw) -> str:
    parts = []
    if strategy.ulysses > 1:
        where = "across nodes" if group_hw.link_bandwidth else "within a node"
        parts.append(f"all-to-all {where} {exchange * 1e3:.2f} ms")
    if strategy.ring > 1:
        link = "inter-node" if ring_hw.link_bandwidth else "intra-node"
        if ring_prediction is None:
            parts.append(f"all-gather over the {link} link, not overlapped")
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
