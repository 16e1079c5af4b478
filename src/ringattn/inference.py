"""Long-context inference from a KV cache sharded over the ranks of a group.

Prefill runs ring attention over the sharded prompt and keeps each rank's shard of keys/values.
New tokens (decode steps, or chunks of a prompt fed after the first) arrive replicated on every
rank, as a context-parallel model computes them; each new token's key/value is stored on one rank,
round-robin by position, so the cache stays balanced as it grows. Attention of the new queries is
computed by every rank against its own slice, and the partial results are merged exactly with one
log-sum-exp reduction — a max, then one sum of the rescaled outputs and denominators — so a decode
step costs two all-reduces (O(log p) latency), not p ring steps:

    m = max_r lse_r,   out = sum_r exp(lse_r - m) out_r / sum_r exp(lse_r - m),
    lse = m + log(sum_r exp(lse_r - m)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .api import positions as layout_positions
from .api import ring_attention
from .checks import sinks_problem
from .comm import GroupLike, all_reduce_bounded, group_rank_and_size, resolve_group
from .kernels import masked_kernel_for, select_kernel
from .layout import LayoutName
from .merge import empty_partial, merge_partial, with_sinks

_EMPTY_SLOT = -1


class _LayerCache:
    """One layer's slice: keys/values ``(batch, capacity, heads_kv, head_dim)`` and the global
    position of every slot ``(batch, capacity)`` (``-1`` when empty)."""

    def __init__(self, batch, heads_kv, head_dim, head_dim_v, capacity, dtype, device):
        self.k = torch.zeros(batch, capacity, heads_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, capacity, heads_kv, head_dim_v, dtype=dtype, device=device)
        self.pos = torch.full((batch, capacity), _EMPTY_SLOT, dtype=torch.long, device=device)
        self.filled = torch.zeros(batch, dtype=torch.long)  # slots used per sequence

    def ensure_capacity(self, needed: int) -> None:
        capacity = self.k.shape[1]
        if needed <= capacity:
            return
        grown = max(needed, 2 * capacity)
        pad = grown - capacity
        self.k = torch.cat([self.k, self.k.new_zeros(self.k.shape[0], pad, *self.k.shape[2:])], 1)
        self.v = torch.cat([self.v, self.v.new_zeros(self.v.shape[0], pad, *self.v.shape[2:])], 1)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], pad), -1)], 1)

    def append(self, row: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store tokens ``k``/``v`` ``(n, heads_kv, head_dim)`` at global positions ``pos``."""
        start = int(self.filled[row])
        self.ensure_capacity(start + len(pos))
        self.k[row, start : start + len(pos)] = k
        self.v[row, start : start + len(pos)] = v
        self.pos[row, start : start + len(pos)] = pos
        self.filled[row] = start + len(pos)


class KVCache:
    """Each rank's slice of a KV cache for ``num_layers`` layers and ``batch`` sequences.

    Args:
        num_layers: attention layers that share the cache.
        batch: sequences decoded together (their lengths may differ).
        heads_kv, head_dim: key/value heads and head size.
        head_dim_v: the values' head size when it differs from the keys' (MLA).
        capacity: initial slots per rank and sequence; the cache grows by doubling.
        group: a ProcessGroup, a 1-D DeviceMesh or ``None`` (default group; a world of one when
            ``torch.distributed`` is not initialised).

    Use per layer, in order: ``prefill`` once with the sharded prompt, then ``extend`` with the
    new tokens of every decode step (or later prompt chunks). ``lengths`` counts the tokens each
    sequence has so far (the same on every rank).
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads_kv: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 256,
        group: GroupLike = None,
        head_dim_v: int | None = None,
    ):
        self.group = resolve_group(group)
        self.rank, self.world_size = group_rank_and_size(self.group)
        self.layers = [
            _LayerCache(
                batch,
                heads_kv,
                head_dim,
                head_dim if head_dim_v is None else head_dim_v,
                capacity,
                dtype,
                torch.device(device),
            )
            for _ in range(num_layers)
        ]
        self.lengths = [torch.zeros(batch, dtype=torch.long) for _ in range(num_layers)]
        self.batch = batch

    def local_tokens(self, layer: int = 0) -> list[int]:
        """Tokens of each sequence held by this rank (for balance checks)."""
        return self.layers[layer].filled.tolist()

    def prefill(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        lengths: torch.Tensor | None = None,
        layout: LayoutName = "zigzag",
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal ring attention over the prompt, keeping this rank's keys/values.

        Args:
            q: ``(batch, seq_local, heads_q, head_dim)``, this rank's shard (:func:`shard`).
            k, v: ``(batch, seq_local, heads_kv, head_dim | head_dim_v)``, same layout.
            lengths: ``(batch,)`` real prompt lengths when sequences are right-padded to one
                length; positions at or past a sequence's length are padding.
            layout: the layout the prompt was sharded in.
            sinks: the layer's attention-sink logits ``(heads_q,)``, if it has them (see
                :func:`ringattn.ring_attention`).

        Returns:
            ``(batch, seq_local, heads_q, head_dim_v)`` attention output of this rank's shard.
        """
        if self.lengths[layer].any():
            raise RuntimeError(f"layer {layer} is already prefilled; feed new tokens to extend()")
        seq_local = q.shape[1]
        padded = seq_local * self.world_size
        pos = layout_positions(padded, layout, self.group).to(q.device)
        lengths = torch.full((self.batch,), padded) if lengths is None else lengths.cpu().long()
        valid = pos[None, :] < lengths.to(q.device)[:, None]
        out = ring_attention(
            q,
            k,
            v,
            causal=True,
            layout=layout,
            group=self.group,
            attention_mask=valid if lengths.lt(padded).any() else None,
            sinks=sinks,
        )
        cache = self.layers[layer]
        for row in range(self.batch):
            keep = valid[row]
            cache.append(row, k[row, keep], v[row, keep], pos[keep])
        self.lengths[layer] = lengths.clone()
        return out

    def extend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend new tokens, replicated on every rank, to the cache plus themselves (causal).

        Args:
            q: ``(batch, new, heads_q, head_dim)``; the new tokens of sequence ``b`` sit at
                positions ``lengths[b] .. lengths[b] + new - 1``.
            k, v: ``(batch, new, heads_kv, head_dim | head_dim_v)``.
            sinks: the layer's attention-sink logits ``(heads_q,)``, if it has them.

        Returns:
            ``(batch, new, heads_q, head_dim)``, the same on every rank.
        """
        problem = sinks_problem(sinks, q)
        if problem:
            raise ValueError(f"KVCache.extend: {problem}")
        cache = self.layers[layer]
        new = q.shape[1]
        if new == 0:
            return q.new_zeros((*q.shape[:3], cache.v.shape[-1]))
        start = self.lengths[layer]
        q_pos = start[:, None] + torch.arange(new)[None, :]  # (batch, new)
        # every new query sees every key cached before this call: slots below the shortest
        # row's count need no mask (known on the host, so deciding costs no device sync)
        seen_by_all = int(cache.filled.min())
        for row in range(self.batch):
            mine = q_pos[row] % self.world_size == self.rank
            cache.append(row, k[row, mine], v[row, mine], q_pos[row, mine].to(cache.pos.device))
        self.lengths[layer] = start + new
        used = int(cache.filled.max())
        q_pos = q_pos.to(cache.pos.device)
        keys = (cache.k[:, :used], cache.v[:, :used], cache.pos[:, :used])
        out, lse = _cached_attention(q, *keys, q_pos, seen_by_all)
        if sinks is None:
            return merge_across_ranks(out, lse, self.group).to(q.dtype)
        out, lse = merge_across_ranks(out, lse, self.group, return_lse=True)
        return with_sinks(out, lse, sinks)[0].to(q.dtype)


EXTEND_TILE = 1024
""":meth:`KVCache.extend` attends keys every new query sees in fused kernel calls of at most
``EXTEND_TILE ** 2`` (query, key) pairs (``EXTEND_TILE`` queries against as many keys, or one
decode query against up to a million), and the rest — the new tokens themselves, empty slots of
shorter sequences — in masked calls of at most ``EXTEND_TILE`` queries x ``EXTEND_TILE`` keys:
a boolean mask of that many pairs per sequence and, on the reference kernel (a GPU's masked
path), float32 scores per sequence and query head (4 MiB) plus the call's keys and values
repeated to every query head in float32."""


def _cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys_pos: torch.Tensor,
    q_pos: torch.Tensor,
    seen_by_all: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``q`` ``(batch, new, heads_q, head_dim)`` at global positions
    ``q_pos`` ``(batch, new)`` over this rank's cached ``k``/``v`` ``(batch, used, heads_kv,
    head_dim)`` at ``keys_pos`` ``(batch, used)`` (``-1``: empty slot), of which the first
    ``seen_by_all`` slots are visible to every query. Returns ``(out, lse)`` in the
    accumulator dtype; runs no device sync."""
    out, lse = empty_partial(q, v.shape[-1])
    new, used = q.shape[1], k.shape[1]
    main = select_kernel("auto", q, v.shape[-1])
    masked = masked_kernel_for(main, needs_score_mod=False)
    scale = q.shape[-1] ** -0.5
    rows_per_call = min(new, EXTEND_TILE)
    cols_per_call = max(EXTEND_TILE, EXTEND_TILE**2 // rows_per_call)
    spans = [
        (k0, min(seen_by_all, k0 + cols_per_call)) for k0 in range(0, seen_by_all, cols_per_call)
    ]
    spans += [(k0, min(used, k0 + EXTEND_TILE)) for k0 in range(seen_by_all, used, EXTEND_TILE)]
    for q0 in range(0, new, rows_per_call):
        rows = slice(q0, min(new, q0 + rows_per_call))
        for k0, k1 in spans:
            args = (q[:, rows], k[:, k0:k1], v[:, k0:k1])
            if k1 <= seen_by_all:
                out_t, lse_t = main.forward(*args, causal=False, scale=scale)
            else:
                slots = keys_pos[:, None, k0:k1]
                mask = ((slots >= 0) & (slots <= q_pos[:, rows, None]))[:, None]
                out_t, lse_t = masked.forward(*args, causal=False, scale=scale, mask=mask)
                lse_t = lse_t.masked_fill(~mask.any(-1), float("-inf"))
            merge_partial(out[:, rows], lse[:, :, rows], out_t, lse_t)
    return out, lse


def merge_across_ranks(
    out: torch.Tensor, lse: torch.Tensor, group: GroupLike = None, return_lse: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of every rank's partial attention ``(out, lse)`` with two all-reduces.

    Args:
        out: ``(batch, seq, heads, head_dim)`` partial output over this rank's keys (fp32).
        lse: ``(batch, heads, seq)`` its log-sum-exp (``-inf`` where no key was visible).
        return_lse: also return the merged log-sum-exp.

    Returns:
        The attention output over all ranks' keys, ``(batch, seq, heads, head_dim)``; rows that
        see no key anywhere are 0 (and their log-sum-exp ``-inf``).
    """
    process_group = resolve_group(group)
    _, world_size = group_rank_and_size(process_group)
    if world_size == 1:
        return (out, lse) if return_lse else out
    top = lse.clone()
    all_reduce_bounded(top, process_group, "merging the ranks' attention", dist.ReduceOp.MAX)
    reference = top.masked_fill(torch.isinf(top), 0.0)
    weight = torch.exp(lse - reference)  # 0 for ranks that saw nothing
    weighted = out * weight.transpose(1, 2).unsqueeze(-1)
    packed = torch.cat([weighted.flatten(), weight.flatten()])
    all_reduce_bounded(packed, process_group, "merging the ranks' attention")
    numerator = packed[: weighted.numel()].view_as(weighted)
    total = packed[weighted.numel() :].view_as(weight)
    denominator = total.transpose(1, 2).unsqueeze(-1)
    merged = numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    return (merged, reference + total.log()) if return_lse else merged
