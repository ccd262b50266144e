"""validate_adapter: what vLLM may be given, and one clear line for what it may not (no vLLM here)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunedlora.errors import PrunedLoraError
from prunedlora.metadata import AdapterRecord, write_adapter_record
from prunedlora.serve.validate import (
    AdapterValidationError,
    base_linear_shapes,
    validate_adapter,
    validate_adapters,
)
from tests.serve.helpers import fold_scaling_like_export, make_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(vllm_tiny_model_path) -> Path:
    return vllm_tiny_model_path


@pytest.fixture(scope="module")
def good(base, tmp_path_factory) -> Path:
    return make_adapter(base, tmp_path_factory.mktemp("good") / "a", r=4, lora_alpha=8)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _refused(adapter, base, match, **kwargs) -> str:
    with pytest.raises(AdapterValidationError, match=match) as info:
        validate_adapter(adapter, base, name="x", **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith("adapter 'x'")
    return message


def test_plain_peft_adapter(base, good):
    info = validate_adapter(good, base, name="a")
    shapes = base_linear_shapes(base)
    assert set(info.modules) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    for module, lora in info.modules.items():
        assert (lora.rank, lora.scaling) == (4, 2.0)
        assert (lora.out_features, lora.in_features) == shapes[module]
    assert info.max_rank == info.slot_rank == 4
    assert info.record is None and info.notes == []
    assert info.num_params == sum(4 * (m.in_features + m.out_features) for m in info.modules.values())


def test_rank_and_alpha_patterns(base, tmp_path):
    adapter = make_adapter(
        base,
        tmp_path / "p",
        r=8,
        lora_alpha=16,
        target_modules=ALL,
        rank_pattern={"o_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 4.0},
        use_rslora=True,
    )
    info = validate_adapter(adapter, base)
    ranks = info.ranks
    assert ranks["model.layers.0.self_attn.o_proj"] == 2
    assert ranks["model.layers.1.self_attn.q_proj"] == 6
    assert ranks["model.layers.0.self_attn.q_proj"] == 8
    assert info.modules["model.layers.0.mlp.down_proj"].scaling == pytest.approx(4.0 / math.sqrt(8))
    assert info.modules["model.layers.0.self_attn.o_proj"].scaling == pytest.approx(16 / math.sqrt(2))
    assert info.slot_rank == 8 and info.widest_module.endswith("proj")


def test_export_style_adapter_with_record(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "e", r=6, lora_alpha=12, target_modules=ALL, rank_pattern={"v_proj": 3})
    fold_scaling_like_export(adapter)
    ranks = dict.fromkeys(validate_adapter(adapter, base).ranks, 6)
    write_adapter_record(
        adapter,
        AdapterRecord(
            base_model=str(base), r0=8, ranks=ranks, params_before=1, params_after=1, bytes_before=1, bytes_after=1
        ),
    )
    info = validate_adapter(adapter, base)
    assert all(m.scaling == pytest.approx(1.0) for m in info.modules.values())
    assert info.record is not None and info.record.r0 == 8
    (adapter / "prunedlora_adapter.json").write_text("{not json")
    info = validate_adapter(adapter, base)  # the record is optional: a broken one is a note, not a refusal
    assert info.record is None and "prunedlora_adapter.json" in info.notes[0]


def test_config_rank_above_tensors_needs_that_slot(base, tmp_path):
    """vLLM compares the config's r with max_lora_rank, not the tensors."""
    adapter = make_adapter(base, tmp_path / "r", r=16, rank_pattern={"q_proj": 4, "v_proj": 4})
    info = validate_adapter(adapter, base)
    assert info.max_rank == 4 and info.slot_rank == 16
    assert "r=16" in info.widest_module
    _refused(adapter, base, r"needs rank 16 \(r=16 in adapter_config.json\).*max_lora_rank 8", max_lora_rank=8)


def test_rank_above_slot_names_module_and_fix(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "big", r=12, target_modules=["q_proj"])
    message = _refused(adapter, base, "above the server's max_lora_rank 8", max_lora_rank=8)
    assert "model.layers.0.self_attn.q_proj" in message and "--max-lora-rank 16" in message
    assert validate_adapter(adapter, base, max_lora_rank=16).slot_rank == 12


def test_truncated_safetensors(good, base, tmp_path):
    adapter = _copy(good, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    _refused(adapter, base, "is truncated: its header describes")
    weights.write_bytes(data[:20])
    _refused(adapter, base, "damaged or truncated")


def test_pickled_bin_refused_with_export_hint(good, base, tmp_path):
    adapter = make_adapter(base, tmp_path / "pickled", safe_serialization=False)
    assert (adapter / "adapter_model.bin").exists()
    message = _refused(adapter, base, "ships a pickled adapter_model.bin")
    assert "prunedlora export" in message
    # A pickle beside a safetensors file is refused too: the adapter still ships one.
    both = _copy(good, tmp_path)
    shutil.copy(adapter / "adapter_model.bin", both / "adapter_model.bin")
    _refused(both, base, "ships a pickled adapter_model.bin")


def test_dora_refused(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "dora", use_dora=True)
    _refused(adapter, base, "uses DoRA")


def test_dora_tensors_refused_even_if_config_lies(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "dora2", use_dora=True)
    _edit_config(adapter, use_dora=False)
    _refused(adapter, base, "DoRA magnitude vectors")


def test_adalora_points_to_export(base, tmp_path):
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, AdaLoraConfig(init_r=6, target_r=2, target_modules=["q_proj"], total_step=10))
    peft_model.save_pretrained(tmp_path / "ada")
    message = _refused(tmp_path / "ada", base, "AdaLoRA")
    assert "prunedlora export ADAPTER OUT_DIR --from-adalora" in message


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"bias": "all"}, "trains biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "is a IA3 adapter"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"lora_bias": True}, "LoRA bias"),
        ({"r": 0}, "r must be a positive integer"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"r": 5}, "declares rank 5"),
    ],
)
def test_unsupported_configs(good, base, tmp_path, changes, match):
    adapter = _copy(good, tmp_path)
    _edit_config(adapter, **changes)
    _refused(adapter, base, match)


def test_missing_required_field(good, base, tmp_path):
    adapter = _copy(good, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["target_modules"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _refused(adapter, base, "lacks target_modules")


def test_wrong_shapes_from_another_base(base, other_tiny_model_path, tmp_path):
    adapter = make_adapter(other_tiny_model_path, tmp_path / "other")
    message = _refused(adapter, base, "belongs to another base model")
    assert "lora_A [4, 96]" in message and "64x64" in message


def test_module_missing_from_base(good, base, tmp_path):
    adapter = _copy(good, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    tensors = {k.replace("self_attn.q_proj", "self_attn.qq_proj"): v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    message = _refused(adapter, base, r"qq_proj \(and 1 more\), which is not a linear layer of base model")
    assert "q_proj" in message.split("named")[1]


@pytest.mark.parametrize(
    "targets, missing",
    [(["q_proj", "foo_proj"], "['foo_proj']"), (["v_proj", "bar", "q_proj"], "['bar']"), (r".*\.nope_proj", "nope")],
)
def test_target_modules_the_base_lacks_are_named(good, base, tmp_path, targets, missing):
    # the weights cover q_proj and v_proj; PEFT would refuse the extra entry, vLLM would silently load the rest
    adapter = _copy(good, tmp_path)
    _edit_config(adapter, target_modules=targets)
    message = _refused(adapter, base, "match no module of base model")
    assert missing in message and "q_proj" in message.split("named")[1]


def test_target_modules_regex_and_all_linear_accepted(good, base, tmp_path):
    adapter = _copy(good, tmp_path)
    for targets in (r".*\.(q_proj|v_proj)", "all-linear", ["self_attn.q_proj", "v_proj"]):
        _edit_config(adapter, target_modules=targets)
        assert set(validate_adapter(adapter, base).ranks) == set(validate_adapter(good, base).ranks)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_embedding_targets_refused(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "emb", target_modules=["q_proj", "embed_tokens"])
    _refused(adapter, base, "adapts an embedding")


def test_nonfinite_weights(good, base, tmp_path):
    adapter = _copy(good, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    _refused(adapter, base, "NaN or infinite")
    assert validate_adapter(adapter, base, check_finite=False).max_rank == 4


def test_unpaired_and_foreign_tensors(good, base, tmp_path):
    adapter = _copy(good, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    only_a = {k: v for k, v in tensors.items() if k != key}
    save_file(only_a, str(weights))
    _refused(adapter, base, "has no lora_B weight")
    save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(64)}, str(weights))
    _refused(adapter, base, "not a LoRA A/B weight")
    save_file({}, str(weights))
    _refused(adapter, base, "holds no LoRA tensors")


def test_missing_files(good, base, tmp_path):
    _refused(tmp_path / "nowhere", base, "is not a directory")
    adapter = _copy(good, tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    _refused(adapter, base, "adapter_model.safetensors is missing")
    (adapter / "adapter_config.json").write_text("[1, 2")
    _refused(adapter, base, "not valid JSON")
    (adapter / "adapter_config.json").unlink()
    _refused(adapter, base, "adapter_config.json is missing")


def test_base_without_safetensors(good, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PrunedLoraError, match="has no safetensors weights"):
        validate_adapter(good, tmp_path)


def test_validate_adapters_names_the_bad_one(good, base, tmp_path):
    bad = _copy(good, tmp_path)
    _edit_config(bad, use_dora=True)
    assert set(validate_adapters({"a": good, "b": good}, base)) == {"a", "b"}
    with pytest.raises(AdapterValidationError, match="adapter 'bad'"):
        validate_adapters({"a": good, "bad": bad}, base)
