"""``ringattn bench --max-context``: the search's contract on synthetic memory curves, and one
real search on a tiny budget (world sizes 1 and 2, real processes). The flags are tested in
test_cli.py."""

from __future__ import annotations

import json

import pytest

from ringattn.tools.max_context import MaxContextSearch, find_longest, run_max_context
from ringattn.tools.memory import MIB


def _assert_contract(result, measure, budget: int, multiple: int, resolution: float) -> None:
    """The answer is a probe that fitted, the reported failure a probe that did not, one
    resolution step apart; both are what ``measure`` says."""
    longest, failure = result.longest, result.shortest_failure
    assert longest.fits and longest.peak_bytes == measure(longest.seq_len) <= budget
    assert not failure.fits and failure.peak_bytes == measure(failure.seq_len) > budget
    assert longest.seq_len % multiple == 0 and failure.seq_len % multiple == 0
    assert result.step == max(multiple, int(resolution * longest.seq_len) // multiple * multiple)
    assert 0 < failure.seq_len - longest.seq_len <= result.step
    assert longest in result.probes and failure in result.probes


@pytest.mark.parametrize("guess_error", [0.3, 1.0, 1.04, 3.0])
def test_linear_memory_is_found_with_few_probes(guess_error):
    budget, multiple = 64 * MIB, 8

    def measure(tokens: int) -> int:  # 5 MiB fixed + 7 KiB per token: 8,411 tokens fit
        return 5 * MIB + 7 * 1024 * tokens

    limit = (budget - 5 * MIB) // (7 * 1024) // multiple * multiple
    result = find_longest(measure, budget, multiple, int(guess_error * limit), resolution=0.01)
    _assert_contract(result, measure, budget, multiple, 0.01)
    assert limit - result.step < result.longest.seq_len <= limit
    assert len(result.probes) <= 6  # two cheap probes, then the line is right at once


def test_steps_in_memory_still_bracket_the_answer():
    """A staircase (allocations that jump) is not linear: the search must still
    end on a fitting probe one step below a failing one."""
    budget = 100 * MIB

    def measure(tokens: int) -> int:
        return 3 * 1024 * tokens + (4 * MIB) * (tokens // 3000) + tokens**2 // 50

    seen = []
    result = find_longest(measure, budget, 4, 30_000, resolution=0.005, on_probe=seen.append)
    _assert_contract(result, measure, budget, 4, 0.005)
    assert seen == result.probes and len(seen) <= 20


def test_memory_that_steps_down_is_searched_beyond_the_first_failure():
    """Memory drops where blocks are cut finer: 3,000 B/token below 10,000 tokens, 2,000 above.
    The bracket first closes below 10,000, then the predicted answer beyond it is probed and the
    search finds the true longest, 13,500."""

    def measure(tokens: int) -> int:
        return (3000 if tokens < 10_000 else 2000) * tokens

    result = find_longest(measure, 27_000_000, 4, guess=13_000, resolution=0.005)
    assert 13_500 - result.step <= result.longest.seq_len <= 13_500
    assert any(9_000 - 60 <= p.seq_len <= 9_000 and p.fits for p in result.probes)


def test_a_budget_below_the_shortest_length_reports_no_fit():
    result = find_longest(lambda tokens: 10 * MIB, 1 * MIB, 4, 4096)
    assert result.longest is None and not result.shortest_failure.fits
    assert result.shortest_failure.seq_len == 4


def test_real_search_on_one_and_two_ranks(tmp_path, capfd):
    """Real ranks: each world size's answer was measured fitting, the reported failure was
    measured failing within the resolution, and the answer uses most of the budget. One head
    keeps the shards long (~7K tokens at p=2: 6 sub-blocks) while the probes stay quick."""
    search = MaxContextSearch(
        budget_bytes=16 * MIB, world_sizes=[1, 2], heads=[(1, 1)], resolution=0.03
    )
    rows = {row["world_size"]: row for row in run_max_context(search, tmp_path)}
    assert sorted(rows) == [1, 2]
    for world, row in rows.items():
        multiple = 1 if world == 1 else 2 * world  # zigzag
        assert row["longest_peak_bytes"] <= search.budget_bytes
        assert row["shortest_failure_peak_bytes"] > search.budget_bytes
        gap = row["shortest_failure_seq_len"] - row["longest_seq_len"]
        assert 0 < gap <= max(multiple, search.resolution * row["longest_seq_len"])
        assert row["longest_peak_bytes"] > 0.9 * search.budget_bytes
        fitting = [p["seq_len"] for p in row["probes"] if p["fits"]]
        assert max(fitting) == row["longest_seq_len"]
    assert rows[2]["longest_seq_len"] > 1.5 * rows[1]["longest_seq_len"]
    assert rows[2]["ratio_to_single"] == rows[2]["longest_seq_len"] / rows[1]["longest_seq_len"]
    report = json.loads((tmp_path / "max_context.json").read_text())
    assert report["rows"] == json.loads(json.dumps(list(rows.values())))
    assert "| 2 | zigzag | 1/1 | float32 |" in (tmp_path / "max_context.md").read_text()
    assert (tmp_path / "max_context.png").stat().st_size > 0
    assert "[max-context p=2 zigzag h1/1 float32]" in capfd.readouterr().out  # progress
