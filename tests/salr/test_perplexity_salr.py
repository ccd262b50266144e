"""Perplexity of a SALR model as PEFT loads it equals that of the dense M*W0 + E_r weights, the
shortcut benchmarks/salr_eval.py takes (it adds E_r to the weights instead of wrapping in PEFT)."""

from __future__ import annotations

import pytest
import torch

from prunedlora.perplexity import PerplexityConfig, perplexity_of_ids, tokenize_corpus
from prunedlora.salr.pipeline import ADAPTER_DIR, BASE_DIR
from tests.salr.test_pipeline import expected_weights

TEXT = "Sparse bases lose a little of what the dense one knew, and a low-rank residual gives some back. " * 6


def test_peft_wrapped_salr_perplexity_equals_merged_weights(tiny_salr, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = tokenize_corpus(AutoTokenizer.from_pretrained(tiny_model_path), TEXT)
    config = PerplexityConfig(window=32, progress=False)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    dense_ppl = perplexity_of_ids(dense, ids, config)
    _, expected = expected_weights(tiny_model_path, tiny_salr.config)
    state = dense.state_dict()
    for name, (sparse, residual) in expected.items():
        state[name] = sparse + residual
    dense.load_state_dict(state)
    merged = perplexity_of_ids(dense, ids, config)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_salr.out_dir / BASE_DIR), tiny_salr.out_dir / ADAPTER_DIR
    )
    wrapped = perplexity_of_ids(peft, ids, config)
    assert wrapped.windows == merged.windows >= 2
    assert wrapped.ppl == pytest.approx(merged.ppl, rel=1e-5)
    assert abs(wrapped.nll - dense_ppl.nll) > 1e-4  # pruning changed the model the numbers describe
    assert torch.isfinite(torch.tensor(wrapped.ppl))
