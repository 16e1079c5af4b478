"""The cost model: the paper's figures, the overlap condition, and sane predictions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ringattn import Granularity
from ringattn.tools.plan import (
    PROFILES,
    Config,
    Hardware,
    across_nodes,
    best_configuration,
    device_memory,
    longest_sequence,
    memory_per_token,
    memory_size,
    min_tokens_for_overlap,
    paper_minimal_sequence,
    predict,
    validate,
    with_link,
)

MEASURED = Path(__file__).parent.parent / "docs" / "max-context.json"


def test_paper_table_2_follows_our_overlap_model():
    """The Ring Attention paper's minimal sequence per device (Table 2) against the overlap
    condition our cost model derives from FLOPs, bytes and latency (bf16 MHA, peak FLOPs, no
    latency, as the paper assumes): the multiple read off the NVLink row (6.2K tokens) predicts
    the InfiniBand row (149.5K) within 2%; nothing is fitted to that row. With the profiles'
    link latency (5 us NVLink, 10 us InfiniBand) the model needs 28% more tokens on NVLink,
    where a step is short enough for latency to matter, and 0.1% more on InfiniBand."""
    config = Config(seq_len=1 << 20, devices=8, heads=8, kv_heads=8, causal=False, dtype="bfloat16")
    paper = {"a100-nvlink": 6.2e3, "a100-infiniband": 149.5e3}
    with_latency = {
        name: replace(PROFILES[name], flops=PROFILES[name].peak_flops, comm_compute_share=0.0)
        for name in paper
    }
    as_paper = {name: replace(hw, latency=0.0) for name, hw in with_latency.items()}
    minimum = {name: min_tokens_for_overlap(config, hw) for name, hw in as_paper.items()}
    multiple = paper["a100-nvlink"] / minimum["a100-nvlink"]
    assert 5.5 < multiple < 6.5  # the paper's blockwise transformer holds ~6 blocks per device
    predicted = multiple * minimum["a100-infiniband"]
    assert abs(predicted / paper["a100-infiniband"] - 1) < 0.02, predicted
    latency_cost = {
        name: min_tokens_for_overlap(config, with_latency[name]) / minimum[name] for name in paper
    }
    assert latency_cost["a100-nvlink"] == pytest.approx(1.28, abs=0.02)
    assert latency_cost["a100-infiniband"] == pytest.approx(1.0, abs=0.005)
    # the CLI's `plan --paper-table` (6 F / B) is the same formula
    assert paper_minimal_sequence(PROFILES["a100-nvlink"].peak_flops, 300e9) == pytest.approx(
        6 * minimum["a100-nvlink"], rel=1e-9
    )


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


def test_a_network_link_sets_the_transfer_and_its_compute_share():
    """A link between ring neighbours: transfers take the link's time, the overlap point scales
    with 1 / rate, and the compute units lose the link's share of each transfer's time."""
    ideal = Hardware("ideal", 100e9, 10e9, 0.0, 80e9, "float32", "test", comm_compute_share=0.5)
    config = Config(seq_len=1 << 16, devices=2, heads=2, kv_heads=2, head_dim=64,
                    dtype="float32", causal=False, layout="contiguous", backward=False)  # fmt: skip
    slow, slower = with_link(ideal, 1.0), with_link(ideal, 0.25, compute_share=0.2)
    assert slow.link_bandwidth == 1e9 / 8 and "1 Gbit/s" in slow.name
    assert slow.comm_compute_share == 0.0 and slower.comm_compute_share == 0.2
    per_token = 2 * 2 * 64 * 4  # K and V, float32
    flops_per_token_pair = 4 * 2 * 64
    # a c^2 = e c / link  ->  c = e / (link a)
    expected = per_token * 8 / 1e9 / (flops_per_token_pair / 100e9)
    assert min_tokens_for_overlap(config, slow) == pytest.approx(expected, rel=1e-9)
    # 4x slower and 20% of it taken from compute: a c^2 = 0.8 e c / link
    ratio = min_tokens_for_overlap(config, slower) / min_tokens_for_overlap(config, slow)
    assert ratio == pytest.approx(4.0 * 0.8, rel=1e-9)
    prediction = predict(config, slower)
    n = config.seq_len // 2
    assert prediction.comm_step_s == pytest.approx(n * per_token / (0.25e9 / 8), rel=1e-9)
    busy = max(prediction.compute_step_s + 0.2 * prediction.comm_step_s, prediction.comm_step_s)
    assert prediction.busy_step_s == pytest.approx(busy, rel=1e-9)
    assert prediction.overlapped == (busy > prediction.comm_step_s)
    # a link faster than the device's own path changes nothing but the share
    fast = with_link(ideal, 1000.0, compute_share=0.5)
    assert predict(config, fast).comm_step_s == pytest.approx(predict(config, ideal).comm_step_s)
    with pytest.raises(ValueError, match="positive rate"):
        with_link(ideal, 0.0)
    with pytest.raises(ValueError, match="compute share"):
        with_link(ideal, 1.0, compute_share=1.0)


def test_a_ring_across_nodes_waits_for_the_inter_node_link():
    """A ring within a node runs at NVLink speed; one that spans nodes needs the inter-node
    minimum block size — the Ring Attention paper's A100/InfiniBand figure, not its NVLink one."""
    config = Config(seq_len=1 << 20, devices=16, heads=8, kv_heads=8, causal=False)
    nvlink, infiniband = PROFILES["a100-nvlink"], PROFILES["a100-infiniband"]
    assert across_nodes(nvlink, 8, 8) is nvlink  # one node
    spanning = across_nodes(nvlink, 16, 8)
    assert spanning.link_bandwidth == pytest.approx(infiniband.bandwidth)
    assert min_tokens_for_overlap(config, spanning) == pytest.approx(
        min_tokens_for_overlap(config, infiniband), rel=1e-9
    )
    # 24x less bandwidth; NVLink's latency term keeps the in-node minimum from falling 24x
    assert min_tokens_for_overlap(config, spanning) > 15 * min_tokens_for_overlap(config, nvlink)
    # 1M causal tokens over 64 H100s, MHA: overlapped at NVLink speed, not across 8 nodes
    wide = replace(config, devices=64, heads=32, kv_heads=32, head_dim=128, causal=True)
    assert predict(wide, PROFILES["h100-nvlink"]).overlapped
    assert not predict(wide, across_nodes(PROFILES["h100-nvlink"], 64, 8)).overlapped
    assert across_nodes(nvlink, 16, 8, inter_node_gbps=200).link_bandwidth == 25e9
    with pytest.raises(ValueError, match="inter-node-gbps"):
        across_nodes(PROFILES["cpu-2core"], 4, 2)


def test_contiguous_causal_is_predicted_slower_than_zigzag():
    hw = PROFILES["h100-nvlink"]
    config = Config(seq_len=1 << 20, devices=16)
    zigzag = predict(config, hw)
    contiguous = predict(replace(config, layout="contiguous"), hw)
    assert contiguous.total_s > 1.5 * zigzag.total_s
    assert best_configuration(replace(config, layout="contiguous"), hw).config.layout != (
        "contiguous"
    )


def _config(workload: dict, world: int, seq_len: int, backward: bool = True) -> Config:
    return Config.for_workload(workload, world, seq_len=seq_len, backward=backward)


def test_longest_sequence_matches_measured_max_context():
    """`ringattn bench --max-context` (docs/max-context.json: 48 MiB per rank incl. inputs,
    4 heads, 2 KV heads, d=64, fp32, causal zigzag, p = 1, 2, 4, forward+backward): the plan's
    longest fitting sequence within 15% of the measured one, and its memory per device within
    6% of every probe's measured peak near the budget (above 70% of it; smaller probes carry
    a few MiB of fixed costs, the CPU kernel's per-thread buffers, that the model leaves out)."""
    report = json.loads(MEASURED.read_text())
    budget = report["search"]["budget_bytes"]
    assert sorted(row["world_size"] for row in report["rows"]) == [1, 2, 4]
    for row in report["rows"]:
        world, workload = row["world_size"], row["workload"]
        predicted = longest_sequence(_config(workload, world, 0), budget)
        assert predicted == pytest.approx(row["longest_seq_len"], rel=0.15), world
        near = [probe for probe in row["probes"] if probe["peak_bytes"] > 0.7 * budget]
        assert len(near) >= 2
        for probe in near:
            memory = device_memory(_config(workload, world, probe["seq_len"]))
            assert memory == pytest.approx(probe["peak_bytes"], rel=0.06), (world, probe)


@pytest.mark.parametrize(("world", "measured"), [(1, 10_866), (2, 19_224), (4, 38_448)])
def test_inference_longest_sequence_matches_measurement(world, measured):
    """`ringattn bench --max-context --inference --memory 32MiB` (forward only under no_grad,
    same heads as above), measured 2026-11-30: the longest fitting length per world size."""
    workload = {"heads": 4, "kv_heads": 2, "head_dim": 64, "dtype": "float32"}
    workload |= {"causal": True, "layout": "zigzag"}
    config = _config(workload, world, 0, backward=False)
    assert longest_sequence(config, 32 * 2**20) == pytest.approx(measured, rel=0.15)


def test_memory_model_terms():
    """One device holds its inputs and what attention inherently produces (out, lse, dq, dk,
    dv), and nothing else; a ring adds its buffers, fewer with more sub-blocks."""
    single = Config(seq_len=8192, devices=1, heads=4, kv_heads=2, head_dim=64, dtype="float32")
    q_row, kv_row, lse = 4 * 64 * 4, 2 * 64 * 4, 4 * 4
    inputs = 2 * q_row + 2 * kv_row  # q, dout, k, v
    assert memory_per_token(single) == inputs + 2 * q_row + 2 * kv_row + lse
    ring = replace(single, seq_len=4 * 8192, devices=4)  # 8,192 tokens per device: 8 sub-blocks
    buffers = (2 * 2 * kv_row + 3 * 2 * kv_row + (q_row + 2 * kv_row)) / 8
    assert memory_per_token(ring) == memory_per_token(single) + buffers
    whole_blocks = replace(ring, granularity=Granularity(sub_blocks=1))
    assert memory_per_token(whole_blocks) == memory_per_token(single) + 8 * buffers
    # 16-bit inputs: tensors, travelling blocks and the kernel band halve; the returns stay
    # float32 and the backward cuts them 4 times finer (32 pieces); dq is float32 (instead of
    # its 16-bit result)
    bf16 = replace(ring, dtype="bfloat16")
    halved = (memory_per_token(single) - lse) / 2 + lse
    bf16_buffers = (2 * kv_row + 3 * 2 * kv_row) / 32 + (q_row + 2 * kv_row) / 2 / 8
    assert memory_per_token(bf16) == halved + bf16_buffers + q_row / 2


def test_longest_sequence_is_the_longest_fitting_multiple():
    config = Config(seq_len=0, devices=4, heads=4, kv_heads=2, head_dim=64, dtype="float32")
    for budget in (3 * 2**20, 64 * 2**20, 10 * 2**30):
        longest = longest_sequence(config, budget)
        assert longest % 8 == 0 and device_memory(replace(config, seq_len=longest)) <= budget
        assert device_memory(replace(config, seq_len=longest + 8)) > budget
    assert longest_sequence(config, 1024) == 0


def test_longest_sequence_looks_past_a_sub_block_step():
    """Memory drops where a longer shard is cut into one more sub-block (8,184 -> 8,192 tokens
    at p = 4 goes from 1 to 2 sub-blocks): a budget that 8,184 tokens exceed but longer
    sequences fit finds the longer ones, as a scan of every length does."""
    config = Config(seq_len=0, devices=4, heads=4, kv_heads=2, head_dim=64, dtype="float32")

    def memory(seq_len: int) -> float:
        return device_memory(replace(config, seq_len=seq_len))

    assert memory(8192) < memory(8184)
    for budget in (memory(8192) + 1, (memory(8184) + memory(8192)) / 2, memory(12280) - 1):
        scanned = max(n for n in range(8, 24_000, 8) if memory(n) <= budget)
        assert scanned > 8184 and longest_sequence(config, budget) == scanned


def test_memory_sizes_parse():
    assert memory_size("64MiB") == memory_size("64M") == 64 * 2**20
    assert memory_size("2GiB") == 2 * 2**30 and memory_size("1.5g") == 3 * 2**29
    assert memory_size("64MB") == 64_000_000 and memory_size("1000") == 1000
    for bad in ("64Q", "MiB", "", "1..5G"):
        with pytest.raises(ValueError, match="not a memory size"):
            memory_size(bad)


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


def test_value_head_dim_is_counted():
    """MLA: q/k rows of 192 and v rows of 128 — the planner's memory, flops and bytes per step
    count each tensor at its own head dim; a value dim equal to head_dim changes nothing."""
    mla = Config(seq_len=4 * 8192, devices=4, heads=8, kv_heads=8, head_dim=192, head_dim_v=128)
    same = replace(mla, head_dim_v=192)
    assert memory_per_token(same) == memory_per_token(replace(mla, head_dim_v=None))
    equal, unset = (
        predict(c, PROFILES["a100-nvlink"]) for c in (same, replace(same, head_dim_v=None))
    )
    assert replace(equal, config=unset.config) == unset
    single = replace(mla, seq_len=8192, devices=1, dtype="float32")
    q_row, out_row, kv_row, lse = 8 * 192 * 4, 8 * 128 * 4, 8 * (192 + 128) * 4, 8 * 4
    inputs = q_row + out_row + kv_row  # q, dout, k, v
    assert memory_per_token(single) == inputs + out_row + lse + q_row + kv_row
    assert mla.flops_per_pair == 2 * 8 * (192 + 128)
    assert mla.bytes_per_step(100, backward=False) == 100 * 8 * (192 + 128) * 2  # k, v in bf16
    ratio = (
        predict(mla, PROFILES["a100-nvlink"]).comm_step_s
        / predict(same, PROFILES["a100-nvlink"]).comm_step_s
    )
    assert ratio == pytest.approx((192 + 128) / 384, rel=0.01)


def test_node_aware_ranking_follows_published_behaviour():
    """USP/LoongTrain: on multi-node clusters, head-parallel all-to-all inside a node and the
    ring across nodes beat either alone. 256K MHA tokens on 64 H100s in 8 nodes: the pure ring
    waits for InfiniBand at every step (4K tokens per device, under the inter-node minimum);
    Ulysses 8 x ring 8 keeps the all-to-all on NVLink and gives the ring blocks long enough to
    hide it; Ulysses across nodes pays for InfiniBand all-to-alls."""
    from ringattn.tools.cluster import rank

    config = Config(seq_len=256 * 1024, devices=64, heads=32, kv_heads=32, head_dim=128)
    ranked = rank(config, PROFILES["h100-nvlink"], gpus_per_node=8)
    best = ranked[0].strategy
    assert (best.ulysses, best.ring, best.rotation) == (8, 8, "kv"), ranked[0]
    by = {(r.strategy.ulysses, r.strategy.rotation, r.strategy.layout): r for r in ranked}
    pure_ring = by[(1, "kv", "zigzag")]
    assert "waits" in pure_ring.reason and pure_ring.total_s > 3 * ranked[0].total_s
    assert by[(16, "kv", "zigzag")].total_s > ranked[0].total_s
    assert "across nodes" in by[(16, "kv", "zigzag")].reason


def test_ranking_parts():
    """A Ulysses degree of 1 is the 1-D ring's own prediction; KV heads are repeated to the
    Ulysses degree; all-gather holds every rank's K/V, more memory than the ring; a strategy
    that does not fit ranks after every one that does."""
    from ringattn.tools.cluster import Strategy, rank, ring_config

    config = Config(seq_len=64 * 1024, devices=16, heads=16, kv_heads=2, head_dim=128)
    hardware = PROFILES["h100-nvlink"]
    ranked = rank(config, hardware, gpus_per_node=8)
    ring = next(r for r in ranked if r.strategy == Strategy(1, 16, "kv", "zigzag"))
    spans = across_nodes(hardware, 16, 8)
    assert ring.total_s == pytest.approx(predict(replace(config, rotation="kv"), spans).total_s)
    assert ring_config(config, Strategy(4, 4, "kv", "zigzag")).kv_heads == 1  # lcm(2, 4) / 4
    assert ring_config(config, Strategy(4, 4, "kv", "zigzag")).heads == 4
    gather = next(r for r in ranked if r.strategy == Strategy(1, 16, "allgather", "zigzag"))
    assert gather.memory_bytes > ring.memory_bytes
    small = replace(hardware, memory=ring.memory_bytes * 1.01)
    fits = [r.fits for r in rank(config, small, gpus_per_node=8)]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)


def test_nodes_share_their_links():
    """Messages sent at once: a device's go one after another over its link, a node's share
    its NICs. On 2 nodes of 2: the 1x4 ring crosses once per node; the two rings of 2x2 cross
    twice per node, which one NIC carries at half rate each; 4x1's all-to-all sends every rank
    to two ranks of the other node."""
    from ringattn.tools.cluster import (
        Nodes,
        Strategy,
        _group_messages,
        _ring_messages,
        _ulysses_groups,
    )

    one_ring = _ring_messages(Strategy(1, 4, "kv", "zigzag"))
    assert Nodes(2, 2).loads(one_ring) == (1, 1) == Nodes(2, 1).loads(one_ring)
    two_rings = _ring_messages(Strategy(2, 2, "kv", "zigzag"))
    assert Nodes(2, 2).loads(two_rings) == (0, 1)
    assert Nodes(2, 1).loads(two_rings) == (0, 2)
    all_to_all = _group_messages(_ulysses_groups(Strategy(4, 1, "kv", "zigzag")))
    assert Nodes(2, 2).loads(all_to_all) == (1, 2)
    assert Nodes(2, 1).loads(all_to_all) == (1, 4)
    assert Nodes(4, 1).loads(all_to_all) == (3, 0)  # one node: nothing crosses


def test_shared_nics_slow_the_configurations_that_cross_at_once():
    """With one NIC per node instead of one per device, the pure ring (one crossing per node)
    keeps its time and the 2x2 rings (two crossings per node) slow down."""
    from ringattn.tools.cluster import Strategy, rank

    config = Config(seq_len=8192, devices=4, heads=8, kv_heads=8, head_dim=64, causal=True)
    hardware = PROFILES["cpu-2core"]

    def times(nics):
        ranked = rank(config, hardware, 2, 0.1, nics)
        return {r.strategy: r.total_s for r in ranked}

    per_device, shared = times(2), times(1)
    ring, two_rings = Strategy(1, 4, "kv", "zigzag"), Strategy(2, 2, "kv", "zigzag")
    assert shared[ring] == pytest.approx(per_device[ring])
    assert shared[two_rings] > 1.2 * per_device[two_rings]


def test_return_hop_carries_only_the_accumulator():
    """The last hop of a pass sends an accumulator home, not a block: nothing for pass-KV's
    forward, dK/dV (fp32) for its backward, out and lse for pass-Q's forward, dQ backward."""
    config = Config(seq_len=4096, devices=2, heads=8, kv_heads=2, head_dim=64, dtype="bfloat16")
    n = 2048
    assert config.return_bytes(n, backward=False) == 0
    assert config.return_bytes(n, backward=True) == n * 2 * 128 * 4
    q = replace(config, rotation="q")
    assert q.return_bytes(n, backward=False) == n * 8 * 65 * 4
    assert q.return_bytes(n, backward=True) == n * 8 * 64 * 4


def test_cluster_ranking_matches_the_recorded_measurement():
    """The planner against the measurement recorded in docs/cluster-ranking-hosts.json (4 ranks
    on two simulated hosts joined by a 100 Mbit/s link, benchmarks/cluster_ranking.py): every
    configuration within 25%, and every pair predicted more than 10% apart measured in the
    same order."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "cluster_ranking", root / "benchmarks" / "cluster_ranking.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = json.loads((root / "docs" / "cluster-ranking-hosts.json").read_text())
    rows, within, disordered = module.predict(
        saved["rows"], saved["profile"], saved["link"], *saved["shape"]
    )
    assert within, [(r["ulysses"], r["ring"], r["rotation"], r["error"]) for r in rows]
    assert not disordered


def test_ranking_edge_cases():
    """An inter-node profile is its own link; a batch of 4 sends 4 times the ring's bytes; a
    float64 shard holds no less than a float32 one (it accumulates in place)."""
    from ringattn.tools.cluster import rank

    config = Config(seq_len=65536, devices=8, heads=8, kv_heads=8, head_dim=128)
    assert rank(config, PROFILES["h100-infiniband"], gpus_per_node=4)[0].fits
    one = predict(replace(config, rotation="kv"), PROFILES["h100-infiniband"])
    four = predict(replace(config, rotation="kv", batch=4), PROFILES["h100-infiniband"])
    assert four.comm_step_s > 3.9 * (one.comm_step_s - PROFILES["h100-infiniband"].latency)
    ring = Config(seq_len=8192, devices=4, heads=4, kv_heads=2, head_dim=64)
    assert memory_per_token(replace(ring, dtype="float64")) > memory_per_token(ring)
