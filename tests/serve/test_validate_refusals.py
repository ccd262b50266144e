"""validate_adapter refusals not covered in test_validate.py, each next to the good adapter it was made
from (which validates), so a refusal cannot come from a broken fixture. No vLLM needed.

Break, made once for each: drop the check in prunedlora/serve/validate.py -> the adapter is accepted
(or refused by a later check with another message) and the ``match`` below goes red.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunedlora.serve.validate import AdapterValidationError, validate_adapter
from tests.serve.helpers import make_adapter

WEIGHTS = "adapter_model.safetensors"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def good(vllm_tiny_model_path, tmp_path_factory) -> Path:
    return make_adapter(vllm_tiny_model_path, tmp_path_factory.mktemp("good") / "a", r=4, lora_alpha=8)


@pytest.fixture
def copy(good, tmp_path) -> Path:
    shutil.copytree(good, tmp_path / "a")
    return tmp_path / "a"


def _refused(adapter: Path, base: Path, match: str) -> None:
    with pytest.raises(AdapterValidationError, match=match) as info:
        validate_adapter(adapter, base, name="x")
    message = str(info.value)
    assert "\n" not in message and message.startswith("adapter 'x'")


def _edit_tensors(adapter: Path, edit) -> None:
    tensors = load_file(str(adapter / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(adapter / WEIGHTS))


def test_the_fixture_is_valid(good, vllm_tiny_model_path):
    info = validate_adapter(good, vllm_tiny_model_path, name="x")
    assert info.max_rank == 4 and A_KEY in load_file(str(good / WEIGHTS))


@pytest.mark.parametrize("content", ["[1, 2]", '"lora"', "null", "4"])
def test_config_that_is_not_a_json_object(copy, vllm_tiny_model_path, content):
    (copy / "adapter_config.json").write_text(content)
    _refused(copy, vllm_tiny_model_path, "does not hold a JSON object")


@pytest.mark.parametrize("alpha", [0, -8, "8", None, True])  # True: JSON true is a bool, not an alpha of 1
def test_bad_lora_alpha(copy, vllm_tiny_model_path, alpha):
    path = copy / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = alpha
    path.write_text(json.dumps(config))
    _refused(copy, vllm_tiny_model_path, r"lora_alpha must be a positive number, got ")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_non_float_tensors(copy, vllm_tiny_model_path, dtype):
    _edit_tensors(copy, lambda t: t.__setitem__(A_KEY, t[A_KEY].to(dtype)))
    _refused(copy, vllm_tiny_model_path, rf"tensor {A_KEY} has dtype {dtype}; LoRA weights must be floating point")


def test_a_and_b_of_different_ranks(copy, vllm_tiny_model_path):
    _edit_tensors(copy, lambda t: t.__setitem__(A_KEY, t[A_KEY][:3].clone()))
    module = r"module model\.layers\.0\.self_attn\.q_proj"
    _refused(copy, vllm_tiny_model_path, module + r" has lora_A \[3, 64\] and lora_B \[")


@pytest.mark.parametrize(("drop", "missing"), [(A_KEY, "lora_A"), (B_KEY, "lora_B")])
def test_a_module_without_one_factor(copy, vllm_tiny_model_path, drop, missing):
    _edit_tensors(copy, lambda t: t.pop(drop))
    _refused(copy, vllm_tiny_model_path, rf"module model\.layers\.0\.self_attn\.q_proj has no {missing} weight")


def test_three_problems_in_one_message(copy, vllm_tiny_model_path):
    """Every problem at once (as vLLM's PEFTHelper reports): a config problem, a tensor problem and a
    module problem, named in one line separated by '; ', so the user fixes them in one pass.

    Break: make validate_adapter raise at the first problem -> only one of the three is named."""
    path = copy / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "bias": "all"}))
    _edit_tensors(copy, lambda t: (t.__setitem__(A_KEY, t[A_KEY] * float("nan")), t.pop(B_KEY)))
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter(copy, vllm_tiny_model_path, name="x")
    message = str(info.value)
    assert "\n" not in message and message.startswith("adapter 'x'")
    assert "trains biases" in message
    assert f"tensor {A_KEY} holds NaN or infinite values" in message
    assert "module model.layers.0.self_attn.q_proj has no lora_B weight" in message
    assert message.count("; ") >= 2


def test_a_problem_of_every_module_is_named_once(copy, vllm_tiny_model_path):
    """A config rank that no module has is one problem, naming the first module and counting the rest."""
    path = copy / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "r": 5}))
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter(copy, vllm_tiny_model_path, name="x")
    message = str(info.value)
    modules = {k.rsplit(".lora_", 1)[0] for k in load_file(str(copy / WEIGHTS))}
    assert message.count("declares rank 5") == 1
    assert f"(and {len(modules) - 1} more)" in message


def test_several_adapters_are_named_in_one_message(good, copy, vllm_tiny_model_path, tmp_path):
    from prunedlora.serve.validate import validate_adapters

    other = shutil.copytree(copy, tmp_path / "b")
    for adapter in (copy, other):
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))
    with pytest.raises(AdapterValidationError) as info:
        validate_adapters({"good": good, "one": copy, "two": other}, vllm_tiny_model_path)
    message = str(info.value)
    assert "adapter 'one'" in message and "adapter 'two'" in message and "'good'" not in message
