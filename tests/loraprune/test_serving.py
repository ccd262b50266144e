"""The exported pair is what serve expects: the sliced adapter validates against the pruned base, an
adapter trained on the dense base is refused for it by shape (one line), and (slow) vLLM loads the pruned
SmolLM2 and gives Hugging Face's greedy tokens."""

import pytest
import torch

from prunedlora.loraprune import GroupMasks, LorapruneConfig, write_pruned
from prunedlora.loraprune.groups import decoder_shape, find_projections, plan
from prunedlora.loraprune.slicing import ADAPTER_DIR, BASE_DIR
from tests.loraprune.helpers import ALL, tiny_peft


def random_masks(model, config: LorapruneConfig, seed: int = 0) -> GroupMasks:
    shape = decoder_shape(model.config)
    p = plan(config, shape)
    masks = GroupMasks(shape)
    generator = torch.Generator().manual_seed(seed)
    for layer in range(shape.num_layers):
        groups = torch.randperm(shape.num_kv_heads, generator=generator)[: p.groups_removed].tolist()
        channels = torch.randperm(shape.intermediate, generator=generator)[: p.channels_removed].tolist()
        masks.remove(layer, groups=groups, channels=channels)
    masks.attach(find_projections(model))
    return masks


def test_the_sliced_adapter_validates_and_a_dense_one_is_refused(tmp_path):
    from prunedlora.serve.validate import AdapterValidationError, validate_adapter

    model = tiny_peft()
    model.save_pretrained(tmp_path / "dense-adapter")
    write_pruned(model, random_masks(model, LorapruneConfig(sparsity=0.5)), tmp_path / "pruned")
    base = tmp_path / "pruned" / BASE_DIR
    info = validate_adapter(tmp_path / "pruned" / ADAPTER_DIR, base)
    assert info is not None
    with pytest.raises(AdapterValidationError) as err:
        validate_adapter(tmp_path / "dense-adapter", base)
    assert "belongs to another base model" in str(err.value)


@pytest.mark.slow
def test_vllm_serves_smollm2_pruned_to_half_with_hf_greedy_tokens(default_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from prunedlora.serve.engine import OfflineEngine
    from tests.serve.helpers import hf_greedy

    base = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False)
    model = get_peft_model(base, lora)
    with torch.no_grad():  # a small adapter: the pruned base stays a language model, the adapter still matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    masks = random_masks(model, LorapruneConfig(sparsity=0.5))  # 3 query heads over 1 KV head, MLP 853
    write_pruned(model, masks, tmp_path / "pruned", tokenizer=AutoTokenizer.from_pretrained(default_model_path))
    pruned, adapter = tmp_path / "pruned" / BASE_DIR, tmp_path / "pruned" / ADAPTER_DIR
    prompts, max_tokens = ["The capital of France is", "def add(a, b):"], 6
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with OfflineEngine(pruned, {"a": adapter}, dtype="float32", max_model_len=256, max_num_seqs=4, seed=0) as engine:
        results = engine.generate(
            [(p, n) for p in prompts for n in (None, "a")], sampling_params=params, use_tqdm=False
        )
    for name, path in ((None, None), ("a", adapter)):
        expected, margin = hf_greedy(pruned, path, prompts, max_tokens)
        assert margin > 1e-3
        got = [r.token_ids for r in results if r.adapter == name]
        assert got == expected, name
