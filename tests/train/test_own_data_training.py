"""A recipe holding only the model and the data trains: the run's length defaults to one epoch, the
pruning steps to fractions of it, a dev split is carved and its loss recorded; epochs count steps."""

from __future__ import annotations

import json
import math

import pytest

from prunedlora import metadata
from prunedlora.tasks import VENDORED_DATA_DIR
from prunedlora.train.recipe import PRUNE_END_FRACTION, load_recipe, recipe_from_dict, schedule_defaults
from prunedlora.train.runner import train

CHAT = VENDORED_DATA_DIR / "examples" / "chat.jsonl"


def test_a_five_line_recipe_trains_with_defaults(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(f"model: {tiny_model_path}\ndata:\n  path: {CHAT}\n  format: chat\n")
    recipe = load_recipe(tmp_path / "recipe.yaml")
    result = train(recipe)
    record = json.loads((result.run_dir / metadata.RUN_RECORD_FILE).read_text())
    train_rows = 60 - 6  # a tenth of the 60 conversations is carved off as the dev split
    assert result.global_step == math.ceil(train_rows / 8)  # one epoch at the default batch of 8
    assert result.average_rank == pytest.approx(8.0)  # the default target, reached before the run ends
    assert record["training"]["dev_losses"] and len(result.dev_losses) >= 1
    assert record["method"]["prune_end_step"] < result.global_step


def test_epochs_count_optimizer_steps(tiny_model_path, tmp_path):
    raw = {
        "model": str(tiny_model_path),
        "prune": False,
        "data": {"path": str(CHAT), "format": "chat", "max_examples": 12, "max_length": 256},
        "training": {"output_dir": str(tmp_path / "run"), "epochs": 2, "per_device_train_batch_size": 4},
    }
    result = train(recipe_from_dict(raw))
    assert result.global_step == 2 * 12 // 4


def test_pruning_steps_default_to_fractions_of_the_run_and_given_ones_win():
    filled = schedule_defaults({}, 90)
    assert filled == {"prune_start_step": 9, "prune_end_step": int(90 * PRUNE_END_FRACTION), "prune_every": 6}
    assert schedule_defaults({"prune_end_step": 30}, 90)["prune_end_step"] == 30
    assert schedule_defaults({}, 1) == {"prune_start_step": 0, "prune_end_step": 0, "prune_every": 1}


def test_explicit_pruning_steps_are_still_checked_against_the_run():
    from prunedlora.rank.config import ConfigError

    recipe = load_recipe("smollm2-sst2", {"training.max_steps": "20"})
    with pytest.raises(ConfigError, match=r"prune_end_step \(100\) must be before max_steps \(20\)"):
        recipe.with_steps(20)  # what the runner does before the model loads
    # a recipe that leaves them out has them placed inside the run
    raw = {"model": "default", "data": {"task": "sst2"}, "training": {"max_steps": 20}}
    assert recipe_from_dict(raw).method.prune_end_step < 20


def test_plain_lora_ignores_pruning_only_options():
    recipe = load_recipe("smollm2-sst2", {"prune": "false", "method.r0": "8"})
    assert recipe.method.r0 == 8 and recipe.method.max_rank == 8


def test_max_steps_and_epochs_together_are_refused():
    from prunedlora.errors import PrunedLoraError

    raw = {"model": "default", "data": {"task": "sst2"}, "training": {"max_steps": 5, "epochs": 1}}
    with pytest.raises(PrunedLoraError, match="not both"):
        recipe_from_dict(raw)
