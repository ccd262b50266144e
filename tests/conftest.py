"""Shared fixtures: tiny random Llama models for mechanics, the real default model for quality.

Tiny models use the default model's tokenizer (so chat templates are real) with a 2-layer random
network; they are for mechanics only, never for claims about quality.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def tiny_llama_config(**overrides):
    """The tiny Llama every mechanics test builds on: 2 layers, hidden 64, grouped-query attention (4 query
    heads over 2 KV heads); ``overrides`` replace LlamaConfig fields (in-memory tests use a smaller vocab)."""
    from transformers import LlamaConfig

    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**fields, **overrides})


def build_tiny_llama(path: Path, seed: int = 0, tokenizer_from: Path | None = None, **config_overrides) -> Path:
    """A 2-layer random Llama (hidden 64) saved as a Hugging Face folder, with the default tokenizer;
    ``config_overrides`` replace LlamaConfig fields (vLLM's CPU attention needs other head sizes)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok_dir = tokenizer_from
    if tok_dir is None:
        from prunedlora.models import default_model_dir

        tok_dir = default_model_dir(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    config = tiny_llama_config(
        **{
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **config_overrides,
        }
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real SmolLM2-135M-Instruct folder (materialised once into the cache)."""
    from prunedlora.models import default_model_dir

    return default_model_dir(progress=False)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, default_model_path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_from=default_model_path)


@pytest.fixture(scope="session")
def default_tokenizer(default_model_path):
    """The default model's tokenizer (its chat template is the one training renders with)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)
