"""A cost model of the ring: what a configuration costs on given hardware, before running it.

Per ring step a rank computes its share of the tiles and, at the same time, sends one travelling
block to its neighbour. With ``F`` the sustained FLOP/s of the attention kernel on one device,
``B`` the bytes/s one device sends to its neighbour and ``L`` the latency of one message:

    compute_step = flops_of_the_busiest_rank / p / F
    comm_step    = bytes_per_step / B + L                         (see ringattn.rotation)
    step         = max(compute_step + s * comm_step, comm_step)

When CPU ranks share one machine, a rank's FLOP/s is its share of the cores, and the pass takes
at least the machine's total work over the machine's FLOP/s (an idle rank frees its core). The
kernel runs slower on small blocks: ``F(c) = F * c / (c + h)`` for blocks of ``c`` tokens, and a
fused kernel computes the diagonal of a causal tile in blocks of ``diagonal_block`` tokens, which
adds ``rows * diagonal_block / 2`` scored pairs per causal tile.

``s`` is the share of a transfer's time that also occupies the compute units: 0 on GPUs (DMA
engines move the data), measured on CPUs, where gloo copies through the same cores. A pass is
``p`` steps, the last without a transfer, plus the final hop of a returning accumulator, plus a
fixed ``step_overhead`` per step (merges, bookkeeping; scaled by ``p / cores`` when CPU ranks
oversubscribe the cores); backward
FLOPs are ``backward_ratio`` x forward (2.5 for flash attention: five matmuls against two).

The smallest block that hides its transfer (forward, pass-KV, MHA, no latency) follows from
``4 d c^2 / F >= 2 c d e / B``: ``c >= e F / (2 B)``, i.e. ``c >= F / B`` for 2-byte elements —
the condition of the Ring Attention paper (Liu, Zaharia, Abbeel 2023, arXiv:2310.01889, Sec. 3).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..engine import Granularity
from ..layout import LAYOUTS
from ..masks import rank_work
from ..rotation import rotation_bytes
from .memory import format_bytes

CALIBRATION_PATH = Path(os.environ.get("RINGATTN_PROFILE", "~/.cache/ringattn/local.json"))


@dataclass(frozen=True)
class Hardware:
    """One device of a ring and its link to the next device."""

    name: str
    flops: float  # sustained attention FLOP/s per device in `dtype`
    bandwidth: float  # bytes/s a device sends to its ring neighbour (one direction)
    latency: float  # seconds per message
    memory: float  # bytes per device
    dtype: str
    source: str
    comm_compute_share: float = 0.0  # s: share of transfer time that also takes compute
    ranks_share_device: bool = False  # CPU ranks on one machine split its cores and copies
    cores: int = 1  # with ranks_share_device: cores of the machine `flops` was measured on
    half_efficiency_tokens: float = 0.0  # h: the kernel runs at flops * c / (c + h) on c tokens
    diagonal_block: int = 0  # the fused kernel computes causal diagonals in blocks this wide
    step_overhead: float = 0.0  # seconds per ring step not hidden (merges, bookkeeping, waking)
    backward_ratio: float = 2.5
    peak_flops: float | None = None  # datasheet peak, for the paper's overlap condition
    # bytes/s of a network link between ring neighbours (hosts joined by Ethernet/InfiniBand, or
    # a shaped link), per direction and not shared by the ranks of a device like `bandwidth`; a
    # transfer goes at the slower of the two
    link_bandwidth: float | None = None


# Datasheet peaks (dense bf16) and per-direction link bandwidths; `flops` assumes the kernel
# sustains 60% of peak, roughly what flash-attention reports on these parts.
_SUSTAINED = 0.6
PROFILES: dict[str, Hardware] = {
    "a100-nvlink": Hardware(
        "a100-nvlink",
        _SUSTAINED * 312e12,
        300e9,
        5e-6,
        80e9,
        "bfloat16",
        "NVIDIA A100 SXM datasheet: 312 TFLOPS dense bf16, NVLink 3 600 GB/s total (300 GB/s "
        "per direction, the figure of the Ring Attention paper's Table 2)",
        peak_flops=312e12,
    ),
    "a100-infiniband": Hardware(
        "a100-infiniband",
        _SUSTAINED * 312e12,
        12.5e9,
        10e-6,
        80e9,
        "bfloat16",
        "A100 datasheet (312 TFLOPS); 100 Gb/s InfiniBand per GPU = 12.5 GB/s, as in the Ring "
        "Attention paper's Table 2",
        peak_flops=312e12,
    ),
    "h100-nvlink": Hardware(
        "h100-nvlink",
        _SUSTAINED * 989e12,
        450e9,
        5e-6,
        80e9,
        "bfloat16",
        "NVIDIA H100 SXM datasheet: 989 TFLOPS dense bf16, NVLink 4 900 GB/s total (450 GB/s "
        "per direction)",
        peak_flops=989e12,
    ),
    "h100-infiniband": Hardware(
        "h100-infiniband",
        _SUSTAINED * 989e12,
        50e9,
        10e-6,
        80e9,
        "bfloat16",
        "H100 datasheet (989 TFLOPS); NDR 400 Gb/s InfiniBand per GPU = 50 GB/s",
        peak_flops=989e12,
    ),
    "cpu-2core": Hardware(
        "cpu-2core",
        160e9,
        0.68e9,
        280e-6,
        24 * 2**30,
        "float32",
        "this project's 2-core development machine: FLOP/s, bandwidth, latency and diagonal "
        "block from `ringattn bench --calibrate` on 2026-11-25 (docs/profile-local.json); the "
        "small-block, per-step and transfer-share terms fitted to the runs in "
        "docs/benchmarks.md (least maximum error)",
        comm_compute_share=0.5,
        ranks_share_device=True,
        cores=2,
        half_efficiency_tokens=300.0,
        diagonal_block=152,
        backward_ratio=2.5,
        step_overhead=0.006,
    ),
}


def with_link(
    hardware: Hardware, gbps: float, latency: float | None = None, compute_share: float = 0.0
) -> Hardware:
    """``hardware`` whose ring neighbours talk over a network link of ``gbps`` gigabits per
    second in each direction, ``latency`` seconds per message (default: the profile's), and
    ``compute_share`` of a transfer's time also taken from compute (0: the NIC moves the data;
    a software network stack on the compute cores costs a share, measured on a link)."""
    if not (math.isfinite(gbps) and gbps > 0):
        raise ValueError(f"the link needs a positive rate, got {gbps} Gbit/s")
    if latency is not None and not (math.isfinite(latency) and latency >= 0):
        raise ValueError(f"the link's latency must be >= 0 seconds, got {latency}")
    if not 0 <= compute_share < 1:
        raise ValueError(f"the link's compute share must be in [0, 1), got {compute_share}")
    return replace(
        hardware,
        name=f"{hardware.name} over a {gbps:g} Gbit/s link",
        link_bandwidth=gbps * 1e9 / 8,
        latency=hardware.latency if latency is None else latency,
        comm_compute_share=compute_share,
        source=f"{hardware.source}; link: {gbps:g} Gbit/s per direction, compute share "
        f"{compute_share:g} (--link-gbps)",
    )


# the link between the nodes of a GPU profile: the InfiniBand profile of the same GPU
INTER_NODE_PROFILES = {"a100-nvlink": "a100-infiniband", "h100-nvlink": "h100-infiniband"}


def across_nodes(
    hardware: Hardware, devices: int, gpus_per_node: int, inter_node_gbps: float | None = None
) -> Hardware:
    """``hardware`` for a ring of ``devices`` on nodes of ``gpus_per_node`` devices: a ring that
    spans nodes crosses the inter-node link at least twice, and every step waits for its slowest
    hop, so each step's transfer goes at the inter-node rate (``inter_node_gbps``, default the
    InfiniBand profile paired with ``hardware`` in :data:`INTER_NODE_PROFILES`)."""
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    if devices <= gpus_per_node or hardware.name in INTER_NODE_PROFILES.values():
        return hardware  # one node, or a profile that is the inter-node link already
    paired = INTER_NODE_PROFILES.get(hardware.name)
    if inter_node_gbps is None and paired is None:
        raise ValueError(
            f"the ring spans {-(-devices // gpus_per_node)} nodes: give the inter-node link "
            f"(--inter-node-gbps); {hardware.name!r} has no paired inter-node profile"
        )
    latency = PROFILES[paired].latency if paired else None
    if inter_node_gbps is None:
        inter_node_gbps = PROFILES[paired].bandwidth * 8 / 1e9
    # a software stack's compute costs per byte: over a slower link, a smaller share of its time
    share = hardware.comm_compute_share * min(1.0, inter_node_gbps * 1e9 / 8 / hardware.bandwidth)
    return with_link(hardware, inter_node_gbps, latency, share)


def load_hardware(name: str) -> Hardware:
    """A built-in profile, ``local`` (the calibration file), or a path to a profile JSON."""
    if name in PROFILES:
        return PROFILES[name]
    path = CALIBRATION_PATH.expanduser() if name == "local" else Path(name)
    if not path.exists():
        hint = "run `ringattn plan --calibrate` first" if name == "local" else "no such file"
        raise ValueError(
            f"unknown hardware {name!r}: choose one of {sorted(PROFILES)}, 'local' or a JSON "
            f"profile path ({hint})"
        )
    return Hardware(**json.loads(path.read_text()))


@dataclass(frozen=True)
class Config:
    """A ring attention problem to predict."""

    seq_len: int
    devices: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    head_dim_v: int | None = None  # the values' head dim when it differs (MLA)
    batch: int = 1
    dtype: str = "bfloat16"
    causal: bool = True
    layout: str = "zigzag"
    rotation: str = "kv"
    backward: bool = True
    granularity: Granularity = field(default_factory=Granularity)  # the engine's sub-blocks

    @classmethod
    def for_workload(cls, workload: Mapping[str, Any], devices: int, **changes: Any) -> Config:
        """The problem of a bench/demo workload (the fields of a ``Workload``, or those of its
        shape that are given) on ``devices`` devices, with ``changes`` on top."""
        given = {name: workload[name] for name in _WORKLOAD_FIELDS if name in workload}
        return cls(**{"devices": devices, **given, **changes})

    @property
    def value_dim(self) -> int:
        """Head dim of v, out and dout."""
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def flops_per_pair(self) -> float:
        """Forward FLOPs per (query, key) pair: ``q k^T`` and ``p v``."""
        return 2.0 * self.batch * self.heads * (self.head_dim + self.value_dim)

    def bytes_per_step(self, seq_local: int, backward: bool) -> float:
        """Bytes one rank sends per ring step and sequence of the batch under this rotation
        (forward, or forward and backward together), :func:`ringattn.rotation_bytes`."""
        dtype = getattr(torch, self.dtype)
        return rotation_bytes(
            seq_local,
            seq_local,
            self.heads,
            self.kv_heads,
            self.head_dim,
            dtype,
            backward,
            self.value_dim,
        )[self.rotation]

    def return_bytes(self, seq_local: int, backward: bool) -> float:
        """Bytes per sequence of the batch of the accumulator a rank sends home after a pass's
        last step (it follows its block one step behind): pass-Q's out and lse (forward) or dQ
        (backward), pass-KV's dK and dV (backward); nothing for pass-KV's forward."""
        acc = 8 if self.dtype == "float64" else 4
        if self.rotation == "kv":
            return (
                seq_local * self.kv_heads * (self.head_dim + self.value_dim) * acc
                if backward
                else 0
            )
        per_head = self.head_dim if backward else self.value_dim + 1
        return seq_local * self.heads * per_head * acc


_WORKLOAD_FIELDS = (
    "seq_len",
    "heads",
    "kv_heads",
    "head_dim",
    "head_dim_v",
    "batch",
    "dtype",
    "causal",
    "layout",
)


@dataclass(frozen=True)
class Prediction:
    config: Config
    hardware: str
    compute_step_s: float
    comm_step_s: float
    busy_step_s: float  # a forward step with a transfer: max(compute + s x transfer, transfer)
    overlapped: bool
    forward_s: float
    backward_s: float
    total_s: float
    ideal_s: float
    efficiency: float
    memory_bytes: float
    min_tokens_per_device: float
    max_seq_len: int
    device_memory: float  # the budget max_seq_len was fitted to, bytes per device

    def summary(self) -> str:
        c = self.config
        return "\n".join(
            [
                f"{c.seq_len:,} tokens on {c.devices} x {self.hardware}: {c.layout} layout, "
                f"pass-{c.rotation.upper()}, {'causal' if c.causal else 'full'}, "
                f"{c.heads} heads ({c.kv_heads} KV), d={c.head_dim}"
                + (f" (v {c.value_dim})" if c.value_dim != c.head_dim else "")
                + f", {c.dtype}, batch {c.batch}",
                f"  per step: compute {self.compute_step_s * 1e3:.3f} ms, "
                f"transfer {self.comm_step_s * 1e3:.3f} ms -> "
                f"{'fully overlapped' if self.overlapped else 'communication-bound'}",
                f"  forward {self.forward_s:.4f} s"
                + (f", backward {self.backward_s:.4f} s" if c.backward else "")
                + f", total {self.total_s:.4f} s; efficiency {self.efficiency:.2f} "
                f"(ideal {self.ideal_s:.4f} s)",
                f"  memory per device (inputs, outputs, gradients, ring buffers): "
                f"{format_bytes(self.memory_bytes)}",
                f"  full overlap needs >= {self.min_tokens_per_device:,.0f} tokens per device; "
                f"longest sequence that fits {format_bytes(self.device_memory)} per device: "
                f"{self.max_seq_len:,} tokens",
            ]
        )


_UNIT_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}


def memory_size(text: str) -> int:
    """'64MiB', '2GiB', '512M', '1.5G' -> bytes: K, M, G, T with or without 'iB' are powers of
    1024, 'KB', 'MB', 'GB', 'TB' powers of 1000, and a plain number (or with 'B') is bytes."""
    match = re.fullmatch(r"\s*(\d*\.?\d+)\s*(?:([kmgt])(ib|i|b)?|(b)?)\s*", text.lower())
    if not match:
        raise ValueError(f"not a memory size: {text!r} (try 64MiB or 2GiB)")
    number, unit, suffix = float(match.group(1)), match.group(2), match.group(3)
    if unit is None:
        return int(number)
    base = 1000 if suffix == "b" else 1024
    return int(number * base ** _UNIT_POWERS[unit])


def _element_size(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def memory_per_token(config: Config) -> float:
    """Peak bytes per token of one device's shard (``seq_len / devices`` tokens), its inputs
    included, as measured by ``ringattn bench --max-context`` (``docs/max-context.json``).

    - inputs: q, k, v, and for training dout, in the input dtype (``e`` bytes per element);
    - what any attention keeps: out and the float32 log-sum-exp, and for training dq, dk, dv;
      a single device (``devices == 1``) computes the whole block and needs nothing else;
    - the ring's buffers, one sub-block each (the engine cuts a shard into
      ``granularity.count(segments)`` sub-blocks, the backward of 16-bit inputs
      ``accumulator_split`` times more): the travelling block being computed on and the one
      arriving, three returning float32 blocks (being filled, sent, arriving: dK/dV under
      pass-KV backward, dQ under pass-Q backward, partial out + lse under pass-Q forward), and
      one band of kernel outputs (in the inputs' dtype when training);
    - float32 accumulators for inputs in 16-bit dtypes (float32 inputs accumulate in place): dq
      (pass-KV) or dk, dv (pass-Q) in training, which take the place of their 16-bit results
      (converted band by band at the end), and out in pass-KV inference, next to its result.
    """
    e = _element_size(config.dtype)
    q_row = config.heads * config.head_dim  # q, dq
    out_row = config.heads * config.value_dim  # out, dout
    kv_row = config.kv_heads * (config.head_dim + config.value_dim)  # k and v, dk and dv
    lse = (8 if config.dtype == "float64" else 4) * config.heads  # the accumulator dtype
    train = config.backward
    inputs = (q_row + out_row + kv_row if train else q_row + kv_row) * e
    outputs = out_row * e + lse + ((q_row + kv_row) * e if train else 0)
    if config.devices == 1:
        return config.batch * (inputs + outputs)
    if config.rotation == "kv":
        travelling = kv_row * e
        returning = kv_row * 4 if train else 0
        accumulators = q_row * (4 - e) if train else out_row * 4
    else:
        travelling = ((q_row + 2 * out_row) * e + lse) if train else q_row * e
        returning = q_row * 4 if train else out_row * 4 + lse
        accumulators = kv_row * (4 - e) if train else 0
    band = (q_row + kv_row) * e if train else out_row * 4 + lse
    if e >= 4:  # float32 (or float64) inputs accumulate in their own dtype, in place
        accumulators = 0
    count, travel_count = _sub_block_counts(config)
    ring = (2 * travelling + 3 * returning) / travel_count + band / count
    return config.batch * (inputs + outputs + ring + accumulators)


def device_memory(config: Config) -> float:
    """Peak bytes of one device, inputs included (:func:`memory_per_token` x tokens per device)."""
    return memory_per_token(config) * (config.seq_len // config.devices)


def _sub_block_counts(config: Config) -> tuple[int, int]:
    """The sub-blocks of a shard (bands of the stationary side), and of the travelling block in
    the pass that peaks: finer in the backward of 16-bit inputs (``accumulator_split``)."""
    seq_local = config.seq_len // config.devices
    segments = LAYOUTS[config.layout].segments(0, config.devices, seq_local)
    granularity = config.granularity
    split = (
        granularity.accumulator_split if config.backward and _element_size(config.dtype) < 4 else 1
    )
    return granularity.count(segments), granularity.count(segments, split)


def longest_sequence(config: Config, memory: float) -> int:
    """The longest total sequence (a multiple of the layout's) whose :func:`device_memory` fits
    ``memory`` bytes per device; 0 if none does.

    Memory grows with the length except where a sub-block count steps up (a longer shard is
    cut finer and holds smaller ring buffers per token), so the search runs per pair of counts
    (:func:`_sub_block_counts`): the lengths with one pair form an interval, inside which memory
    only grows.
    """
    multiple = LAYOUTS[config.layout].seq_multiple(config.devices)

    def at(units: int) -> Config:
        return replace(config, seq_len=units * multiple)

    def last(low: int, high: int, holds) -> int:
        """The largest units in ``[low, high]`` where ``holds`` (true up to it, false after)."""
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if holds(middle) else (low, middle - 1)
        return low

    # no sequence fits beyond what the inputs and outputs alone need (the ring adds to them)
    bare = replace(at(1), devices=1)
    ceiling = int(memory / memory_per_token(bare) * config.devices / multiple) + 1
    best, start = 0, 1
    while start <= ceiling:
        counts = _sub_block_counts(at(start))
        end = last(start, ceiling, lambda units, c=counts: _sub_block_counts(at(units)) == c)
        if device_memory(at(start)) <= memory:
            fitting = last(start, end, lambda units: device_memory(at(units)) <= memory)
            best = max(best, fitting)
        start = end + 1
    return best * multiple


def _rates(hardware: Hardware, devices: int, tokens: float) -> tuple[float, float, float]:
    """FLOP/s of the whole machine (all ranks together) and of one rank, and the bytes/s one
    rank copies through its own device, when ``devices`` ranks each compute blocks of
    ``tokens`` tokens."""
    flops = hardware.flops * tokens / (tokens + hardware.half_efficiency_tokens)
    if not hardware.ranks_share_device:
        return flops * devices, flops, hardware.bandwidth
    per_rank = flops * max(1, hardware.cores // devices) / hardware.cores
    return flops, per_rank, hardware.bandwidth * min(1.0, 2 / devices)


def _wire(hardware: Hardware, device_bandwidth: float) -> float:
    """Bytes/s a transfer reaches its neighbour at: the device's path, or a slower link."""
    return min(device_bandwidth, hardware.link_bandwidth or math.inf)


def min_tokens_for_overlap(config: Config, hardware: Hardware) -> float:
    """Smallest tokens per device whose forward step hides its transfer (latency included).

    The kernel's rate depends on the block size (``half_efficiency_tokens``), so the block size
    is solved for at the rate of blocks of that size (a fixed point, found by iteration)."""
    causal_share = 0.5 if config.causal else 1.0
    share = hardware.comm_compute_share
    per_token = config.bytes_per_step(1, backward=False)

    def solve(tokens: float) -> float:
        machine, flops, bandwidth = _rates(hardware, config.devices, tokens)
        if hardware.ranks_share_device:  # as predict: the machine's rate bounds every rank's
            flops = min(flops, machine / config.devices)
        a = config.flops_per_pair * causal_share / flops
        b = config.batch * per_token / _wire(hardware, bandwidth)
        # hidden when compute + s * transfer >= transfer: a c^2 >= (1 - s) (b c + L)
        b, latency = (1 - share) * b, (1 - share) * hardware.latency
        return (b + math.sqrt(b * b + 4 * a * latency)) / (2 * a)

    tokens = solve(max(1.0, config.seq_len / config.devices))
    for _ in range(50):  # the rate rises with the block, so the iteration contracts
        if tokens <= 0:  # no latency and a free transfer: any block hides it
            return 0.0
        tokens, previous = solve(tokens), tokens
        if abs(tokens - previous) <= 1e-6 * previous:
            break
    return tokens


def predict(config: Config, hardware: Hardware) -> Prediction:
    """Predicted time, efficiency and memory of ``config`` on ``hardware``."""
    p = config.devices
    seq_local = config.seq_len // p
    work = rank_work(
        config.layout, p, seq_local, config.causal, diagonal_block=hardware.diagonal_block
    )
    flops_rank = config.flops_per_pair * max(work)
    flops_total = config.flops_per_pair * sum(work)
    fwd_bytes = config.batch * config.bytes_per_step(seq_local, backward=False)
    both_bytes = config.batch * config.bytes_per_step(seq_local, backward=True)
    share = hardware.comm_compute_share
    machine_flops, rank_flops, device_bandwidth = _rates(hardware, p, seq_local)
    wire_bandwidth = _wire(hardware, device_bandwidth)

    def pass_time(scale: float, step_bytes: float, returned: float) -> tuple:
        """Seconds of the pass, of compute per step, of a transfer, and of a step that
        overlaps a transfer; and whether the transfer is hidden. ``returned``: bytes of the
        last hop, an accumulator going home (0: none)."""
        # the busiest rank bounds the pass, and so does the machine when ranks share it
        compute_pass = max(scale * flops_rank / rank_flops, scale * flops_total / machine_flops)
        compute = compute_pass / p
        comm = step_bytes / wire_bandwidth + hardware.latency if p > 1 else 0.0
        busy = max(compute + share * comm, comm)
        returns = bool(returned) and p > 1
        back = returned / wire_bandwidth + hardware.latency if returns else 0.0
        total = (p - 1) * busy + compute + back
        crowding = max(1.0, p / hardware.cores) if hardware.ranks_share_device else 1.0
        overhead = (p + returns) * hardware.step_overhead * crowding
        return total + overhead, compute, comm, busy, compute + share * comm >= comm

    forward, compute_step, comm_step, busy_step, hidden = pass_time(
        1.0, fwd_bytes, config.batch * config.return_bytes(seq_local, backward=False)
    )
    backward = 0.0
    if config.backward:
        backward, *_ = pass_time(
            hardware.backward_ratio,
            both_bytes - fwd_bytes,
            config.batch * config.return_bytes(seq_local, backward=True),
        )
    ratio = 1 + (hardware.backward_ratio if config.backward else 0.0)
    ideal = ratio * flops_total / machine_flops
    return Prediction(
        config=config,
        hardware=hardware.name,
        compute_step_s=compute_step,
        comm_step_s=comm_step,
        busy_step_s=busy_step,
        overlapped=hidden,
        forward_s=forward,
        backward_s=backward,
        total_s=forward + backward,
        ideal_s=ideal,
        efficiency=ideal / (forward + backward) if forward + backward > 0 else 1.0,
        memory_bytes=device_memory(config),
        min_tokens_per_device=min_tokens_for_overlap(config, hardware),
        max_seq_len=longest_sequence(config, hardware.memory),
        device_memory=hardware.memory,
    )


def best_configuration(config: Config, hardware: Hardware) -> Prediction:
    """The fastest layout and rotation for ``config`` that fits in device memory."""
    candidates = [
        predict(replace(config, layout=layout, rotation=rotation), hardware)
        for layout in LAYOUTS
        for rotation in ("kv", "q")
        if config.seq_len % LAYOUTS[layout].seq_multiple(config.devices) == 0
    ]
    fitting = [c for c in candidates if c.memory_bytes <= hardware.memory] or candidates
    return min(fitting, key=lambda c: c.total_s)


def paper_minimal_sequence(peak_flops: float, bandwidth: float) -> float:
    """Minimal sequence length per device as the Ring Attention paper's Table 2 lists it.

    The paper's overlap condition is a block of ``c >= F / B`` tokens (bf16, MHA); its Table 2
    values (6.2K on A100 NVLink, 149.5K on A100 InfiniBand) equal ``6 F / B`` within 0.5%: each
    device holds several such blocks in the paper's blockwise transformer. We use the factor 6
    inferred from those two rows.
    """
    return 6 * peak_flops / bandwidth


def save_profile(hardware: Hardware, path: Path) -> Path:
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(hardware), indent=2))
    return path


def _calibration_worker(seq_len: int, repeats: int) -> dict | None:
    """Two ranks: gloo bandwidth and latency, and the compute share of a transfer."""
    import time

    import torch.distributed as dist

    from ..comm import RingComm
    from .launch import cpu_threads_per_rank, init_worker
    from .workload import Workload, time_ring

    init_worker("cpu")
    torch.set_num_threads(cpu_threads_per_rank())
    comm = RingComm(dist.group.WORLD)

    def exchange_time(numel: int) -> float:
        buffer = torch.zeros(numel)
        comm.exchange([buffer]).wait()
        times = []
        for _ in range(repeats * 3):
            dist.barrier()
            start = time.perf_counter()
            comm.exchange([buffer]).wait()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    latency = exchange_time(1)
    big = 8 * 2**20
    bandwidth = big * 4 / max(exchange_time(big) - latency, 1e-9)
    workload = Workload(seq_len=seq_len, heads=8, kv_heads=8, causal=False, layout="contiguous")
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = workload.inputs(
        torch.arange(rank * seq_len // world, (rank + 1) * seq_len // world), torch.device("cpu")
    )
    timing = time_ring(workload, inputs, repeats, before_each=lambda i: dist.barrier())
    steps = [s for s in timing.trace.steps if s.phase == "forward"]
    tiny = {name: t[:, :64] for name, t in inputs.items()}
    time_ring(workload, tiny, 1)
    tiny_timing = time_ring(workload, tiny, repeats * 3, before_each=lambda i: dist.barrier())
    passes_steps = 2 * world + 1  # forward p steps, backward p steps and the returning hop
    result = {
        "latency": latency,
        "bandwidth": bandwidth,
        "forward_s": timing.forward_s,
        "step_bytes": steps[0].bytes_sent,
        "compute_s": [s.compute_s for s in steps],
        "step_overhead": (tiny_timing.forward_s + tiny_timing.backward_s) / passes_steps,
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    dist.destroy_process_group()
    return gathered if rank == 0 else None


def calibrate(seq_len: int = 8192, repeats: int = 3) -> Hardware:
    """Measure this machine: kernel FLOP/s on all cores, forward/backward time ratio, gloo
    bandwidth and latency between two local ranks, and how much a transfer slows compute."""
    from .launch import run_on_ranks
    from .workload import Workload, time_single_process

    cores = len(os.sched_getaffinity(0))
    inverse_rates = {}  # 1 / FLOP/s at two sizes: 1/F(c) = (1 + h / c) / F
    for tokens in (seq_len // 4, seq_len):
        workload = Workload(seq_len=tokens, heads=8, kv_heads=8, causal=False)
        time_single_process(workload, torch.device("cpu"), cores)
        single = time_single_process(workload, torch.device("cpu"), cores, repeats)
        inverse_rates[tokens] = single.forward_s / workload.flops_forward()
    small, large = seq_len // 4, seq_len
    slope = (inverse_rates[small] - inverse_rates[large]) / (1 / small - 1 / large)
    flops = 1 / max(inverse_rates[large] - slope / large, 1e-30)
    half_tokens = max(0.0, slope * flops)
    # causal time / full time = (n^2 / 2 + n * block / 2) / n^2 on n tokens
    causal = Workload(seq_len=small, heads=8, kv_heads=8, causal=True)
    time_single_process(causal, torch.device("cpu"), cores)
    causal_s = time_single_process(causal, torch.device("cpu"), cores, repeats).forward_s
    full_s = inverse_rates[small] * 2 * causal.flops_forward()
    diagonal_block = int(max(0.0, small * (2 * causal_s / full_s - 1)))
    ranks = next(r for r in run_on_ranks(_calibration_worker, (seq_len, repeats), 2).values() if r)
    bandwidth = min(r["bandwidth"] for r in ranks)
    latency = max(r["latency"] for r in ranks)
    # forward = compute(step 0) + compute(step 1): the extra time of the step that overlapped
    # a transfer, over the transfer's time, is the compute share of the transfer.
    comm = ranks[0]["step_bytes"] / bandwidth + latency
    slowdown = statistics.mean(r["compute_s"][0] - r["compute_s"][-1] for r in ranks)
    share = min(1.0, max(0.0, slowdown / comm))
    return Hardware(
        name="local",
        flops=flops,
        bandwidth=bandwidth,
        latency=latency,
        memory=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        dtype="float32",
        source=f"calibrated on this machine ({cores} cores, torch {torch.__version__})",
        comm_compute_share=share,
        ranks_share_device=True,
        cores=cores,
        half_efficiency_tokens=half_tokens,
        diagonal_block=diagonal_block,
        step_overhead=statistics.median(r["step_overhead"] for r in ranks),
        backward_ratio=single.backward_s / single.forward_s,
    )


def validate(bench_rows: list[dict], hardware: Hardware) -> list[dict]:
    """Predicted against measured forward+backward time for ``ringattn bench`` rows."""
    table = []
    for row in bench_rows:
        config = Config.for_workload(row["workload"], row["world_size"], rotation="kv")
        predicted = predict(config, hardware).total_s
        measured = row["ring_total_s"]
        table.append(
            {
                "config": config,
                "predicted_s": predicted,
                "measured_s": measured,
                "error": predicted / measured - 1,
            }
        )
    return table
