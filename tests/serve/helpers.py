"""Helpers for the serve tests: a tiny Llama vLLM's CPU backend accepts, PEFT adapters made here.

vLLM's CPU attention supports head sizes 32, 64, 80, ... but not 16, so the shared ``tiny_model_path``
(head_dim 16) cannot be served; ``vllm_tiny_model_path`` is the same 2-layer, hidden-64 Llama with two
heads of 32. Its weights are drawn wider than Hugging Face's default init so greedy decoding has clear
winners (the parity checks compare token ids exactly).
"""

from __future__ import annotations

import json
from pathlib import Path


def build_vllm_tiny_llama(path: Path, tokenizer_from: Path, seed: int = 0, hidden: int = 64) -> Path:
    """The tests' tiny Llama in a shape vLLM's CPU attention accepts (head size 32), with larger
    initial weights so that greedy answers differ between adapters."""
    from tests.conftest import build_tiny_llama

    return build_tiny_llama(
        path,
        seed=seed,
        tokenizer_from=tokenizer_from,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=hidden // 32,
        num_key_value_heads=1,
        head_dim=32,
        initializer_range=0.2,
    )


def make_adapter(
    base: Path,
    out: Path,
    *,
    r: int = 4,
    lora_alpha: float = 8.0,
    target_modules=("q_proj", "v_proj"),
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int = 0,
    b_std: float = 0.3,
    safe_serialization: bool = True,
) -> Path:
    """A PEFT LoRA adapter on ``base`` with random nonzero lora_B (so it changes the answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        use_rslora=use_rslora,
        use_dora=use_dora,
        lora_dropout=0.0,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    return out


def fold_scaling_like_export(adapter: Path) -> Path:
    """Rewrite a PEFT adapter the way ``prunedlora export`` writes one: each module's scaling folded
    into lora_B, ``r`` = the largest module rank, ``lora_alpha`` = r, and per-module rank_pattern and
    alpha_pattern (alpha = rank, so every scaling is 1). Same function as before, different config."""
    from safetensors.torch import load_file, save_file

    from prunedlora.vllm_compat import pattern_value

    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    ranks, out = {}, {}
    for key, tensor in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if ".lora_A." in key:
            ranks[module] = tensor.shape[0]
            out[key] = tensor
    for key, tensor in tensors.items():
        if ".lora_B." in key:
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            rank = ranks[module]
            alpha = pattern_value(config.get("alpha_pattern"), module) or config["lora_alpha"]
            scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
            out[key] = (tensor * scaling).contiguous()
    r = max(ranks.values())
    config.update(
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern=dict(ranks.items()),
        alpha_pattern=dict(ranks.items()),
    )
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(out, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return adapter


def hf_greedy(base: Path, adapter: Path | None, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], float]:
    """HF (+PEFT) greedy continuations of each prompt (``max_tokens`` each, EOS not special) and the
    smallest gap between the best and second-best logit on the way: parity of token ids is only
    meaningful when that gap is well above float32 noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    results, margin = [], float("inf")
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model(input_ids=ids, use_cache=True)
            generated = []
            for _ in range(max_tokens):
                top = torch.topk(out.logits[0, -1], 2)
                margin = min(margin, float(top.values[0] - top.values[1]))
                token = int(top.indices[0])
                generated.append(token)
                out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            results.append(generated)
    return results, margin


def alive(pids) -> list[int]:
    """The pids that still run (zombies count as gone: they hold no resources and will be reaped)."""
    import psutil

    result = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
        except psutil.NoSuchProcess:
            pass
    return result


def live_vllm_children() -> list:
    """This process's live descendants whose command line mentions vLLM (zombies skipped, as in
    ``alive``: a finished child another test has not reaped yet is no leftover server)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "vllm" in " ".join(proc.cmdline()).lower():
                found.append(proc)
        except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found
