"""`prunedlora train` with a ``salr:`` section on the tiny model: two steps from a sparsify folder keep
a frozen residual frozen and record where the run came from; `prunedlora export` of the run writes an
adapter PEFT loads over the sparse base with the run's logits, and refuses the dense base."""

import json

import pytest
import torch
from safetensors.torch import load_file

from prunedlora import metadata
from prunedlora.cli import main
from prunedlora.salr import SalrError
from prunedlora.train.recipe import recipe_from_dict
from prunedlora.train.runner import train

WEIGHTS = "adapter_model.safetensors"


def salr_recipe(model_dir, salr, run_dir, steps=2):
    return recipe_from_dict(
        {
            "model": str(model_dir),
            "prune": False,
            "data": {"task": "sst2", "max_examples": 16, "max_length": 48},
            "salr": salr,
            "training": {
                "output_dir": str(run_dir),
                "max_steps": steps,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-2,
                "weight_decay": 0.1,  # AdamW moves a zero-gradient parameter: the freeze must undo it
                "save_steps": steps,
                "logging_steps": 1,
            },
        }
    )


@pytest.fixture(scope="module")
def frozen_run(tiny_model_path, tiny_salr, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("salr-train") / "run"
    result = train(salr_recipe(tiny_model_path, {"dir": str(tiny_salr.out_dir), "residual": "frozen"}, run_dir))
    return run_dir, result


def split(tensors, r):
    """(residual part, task part) of every A and B: the first r rows of A, the first r columns of B."""
    residual, task = {}, {}
    for key, value in tensors.items():
        if "lora_A" in key:
            residual[key], task[key] = value[:r], value[r:]
        else:
            residual[key], task[key] = value[:, :r], value[:, r:]
    return residual, task


def test_two_steps_keep_a_frozen_residual_frozen_and_train_the_task_part(frozen_run, tiny_salr):
    run_dir, result = frozen_run
    r = tiny_salr.config.residual_rank
    start_res, start_task = split(load_file(tiny_salr.out_dir / "adapter" / WEIGHTS), r)
    end_res, end_task = split(load_file(run_dir / "adapter" / WEIGHTS), r)
    assert result.global_step == 2 and sorted(start_res) == sorted(end_res)
    assert all(torch.equal(start_res[k], end_res[k]) for k in start_res)
    assert any(not torch.equal(start_task[k], end_task[k]) for k in start_task)
    assert set(result.ranks.values()) == {tiny_salr.config.rank}  # the adapter keeps its full rank


def test_the_run_record_names_the_sparse_base_and_the_source(frozen_run, tiny_salr, tiny_model_path):
    run_dir, _ = frozen_run
    record = metadata.read_run_record(run_dir)
    base = (tiny_salr.out_dir / "base").resolve()
    assert record.base_model == str(base) and record.r0 == tiny_salr.config.rank
    assert record.lora_alpha == tiny_salr.config.lora_alpha
    source = record.training["salr_source"]
    assert source["residual"] == "frozen" and source["source_model"] == str(tiny_model_path.resolve())
    assert source["config"]["residual_rank"] == tiny_salr.config.residual_rank and source["bytes"]["compressed_file"]
    assert record.training["salr"]["dir"] == str(tiny_salr.out_dir)


def test_export_serves_the_run_over_the_sparse_base_with_the_same_logits(
    frozen_run, tiny_salr, tiny_model_path, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _ = frozen_run
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    base_dir = (tiny_salr.out_dir / "base").resolve()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    adapter_record = metadata.read_adapter_record(out)
    assert adapter_record.training["training"]["salr_source"]["residual"] == "frozen"

    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])
    with torch.no_grad():
        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "adapter")
        expected = trained.eval()(input_ids=ids).logits
        served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
        got = served.eval()(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-4, rtol=0)

    capsys.readouterr()  # over the dense model it was pruned from: refused in one line, nothing written
    wrong = tmp_path / "wrong"
    assert main(["export", str(run_dir), str(wrong), "--base-model", str(tiny_model_path)]) == 2
    err = capsys.readouterr().err
    assert "is a SALR run" in err and err.count("\n") == 1 and not wrong.exists()


def test_a_trainable_residual_moves_and_a_missing_folder_is_made_first(tiny_model_path, tmp_path):
    made = tmp_path / "made"
    options = {"sparsity": 0.5, "residual_rank": 2, "task_rank": 2, "lora_alpha": 8.0}
    result = train(
        salr_recipe(tiny_model_path, {"dir": str(made), "residual": "trainable", "sparsify": options}, tmp_path / "r")
    )
    assert (made / "salr.json").is_file() and result.global_step == 2
    start, _ = split(load_file(made / "adapter" / WEIGHTS), 2)
    end, _ = split(load_file(tmp_path / "r" / "adapter" / WEIGHTS), 2)
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_a_damped_residual_moves_less_than_a_trainable_one_and_the_run_records_its_scale(
    tiny_salr, tiny_model_path, tmp_path
):
    r = tiny_salr.config.residual_rank
    start, _ = split(load_file(tiny_salr.out_dir / "adapter" / WEIGHTS), r)
    moved = {}
    for name, scale in (("full", None), ("damped", 0.05)):
        section = {"dir": str(tiny_salr.out_dir), "residual": "trainable", "residual_lr_scale": scale}
        train(salr_recipe(tiny_model_path, section, tmp_path / name))
        end, _ = split(load_file(tmp_path / name / "adapter" / WEIGHTS), r)
        moved[name] = sum(float((end[k] - start[k]).norm()) for k in start)
        source = metadata.read_run_record(tmp_path / name).training["salr_source"]
        assert source["residual"] == "trainable" and source["residual_lr_scale"] == scale
    assert 0 < moved["damped"] < 0.2 * moved["full"]


def test_a_scale_on_a_folder_recorded_frozen_is_refused_before_training(tiny_salr, tiny_model_path, tmp_path):
    """tiny_salr records residual: frozen; a recipe that leaves the mode to the folder cannot scale it."""
    recipe = salr_recipe(tiny_model_path, {"dir": str(tiny_salr.out_dir), "residual_lr_scale": 0.1}, tmp_path / "r")
    with pytest.raises(SalrError, match="applies to a trainable residual") as info:
        train(recipe)
    assert "\n" not in str(info.value) and not (tmp_path / "r").exists()


def test_a_folder_made_by_a_recipe_is_calibrated_on_its_text(tiny_model_path, tmp_path):
    """salr.calibration reaches sparsify: the folder the first run makes records the recipe's text."""
    import hashlib

    text = tmp_path / "task.txt"
    text.write_text("Natalia sold clips to 48 of her friends in April. " * 40)
    options = {"residual_rank": 2, "task_rank": 2, "residual_fit": "whitened", "calibration_samples": 2}
    options["calibration_length"] = 32
    section = {"dir": str(tmp_path / "made"), "sparsify": options, "calibration": str(text)}
    train(salr_recipe(tiny_model_path, section, tmp_path / "r", steps=1))
    record = json.loads((tmp_path / "made" / "salr.json").read_text())
    assert record["calibration"]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()


def test_a_folder_from_another_model_is_refused(tiny_salr, tmp_path, default_model_path):
    recipe = salr_recipe(default_model_path, {"dir": str(tiny_salr.out_dir)}, tmp_path / "r")
    with pytest.raises(SalrError, match="was sparsified from .* not from the recipe's model") as info:
        train(recipe)
    assert "\n" not in str(info.value) and not (tmp_path / "r").exists()
