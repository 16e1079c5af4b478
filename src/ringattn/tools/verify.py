"""Sampled verification: check a ring's results where one process could not hold the sequence.

A full check runs attention over the whole sequence in one process, which costs O(n^2) time
and O(n) memory in one place. This module checks the ring instead at *sampled* global positions
against a float64 reference that no rank computes over the whole sequence at once:

* Sampled rows (``out``, ``lse``, ``dq``): every rank computes the float64 partial attention of
  the sampled queries over *its own keys* (causal mask by global position), and the partials are
  merged exactly across ranks (all-reduce of the maxima, then of the rescaled sums). ``dq`` of the
  sampled rows follows the same way, from the merged ``out`` and ``lse``.
* Sampled columns (``dk``, ``dv``): they need ``lse_i`` and ``delta_i = dO_i . O_i`` of every row
  ``i`` that sees the column, i.e. a float64 forward over all rows. Every rank computes it for its
  own rows, streaming all keys in blocks, then adds its rows' contributions to the sampled
  columns, and the sums are all-reduced. Time O(n^2 d / p) per rank, memory O(n/p).

Inputs are a pure function of the seed and the global position (:meth:`Workload.inputs`), so every
rank rebuilds the tokens it needs instead of receiving them, and the reference never uses the
ring's own results. Tiles are at most :data:`TILE_ELEMENTS` scores.

Tolerances are those of the full check: 1e-5 relative to ``max |ref|`` in float32. In bfloat16 and
float16 the ring must stay within twice the error that the *same local kernel* makes in that dtype
at the same sampled positions (floor 1e-3): the kernel runs on each rank's blocks and the blocks
are merged exactly in float64. For ``dk``/``dv`` that kernel run is given the float64 rows'
``out``/``lse`` rounded to the dtype (a single process would use its own low-precision forward).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..comm import GroupLike, group_rank_and_size, resolve_group
from ..inference import merge_across_ranks
from ..kernels import masked_kernel_for, select_kernel
from ..layout import get_layout, sub_blocks
from ..trace import progress_text
from .workload import Workload

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
"""Largest ``max |ring - ref| / max |ref|`` accepted per output, by input dtype."""
LOW_PRECISION = ("bfloat16", "float16")
LOW_PRECISION_FLOOR = 1e-3
"""Relative error below which low-precision results always pass."""
TILE_ELEMENTS = 2**20
"""Scores per float64 tile (8 MiB; measured fastest on this machine's CPU)."""

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def tolerances(
    dtype: str, names: Iterable[str], own_errors: dict[str, float] | None = None
) -> dict[str, float]:
    """Accepted relative error per output name: :data:`TOLERANCE` for float32/float64; in low
    precision twice ``own_errors`` (what a single process or the same kernel makes in that
    dtype), at least :data:`LOW_PRECISION_FLOOR`."""
    if dtype in LOW_PRECISION:
        return {name: max(2 * own_errors[name], LOW_PRECISION_FLOOR) for name in names}
    return dict.fromkeys(names, TOLERANCE[dtype])


def _edges(workload: Workload, world_size: int) -> set[int]:
    """Global positions where the ring's work is cut: the first and last token, the first and
    last token of every segment a rank holds (shard and chunk boundaries of the layout) and, in
    a ring of several ranks, of every sub-block piece and every band of kernel rows
    (:class:`ringattn.Granularity`)."""
    seq_len, seq_local = workload.seq_len, workload.seq_len // world_size
    layout = get_layout(workload.layout)
    edges = {0, seq_len - 1}
    for rank in range(world_size):
        segments = layout.segments(rank, world_size, seq_local)
        positions = layout.positions(rank, world_size, seq_local)
        local = {0, seq_local - 1}
        offset = 0
        for segment in segments:
            local.update((offset, offset + segment.length - 1))
            offset += segment.length
        if world_size > 1:
            granularity = workload.granularity
            finer = granularity.accumulator_split if workload.dtype in LOW_PRECISION else 1
            for split in {1, finer}:  # the 16-bit backward's finer cut, where it happens
                for block in sub_blocks(segments, granularity.count(segments, split)):
                    local.update(i for start, stop in block.pieces for i in (start, stop - 1))
            band = granularity.band(segments)
            local.update(
                i for b in range(0, seq_local, band) for i in (b, min(b + band, seq_local) - 1)
            )
        edges.update(positions[sorted(local)].tolist())
    return edges


def sample_positions(workload: Workload, world_size: int, count: int = 256) -> torch.Tensor:
    """Sorted distinct global positions to check, the same on every rank: where the ring cuts
    its work (:func:`_edges`: shard, chunk, sub-block and band boundaries) and seeded random
    positions up to ``count`` in all (int64, ``(count,)``)."""
    seq_len = workload.seq_len
    chosen = _edges(workload, world_size)
    count = min(max(count, len(chosen)), seq_len)
    generator = torch.Generator().manual_seed(workload.seed * 7919 + 17)
    for position in torch.randperm(seq_len, generator=generator).tolist():
        if len(chosen) == count:
            break
        chosen.add(position)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def _by_kv_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(b, s, heads, d)`` -> ``(b, kv_heads, group * s, d)``: query head ``h = kv * group + g``
    (it uses key/value head ``kv``) at rows ``g * s .. g * s + s - 1`` of ``kv``."""
    b, s, h, d = x.shape
    grouped = x.reshape(b, s, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4)
    return grouped.reshape(b, kv_heads, h // kv_heads * s, d)


def _from_kv_head(x: torch.Tensor, seq: int) -> torch.Tensor:
    """Inverse of :func:`_by_kv_head`: ``(b, kv_heads, group * seq, d)`` -> ``(b, seq, heads,
    d)``."""
    b, kv, rows, d = x.shape
    return x.reshape(b, kv, rows // seq, seq, d).permute(0, 3, 1, 2, 4).reshape(b, seq, -1, d)


def _scores(q, k, visible, scale) -> torch.Tensor:
    """Scaled scores ``(b, kv_heads, group * r, c)``, ``-inf`` where ``visible`` ``(r, c)`` is
    False."""
    b, r, h, _ = q.shape
    kv = k.shape[2]
    scores = torch.matmul(_by_kv_head(q, kv), k.transpose(1, 2).transpose(-1, -2)).mul_(scale)
    if visible is not None:
        scores.view(b, kv, h // kv, r, -1).masked_fill_(~visible, float("-inf"))
    return scores


def exact_forward(q, k, v, visible, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention of one tile, independent of the engine and its kernels.

    ``q`` ``(b, r, heads, d)``; ``k``, ``v`` ``(b, c, kv_heads, d)``; ``visible`` bool ``(r, c)``
    or ``None`` (all visible). Returns ``out`` ``(b, r, heads, d)`` and ``lse`` ``(b, heads, r)``;
    a row that sees no key gets ``out = 0`` and ``lse = -inf``.
    """
    b, r, h, _ = q.shape
    scores = _scores(q, k, visible, scale)
    top = scores.amax(-1, keepdim=True)
    top = top.masked_fill(torch.isinf(top), 0.0)  # rows that see nothing: every exp is 0
    probs = scores.sub_(top).exp_()
    total = probs.sum(-1, keepdim=True)
    out = torch.matmul(probs, v.transpose(1, 2))
    out = out.div_(total.clamp_min(torch.finfo(out.dtype).tiny))
    return _from_kv_head(out, r), (top + total.log()).reshape(b, h, r)


def exact_backward(dout, q, k, v, out, lse, visible, scale):
    """Float64 gradients of one tile given the rows' *final* ``out`` ``(b, r, heads, d)`` and
    ``lse`` ``(b, heads, r)``: with ``P = exp(S - lse)`` and ``delta = rowsum(dO * O)``,
    ``dv = P^T dO``, ``dS = P (dO V^T - delta)``, ``dq = scale dS K``, ``dk = scale dS^T Q``.
    Returns ``dq`` like ``q`` and ``dk``, ``dv`` like ``k``."""
    b, r = q.shape[:2]
    kv = k.shape[2]
    lse = lse.masked_fill(torch.isinf(lse), float("inf"))  # a row that sees nothing: P = 0
    probs = _scores(q, k, visible, scale).sub_(lse.reshape(b, kv, -1, 1)).exp_()
    delta = (dout * out).sum(-1).transpose(1, 2).reshape(b, kv, -1, 1)
    dout_h = _by_kv_head(dout, kv)
    dscores = torch.matmul(dout_h, v.transpose(1, 2).transpose(-1, -2)).sub_(delta).mul_(probs)
    dq = _from_kv_head(torch.matmul(dscores, k.transpose(1, 2)), r).mul_(scale)
    dk = torch.matmul(dscores.transpose(-1, -2), _by_kv_head(q, kv)).mul_(scale)
    dv = torch.matmul(probs.transpose(-1, -2), dout_h)
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)


@dataclass(frozen=True)
class _Arithmetic:
    """How a pass computes: inputs built in ``workload.dtype``, tiles by ``forward(q, k, v,
    visible, scale)`` and ``backward(dout, q, k, v, out, lse, visible, scale)``, every result
    returned in float64."""

    workload: Workload
    device: torch.device
    forward: Forward
    backward: Backward

    def inputs(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.workload.inputs(positions, self.device)


def _exact(workload: Workload, device: torch.device) -> _Arithmetic:
    """Float64 throughout, on the float32 values of the inputs (as the full check's reference)."""
    return _Arithmetic(replace(workload, dtype="float64"), device, exact_forward, exact_backward)


def _same_kernel(workload: Workload, device: torch.device) -> _Arithmetic:
    """The ring's local kernel for masked tiles, in the workload's dtype; results in float64."""
    probe = torch.empty(
        1, 1, workload.heads, workload.head_dim, dtype=workload.torch_dtype, device=device
    )
    kernel = masked_kernel_for(select_kernel("auto", probe), False)

    def mask(visible):
        return None if visible is None else visible[None, None]

    def forward(q, k, v, visible, scale):
        out, lse = kernel.forward(q, k, v, causal=False, scale=scale, mask=mask(visible))
        if visible is not None:  # the CPU op returns lse 0, not -inf, for rows it hides entirely
            lse = lse.masked_fill(~visible.any(-1), float("-inf"))
        return out.double(), lse.double()

    def backward(dout, q, k, v, out, lse, visible, scale):
        grads = kernel.backward(
            dout, q, k, v, out.to(q.dtype), lse.float(), causal=False, scale=scale,
            mask=mask(visible),
        )  # fmt: skip
        return tuple(g.double() for g in grads)

    return _Arithmetic(workload, device, forward, backward)


def _chunks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


@dataclass
class _Rows:
    """Query rows at global ``positions`` ``(r,)`` with their ``q`` and ``dout``
    ``(b, r, heads, d)``, and, once known, their final ``out`` and ``lse`` ``(b, heads, r)``."""

    positions: torch.Tensor
    q: torch.Tensor
    dout: torch.Tensor
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    @classmethod
    def build(cls, arithmetic: _Arithmetic, positions: torch.Tensor) -> _Rows:
        inputs = arithmetic.inputs(positions)
        return cls(positions.to(arithmetic.device), inputs["q"], inputs["dout"])


def _tiles(
    rows: _Rows, keys: torch.Tensor, arithmetic: _Arithmetic
) -> Iterator[tuple[slice, dict[str, torch.Tensor], slice, torch.Tensor | None]]:
    """Key blocks of global positions ``keys`` (``k``, ``v`` built once each), and within each
    the row blocks that see any of them: ``(key_block, key_inputs, row_block, visible)``, with
    ``visible`` ``None`` when the row block sees every key of the block."""
    causal = arithmetic.workload.causal
    batch_heads = rows.q.shape[0] * rows.q.shape[2]
    row_size = max(1, min(len(rows.positions), int((TILE_ELEMENTS // batch_heads) ** 0.5)))
    key_size = max(1, TILE_ELEMENTS // (batch_heads * row_size))
    row_blocks = [
        (block, rows.positions[block], *rows.positions[block].aminmax())
        for block in _chunks(len(rows.positions), row_size)
    ]
    for key_block in _chunks(len(keys), key_size):
        built = arithmetic.inputs(keys[key_block])
        key_inputs = {  # stored head-major, so that every tile multiplies contiguous blocks
            name: built[name].transpose(1, 2).contiguous().transpose(1, 2) for name in "kv"
        }
        key_positions = keys[key_block].to(arithmetic.device)
        first_key, last_key = key_positions.aminmax()
        for row_block, row_positions, first_row, last_row in row_blocks:
            if causal and first_key > last_row:
                continue
            visible = None
            if causal and last_key > first_row:
                visible = key_positions[None, :] <= row_positions[:, None]
            yield key_block, key_inputs, row_block, visible


def _attend(
    arithmetic: _Arithmetic, rows: _Rows, keys: torch.Tensor, progress: _Progress | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``rows`` over the keys at global positions ``keys``: ``out``
    ``(b, r, heads, d)`` and ``lse`` ``(b, heads, r)``, float64, blocks merged exactly."""
    workload = arithmetic.workload
    scale = workload.head_dim**-0.5
    b, r, h, d = rows.q.shape
    out = torch.zeros(b, r, h, d, dtype=torch.float64, device=arithmetic.device)
    lse = torch.full((b, h, r), float("-inf"), dtype=torch.float64, device=arithmetic.device)
    last_block = None
    for key_block, key_inputs, row_block, visible in _tiles(rows, keys, arithmetic):
        if progress is not None and key_block != last_block:
            progress.keys_done(key_block.start)
            last_block = key_block
        tile_out, tile_lse = arithmetic.forward(
            rows.q[:, row_block], key_inputs["k"], key_inputs["v"], visible, scale
        )
        _merge_into(out[:, row_block], lse[..., row_block], tile_out, tile_lse)
    return out, lse


def _merge_into(out: torch.Tensor, lse: torch.Tensor, part_out, part_lse) -> None:
    """``(out, lse)`` <- the exact merge of ``(out, lse)`` with ``(part_out, part_lse)``, in
    place (``out`` ``(b, r, heads, d)``, ``lse`` ``(b, heads, r)``)."""
    total = torch.logaddexp(lse, part_lse)
    finite = total.masked_fill(torch.isinf(total), 0.0)
    keep = torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1)
    add = torch.exp(part_lse - finite).transpose(1, 2).unsqueeze(-1)
    out.mul_(keep).add_(part_out * add)
    lse.copy_(total)


def _gradients(
    arithmetic: _Arithmetic, rows: _Rows, keys: torch.Tensor, of_keys: bool
) -> tuple[torch.Tensor, ...]:
    """The contribution of the pairs (``rows`` x keys at ``keys``) to the gradients: ``(dq,)``
    of the rows, or with ``of_keys`` ``(dk, dv)`` of the keys ``(b, len(keys), kv_heads, d)``."""
    workload = arithmetic.workload
    scale = workload.head_dim**-0.5
    b, r, h, d = rows.q.shape
    if of_keys:
        dk = torch.zeros(
            b, len(keys), workload.kv_heads, d, dtype=torch.float64, device=arithmetic.device
        )
        sums = (dk, torch.zeros_like(dk))
    else:
        sums = (torch.zeros(b, r, h, d, dtype=torch.float64, device=arithmetic.device),)
    for key_block, key_inputs, row_block, visible in _tiles(rows, keys, arithmetic):
        dq, dk, dv = arithmetic.backward(
            rows.dout[:, row_block], rows.q[:, row_block], key_inputs["k"], key_inputs["v"],
            rows.out[:, row_block], rows.lse[..., row_block], visible, scale,
        )  # fmt: skip
        if of_keys:
            sums[0][:, key_block] += dk
            sums[1][:, key_block] += dv
        else:
            sums[0][:, row_block] += dq
    return sums


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over ``group`` (nothing to do without a group: a world of one)."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _Progress:
    """Reports ``"<label> (38%), 120 s elapsed, ~200 s left"`` at most every ``every_s`` seconds
    while ``rows`` attend to the keys ``0 .. seq_len - 1`` in order."""

    def __init__(self, label, rows: torch.Tensor, seq_len, causal, callback, every_s):
        self.label, self.callback, self.every_s = label, callback, every_s
        self.rows, self.causal = rows.double() + 1, causal  # keys each row sees, when causal
        self.total = self._pairs(seq_len)
        self.start = self.last = time.perf_counter()

    def _pairs(self, keys_seen: int) -> float:
        if self.causal:
            return self.rows.clamp(max=keys_seen).sum().item()
        return float(len(self.rows) * keys_seen)

    def keys_done(self, keys: int) -> None:
        """Keys ``0 .. keys - 1`` are done."""
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        self.callback(progress_text(self.label, self._pairs(keys) / self.total, now - self.start))


def _sampled_values(
    arithmetic: _Arithmetic,
    sample: torch.Tensor,
    own: torch.Tensor,
    group,
    own_rows: _Rows | None,
) -> dict[str, torch.Tensor]:
    """``out``, ``lse`` (and with ``own_rows``, the rank's rows with their final ``out``/``lse``:
    ``dq``, ``dk``, ``dv``) at the sampled positions, summed over every rank's share."""
    rows = _Rows.build(arithmetic, sample)
    out, lse = _attend(arithmetic, rows, own)
    rows.out, rows.lse = merge_across_ranks(out, lse, group, return_lse=True)
    values = {"out": rows.out, "lse": rows.lse}
    if own_rows is None:
        return values
    (values["dq"],) = _gradients(arithmetic, rows, own, of_keys=False)
    values["dk"], values["dv"] = _gradients(arithmetic, own_rows, sample, of_keys=True)
    for name in ("dq", "dk", "dv"):
        _all_reduce(values[name], group)
    return values


@dataclass
class SampledCheck:
    """Result of :func:`verify_sampled` (the same on every rank)."""

    positions: int
    """Sampled global positions: rows for ``out``, ``lse``, ``dq``; columns for ``dk``, ``dv``."""
    errors: dict[str, float]
    """``max |ring - ref| / max |ref|`` over the samples, per output."""
    tolerance: dict[str, float]
    kernel_errors: dict[str, float] | None
    """Low precision: the same kernel's own error at the samples, which sets the tolerance."""
    seconds: float
    """Wall time of the verification, reference included."""

    @property
    def passed(self) -> bool:
        return all(err <= self.tolerance[name] for name, err in self.errors.items())


def relative_errors(
    values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, float]:
    """``max |value - ref| / max |ref|`` per name, computed in float64 (NaN where a value is
    NaN: no comparison passes it)."""
    errors = {}
    for name, got in values.items():
        ref = reference[name].double()
        scale = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        errors[name] = ((got.double() - ref).abs().max() / scale).item()
    return errors


def _ring_errors(outputs, reference, sample, own, group) -> dict[str, float]:
    """``max |ring - ref| / max |ref|`` per output over the samples; each rank compares the
    sampled positions it holds (non-finite ring values count as infinitely wrong)."""
    order = torch.argsort(own)
    found = torch.searchsorted(own[order], sample).clamp(max=len(own) - 1)
    held = own[order][found] == sample
    local = order[found[held]]
    sampled = held.nonzero().squeeze(1)
    names = list(outputs)
    device = reference["out"].device
    local, sampled = local.to(device), sampled.to(device)
    worst = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i, name in enumerate(names):
        dim = 2 if name == "lse" else 1
        got = outputs[name].index_select(dim, local).double()
        ref = reference[name].index_select(dim, sampled)
        if got.numel():
            worst[i] = torch.nan_to_num((got - ref).abs(), nan=float("inf")).max()
    _all_reduce(worst, group, dist.ReduceOp.MAX)
    return {
        name: (worst[i] / reference[name].abs().max().clamp_min(1e-300)).item()
        for i, name in enumerate(names)
    }


def verify_sampled(
    workload: Workload,
    outputs: dict[str, torch.Tensor],
    *,
    samples: int = 256,
    group: GroupLike = None,
    progress: Callable[[str], None] | None = None,
    every_s: float = 30.0,
) -> SampledCheck:
    """Check this rank's ring results against a float64 reference at sampled positions.

    Call on every rank of ``group`` after the ring ran on ``workload`` (inputs from
    :meth:`Workload.inputs`, sharded by ``workload.layout``, default scale).

    Args:
        outputs: this rank's ``out`` ``(batch, seq_local, heads, head_dim)`` and ``lse``
            ``(batch, heads, seq_local)``, and for a backward check ``dq`` like ``out`` and
            ``dk``, ``dv`` ``(batch, seq_local, kv_heads, head_dim)`` (gradients for ``dout``).
        samples: how many global positions to check (see :func:`sample_positions`).
        progress: called with a line of text every ``every_s`` seconds while the float64 forward
            over all rows runs (backward checks only; it is the long part).

    Returns the errors, tolerances and verdict, the same on every rank.
    """
    start = time.perf_counter()
    process_group = resolve_group(group)
    rank, world = group_rank_and_size(process_group)
    device = outputs["out"].device
    sample = sample_positions(workload, world, samples)
    own = get_layout(workload.layout).positions(rank, world, workload.seq_len // world)
    exact = _exact(workload, device)
    own_rows = None
    if "dq" in outputs:  # dk/dv need lse and delta of every row: float64 forward over all rows
        own_rows = _Rows.build(exact, own)
        tracker = None
        if progress is not None:
            label = f"float64 reference forward over all {workload.seq_len:,} rows"
            tracker = _Progress(label, own, workload.seq_len, workload.causal, progress, every_s)
        own_rows.out, own_rows.lse = _attend(
            exact, own_rows, torch.arange(workload.seq_len), tracker
        )
    reference = _sampled_values(exact, sample, own, process_group, own_rows)
    kernel_errors = None
    if workload.dtype in LOW_PRECISION:
        kernel = _same_kernel(workload, device)
        kernel_rows = None
        if own_rows is not None:
            kernel_rows = _Rows.build(kernel, own)
            kernel_rows.out, kernel_rows.lse = own_rows.out, own_rows.lse
        estimate = _sampled_values(kernel, sample, own, process_group, kernel_rows)
        kernel_errors = relative_errors(estimate, reference)
    errors = _ring_errors(
        {name: outputs[name] for name in reference}, reference, sample, own, process_group
    )
    return SampledCheck(
        positions=len(sample),
        errors=errors,
        tolerance=tolerances(workload.dtype, errors, kernel_errors),
        kernel_errors=kernel_errors,
        seconds=time.perf_counter() - start,
    )
