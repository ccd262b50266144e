"""Tiny random models of each supported decoder family, written by hand (no hub is reachable).

Each is 2 layers, hidden 64, two query heads of 32 over one KV head (a head size vLLM's CPU attention
takes), built from the family's own config class with SmolLM2's tokenizer and, where the family has
its own chat format, that format written as Jinja (prefix-consistent, as training's rendering needs).
Weights are drawn wider than Hugging Face's default init so that greedy decoding has clear winners.
They are for mechanics only, never for claims about quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

_CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's ChatML adds a default system turn when the conversation has none
QWEN2_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}" + _CHATML
)
QWEN3_TEMPLATE = _CHATML
# Mistral's [INST] format: a system turn is prepended to the next user turn
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- set ns = namespace(system='') %}{%- for m in messages %}"
    "{%- if m.role == 'system' %}{%- set ns.system = m.content + '\\n\\n' %}"
    "{%- elif m.role == 'user' %}{{- '[INST] ' + ns.system + m.content + ' [/INST]' }}{%- set ns.system = '' %}"
    "{%- else %}{{- ' ' + m.content + eos_token }}{%- endif %}{%- endfor %}"
)
# Gemma's turns: user and model, a system turn folded into the first user turn
GEMMA3_TEMPLATE = (
    "{{- bos_token }}{%- set ns = namespace(system='') %}{%- for m in messages %}"
    "{%- if m.role == 'system' %}{%- set ns.system = m.content + '\\n\\n' %}"
    "{%- else %}{{- '<start_of_turn>' + ('model' if m.role == 'assistant' else 'user') + '\\n' }}"
    "{%- if m.role == 'user' %}{{- ns.system }}{%- set ns.system = '' %}{%- endif %}"
    "{{- m.content + '<end_of_turn>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
PHI3_TEMPLATE = (
    "{%- for m in messages %}{{- '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=512,
    initializer_range=0.2,
)


@dataclass(frozen=True)
class TinyFamily:
    """One family's tiny model: its transformers config and model classes, config fields beyond the
    shared shape, its chat template (None: SmolLM2's own), the projections it must show and the
    LoRA ops its vLLM checks run with."""

    name: str
    config_class: str
    model_class: str
    overrides: dict = field(default_factory=dict)
    chat_template: str | None = None
    projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_ops: tuple[str, ...] = ("rank-aware",)
    serve_lr: float = 3e-2  # the slow test's learning rate: its adapters must change some greedy answer

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" ", "").replace("-", "")


FAMILIES = (
    TinyFamily(
        "Llama", "LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), lora_ops=("rank-aware", "stock")
    ),
    TinyFamily("Mistral", "MistralConfig", "MistralForCausalLM", dict(sliding_window=None), MISTRAL_TEMPLATE),
    TinyFamily("Qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False), QWEN2_TEMPLATE),
    TinyFamily("Qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True), QWEN3_TEMPLATE),
    TinyFamily(
        "Gemma 3",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(query_pre_attn_scalar=32, sliding_window=512),
        GEMMA3_TEMPLATE,
        serve_lr=2e-1,  # embeddings scaled by sqrt(hidden): a few steps at 3e-2 change no answer
    ),
    TinyFamily(
        "Phi-3",
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(tie_word_embeddings=False),
        PHI3_TEMPLATE,
        projections=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        lora_ops=("rank-aware", "stock"),
    ),
)


def build_tiny_family(family: TinyFamily, path: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """``family``'s tiny random model saved as a Hugging Face folder with SmolLM2's tokenizer (and the
    family's chat template), in float32."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    if family.chat_template is not None:
        tokenizer.chat_template = family.chat_template
    config = getattr(transformers, family.config_class)(
        **{
            **_SHAPE,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **family.overrides,
        }
    )
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config).to(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
