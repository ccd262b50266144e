"""The method seam (``prunedlora.method``): a recipe names one method, old spellings name the same one,
contradictions are one line, and a new method is one class the runner drives without knowing it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunedlora.method import METHODS, Method
from prunedlora.rank.config import ConfigError
from prunedlora.train.recipe import load_recipe, recipe_from_dict

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "name, method",
    [
        ("smollm2-sst2", "prunedlora"),
        ("smollm2-gsm8k", "prunedlora"),
        ("smollm2-codealpaca", "prunedlora"),
        ("smollm2-loraprune", "loraprune"),
        ("smollm2-salr", "salr"),
        ("demo", "prunedlora"),
    ],
)
def test_shipped_recipes_in_the_older_spelling_name_their_method(name, method):
    assert load_recipe(name).method_class().name == method


def test_protocol_recipes_keep_their_text_and_read_as_before():
    """The quality bench hashes these files' raw mappings into its cell keys: they stay as written and
    read as PrunedLoRA recipes; plain LoRA is the same recipe with prune false."""
    for path in sorted((ROOT / "prunedlora" / "bench" / "protocol_recipes").glob("*.yaml")):
        assert "name:" not in path.read_text()
        assert load_recipe(path).method_class().name == "prunedlora"
        plain = load_recipe(path, {"prune": "false"})
        assert plain.method_class() is Method and not plain.prune
        assert plain.method.max_rank == plain.method.r0  # pruning-only options dropped


def _raw(**parts):
    return {"model": "default", "data": {"task": "sst2"}, "training": {"max_steps": 20}, **parts}


@pytest.mark.parametrize(
    "new, old",
    [
        ({"method": {"name": "lora", "r0": 8}}, {"prune": False, "method": {"r0": 8}}),
        ({"method": {"name": "prunedlora", "r0": 8, "target_rank": 2}}, {"method": {"r0": 8, "target_rank": 2}}),
        (
            {"method": {"name": "loraprune", "r0": 8}, "loraprune": {"sparsity": 0.3}},
            {"prune": False, "method": {"r0": 8}, "loraprune": {"sparsity": 0.3}},
        ),
    ],
)
def test_the_tagged_spelling_reads_as_the_older_one(new, old):
    a, b = recipe_from_dict(_raw(**new)), recipe_from_dict(_raw(**old))
    assert a.method_class() is b.method_class()
    assert a.to_dict() == b.to_dict()


def test_a_section_alone_names_its_method_without_prune_false():
    recipe = recipe_from_dict(_raw(loraprune={"sparsity": 0.3}))
    assert recipe.method_class().name == "loraprune" and recipe.to_dict()["method"]["name"] == "loraprune"
    assert recipe.method_class().export_command == "prune-export"


@pytest.mark.parametrize(
    "parts, message",
    [
        ({"method": {"name": "bogus"}}, "method.name must be one of prunedlora, lora, loraprune, salr; got 'bogus'"),
        ({"method": {"name": "lora"}, "loraprune": {}}, "method.name lora has no loraprune section"),
        ({"method": {"name": "lora"}, "prune": True}, "prune: true contradicts method.name lora"),
        ({"method": {"name": "prunedlora"}, "prune": False}, "prune: false contradicts method.name prunedlora"),
        ({"prune": True, "loraprune": {}}, "set prune: false"),
        ({"loraprune": {}, "salr": {"dir": "x"}}, "not both"),
    ],
)
def test_contradictions_are_one_line(parts, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as err:
        recipe_from_dict(_raw(**parts))
    assert "\n" not in str(err.value)


class FrozenA(Method):
    """A method of one class: plain LoRA with A frozen at its initialisation (LoRA-FA's idea)."""

    name = "frozen-a"

    def build_model(self, model_dir, build_lora):
        model = super().build_model(model_dir, build_lora)
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
        return model


def test_a_new_method_is_one_class_the_runner_drives(tiny_model_path, tmp_path):
    from prunedlora.train.runner import train

    METHODS.register(FrozenA)
    try:
        raw = _raw(
            method={"name": "frozen-a", "r0": 4, "target_modules": ["q_proj"]},
            model=str(tiny_model_path),
            data={"task": "sst2", "max_examples": 32, "max_length": 64},
            training={"output_dir": str(tmp_path / "run"), "max_steps": 3, "eval_examples": 4, "save_steps": 100},
        )
        recipe = recipe_from_dict(raw)
        assert recipe.method_class() is FrozenA and not recipe.prune
        result = train(recipe)
    finally:
        METHODS.unregister("frozen-a")
    from safetensors.torch import load_file

    from prunedlora.train.runner import build_peft_model

    assert set(result.ranks.values()) == {4}
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    torch.manual_seed(0)  # as the runner seeds before building: the same initial A
    fresh = {
        k: v for k, v in build_peft_model(Path(tiny_model_path), recipe.method).state_dict().items() if "lora_" in k
    }
    a_keys = [k for k in adapter if "lora_A" in k]
    assert a_keys and len(a_keys) == len([k for k in adapter if "lora_B" in k])
    for key in a_keys:
        (match,) = [
            v
            for k, v in fresh.items()
            if k.endswith(key.split("base_model.model.", 1)[1].replace(".weight", ".default.weight"))
        ]
        assert torch.equal(adapter[key], match)  # A never moved
    assert all(adapter[k.replace("lora_A", "lora_B")].abs().sum() > 0 for k in a_keys)  # B trained from zero
