"""Recipes: the shipped ones are package data, named by file or by name."""

from pathlib import Path

import pytest

from prunedlora.rank.config import ConfigError
from prunedlora.train.recipe import load_recipe, packaged_recipes

SHIPPED = [
    "alpaca-example",
    "chat-example",
    "classification-example",
    "demo",
    "demo-gsm8k",
    "prompt-completion-example",
    "smollm2-codealpaca",
    "smollm2-gsm8k",
    "smollm2-loraprune",
    "smollm2-salr",
    "smollm2-sst2",
    "text-example",
]


def test_the_package_ships_the_recipes():
    assert sorted(packaged_recipes()) == SHIPPED


@pytest.mark.parametrize("spec", ["smollm2-sst2", "smollm2-sst2.yaml", "recipes/smollm2-sst2.yaml"])
def test_a_shipped_recipe_by_name_from_any_folder(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the packaged file is read
    recipe = load_recipe(spec, {"training.max_steps": "300"})
    assert recipe.data.task == "sst2" and recipe.training.max_steps == 300


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text("model: mine\ndata: {task: rte}\n")
    assert load_recipe("demo").model == "mine"


def test_unknown_recipe_lists_the_shipped_names(tmp_path):
    with pytest.raises(
        ConfigError, match="not found; give a YAML file or a shipped recipe's name: alpaca-example, chat-example"
    ):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("elsewhere/smollm2-sst2.yaml")  # a path that is not the recipes folder is not guessed


@pytest.mark.parametrize("name", ["smollm2-sst2", "smollm2-gsm8k", "smollm2-codealpaca"])
def test_task_recipes_use_the_protocols_best_settings(name):
    """What docs/results.md's quality protocol found best: obs (= obs-input with its compensation
    update), global allocation, every module inside vLLM's 16-slot."""
    method = load_recipe(name).method
    assert (method.criterion, method.recovery, method.allocation) == ("obs-input", "compensate", "global")
    assert method.max_rank == 16 and method.target_rank == 8
    # r0 = 64 measured ahead of 32 on SST-2 (three seeds); the other tasks keep the r0 they were measured at
    assert method.r0 == (64 if name == "smollm2-sst2" else 32) and method.lora_alpha == 2 * method.r0
