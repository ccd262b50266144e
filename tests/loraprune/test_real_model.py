"""SmolLM2-135M itself (9 query heads over 3 KV heads of 64, MLP 1536, 30 layers): the ~50% plan slices to
a standard config that Hugging Face loads, with the masked model's logits. No training: masks chosen at
random within the plan, a random-B LoRA on every projection."""

import json

import pytest
import torch

from prunedlora.loraprune import GroupMasks, LorapruneConfig, write_pruned
from prunedlora.loraprune.groups import decoder_shape, find_projections, plan
from prunedlora.loraprune.slicing import BASE_DIR, TOLERANCE
from tests.loraprune.helpers import ALL


@pytest.mark.slow
def test_smollm2_at_half_the_prunable_weights_slices_and_loads(default_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False))
    shape = decoder_shape(model.config)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.intermediate) == (9, 3, 64, 1536)
    p = plan(LorapruneConfig(sparsity=0.5), shape)
    assert abs(p.achieved_sparsity - 0.5) < 1e-3
    masks = GroupMasks(shape)
    generator = torch.Generator().manual_seed(0)
    for layer in range(shape.num_layers):
        groups = torch.randperm(3, generator=generator)[: p.groups_removed].tolist()
        channels = torch.randperm(1536, generator=generator)[: p.channels_removed].tolist()
        masks.remove(layer, groups=groups, channels=channels)
    masks.attach(find_projections(model))
    result = write_pruned(model, masks, tmp_path / "pruned")
    assert result.max_abs_logit_diff <= TOLERANCE
    config = json.loads((tmp_path / "pruned" / BASE_DIR / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (3, 1, 64)
    assert config["intermediate_size"] == 1536 - p.channels_removed
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned" / BASE_DIR)
    dense_params = sum(t.numel() for t in base.parameters())
    assert sum(t.numel() for t in small.parameters()) < 0.75 * dense_params
