"""Paired statistics on inputs whose answers are known in closed form."""

import math

import pytest

from prunedlora.bench.paired import (
    compare,
    gap_closed,
    paired_bootstrap,
    paired_comparisons,
    paired_markdown,
    seed_interval,
    t_quantile_975,
)


def test_bootstrap_of_constant_differences_is_that_constant():
    interval = paired_bootstrap([0.25] * 40)
    assert (interval.mean, interval.low, interval.high) == (0.25, 0.25, 0.25) and interval.excludes_zero


def test_bootstrap_is_the_weighted_ratio_and_brackets_it():
    interval = paired_bootstrap([1.0, 3.0, -2.0, 0.5], weights=[1.0, 3.0, 2.0, 2.0])
    assert interval.mean == pytest.approx(2.5 / 8.0)
    assert interval.low <= interval.mean <= interval.high
    symmetric = paired_bootstrap([1.0, -1.0] * 50)
    assert symmetric.mean == 0.0 and symmetric.low < 0 < symmetric.high and not symmetric.excludes_zero


def test_bootstrap_refuses_mismatched_weights():
    with pytest.raises(ValueError, match="as many weights"):
        paired_bootstrap([1.0, 2.0], weights=[1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([])


def test_gap_closed_is_the_pooled_share_of_the_reference_gap():
    # Two seeds x 4 examples of accuracy: reference 0/4 and 1/4 right, target 4/4 both times; the cell
    # gets 2 and 3 right: it removes (2 + 2) of the (4 + 3) the reference misses and the target does not.
    reference = [[0, 0, 0, 0], [1, 0, 0, 0]]
    target = [[1, 1, 1, 1], [1, 1, 1, 1]]
    cell = [[1, 1, 0, 0], [1, 1, 1, 0]]
    interval = gap_closed(reference, cell, target)
    assert interval.mean == pytest.approx(4 / 7)
    assert interval.low <= interval.mean <= interval.high
    assert gap_closed(reference, target, target).mean == 1.0 and gap_closed(reference, reference, target).mean == 0.0


def test_gap_closed_resamples_examples_together_across_seeds():
    # Every example closes exactly half its gap in every seed: no resample can move the share.
    reference = [[4.0, 2.0, 6.0], [3.0, 5.0, 1.0]]
    target = [[2.0, 0.0, 2.0], [1.0, 1.0, 1.0]]
    cell = [[(r + t) / 2 for r, t in zip(rr, tt)] for rr, tt in zip(reference, target)]
    interval = gap_closed(reference, cell, target)
    assert (interval.mean, interval.low, interval.high) == (0.5, 0.5, 0.5)


def test_gap_closed_refuses_ragged_or_gapless_inputs():
    with pytest.raises(ValueError, match="equal"):
        gap_closed([[1.0, 2.0]], [[1.0]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="no gap"):
        gap_closed([[1.0, 2.0]], [[1.0, 2.0]], [[1.0, 2.0]])


def test_seed_interval_is_the_student_t_interval():
    interval = seed_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.303
    half = 4.303 / math.sqrt(3)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert seed_interval([0.5]) is None
    assert t_quantile_975(1) == 12.706 and t_quantile_975(100) == 1.96


def _cell(method, seed, margins, task="sst2"):
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "eval": {"per_example": {"index": list(range(len(margins))), "margin": margins}},
    }


def test_compare_pairs_examples_by_index_and_seeds_by_seed():
    reference = [_cell("lora-target", 0, [1, -1, -1, 1]), _cell("lora-target", 1, [1, 1, -1, -1])]
    method = [_cell("m", 1, [1, 1, 1, -1]), _cell("m", 0, [1, 1, -1, 1]), _cell("m", 2, [1, 1, 1, 1])]
    found = compare(method, reference, "accuracy")
    assert [s["seed"] for s in found["seeds"]] == [0, 1]  # seed 2 has no reference: not paired
    assert [s["diff"] for s in found["seeds"]] == [0.25, 0.25]
    assert (found["mean"], found["low"], found["high"]) == (0.25, 0.25, 0.25)


def test_nll_differences_are_token_weighted():
    ref = {
        "task": "codealpaca",
        "method": "lora-target",
        "seed": 0,
        "eval": {"per_example": {"index": [0, 1], "logprob_sum": [-10.0, -2.0], "tokens": [10, 2]}},
    }
    other = {
        "task": "codealpaca",
        "method": "m",
        "seed": 0,
        "eval": {"per_example": {"index": [0, 1], "logprob_sum": [-7.0, -3.0], "tokens": [10, 2]}},
    }
    found = compare([other], [ref], "nll")
    assert found["mean"] == pytest.approx((-3.0 + 1.0) / 12)  # lower NLL: a negative difference
    table = paired_markdown([ref, other])
    assert "| codealpaca | nll (lower is better) | m | 1 | -0.1667 | - |" in table


def test_sst2_is_also_compared_on_the_margin_itself():
    """Accuracy moves only where a margin crosses zero; the paired margin sees every example."""
    ref = _cell("lora-target", 0, [2.0, -1.0, 0.5, 1.0])
    other = _cell("m", 0, [3.0, -0.5, 0.7, 1.2])  # every margin higher, no sign changes
    assert compare([other], [ref], "accuracy")["mean"] == 0
    assert compare([other], [ref], "margin")["mean"] == pytest.approx((1.0 + 0.5 + 0.2 + 0.2) / 4)
    table = paired_markdown([ref, other])
    assert "| sst2 | margin (higher is better) | m | 1 | +0.4750 |" in table
    assert "| sst2 | accuracy (higher is better) | m | 1 | +0.0000 |" in table


def test_above_floor_subtracts_the_floor_round_by_round_and_ratios_to_the_reference():
    from prunedlora.bench.paired import above_floor

    per_round = {"floor": [1.0, 2.0, 3.0], "ref": [2.0, 3.0, 4.0], "big": [4.0, 5.0, 6.0]}  # floor drifts; gaps do not
    found = above_floor(per_round, "floor", "ref")
    assert set(found) == {"ref", "big"} and "over_reference" not in found["ref"]
    assert (found["ref"]["above_floor"].mean, found["ref"]["above_floor"].low) == (1.0, 1.0)
    assert (found["big"]["above_floor"].mean, found["big"]["above_floor"].high) == (3.0, 3.0)
    assert found["big"]["over_reference"].mean == pytest.approx(3.0)


def test_paired_comparisons_are_what_the_table_prints():
    ref = _cell("lora-target", 0, [2.0, -1.0, 0.5, 1.0])
    other = _cell("m", 0, [3.0, -0.5, 0.7, 1.2])
    base = _cell("base", 0, [-1.0, -1.0, -1.0, -1.0])  # never compared
    found = paired_comparisons([ref, other, base])
    assert [(f["task"], f["metric"], f["better"], f["method"]) for f in found] == [
        ("sst2", "accuracy", "higher", "m"),
        ("sst2", "margin", "higher", "m"),
    ]
    table = paired_markdown([ref, other, base])
    for f in found:
        assert (
            f"| {f['task']} | {f['metric']} ({f['better']} is better) | {f['method']} | 1 | {f['mean']:+.4f} |" in table
        )
