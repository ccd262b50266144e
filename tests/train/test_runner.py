"""The Trainer path end to end on a tiny model: outputs, resume, masks under accumulation."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from prunedlora import metadata
from prunedlora.config import ConfigError
from prunedlora.train.recipe import load_recipe, recipe_from_dict
from prunedlora.train.runner import train


def tiny_recipe(model_dir, run_dir, **method):
    return recipe_from_dict(
        {
            "model": str(model_dir),
            "data": {"task": "sst2", "max_examples": 96, "max_length": 64},
            "method": {"r0": 8, "lora_alpha": 16, "target_rank": 3, "target_modules": ["q_proj", "v_proj", "down_proj"],
                       "prune_start_step": 1, "prune_end_step": 6, "prune_every": 2, **method},
            "training": {"output_dir": str(run_dir), "max_steps": 9, "per_device_train_batch_size": 4,
                         "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "save_steps": 4,
                         "save_total_limit": None, "logging_steps": 1},
        }
    )


class Crash(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated interruption")


def _adapter(run_dir):
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def test_run_dir_holds_adapter_masks_history_and_plot(tiny_model_path, tmp_path):
    result = train(tiny_recipe(tiny_model_path, tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "masks.safetensors",
                 "rank_history.json", "prunedlora_run.json", "ranks.png"):
        assert (run / name).is_file(), name
    masks = metadata.load_masks(run / "masks.safetensors")
    record = metadata.read_run_record(run)
    assert record.ranks == {n: int(m.sum()) for n, m in masks.items()} == result.ranks
    assert record.average_rank == 3
    history = metadata.read_rank_history(run / "rank_history.json")
    assert [e["step"] for e in history] == [1, 3, 5, 6]
    # the saved adapter has pruned components exactly zero
    tensors = _adapter(run)
    for name, mask in masks.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert torch.all(a[~mask] == 0) and torch.all(b[:, ~mask] == 0)
        assert torch.any(b[:, mask] != 0)


def test_interrupted_run_resumes_to_the_same_masks_and_weights(tiny_model_path, tmp_path):
    reference = train(tiny_recipe(tiny_model_path, tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(tiny_model_path, tmp_path / "b"), callbacks=[Crash(at_step=6)])
    assert (tmp_path / "b" / "checkpoint-4").is_dir() and not (tmp_path / "b" / "masks.safetensors").exists()
    resumed = train(tiny_recipe(tiny_model_path, tmp_path / "b"))
    assert resumed.ranks == reference.ranks
    assert metadata.read_rank_history(tmp_path / "b" / "rank_history.json") == metadata.read_rank_history(
        tmp_path / "a" / "rank_history.json"
    )
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_plain_lora_baseline_keeps_r0(tiny_model_path, tmp_path):
    recipe = tiny_recipe(tiny_model_path, tmp_path / "plain")
    recipe.prune = False
    result = train(recipe)
    assert set(result.ranks.values()) == {8}


def test_bad_target_module_lists_existing_names(tiny_model_path, tmp_path):
    with pytest.raises(ConfigError, match=r"'qkv' matches no module.*down_proj, gate_proj"):
        train(tiny_recipe(tiny_model_path, tmp_path / "bad", target_modules=["qkv"]))


def test_recipe_overrides_and_errors(tmp_path):
    path = Path(__file__).parents[2] / "recipes" / "smollm2-sst2.yaml"
    recipe = load_recipe(path, {"training.max_steps": "20", "target_rank": "4", "method.criterion": "taylor"})
    assert recipe.training.max_steps == 20 and recipe.method.target_rank == 4 and recipe.method.criterion == "taylor"
    with pytest.raises(ConfigError, match="unknown option --bogus"):
        load_recipe(path, {"bogus": "1"})
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["smollm2-sst2", "smollm2-gsm8k", "smollm2-codealpaca", "demo", "demo-gsm8k"])
def test_shipped_recipes_parse(name):
    load_recipe(Path(__file__).parents[2] / "recipes" / f"{name}.yaml")


@pytest.mark.slow
def test_short_real_run_on_smollm2_lowers_loss_and_hits_target(default_model_path, tmp_path):
    recipe = recipe_from_dict(
        {
            "model": str(default_model_path),
            "data": {"task": "sst2", "max_examples": 256, "max_length": 80},
            "method": {"r0": 16, "lora_alpha": 32, "target_rank": 4, "prune_start_step": 3, "prune_end_step": 15,
                       "prune_every": 3},
            "training": {"output_dir": str(tmp_path / "real"), "max_steps": 20, "per_device_train_batch_size": 8,
                         "learning_rate": 3e-4, "logging_steps": 2, "save_steps": 100},
        }
    )
    result = train(recipe)
    first = sum(loss for _, loss in result.losses[:2]) / 2
    last = sum(loss for _, loss in result.losses[-2:]) / 2
    assert last < 0.7 * first, result.losses
    assert result.average_rank == 4
    assert len(set(result.ranks.values())) > 1
