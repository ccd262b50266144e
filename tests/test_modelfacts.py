"""modelfacts.saved_dtype: the one reader of the dtype a base model is saved in (export's merged model
and LoRAPrune's sliced base are written back in it)."""

import json

import pytest
import torch

from prunedlora.modelfacts import saved_dtype


@pytest.mark.parametrize(
    "config, dtype",
    [
        ({"dtype": "bfloat16"}, torch.bfloat16),
        ({"torch_dtype": "float16"}, torch.float16),  # the older key
        ({"dtype": "int8"}, torch.float32),  # not a floating dtype: weights are written as float32
        ({"dtype": "no-such-dtype"}, torch.float32),
        ({}, torch.float32),
    ],
)
def test_a_folder_and_a_dict_read_alike(tmp_path, config, dtype):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert saved_dtype(tmp_path) == dtype == saved_dtype(config)


def test_a_folder_without_a_readable_config_is_float32(tmp_path):
    assert saved_dtype(tmp_path) == torch.float32
    (tmp_path / "config.json").write_text("[1,")
    assert saved_dtype(tmp_path) == torch.float32


def test_column_order_follows_each_familys_running_order():
    """Rank tables and heatmaps see module names without a model: their columns follow every family's
    own order (Llama's q, k, v, o, gate, up, down; Phi-3's fused qkv, o, gate_up, down)."""
    from prunedlora.modelfacts import FAMILIES, PROJECTION_ORDER, module_sort_key
    from prunedlora.train.plots import rank_table

    for family in FAMILIES:
        positions = [PROJECTION_ORDER.index(p) for p in family.projections]
        assert positions == sorted(positions), family.name
    assert sorted(["down", "gate_up", "o", "qkv", "router"], key=module_sort_key) == [
        "qkv",
        "o",
        "gate_up",
        "down",
        "router",
    ]
    phi3 = {
        f"model.layers.{i}.{p}": 2
        for i in range(2)
        for p in ("mlp.down_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj")
    }
    assert rank_table(phi3)[1] == ["qkv", "o", "gate_up", "down"]


def test_the_installed_vllm_has_every_supported_family():
    """The families' architectures as vLLM's registry names them (read as text, vLLM not imported)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    from prunedlora.modelfacts import FAMILIES
    from prunedlora.vllm_compat import vllm_has_architecture

    assert all(vllm_has_architecture(a) for f in FAMILIES for a in f.architectures)
    assert vllm_has_architecture("NoSuchModelForCausalLM") is False
