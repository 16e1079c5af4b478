"""The cost model: the paper's figures, the overlap condition, and sane predictions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ringattn.plan import (
    PROFILES,
    Config,
    Hardware,
    best_configuration,
    min_tokens_for_overlap,
    paper_minimal_sequence,
    predict,
    validate,
)


@pytest.mark.parametrize(
    ("profile", "paper_tokens"), [("a100-nvlink", 6.2e3), ("a100-infiniband", 149.5e3)]
)
def test_reproduces_ring_attention_paper_table_2(profile, paper_tokens):
    hw = PROFILES[profile]
    assert abs(paper_minimal_sequence(hw.peak_flops, hw.bandwidth) / paper_tokens - 1) < 0.10


def test_overlap_condition_is_f_over_b_for_bf16_mha():
    hw = Hardware("ideal", 312e12, 300e9, 0.0, 80e9, "bfloat16", "test")
    config = Config(seq_len=1 << 20, devices=8, heads=8, kv_heads=8, causal=False, dtype="bfloat16")
    assert min_tokens_for_overlap(config, hw) == pytest.approx(312e12 / 300e9, rel=1e-9)
    # GQA moves 4x fewer bytes, so 4x smaller blocks hide their transfer
    gqa = replace(config, kv_heads=2)
    assert min_tokens_for_overlap(gqa, hw) == pytest.approx(312e12 / 300e9 / 4, rel=1e-9)


def test_prediction_is_overlapped_above_the_minimum_and_not_below():
    hw = PROFILES["a100-infiniband"]
    config = Config(seq_len=64 * 4096, devices=64, causal=False, heads=32, kv_heads=32)
    assert not predict(config, hw).overlapped
    long = replace(config, seq_len=64 * 262144)
    prediction = predict(long, hw)
    assert prediction.overlapped and prediction.efficiency > 0.95


def test_contiguous_causal_is_predicted_slower_than_zigzag():
    hw = PROFILES["h100-nvlink"]
    config = Config(seq_len=1 << 20, devices=16)
    zigzag = predict(config, hw)
    contiguous = predict(replace(config, layout="contiguous"), hw)
    assert contiguous.total_s > 1.5 * zigzag.total_s
    assert best_configuration(replace(config, layout="contiguous"), hw).config.layout != (
        "contiguous"
    )


def test_memory_falls_as_one_over_p():
    hw = PROFILES["h100-nvlink"]
    one = predict(Config(seq_len=1 << 20, devices=8), hw).memory_bytes
    two = predict(Config(seq_len=1 << 20, devices=16), hw).memory_bytes
    assert one == pytest.approx(2 * two)


def test_validate_compares_bench_rows():
    row = {
        "workload": {
            "seq_len": 8192,
            "heads": 8,
            "kv_heads": 8,
            "head_dim": 64,
            "batch": 1,
            "dtype": "float32",
            "causal": True,
            "layout": "zigzag",
        },
        "world_size": 2,
        "ring_total_s": 2.0,
    }
    (result,) = validate([row], PROFILES["cpu-2core"])
    assert result["predicted_s"] > 0
    assert result["error"] == pytest.approx(result["predicted_s"] / 2.0 - 1)
