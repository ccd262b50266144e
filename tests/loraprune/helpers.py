"""Tiny LoRA-wrapped Llama models for the LoRAPrune tests (mechanics only, built in memory in seconds)."""

from __future__ import annotations

import torch

from tests.conftest import tiny_llama_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128


def tiny_peft(seed: int = 0, layers: int = 3, targets=ALL, dtype=torch.float32, **config):
    """A 3-layer Llama with GQA (4 query heads over 2 KV heads, head_dim 16, MLP 128) and a rank-4 LoRA on
    ``targets`` whose B is random (not PEFT's zeros), so the LoRA path matters in every check."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=layers, **config)).to(dtype)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(model, lora)


def batch(seed: int = 0, size: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def train_steps(model, pruner, steps: int, lr: float = 1e-3) -> None:
    """A plain loop: backward, the pruner's per-step call, the optimizer step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        pruner.before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad()
