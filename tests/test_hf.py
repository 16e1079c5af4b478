"""Hugging Face transformers integration: tiny random-weight models under context parallelism.

Every rank builds the same model (same seed), runs the single-process reference on the full batch
(eager attention), then runs the model on its own shard with ``attn_implementation="ring"``. The
unsharded logits must equal the reference logits at real tokens, ``cp_loss`` must equal the
reference mean loss, and the parameter gradients must equal the reference gradients after they are
all-reduced with SUM across ranks (each rank's gradient is only a partial sum: its own tokens'
contribution).
"""

from __future__ import annotations

import gc

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
from helpers import counting, reference_attention  # noqa: E402

import ringattn  # noqa: E402
from ringattn.integrations import hf  # noqa: E402

BATCH, SEQ, VOCAB = 2, 64, 128
TOL = 1e-5
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _config(kind: str):
    """The tiny config of a kind of model, and its causal-LM class."""
    if kind == "llama":
        config = transformers.LlamaConfig(**SMALL)
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral_window":  # sliding window 16 on every layer
        config = transformers.MistralConfig(**SMALL, sliding_window=16)
        cls = transformers.MistralForCausalLM
    elif kind == "qwen2_window":  # layer 0 full attention, layer 1 sliding window 16
        config = transformers.Qwen2Config(
            **SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=1
        )
        cls = transformers.Qwen2ForCausalLM
    elif kind == "gemma2_softcap":  # sliding / full layers, attention logits soft-capped at 0.5
        config = transformers.Gemma2Config(
            **SMALL, head_dim=16, sliding_window=16, attn_logit_softcapping=0.5
        )
        cls = transformers.Gemma2ForCausalLM
    elif kind == "gpt_oss":  # layer 0 sliding window 16, layer 1 full; learnable sinks; MoE
        config = transformers.GptOssConfig(
            **{**SMALL, "intermediate_size": 32, "max_position_embeddings": 131072},
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
            attention_dropout=0.0,
        )
        cls = transformers.GptOssForCausalLM
    elif kind == "deepseek_v3":  # MLA: qk head dim 24 (16 + rope 8), value head dim 16
        config = transformers.DeepseekV3Config(
            **{**SMALL, "num_key_value_heads": SMALL["num_attention_heads"]},
            moe_intermediate_size=32,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 MoE
            attention_dropout=0.0,
        )
        cls = transformers.DeepseekV3ForCausalLM
    elif kind == "gpt_oss_full":  # sinks on full attention only (what generate_greedy takes)
        config, cls = _config("gpt_oss")
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    else:
        raise ValueError(kind)
    return config, cls


def _model(kind: str):
    """Same random weights on every rank: seeded right before construction."""
    config, cls = _config(kind)
    torch.manual_seed(1234)
    model = cls(config).float()
    if kind.startswith("gpt_oss"):  # sinks of logit scale (init: std 0.02), so that they matter
        for layer in model.model.layers:
            layer.self_attn.sinks.data.normal_(0.0, 1.5)
    return model


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # newer transformers; 4.53 lacks it
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def _batch(padding: bool):
    gen = torch.Generator().manual_seed(99)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padding:
        attention_mask[1, SEQ - 21 :] = 0  # row 1 right-padded
        input_ids[1, SEQ - 21 :] = 0
    return input_ids, attention_mask


def _cp_matches_single_process(rank, world_size, kind, padding, layout):
    torch.manual_seed(0)
    name = hf.register(f"ring_{layout}", layout=layout)
    model = _model(kind)
    input_ids, attention_mask = _batch(padding)
    valid = attention_mask.bool()

    # single-process reference: HF's own shift, mean over non-ignored labels
    _set_attention(model, "eager")
    model.zero_grad()
    ref_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    ref_labels = input_ids.masked_fill(~valid, -100)
    ref_loss = torch.nn.functional.cross_entropy(
        ref_logits[:, :-1].reshape(-1, VOCAB), ref_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_logits = ref_logits.detach()

    # context parallel: this rank's shard, global positions, ring attention
    _set_attention(model, name)
    model.zero_grad()
    local = hf.shard_batch(
        {"input_ids": input_ids, "attention_mask": attention_mask}, layout=layout, shift_labels=True
    )
    logits = model(
        input_ids=local["input_ids"],
        attention_mask=local["attention_mask"],
        position_ids=local["position_ids"],
        use_cache=False,
    ).logits
    loss = hf.cp_loss(logits, local["labels"])
    loss.backward()

    full = ringattn.unshard(logits.detach(), layout=layout, seq_len=SEQ)
    scale = ref_logits[valid].abs().max()
    logit_err = ((full - ref_logits)[valid].abs().max() / scale).item()
    loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    grad_err = 0.0
    for n, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)  # each rank's gradient is a partial sum over its own tokens
        ref = ref_grads[n]
        err = ((grad - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        grad_err = max(grad_err, err)
    assert logit_err < TOL, f"rank {rank}: logits differ by {logit_err:.2e} (relative)"
    assert loss_err < TOL, f"rank {rank}: loss {loss.item()} vs {ref_loss.item()}"
    assert grad_err < TOL, f"rank {rank}: gradients differ by {grad_err:.2e} (relative)"
    return logit_err, loss_err, grad_err


CASES = [
    ("llama", False, "zigzag"),
    ("llama", True, "zigzag"),
    ("mistral_window", True, "zigzag"),
    ("qwen2_window", False, "striped"),
    ("gemma2_softcap", True, "contiguous"),
]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(("kind", "padding", "layout"), CASES)
def test_model_matches_single_process(pools, world_size, kind, padding, layout):
    pools(world_size).run(_cp_matches_single_process, kind, padding, layout)


@pytest.mark.parametrize(("kind", "padding", "layout"), [CASES[1], CASES[2]])
def test_model_matches_single_process_4_ranks(pools, kind, padding, layout):
    pools(4).run(_cp_matches_single_process, kind, padding, layout)


def _needs_architecture(name: str) -> None:
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")


@pytest.mark.parametrize(
    ("world_size", "padding", "layout"),
    [(2, True, "zigzag"), (3, False, "striped"), (4, True, "contiguous")],
)
def test_gpt_oss_sinks_match_single_process(pools, world_size, padding, layout):
    """gpt-oss: learnable attention sinks (``s_aux``, one ``(heads,)`` parameter per layer) on
    alternating sliding-window and full layers, MoE feed-forward. The sink gradients are among
    the gradients compared."""
    _needs_architecture("GptOssForCausalLM")
    pools(world_size).run(_cp_matches_single_process, "gpt_oss", padding, layout)


def test_gpt_oss_reference_uses_the_sinks():
    """The eager reference of the gpt-oss test depends on its sinks (so ignoring them fails)."""
    _needs_architecture("GptOssForCausalLM")
    model = _model("gpt_oss")
    _set_attention(model, "eager")
    input_ids, attention_mask = _batch(padding=True)
    with torch.no_grad():
        with_sinks = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))  # a sink of weight exp(-inf) = 0
        without = model(input_ids=input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    change = (with_sinks - without)[valid].abs().max() / with_sinks[valid].abs().max()
    assert change > 0.1, f"the sinks change the logits by only {change:.1e} (relative)"


@pytest.mark.parametrize(
    ("world_size", "padding", "layout"), [(2, True, "zigzag"), (3, False, "striped")]
)
def test_deepseek_v3_mla_matches_single_process(pools, world_size, padding, layout):
    """DeepSeek-V3: multi-head latent attention, whose query/key head dim (qk_nope + qk_rope =
    24) differs from the value head dim (16); a dense and a MoE layer."""
    _needs_architecture("DeepseekV3ForCausalLM")
    pools(world_size).run(_cp_matches_single_process, "deepseek_v3", padding, layout)


def test_greedy_generation_refuses_latent_attention():
    """generate_greedy's cache holds one head dim: MLA's values of another dim raise."""
    _needs_architecture("DeepseekV3ForCausalLM")
    with pytest.raises(NotImplementedError, match="same head dim for values"):
        hf.generate_greedy(_model("deepseek_v3"), torch.zeros(1, 4, dtype=torch.long), 2)


def _collectives_per_forward_job(rank, world_size, kind, padding):
    """Collectives of one forward+backward of a 6-layer model (its batch always carries an
    attention_mask, padded or all ones)."""
    name = hf.register("ring_counted")
    config = transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 6})
    if kind == "qwen2_window":  # layers 0-2 full attention, 3-5 a sliding window
        config = transformers.Qwen2Config(
            **{**SMALL, "num_hidden_layers": 6},
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=3,
        )
    if kind == "gpt_oss":  # sliding window / full layers alternate, every layer has sinks
        config, _ = _config("gpt_oss")
        config.num_hidden_layers = 6
        config.layer_types = ["sliding_attention", "full_attention"] * 3
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    _set_attention(model, name)
    input_ids, attention_mask = _batch(padding=padding)
    local = hf.shard_batch({"input_ids": input_ids, "attention_mask": attention_mask})
    with counting({}) as counts:
        logits = model(
            input_ids=local["input_ids"],
            attention_mask=local["attention_mask"],
            position_ids=local["position_ids"],
            use_cache=False,
        ).logits
        logits.sum().backward()
    return {name: n for name, n in counts.items() if name.startswith("collective")}


@pytest.mark.parametrize("padding", [False, True], ids=["all_ones", "padded"])
@pytest.mark.parametrize(
    ("kind", "kinds_of_layer"), [("llama", 1), ("qwen2_window", 2), ("gpt_oss", 2)]
)
def test_checks_cost_one_collective_per_forward_not_per_layer(pools, kind, kinds_of_layer, padding):
    """Per kind of attention layer and forward: one check across ranks, plus one all-gather
    of the padding mask when some rank has padding, whatever the number of layers (sinks
    included: the first layer of each kind agrees on its call with them)."""
    if kind == "gpt_oss":
        _needs_architecture("GptOssForCausalLM")
    for counts in pools(2).run(_collectives_per_forward_job, kind, padding):
        expected = (2 if padding else 1) * kinds_of_layer
        assert counts == {"collective all_gather": expected}, counts


def test_sliding_window_convention():
    """HF's sliding_window=w keeps key j for query i iff i - w < j <= i: ringattn (w - 1, 0)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    w, n = 4, 12
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    hf_allowed = sliding_window_causal_mask_function(w)(0, 0, i, j)
    left, right = hf._window(torch.nn.Module(), {"sliding_window": w}, causal=True)
    assert torch.equal(hf_allowed, (j <= i) & (j >= i - left) & (j <= i + right))
    assert hf._window(torch.nn.Module(), {"sliding_window": None}, causal=True) is None


def test_shard_batch_shifts_globally_and_pads():
    """Single process: labels are shifted on the full sequence; odd lengths are padded/masked."""
    input_ids = torch.arange(10).reshape(1, 10) + 1
    attention_mask = torch.ones(1, 10, dtype=torch.long)
    attention_mask[0, 8:] = 0
    out = hf.shard_batch(
        {"input_ids": input_ids, "attention_mask": attention_mask}, shift_labels=True
    )
    assert out["labels"].tolist() == [[2, 3, 4, 5, 6, 7, 8, -100, -100, -100]]
    assert out["position_ids"].tolist() == [list(range(10))]
    logits = torch.randn(1, 10, 16, requires_grad=True)
    loss = hf.cp_loss(logits, out["labels"])
    ref = torch.nn.functional.cross_entropy(logits[0], out["labels"][0], ignore_index=-100)
    torch.testing.assert_close(loss, ref)


def test_forward_masks_serve_layers_of_different_shapes():
    """Layers of one forward may differ in head count: the planned mask serves them all."""
    attn = hf.make_attention_function()
    planned = hf.ForwardMasks(torch.ones(1, 8, dtype=torch.bool))
    for heads in (4, 8, 2):
        q = torch.randn(1, heads, 8, 16)
        k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
        out, _ = attn(torch.nn.Module(), q, k, v, planned)
        ref, _ = reference_attention(*(t.transpose(1, 2) for t in (q, k, v)), True)
        torch.testing.assert_close(out, ref.float())
    assert len(planned._planned) == 1


def test_rejects_dense_masks_and_caches():
    attn = hf.make_attention_function()
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="2-D padding mask"):
        attn(torch.nn.Module(), q, q, q, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="use_cache=False"):
        attn(torch.nn.Module(), q, q[:, :, :4], q[:, :, :4], None)


def test_attention_dropout_becomes_ring_dropout():
    """HF's dropout argument is the ring's world-size-invariant dropout, seeded by torch's
    generator."""
    attn = hf.make_attention_function()
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    torch.manual_seed(3)
    out, _ = attn(torch.nn.Module(), q, k, v, None, dropout=0.25)
    torch.manual_seed(3)
    ref = ringattn.ring_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), causal=True, dropout_p=0.25
    )
    assert torch.equal(out, ref)
    plain, _ = attn(torch.nn.Module(), q, k, v, None)
    assert not torch.equal(out, plain)


def _generate_job(rank, world_size, layout, kind):
    model = _model(kind).eval()
    prompt = torch.randint(0, VOCAB, (BATCH, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ring_tokens = hf.generate_greedy(model, prompt, 12, layout=layout)
        _set_attention(model, "eager")
        sequence = prompt
        for _ in range(12):  # reference: full recompute each step, no cache
            next_token = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1)
            sequence = torch.cat([sequence, next_token[:, None]], 1)
        none = hf.generate_greedy(model, prompt, 0, layout=layout)
    gc.collect()
    caches_alive = sum(isinstance(obj, ringattn.KVCache) for obj in gc.get_objects())
    return ring_tokens.tolist(), sequence[:, 50:].tolist(), tuple(none.shape), caches_alive


@pytest.mark.parametrize(
    ("world_size", "layout", "kind"),
    [(2, "zigzag", "llama"), (3, "striped", "llama"), (2, "striped", "gpt_oss_full")],
)
def test_greedy_generation_matches_single_process(pools, world_size, layout, kind):
    """The tokens of single-process greedy decoding; no token for max_new_tokens=0; no KV cache
    left alive (in transformers' global attention registry or elsewhere) after the call.
    gpt-oss: its sinks join the prefill and every decode step."""
    if kind.startswith("gpt_oss"):
        _needs_architecture("GptOssForCausalLM")
    for ring_tokens, reference, no_tokens, caches_alive in pools(world_size).run(
        _generate_job, layout, kind
    ):
        assert ring_tokens == reference
        assert no_tokens == (BATCH, 0) and caches_alive == 0


def test_greedy_generation_refuses_a_negative_count():
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        hf.generate_greedy(_model("llama"), torch.zeros(1, 4, dtype=torch.long), -1)


DOC_LENGTHS = (9, 20, 1, 31)  # 61 tokens: no layout divides it, so shard_batch pads


def _packed_matches_separate_documents(rank, world_size, kind, layout):
    """Packed documents (batch 1, position_ids restarting per document) under context
    parallelism equal running each document through the model on its own."""
    torch.manual_seed(0)
    name = hf.register(f"ring_{layout}", layout=layout)
    model = _model(kind)
    gen = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in DOC_LENGTHS]

    _set_attention(model, "eager")
    model.zero_grad()
    ref_logits, ref_sum, count = [], 0.0, 0
    for doc in docs:
        logits = model(input_ids=doc, use_cache=False).logits
        ref_sum = ref_sum + torch.nn.functional.cross_entropy(
            logits[0, :-1], doc[0, 1:], reduction="sum"
        )
        count += doc.shape[1] - 1
        ref_logits.append(logits.detach())
    (ref_sum / count).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_logits = torch.cat(ref_logits, dim=1)

    _set_attention(model, name)
    model.zero_grad()
    packed = {
        "input_ids": torch.cat(docs, dim=1),
        "position_ids": torch.cat([torch.arange(n) for n in DOC_LENGTHS])[None],
    }
    local = hf.shard_batch(packed, layout=layout, shift_labels=True)
    assert local["cu_seq_lens_q"].tolist() == [0, 9, 29, 30, 61]
    labels = local.pop("labels")
    logits = model(**local, use_cache=False).logits
    loss = hf.cp_loss(logits, labels)
    loss.backward()

    full = ringattn.unshard(logits.detach(), layout=layout, seq_len=sum(DOC_LENGTHS))
    logit_err = ((full - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert logit_err < TOL, f"rank {rank}: logits differ by {logit_err:.2e} (relative)"
    assert abs(loss.item() - ref_sum.item() / count) < TOL * abs(loss.item())
    for n, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        err = ((grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item()
        assert err < TOL, f"rank {rank}: gradient of {n} differs by {err:.2e} (relative)"


@pytest.mark.parametrize(
    ("world_size", "kind", "layout"),
    [(2, "llama", "zigzag"), (3, "mistral_window", "striped"), (4, "llama", "contiguous")],
)
def test_packed_documents_match_separate_documents(pools, world_size, kind, layout):
    pools(world_size).run(_packed_matches_separate_documents, kind, layout)


def test_packed_boundaries_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6]])
    assert hf.packed_cu_seqlens(position_ids).tolist() == [0, 3, 4, 6, 8]
    assert hf.packed_cu_seqlens(torch.arange(8)[None]) is None
    assert hf.packed_cu_seqlens(torch.arange(3, 11)[None]) is None  # an offset, not a restart
    assert hf.packed_cu_seqlens(position_ids[0]).tolist() == [0, 3, 4, 6, 8]  # 1-D
    assert hf.packed_cu_seqlens(position_ids.expand(2, -1)) is None  # HF packs batch 1 only
    # HF-style padded position_ids (pads hold 1) are not documents
    padded = torch.tensor([[0, 1, 2, 3, 1, 1]])
    assert hf.packed_cu_seqlens(padded, torch.tensor([[1, 1, 1, 1, 0, 0]])) is None
    batch = {
        "input_ids": torch.ones(2, 6, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 1, 1]]),
    }
    assert "cu_seq_lens_q" not in hf.shard_batch(batch, shift_labels=True)
    out = hf.shard_batch(
        {"input_ids": torch.arange(8)[None] + 1, "position_ids": position_ids}, shift_labels=True
    )
    assert out["labels"].tolist() == [[2, 3, -100, -100, 6, -100, 8, -100]]
