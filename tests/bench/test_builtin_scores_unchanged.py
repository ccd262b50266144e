"""The built-in tasks read through the generic formats score exactly as they did: the base model's
per-example numbers on the first 50 held-out examples equal the committed base cells' (the quality
protocol's table, docs/results.md), so reading SST-2, GSM8K and CodeAlpaca as presets of the chat,
prompt-completion, alpaca and classification formats changed nothing measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunedlora.tasks import shared_data_dir

CELLS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "quality_protocol" / "cells"
BASE_CELLS = {
    "sst2": "sst2-base-s0-66bb9b57071c.json",
    "gsm8k": "gsm8k-base-s0-375c4e5a61fa.json",
    "codealpaca": "codealpaca-base-s0-e4f31a3b07f4.json",
}
FIRST = 50
# The cells were scored on an AMD EPYC; float32 on another CPU moves the numbers in their 5th-6th
# significant digit (an Intel Xeon with AMX, 2026-12-08: at most 1.1e-5 relative on summed log-probs, 2.9e-5
# absolute on SST-2's label margins), while a changed
# prompt, label or carve moves them by whole units. Exact equality of the tokens and labels scored is
# tests/formats/test_presets.py; here the numbers, at the tolerance another machine allows.
TOLERANCE = 1e-4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shared_data_dir().is_dir(), reason="needs ../shared/data (the full data sets)"),
]


@pytest.fixture(scope="module")
def base_model():
    from prunedlora.bench.scoring import load_model, load_tokenizer
    from prunedlora.models import default_model_dir

    model_dir = default_model_dir(progress=False)
    return load_model(model_dir), load_tokenizer(model_dir)


@pytest.mark.parametrize("task", sorted(BASE_CELLS))
def test_base_per_example_scores_equal_the_committed_cell(base_model, task):
    from prunedlora.bench.scoring import EvalSettings, score_task

    cell = json.loads((CELLS / BASE_CELLS[task]).read_text())
    data = cell["spec"]["recipe"]["data"]
    settings = EvalSettings(
        max_examples=FIRST,
        max_length=int(data["max_length"]),
        dev_size=data.get("dev_size"),
        exact_match_examples=0,
    )
    model, tokenizer = base_model
    got = score_task(model, tokenizer, task, shared_data_dir() / task, settings)["per_example"]
    want = {k: v[:FIRST] for k, v in cell["eval"]["per_example"].items()}
    assert got["index"] == want["index"]
    for key in set(want) - {"index"}:
        if key == "tokens":
            assert got[key] == want[key]
        else:
            # margins are differences of float32 log-probs near zero: their error is absolute
            assert got[key] == pytest.approx(want[key], rel=TOLERANCE, abs=TOLERANCE), key
