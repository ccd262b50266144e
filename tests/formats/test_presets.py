"""The built-in tasks are presets of the generic formats, and reading them that way changed nothing:
the tokens and labels of their first 50 training and dev examples (and of every classification
candidate) hash to what the task-specific readers gave before the formats existed
(tests/fixtures/builtin_render_fingerprints.json, written by those readers). Same tokens and labels
mean the same scores on any machine; tests/bench/test_builtin_scores_unchanged.py checks the scores."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from prunedlora.tasks import LABELS, TASK_PRESETS, DataConfig, Example, load_examples, shared_data_dir
from prunedlora.train.data import tokenize_example

FINGERPRINTS = json.loads((Path(__file__).parents[1] / "fixtures" / "builtin_render_fingerprints.json").read_text())
# each task as the quality protocol reads it (max_length, dev carve of the full files)
CASES = {
    "sst2": {"max_length": 128},
    "rte": {"max_length": 256},
    "gsm8k": {"max_length": 384, "dev_size": 500},
    "codealpaca": {"max_length": 256, "dev_size": 500},
}


def fingerprint(tokenizer, task: str, source: str, split: str) -> str:
    options = dict(CASES[task])
    if source == "vendored":
        options.pop("dev_size", None)  # the vendored slices are smaller than the protocol's carve
    path = None if source == "vendored" else shared_data_dir() / task
    examples = load_examples(DataConfig(task=task, path=path, split=split, max_examples=50, **options))
    features = []
    for ex in examples:
        length = options["max_length"]
        features.append(
            [
                ex.index,
                ex.label,
                tokenize_example(tokenizer, ex, length),
                tokenize_example(tokenizer, ex, length, "all"),
            ]
        )
        if task in LABELS:
            features.append([tokenize_example(tokenizer, Example(ex.prompt, w, w), length) for w in LABELS[task]])
    return hashlib.sha256(json.dumps(features).encode()).hexdigest()


@pytest.mark.parametrize("key", sorted(FINGERPRINTS))
def test_builtin_task_renders_as_before(default_tokenizer, key):
    source, task, split = key.split("/")
    if source == "shared" and not shared_data_dir().is_dir():
        pytest.skip("needs ../shared/data (the full data sets)")
    assert fingerprint(default_tokenizer, task, source, split) == FINGERPRINTS[key]


def test_every_builtin_task_is_a_preset_of_a_registered_format():
    from prunedlora.formats import FORMATS

    assert set(TASK_PRESETS) == set(CASES)
    assert all(preset.format in FORMATS for preset in TASK_PRESETS.values())
