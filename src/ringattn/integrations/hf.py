"""Hugging Face ``transformers`` integration: context parallelism for HF models via ring attention.

Every rank of the context-parallel group runs the *whole* model on its own shard of the sequence
(shards in one of ringattn's layouts) with the *global* ``position_ids`` of its tokens, so RoPE
phases match the unsharded run. Every attention layer then calls :func:`ringattn.ring_attention`
instead of eager/SDPA attention, which makes the result exact: the unsharded logits equal those of
the single-process model, and the summed parameter gradients equal the single-process ones.

.. code-block:: python

    import ringattn
    from ringattn.integrations import hf

    hf.register()                                   # attn_implementation "ring", zigzag layout
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ring")
    batch = tokenizer(texts, return_tensors="pt", padding=True)      # same full batch on every rank
    local = hf.shard_batch(batch, shift_labels=True)                  # this rank's shard
    logits = model(
        input_ids=local["input_ids"],
        attention_mask=local["attention_mask"],
        position_ids=local["position_ids"],
        use_cache=False,
    ).logits
    loss = hf.cp_loss(logits, local["labels"])      # exact global mean token loss
    loss.backward()
    # each rank holds a partial sum of every parameter gradient: all-reduce with SUM over the
    # context-parallel group (not an average) before the optimizer step.

Packed documents: :func:`shard_batch` derives HF's ``cu_seq_lens_q/k`` from restarting
``position_ids``; passed to the model they reach the attention function, which masks across
documents (``ring_attention(cu_seqlens=...)``).

Attention sinks (gpt-oss): the layer's ``s_aux`` parameter, ``(heads,)`` logits, becomes
``ring_attention(sinks=...)`` on sliding-window and full layers alike; its gradient on each rank
covers that rank's rows, so the SUM all-reduce above makes it exact like every other gradient.
Multi-head latent attention (DeepSeek-V2/V3): the value head dim may differ from the query/key
head dim (transformers passes ``value`` unpadded to every implementation but flash-attn's).

Contract (checked against transformers 5.x): the attention function gets
``(module, query, key, value, attention_mask, scaling=, dropout=, **kwargs)`` with ``query``
``(batch, heads, seq_local, head_dim)``, un-repeated ``key`` ``(batch, kv_heads, seq_local,
head_dim)`` and ``value`` ``(batch, kv_heads, seq_local, head_dim_v)``, and returns
``(out (batch, seq_local, heads, head_dim_v), None)``. The mask function registered for the same
name never builds a dense mask: it passes the 2-D padding mask of this rank's shard through to the
attention function (or ``None``).
"""

from __future__ import annotations

import contextvars
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn.api import CallOptions, mask_for_call
from ringattn.checks import MaskArgs
from ringattn.comm import (
    GroupLike,
    all_reduce_bounded,
    group_rank_and_size,
    resolve_group,
    split_context,
)
from ringattn.engine import Granularity
from ringattn.layout import Layout, LayoutName

__all__ = [
    "ForwardMasks",
    "cp_loss",
    "generate_greedy",
    "make_attention_function",
    "make_mask_function",
    "packed_cu_seqlens",
    "register",
    "shard_batch",
]

IGNORE_INDEX = -100


class ForwardMasks:
    """What the mask function hands every attention layer of one forward pass: this rank's 2-D
    padding mask, and the :class:`ringattn.RingMask` s planned from it — one per kind of
    attention layer (causality, sliding window, packed documents), built by the first layer of
    that kind with one check across ranks (plus one all-gather of the padding mask) and reused
    by the others at no cost."""

    def __init__(self, padding: torch.Tensor | None):
        self.padding = padding
        self._planned: list[tuple[tuple, torch.Tensor | None, ringattn.RingMask]] = []

    def find(self, kind: tuple, cu_seqlens: torch.Tensor | None) -> ringattn.RingMask | None:
        """The mask planned for layers of ``kind`` with these documents, if any."""
        for known, documents, mask in self._planned:
            if known == kind and documents is cu_seqlens:
                return mask
        return None

    def remember(
        self, kind: tuple, cu_seqlens: torch.Tensor | None, mask: ringattn.RingMask
    ) -> None:
        self._planned.append((kind, cu_seqlens, mask))


def make_mask_function() -> Callable[..., ForwardMasks | torch.Tensor]:
    """A mask function for ``transformers``' ``AttentionMaskInterface`` that builds no dense mask.

    It returns a :class:`ForwardMasks` holding the 2-D padding mask ``(batch, seq_local)`` of
    this rank's shard (or ``None``); the attention function plans a :class:`ringattn.RingMask`
    from it once per forward and kind of layer. Causality, sliding windows and softcapping come
    from the layers; any other ``mask_function`` pattern (e.g. image-token overlays) is not
    supported.
    """

    def ring_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        # transformers calls mask functions with keyword arguments only, and their names changed
        # between versions (cache_position in 4.53, q_length/q_offset in 5.x): only the 2-D
        # padding mask matters here.
        if attention_mask is not None and attention_mask.dim() != 2:
            return attention_mask  # the attention function rejects it with a clear error
        return ForwardMasks(attention_mask)

    return ring_mask


def _window(module: torch.nn.Module, kwargs: Mapping[str, Any], causal: bool):
    """ringattn ``window`` for the layer's HF ``sliding_window`` (``None`` when it has none).

    HF's causal sliding window ``w`` keeps key ``j`` for query ``i`` iff ``i - w < j <= i``
    (``masking_utils.sliding_window_overlay``; flash-attn gets ``window_size=(w - 1, ...)``), i.e.
    ``w`` tokens including the query itself: ringattn's ``window=(w - 1, 0)``. The bidirectional
    variant keeps ``|i - j| <= w``: ``window=(w, w)``.
    """
    if "sliding_window" in kwargs:
        sliding_window = kwargs["sliding_window"]
    else:
        sliding_window = getattr(module, "sliding_window", None)
    if sliding_window is None:
        return None
    sliding_window = int(sliding_window)
    if sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _packed_cu_seqlens(kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The global document boundaries of a packed batch from HF's ``cu_seq_lens_q/k``."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        return cu_q if cu_k is None else cu_k
    if cu_q.shape != cu_k.shape or not torch.equal(cu_q, cu_k.to(cu_q.device)):
        raise ValueError(
            "ring attention needs the same packed documents for queries and keys, got "
            f"cu_seq_lens_q={cu_q.tolist()} and cu_seq_lens_k={cu_k.tolist()}"
        )
    return cu_q


def packed_cu_seqlens(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Cumulative document lengths ``[0, l1, l1 + l2, ..., seq]`` (int32) of a packed sequence,
    read from its ``position_ids`` ``(seq,)`` or ``(1, seq)`` as HF does: a document starts at
    every real token (``attention_mask`` 1, if given) whose position is not its predecessor + 1.
    ``None`` when nothing restarts, and for batches of several rows, which HF does not treat as
    packed either (pass ``cu_seq_lens_q/k`` yourself to pack those)."""
    flat = position_ids.reshape(1, -1) if position_ids.dim() == 1 else position_ids
    if flat.shape[0] != 1:
        return None
    restarts = flat[0, 1:] != flat[0, :-1] + 1
    if attention_mask is not None:
        restarts &= attention_mask.reshape(-1)[1:].bool()
    if not restarts.any():
        return None
    starts = restarts.nonzero().flatten() + 1
    ends = torch.tensor([0, flat.shape[1]], device=flat.device)
    return torch.cat([ends[:1], starts, ends[1:]]).to(torch.int32)


def make_attention_function(
    layout: LayoutName | Layout = "zigzag", group: GroupLike = None
) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function for ``transformers``' ``AttentionInterface`` that runs ring attention.

    The returned function takes ``(module, query, key, value, attention_mask, scaling=None,
    dropout=0.0, **kwargs)`` with ``query`` ``(batch, heads, seq_local, head_dim)``, ``key``
    ``(batch, kv_heads, seq_local, head_dim)`` and ``value`` ``(batch, kv_heads, seq_local,
    head_dim_v)`` of this rank's shard (in ``layout``; ``head_dim_v`` may differ from
    ``head_dim``, as in DeepSeek's multi-head latent attention), and returns ``(out, None)`` with
    ``out`` ``(batch, seq_local, heads, head_dim_v)``.
    ``attention_mask`` must be ``None`` or this rank's 2-D padding mask ``(batch, seq_local)``
    (1/True = real token). Causality comes from ``kwargs["is_causal"]`` or ``module.is_causal``,
    the sliding window from ``kwargs["sliding_window"]`` or ``module.sliding_window``,
    ``kwargs["softcap"]`` becomes :func:`ringattn.softcap`, and ``kwargs["s_aux"]`` (gpt-oss's
    learnable attention sinks, ``(heads,)`` logits) becomes ``ring_attention(sinks=...)``, with
    gradients. Packed sequences come as HF's ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword
    arguments (the *global* cumulative document lengths, as :func:`shard_batch` returns them) and
    keep attention inside each document. ``dropout`` (HF passes the config's
    ``attention_dropout`` in training, 0 in eval) becomes ``ring_attention(dropout_p=)``: the
    world-size-invariant dropout of :mod:`ringattn.dropout`, one seed drawn per layer call from
    torch's default generator (seed every rank alike), not the mask eager attention would draw.
    Returned attention weights and KV caches with past tokens are not supported and raise.

    Layers share the masks the mask function planned for the forward (:class:`ForwardMasks`):
    the first layer of each kind (causality, sliding window, documents) plans and checks it with
    its call, sinks included, and the other layers of that kind reuse it without a collective.
    """

    def ring_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if kwargs.get("output_attentions"):
            raise ValueError("ring attention cannot return attention weights")
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"ring attention needs as many keys as queries on every rank (got "
                f"{query.shape[2]} queries and {key.shape[2]} keys): a KV cache with past tokens "
                "is not supported; call the model with use_cache=False"
            )
        planned = attention_mask if isinstance(attention_mask, ForwardMasks) else None
        padding = planned.padding if planned is not None else attention_mask
        if padding is not None and padding.dim() != 2:
            raise ValueError(
                "ring attention takes only a 2-D padding mask (batch, seq_local) of this rank's "
                f"shard, got a {padding.dim()}-D mask of shape "
                f"{tuple(padding.shape)}; pass a 2-D attention_mask to the model"
            )
        cu_seqlens = _packed_cu_seqlens(kwargs)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        is_causal = bool(is_causal)
        window = _window(module, kwargs, is_causal)
        softcap = kwargs.get("softcap")
        score_mod = None if softcap is None else ringattn.softcap(float(softcap))
        sinks = kwargs.get("s_aux")  # gpt-oss: the layer's (heads,) sink logits, a parameter
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        kind = (is_causal, window, q.device)
        mask = None if planned is None else planned.find(kind, cu_seqlens)
        if mask is None:
            keywords = MaskArgs(
                causal=is_causal,
                window=window,
                cu_seqlens=cu_seqlens,
                attention_mask=None if padding is None else padding.bool(),
            )
            call = (scaling, score_mod, Granularity(), "auto", True)
            # the call agreed with the mask includes the sinks: no further check per layer
            options = CallOptions(dropout_p=float(dropout))
            mask = mask_for_call(
                q, k, v, keywords, layout, group, *call, sinks=sinks, options=options
            )
            if planned is not None:
                planned.remember(kind, cu_seqlens, mask)
        out = ringattn.ring_attention(
            q,
            k,
            v,
            mask=mask,
            scale=scaling,
            score_mod=score_mod,
            sinks=sinks,
            dropout_p=float(dropout),
        )
        return out, None

    return ring_attention_forward


def register(
    name: str = "ring", layout: LayoutName | Layout = "zigzag", group: GroupLike = None
) -> str:
    """Register ring attention with ``transformers`` as ``attn_implementation=name``.

    Registers the attention function (:func:`make_attention_function`) through
    ``transformers.AttentionInterface.register`` and a mask function of the same name
    (:func:`make_mask_function`) through ``transformers.masking_utils.AttentionMaskInterface``, so
    no dense ``(seq, seq)`` mask is ever built. Use it with
    ``from_pretrained(..., attn_implementation=name)`` or ``model.set_attn_implementation(name)``.
    Inputs must be sharded in ``layout`` over ``group`` (see :func:`shard_batch`). ``group`` may
    be a ``(ulysses, ring)`` DeviceMesh (:func:`ringattn.context_mesh`): pass the same mesh to
    :func:`shard_batch` and :func:`cp_loss`, and sum parameter gradients over all its ranks.
    Registering the same name again replaces the previous functions. Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, make_attention_function(layout=layout, group=group))
    AttentionMaskInterface.register(name, make_mask_function())
    return name


def shard_batch(
    batch: Mapping[str, Any],
    layout: LayoutName | Layout = "zigzag",
    group: GroupLike = None,
    *,
    shift_labels: bool = False,
    pad_token_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """This rank's shard of a full batch, plus the global ``position_ids`` for RoPE.

    ``batch`` holds full-sequence tensors, identical on every rank: ``input_ids`` ``(batch, seq)``
    and optionally ``attention_mask`` ``(batch, seq)`` (1 = real token), ``labels``
    ``(batch, seq)`` and ``position_ids`` ``(batch | 1, seq)``. Returns a new dict where these are
    sharded along dim 1 into ``(batch, seq_local)`` tensors (``seq_local`` =
    ``ringattn.padded_length(seq, layout, world_size) // world_size``), with ``position_ids``
    ``(batch, seq_local)`` added (the global positions of this rank's tokens) when absent; other
    entries are copied unchanged. A length the layout cannot split is padded at the end
    (``input_ids`` with ``pad_token_id``, ``attention_mask`` with 0 — created if absent —,
    ``labels`` with ``ignore_index``), and the padding mask hides it.

    Packed sequences (several documents in one row, batch size 1, as HF's
    ``DataCollatorWithFlattening`` makes them): pass ``position_ids`` that restart at every
    document, and ``cu_seq_lens_q`` / ``cu_seq_lens_k`` if you have them. They stay global
    (unsharded); when absent they are derived from ``position_ids`` (:func:`packed_cu_seqlens`).
    Pass them to the model with the other entries (``model(**local)`` minus ``labels``): the ring
    then keeps attention inside each document, and ``shift_labels`` ignores each document's last
    token (its successor belongs to the next document).

    ``shift_labels=True`` is what causal-LM training under context parallelism needs: the
    next-token shift must happen on the *global* sequence, before sharding (a token's successor
    usually lives on another rank). It sets ``labels[:, t] = source[:, t + 1]`` and
    ``labels[:, -1] = ignore_index``, where ``source`` is ``batch["labels"`` if given, else
    ``input_ids`` with padding tokens (``attention_mask == 0``) set to ``ignore_index``; the
    result is then sharded. Such labels are already shifted: pass them to :func:`cp_loss`, never as
    ``labels=`` to the model (its loss would shift them again, within the shard).
    """
    if "input_ids" not in batch:
        raise ValueError("shard_batch needs batch['input_ids'] of shape (batch, seq)")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    bsz, seq_len = input_ids.shape
    ring_group, ulysses = split_context(group)
    _, world_size = group_rank_and_size(ring_group)
    pieces = ulysses.size if ulysses else 1
    padded = ringattn.padded_length(seq_len, layout, world_size, ulysses=pieces)

    out = dict(batch)
    tensors: dict[str, tuple[torch.Tensor, int]] = {"input_ids": (input_ids, pad_token_id)}
    attention_mask = batch.get("attention_mask")
    if attention_mask is None and padded != seq_len:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask is not None:
        tensors["attention_mask"] = (attention_mask, 0)
    cu_seqlens = _packed_cu_seqlens(batch)
    if cu_seqlens is None and batch.get("position_ids") is not None:
        cu_seqlens = packed_cu_seqlens(batch["position_ids"], batch.get("attention_mask"))
    labels = batch.get("labels")
    if shift_labels:
        source = labels
        if source is None:
            source = input_ids
            if attention_mask is not None:
                source = source.masked_fill(attention_mask == 0, ignore_index)
        labels = torch.cat([source[:, 1:], source.new_full((bsz, 1), ignore_index)], dim=1)
        if cu_seqlens is not None:  # a document's last token has no successor in the document
            labels[:, cu_seqlens[1:].long() - 1] = ignore_index
    if labels is not None:
        tensors["labels"] = (labels, ignore_index)
    if batch.get("position_ids") is not None:
        position_ids = batch["position_ids"].expand(bsz, -1)
        tail = torch.arange(seq_len, padded, device=position_ids.device)
        tensors["position_ids"] = (position_ids, None)
    for key, (tensor, pad_value) in tensors.items():
        if tensor.shape[:2] != (bsz, seq_len):
            raise ValueError(
                f"batch[{key!r}] must have shape ({bsz}, {seq_len}, ...) like input_ids, "
                f"got {tuple(tensor.shape)}"
            )
        if padded != seq_len:
            if key == "position_ids":
                pad = tail.to(tensor.dtype).expand(bsz, -1)
            else:
                pad = tensor.new_full((bsz, padded - seq_len, *tensor.shape[2:]), pad_value)
            tensor = torch.cat([tensor, pad], dim=1)
        out[key] = ringattn.shard(tensor, layout=layout, dim=1, group=group)
    if "position_ids" not in tensors:
        pos = ringattn.positions(seq_len, layout=layout, group=group)
        out["position_ids"] = pos.to(input_ids.device).unsqueeze(0).expand(bsz, -1)
    if cu_seqlens is not None:
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seqlens
    return out


def cp_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: GroupLike = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Exact global mean token cross-entropy over all ranks of the context-parallel group.

    ``logits`` ``(batch, seq_local, vocab)`` and ``labels`` ``(batch, seq_local)`` are this rank's
    shard, with labels already aligned to the logits (shifted on the global sequence, see
    :func:`shard_batch`). The per-token loss sum and the count of labels ``!= ignore_index`` are
    summed over ``group``; every rank returns the same scalar, ``global_sum / global_count``
    (0 if no label counts), in float32.

    Gradients: backward on each rank differentiates ``local_sum / global_count`` — this rank's
    share of the global mean — so the sum over ranks of the parameter gradients is exactly the
    gradient of the global mean loss. All-reduce parameter gradients with SUM over the
    context-parallel group (if a data-parallel wrapper averages over it instead, multiply by the
    context-parallel world size).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree on all "
            "but the last dimension"
        )
    flat_labels = labels.reshape(-1).to(logits.device)
    local_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        flat_labels,
        ignore_index=ignore_index,
        reduction="sum",
    )
    stats = torch.stack([local_sum.detach(), (flat_labels != ignore_index).sum().to(torch.float32)])
    ring_group, ulysses = split_context(group)
    _, world_size = group_rank_and_size(ring_group)
    groups = ([ulysses.group] if ulysses else []) + ([ring_group] if world_size > 1 else [])
    for process_group in groups:  # a (ulysses, ring) mesh: over both dims
        if torch.compiler.is_compiling():  # traceable: no async collective
            dist.all_reduce(stats, group=process_group)
        else:
            all_reduce_bounded(stats, process_group, "summing the loss over the ranks")
    total, count = stats[0], stats[1].clamp_min(1.0)
    return (local_sum + (total - local_sum.detach())) / count


@dataclass
class _Generation:
    """The state of one :func:`generate_greedy` call, seen by its attention function."""

    cache: ringattn.KVCache
    lengths: torch.Tensor
    layout: LayoutName | Layout
    head_dim: int
    prefilling: bool = True


_GENERATION: contextvars.ContextVar[_Generation | None] = contextvars.ContextVar(
    "ringattn_hf_generation", default=None
)
_GENERATION_NAME = "ringattn_kv_cache"


def _generation_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """The attention function of :func:`generate_greedy`, registered once under
    ``"ringattn_kv_cache"``. It holds no state: the running generation's cache lives in a
    context variable that the call clears when it returns, so no cache outlives its call."""
    generation = _GENERATION.get()
    if generation is None:
        raise RuntimeError("the 'ringattn_kv_cache' attention runs only inside generate_greedy")
    if _window(module, kwargs, True) is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError("generate_greedy supports plain causal attention only")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(
            "generate_greedy needs the same head dim for values as for queries, got "
            f"{value.shape[-1]} and {query.shape[-1]} (multi-head latent attention)"
        )
    if scaling is not None and abs(scaling - generation.head_dim**-0.5) > 1e-12:
        raise NotImplementedError(f"generate_greedy needs scaling head_dim**-0.5, got {scaling}")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    cache, sinks = generation.cache, kwargs.get("s_aux")
    if generation.prefilling:
        prefill = cache.prefill(
            module.layer_idx,
            q,
            k,
            v,
            lengths=generation.lengths,
            layout=generation.layout,
            sinks=sinks,
        )
        return prefill, None
    return cache.extend(module.layer_idx, q, k, v, sinks=sinks), None


def generate_greedy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    layout: LayoutName | Layout = "zigzag",
    group: GroupLike = None,
) -> torch.Tensor:
    """Greedy decoding: ring prefill of the sharded prompt, then decode steps from the sharded
    :class:`ringattn.KVCache` (two all-reduces per layer and step, not a ring pass).

    ``input_ids`` ``(batch, prompt_len)`` is the full prompt, the same on every rank, without
    padding. Returns the ``(batch, max_new_tokens)`` new tokens (int64), the same on every rank.
    Supports decoders with plain causal attention and the default ``head_dim ** -0.5`` scaling
    (Llama-style), with or without attention sinks (gpt-oss's ``s_aux``, applied at prefill and
    at every step); layers with sliding windows or soft-capping, and values of another head dim
    than the queries (multi-head latent attention), raise. The cache is freed when the call
    returns.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    try:
        count = operator.index(max_new_tokens)  # int, numpy or torch integers
    except TypeError:
        count = -1
    if count < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    max_new_tokens = count
    batch, prompt_len = input_ids.shape
    if max_new_tokens == 0:
        return input_ids.new_empty((batch, 0), dtype=torch.long)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    cache = ringattn.KVCache(
        config.num_hidden_layers,
        batch,
        config.num_key_value_heads,
        head_dim,
        dtype=param.dtype,
        device=param.device,
        group=group,
    )
    generation = _Generation(cache, torch.full((batch,), prompt_len), layout, head_dim)
    AttentionInterface.register(_GENERATION_NAME, _generation_attention)
    AttentionMaskInterface.register(_GENERATION_NAME, _no_mask)
    previous = config._attn_implementation
    _set_attn_implementation(model, _GENERATION_NAME)
    token = _GENERATION.set(generation)
    try:
        local = ringattn.shard(input_ids, layout, group=group)
        positions = ringattn.positions(prompt_len, layout, group=group).to(input_ids.device)
        logits = model(
            input_ids=local, position_ids=positions.expand(batch, -1), use_cache=False
        ).logits
        last = logits.new_zeros(batch, logits.shape[-1])
        owner = (positions == prompt_len - 1).nonzero()
        if len(owner):
            last = logits[:, int(owner[0])].clone()
        process_group = resolve_group(group)
        if group_rank_and_size(process_group)[1] > 1:
            # only the owner's row is non-zero
            all_reduce_bounded(last, process_group, "sharing the last prompt token's logits")
        tokens = [last.argmax(-1)]
        generation.prefilling = False
        for step in range(max_new_tokens - 1):
            position = torch.full((batch, 1), prompt_len + step, device=input_ids.device)
            logits = model(input_ids=tokens[-1][:, None], position_ids=position, use_cache=False)
            tokens.append(logits.logits[:, -1].argmax(-1))
    finally:
        _GENERATION.reset(token)
        _set_attn_implementation(model, previous)
    return torch.stack(tokens, 1)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function of the decoding attention: the cache knows what each query sees."""
    return None


def _set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.55
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
