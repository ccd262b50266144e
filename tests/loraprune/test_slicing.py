"""Slicing: the written base + adapter reproduce the masked model (float64 logits within 1e-4), every
written shape is legal grouped-query attention, and refusals write nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file

from prunedlora.loraprune import GroupMasks, LorapruneConfig, LorapruneError, LoraPruner, SliceVerificationError
from prunedlora.loraprune.groups import decoder_shape, find_projections
from prunedlora.loraprune.slicing import ADAPTER_DIR, BASE_DIR, PRUNE_FILE, TOLERANCE, write_pruned
from tests.loraprune.helpers import batch, tiny_peft, train_steps


def assert_nothing_written(tmp_path, name):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")]  # no staging left behind


def hand_masks(model):
    """Different kept indices per layer, the same counts: layer 0 keeps KV group 1, the others group 0."""
    masks = GroupMasks(decoder_shape(model.config))
    for layer in range(3):
        masks.remove(layer, groups=[0] if layer == 0 else [1], channels=list(range(layer, 128, 4)))
    masks.attach(find_projections(model))
    return masks


def test_sliced_model_gives_the_masked_models_logits(tmp_path):
    model = tiny_peft()
    masks = hand_masks(model)
    masked = model(input_ids=batch(5)).logits.detach()
    result = write_pruned(model, masks, tmp_path / "pruned")
    assert result.max_abs_logit_diff <= TOLERANCE
    assert (result.num_attention_heads, result.num_key_value_heads, result.intermediate_size) == (2, 1, 96)
    config = json.loads((tmp_path / "pruned" / BASE_DIR / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 96)
    assert config["head_dim"] == 16 and config["hidden_size"] == 64
    record = json.loads((tmp_path / "pruned" / PRUNE_FILE).read_text())
    assert record["kept_kv_groups"] == [[1], [0], [0]]
    # the training model is back in float32 and still masked
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(model(input_ids=batch(5)).logits, masked)
    # an independent float32 load agrees too
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned" / BASE_DIR), tmp_path / "pruned" / ADAPTER_DIR
    )
    torch.testing.assert_close(loaded(input_ids=batch(5)).logits, masked, rtol=1e-4, atol=1e-4)


def test_written_weights_have_the_pruned_shapes(tmp_path):
    model = tiny_peft()
    write_pruned(model, hand_masks(model), tmp_path / "pruned")
    base = load_file(tmp_path / "pruned" / BASE_DIR / "model.safetensors")
    layer = "model.layers.1"
    assert base[f"{layer}.self_attn.q_proj.weight"].shape == (32, 64)
    assert base[f"{layer}.self_attn.k_proj.weight"].shape == (16, 64)
    assert base[f"{layer}.self_attn.o_proj.weight"].shape == (64, 32)
    assert base[f"{layer}.mlp.gate_proj.weight"].shape == (96, 64)
    assert base[f"{layer}.mlp.down_proj.weight"].shape == (64, 96)
    adapter = load_file(tmp_path / "pruned" / ADAPTER_DIR / "adapter_model.safetensors")
    prefix = f"base_model.model.{layer}"
    assert adapter[f"{prefix}.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert adapter[f"{prefix}.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert adapter[f"{prefix}.self_attn.o_proj.lora_A.weight"].shape == (4, 32)
    assert adapter[f"{prefix}.mlp.down_proj.lora_A.weight"].shape == (4, 96)
    assert adapter[f"{prefix}.mlp.up_proj.lora_B.weight"].shape == (96, 4)


@pytest.mark.parametrize(
    "settings",
    [
        dict(sparsity=0.5),
        dict(sparsity=0.2, criterion="magnitude"),
        dict(sparsity=0.15, prune_channels=False, criterion="random"),
        dict(sparsity=0.4, prune_heads=False, criterion="grad"),
    ],
)
def test_every_pruned_model_is_legal_gqa_and_matches_the_masks(tmp_path, settings):
    model = tiny_peft(layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    pruner = LoraPruner(model, LorapruneConfig(prune_every=2, **settings), total_steps=8)
    train_steps(model, pruner, 8)
    pruner.close()
    pruner.masks.attach(pruner.projections)
    result = write_pruned(model, pruner.masks, tmp_path / "pruned")
    assert result.num_attention_heads % result.num_key_value_heads == 0
    assert result.num_attention_heads // result.num_key_value_heads == 2  # each query head beside its KV head
    assert result.num_key_value_heads == 4 - pruner.plan.groups_removed
    assert result.intermediate_size == 128 - pruner.plan.channels_removed
    assert result.max_abs_logit_diff <= TOLERANCE


def test_qwen2_biases_are_sliced_with_their_rows(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = get_peft_model(
        Qwen2ForCausalLM(config),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    masks = GroupMasks(decoder_shape(model.config))
    masks.remove(0, groups=[0], channels=[1])
    masks.remove(1, groups=[1], channels=[2])
    masks.attach(find_projections(model))
    assert write_pruned(model, masks, tmp_path / "q").max_abs_logit_diff <= TOLERANCE


def test_a_model_whose_masks_are_not_applied_fails_verification_and_writes_nothing(tmp_path):
    model = tiny_peft()
    masks = hand_masks(model)
    masks.detach()  # the "training model" no longer matches the masks it is sliced by
    with pytest.raises(SliceVerificationError, match="nothing was written") as info:
        write_pruned(model, masks, tmp_path / "pruned")
    assert "\n" not in str(info.value)
    assert_nothing_written(tmp_path, "pruned")


def test_layers_of_different_widths_are_refused(tmp_path):
    model = tiny_peft(layers=5)
    pruner = LoraPruner(model, LorapruneConfig(sparsity=0.2, exempt_layers="released", prune_every=2), total_steps=6)
    train_steps(model, pruner, 6)
    assert pruner.plan.exempt == (0, 4) and not pruner.plan.exportable
    assert pruner.masks.channels[0].all() and pruner.masks.channels[4].all()  # exempt: first and last
    assert not pruner.masks.channels[2].all()
    with pytest.raises(LorapruneError, match="exempt_layers: none") as info:
        write_pruned(model, pruner.masks, tmp_path / "pruned")
    assert "\n" not in str(info.value)
    assert_nothing_written(tmp_path, "pruned")


def test_a_model_that_is_not_llama_like_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LorapruneError, match="Llama-like") as info:
        LoraPruner(model, LorapruneConfig(), total_steps=10)
    assert "\n" not in str(info.value)
    llama = tiny_peft()
    masks = GroupMasks(decoder_shape(llama.config))
    with pytest.raises(LorapruneError, match="Llama-like"):
        write_pruned(model, masks, tmp_path / "pruned")
    assert_nothing_written(tmp_path, "pruned")


def test_a_bfloat16_base_is_written_in_bfloat16_and_still_matches(tmp_path):
    from transformers import LlamaConfig

    from prunedlora.modelfacts import saved_dtype

    assert saved_dtype(LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    assert saved_dtype(LlamaConfig()) == torch.float32
    model = tiny_peft()
    with torch.no_grad():  # a bfloat16 base loaded in float32 (as export loads it): every value is a bfloat16
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.copy_(p.to(torch.bfloat16).float())
    result = write_pruned(model, hand_masks(model), tmp_path / "pruned", dtype=torch.bfloat16)
    assert result.max_abs_logit_diff <= TOLERANCE
    config = json.loads((tmp_path / "pruned" / BASE_DIR / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
