"""Each supported decoder family end to end on a tiny random model (tests/families.py): its layers read
from the model (``modelfacts``), a few training steps with pruning under the default ``all-linear``
targets and global allocation (so modules end at different ranks), and an export that PEFT loads to
the same logits as the run's r0 adapter. The vLLM half is tests/serve/test_families_vllm.py (slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunedlora import metadata
from prunedlora.modelfacts import (
    FAMILIES,
    BaseModelError,
    UnsupportedModelError,
    family_of,
    model_facts,
    resolve_targets,
)
from tests.export.conftest import max_abs_diff, peft_logits
from tests.families import FAMILIES as TINY
from tests.families import build_tiny_family

PARITY = 1e-4


@pytest.fixture(scope="module", params=TINY, ids=lambda f: f.slug)
def family_model(request, tmp_path_factory, default_model_path) -> tuple:
    family = request.param
    return family, build_tiny_family(family, tmp_path_factory.mktemp(family.slug), default_model_path)


def family_recipe(model_dir: Path, run_dir: Path, **method) -> dict:
    """A few steps of PrunedLoRA on the default targets (all-linear), global allocation, r0 8 -> 3."""
    return {
        "model": str(model_dir),
        "data": {"task": "sst2", "max_examples": 16, "max_length": 96},
        "method": {
            "r0": 8,
            "lora_alpha": 16,
            "target_rank": 3,
            "allocation": "global",
            "prune_start_step": 1,
            "prune_end_step": 3,
            "prune_every": 1,
            **method,
        },
        "training": {
            "output_dir": str(run_dir),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-3,
            "save_steps": 100,
            "logging_steps": 1,
            "eval_examples": 4,
        },
    }


def test_layers_are_read_from_the_model(family_model):
    family, path = family_model
    facts = model_facts(path)
    assert facts.family.name == family.name and facts.num_layers == 2 and facts.layer_prefix == "model.layers"
    assert facts.projections == family.projections
    assert resolve_targets(path, "all-linear") == list(family.projections)
    assert len(facts.module_paths()) == 2 * len(family.projections)
    packed = facts.packed_layers()
    assert set(packed) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert sum(len(v) for v in packed.values()) == len(family.projections)
    hidden = 64
    shapes = {m.name: (m.out_features, m.in_features) for m in facts.modules}
    assert shapes["o_proj"] == (hidden, hidden) and shapes["down_proj"] == (hidden, 128)
    biased = {m.name for m in facts.modules if m.bias}
    assert biased == ({"q_proj", "k_proj", "v_proj"} if family.name == "Qwen2" else set())


def test_train_with_pruning_then_export_with_peft_parity(family_model, tmp_path):
    from prunedlora.export.exporter import export_adapter
    from prunedlora.export.inspection import inspect_adapter
    from prunedlora.train.recipe import recipe_from_dict
    from prunedlora.train.runner import train

    family, path = family_model
    result = train(recipe_from_dict(family_recipe(path, tmp_path / "run")))
    ranks = result.ranks
    assert {n.rsplit(".", 1)[-1] for n in ranks} == set(family.projections)
    assert len(ranks) == 2 * len(family.projections)
    assert result.average_rank == pytest.approx(3.0) and len(set(ranks.values())) > 1  # global: variable ranks
    record = metadata.read_run_record(tmp_path / "run")
    assert sorted(record.target_modules) == sorted(family.projections)  # all-linear made concrete

    out = export_adapter(tmp_path / "run", tmp_path / "adapter").out_dir
    reference = peft_logits(path, tmp_path / "run" / "adapter")
    assert max_abs_diff(reference, peft_logits(path, out)) <= PARITY
    assert metadata.read_adapter_record(out).ranks == {n: r for n, r in ranks.items() if r > 0}
    table = inspect_adapter(out)
    header = next(line for line in table.splitlines() if line.startswith("layer"))
    assert header.split()[1:] == list(family.projections)  # the family's own names, in running order


def test_unsupported_family_is_refused_in_one_line_naming_it():
    with pytest.raises(UnsupportedModelError, match=r"model family 'gpt2' \(GPT2LMHeadModel\) is not supported") as err:
        family_of({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert "\n" not in str(err.value) and all(f.name in str(err.value) for f in FAMILIES)
    with pytest.raises(UnsupportedModelError, match="multimodal"):
        family_of({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": {}})


def test_a_target_matching_nothing_in_the_family_names_its_modules(family_model):
    from prunedlora.rank.config import ConfigError, PrunedLoraConfig

    family, path = family_model
    wrong = "q_proj" if family.name == "Phi-3" else "qkv_proj"
    paths = model_facts(path).module_paths()
    with pytest.raises(ConfigError, match=rf"'{wrong}' matches no module of this model") as err:
        PrunedLoraConfig(target_modules=[wrong]).check_modules(paths, paths)
    assert ", ".join(sorted(family.projections)) in str(err.value)
    assert resolve_targets(path, ["o_proj"]) == ["o_proj"]  # explicit names are kept as given


def test_weights_without_the_family_projections_are_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(BaseModelError, match="is a Llama model but its weights have no decoder layer with k_proj"):
        model_facts(tmp_path)
