"""The demo's quality check: the verdict against the base model, r0/export agreement, the table, and
(slow) the demo's own SST-2 adapter beating the base model on the dev split by more than its noise."""

from __future__ import annotations

import pytest

from prunedlora.bench.demo_quality import AGREEMENT_TOLERANCE, compare, format_table
from prunedlora.bench.scoring import ScoringError


def _classification(margins: list[float]) -> dict:
    return {
        "eval_examples": len(margins),
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "per_example": {"index": list(range(len(margins))), "margin": margins},
    }


def _row(name: str, result: dict, rank: int) -> dict:
    return {
        "name": name,
        "params": 1000 * rank,
        "bytes": 4000 * rank,
        "average_rank": float(rank),
        "max_rank": rank,
        "modules": 1 if rank else 0,
        **result,
    }


def _payload(
    base: dict, r0: dict, export: dict, task: str = "sst2", metric: str = "accuracy", better: str = "higher"
) -> dict:
    rows = [_row("base model", base, 0), _row("r0 training adapter", r0, 32), _row("pruned export", export, 8)]
    return {
        "task": task,
        "eval_examples": base["eval_examples"],
        "rows": rows,
        **compare(base, r0, export, metric, better),
    }


def test_an_export_right_on_far_more_examples_beats_the_base():
    base = _classification([1.0] * 60 + [-1.0] * 40)
    export = _classification([1.0] * 90 + [-1.0] * 10)
    payload = _payload(base, export, export)
    assert payload["export_minus_base"] == pytest.approx(0.30)
    assert payload["low"] > 0 and payload["beats_base"]
    assert "WARNING" not in format_table(payload)


def test_a_difference_within_the_noise_does_not_beat_the_base_and_the_table_says_so():
    base = _classification([1.0] * 60 + [-1.0] * 40)
    export = _classification([-1.0] + [1.0] * 60 + [-1.0] * 38 + [1.0])  # one example worse, two better
    payload = _payload(base, export, export)
    assert payload["export_minus_base"] == pytest.approx(0.01)
    assert not payload["beats_base"]
    table = format_table(payload)
    assert "WARNING: the sst2 adapter does not beat the base model" in table
    for name in ("base model", "r0 training adapter", "pruned export"):
        assert name in table


def test_nll_beats_the_base_when_it_is_lower():
    tokens = [10] * 50
    base = {
        "eval_examples": 50,
        "answer_nll": 1.0,
        "exact_match": 0.0,
        "per_example": {"index": list(range(50)), "logprob_sum": [-10.0] * 50, "tokens": tokens},
    }
    export = {
        "eval_examples": 50,
        "answer_nll": 0.8,
        "exact_match": 0.25,
        "per_example": {
            "index": list(range(50)),
            "logprob_sum": [-8.0 - 0.01 * i for i in range(50)],
            "tokens": tokens,
        },
    }
    payload = _payload(base, export, export, task="gsm8k", metric="answer_nll", better="lower")
    assert payload["high"] < 0 and payload["beats_base"]
    worse = _payload(export, base, base, task="gsm8k", metric="answer_nll", better="lower")
    assert not worse["beats_base"]
    assert "exact_match" in format_table(payload) and "answer_nll" in format_table(payload)


def test_an_export_that_is_not_the_trained_adapter_is_an_error():
    r0 = _classification([1.0] * 10)
    export = _classification([1.0] * 9 + [1.0 + 10 * AGREEMENT_TOLERANCE])
    with pytest.raises(ScoringError, match="disagree"):
        compare(r0, r0, export, "accuracy", "higher")


@pytest.mark.parametrize("task", ["sst2", "gsm8k"])
def test_scoring_a_run_and_its_export_on_a_tiny_model(tmp_path, tiny_model_path, task):
    """The whole scoring path on a tiny random model: the r0 adapter (pruned components zero) and its compact
    export score the same examples alike, sizes come from the files, and the verdict is computed."""
    from prunedlora.bench.demo_quality import DemoEval, score_demo_task
    from prunedlora.bench.scoring import EvalSettings
    from prunedlora.export import export_adapter
    from tests.export.conftest import make_fake_run

    run_dir = make_fake_run(tiny_model_path, tmp_path / "run", r0=8, b_std=0.5)
    export_adapter(run_dir, tmp_path / "export")
    settings = EvalSettings(max_examples=12, batch_size=4, exact_match_examples=2, max_new_tokens=4)
    payload = score_demo_task(DemoEval(task, settings), tiny_model_path, run_dir, tmp_path / "export")
    base, r0, export = payload["rows"]
    metric = "accuracy" if task == "sst2" else "answer_nll"
    assert payload["metric"] == metric and payload["eval_examples"] == 12
    assert r0[metric] == pytest.approx(export[metric], abs=1e-4)
    assert payload["r0_export_max_diff"] <= AGREEMENT_TOLERANCE
    key = "margin" if task == "sst2" else "logprob_sum"
    changed = [abs(x - y) for x, y in zip(base["per_example"][key], export["per_example"][key])]
    assert max(changed) > 10 * AGREEMENT_TOLERANCE  # the adapter changes the model, so the check has teeth
    assert (base["params"], base["bytes"]) == (0, 0)
    assert r0["average_rank"] == r0["max_rank"] == 8 and export["max_rank"] <= 8
    assert 0 < export["params"] < r0["params"] and 0 < export["bytes"] < r0["bytes"]
    if task == "gsm8k":
        assert export["exact_match_examples"] == 2
    assert isinstance(payload["beats_base"], bool)


@pytest.mark.slow
def test_the_demo_sst2_adapter_beats_the_base_model_on_dev(tmp_path, default_model_path):
    """The demo's SST-2 stage as `make demo` runs it (recipes/demo.yaml, train, export, score): the export
    must beat the base model on the 200 dev sentences by more than the split's noise (a paired 95%
    bootstrap interval above zero), and the r0 adapter must agree with it example by example."""
    from prunedlora import demo

    task = next(t for t in demo.DEMO_TASKS if t.name == "sst2")
    run_dir = demo._train_or_reuse(task, tmp_path / "sst2")
    adapter_dir = demo._export_or_reuse(run_dir, tmp_path / "adapters" / "sst2")
    payload = demo._score_or_reuse(task, default_model_path, run_dir, adapter_dir, tmp_path / "quality" / "sst2.json")
    assert (tmp_path / "quality" / "sst2.json").is_file()
    base, r0, export = payload["rows"]
    assert payload["eval_examples"] == 200
    assert payload["low"] > 0, format_table(payload)
    assert payload["beats_base"]
    assert r0["accuracy"] == pytest.approx(export["accuracy"], abs=1 / 200)
    assert export["params"] < r0["params"] and export["max_rank"] <= 16
