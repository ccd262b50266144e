"""The AdaLoRA baseline: its schedule maps onto the recipe's, it ends at the same budget, and the
adapter it saves is the model it trained."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from prunedlora.bench.adalora import AdaLoraBenchError, ranks_from_pattern, schedule_window, train_adalora
from prunedlora.bench.quality import QualityBenchConfig, make_cell
from prunedlora.bench.scoring import load_model
from prunedlora.train.recipe import recipe_from_dict


def _recipe(model, run_dir, steps=6, **method):
    return recipe_from_dict(
        {
            "model": str(model),
            "data": {"task": "sst2", "max_examples": 32, "max_length": 64},
            "method": {
                "r0": 8,
                "lora_alpha": 16,
                "target_rank": 2,
                "prune_start_step": 1,
                "prune_end_step": 4,
                "prune_every": 1,
                **method,
            },
            "training": {
                "output_dir": str(run_dir),
                "max_steps": steps,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-2,
                "logging_steps": 1,
            },
        }
    )


def test_schedule_window_matches_the_pruning_events(tmp_path):
    recipe = _recipe("unused", tmp_path, steps=150, prune_start_step=20, prune_end_step=100, prune_every=10)
    assert schedule_window(recipe, num_modules=14) == (20, 50, 10)  # budget at the target from step 100 on
    late = _recipe("unused", tmp_path, steps=4, prune_start_step=1, prune_end_step=4)
    with pytest.raises(AdaLoraBenchError, match="not before max_steps"):
        schedule_window(late, num_modules=14)


def test_ranks_from_pattern_reads_peft_keys():
    pattern = {
        "model.layers.0.self_attn.q_proj.lora_E": [True, False, True],
        "base_model.model.model.layers.1.mlp.up_proj.lora_E.default": [False, False, False],
    }
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert ranks_from_pattern(pattern, names, init_r=3) == {names[0]: 2, names[1]: 0, names[2]: 3}
    assert ranks_from_pattern(None, names[:1], init_r=4) == {names[0]: 4}


def test_adalora_reaches_the_budget_and_saves_what_it_trained(tiny_model_path, tmp_path):
    result = train_adalora(_recipe(tiny_model_path, tmp_path / "r"), tmp_path / "ada", keep_model=True)
    assert sum(result.ranks.values()) == 2 * len(result.ranks) and result.global_step == 6
    assert len(set(result.ranks.values())) > 1  # AdaLoRA allocates unevenly
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2, 77, 9000, 12]])
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids).logits
        saved = load_model(tiny_model_path, result.adapter_dir)(input_ids=ids).logits
        base = load_model(tiny_model_path)(input_ids=ids).logits
    assert float((trained - base).abs().max()) > 1e-3  # the adapter matters ...
    assert float((trained - saved).abs().max()) < 1e-4  # ... and the saved one is the trained one
    again = train_adalora(_recipe(tiny_model_path, tmp_path / "r"), tmp_path / "ada")  # finished: reused
    assert again.ranks == result.ranks and again.model is None


def test_quality_cell_gives_adalora_the_recipe_budget(tiny_model_path, tmp_path):
    config = QualityBenchConfig(
        model=str(tiny_model_path),
        tasks=["sst2"],
        methods=["adalora"],
        seeds=[0],
        max_steps=10,
        r0=8,
        target_rank=2,
        data_dir="vendored",
    )
    cell = make_cell(config, "sst2", "adalora", 0, Path(tiny_model_path), None, tmp_path)
    recipe = recipe_from_dict(copy.deepcopy(cell.spec["recipe"]))
    assert recipe.method.r0 == 8 and recipe.method.target_rank == 2 and cell.spec["adalora"]
