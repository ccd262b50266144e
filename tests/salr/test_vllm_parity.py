"""SALR served by vLLM unchanged: the materialised sparse base (a plain dense folder with zeros) and the
residual adapter ``sparsify`` writes give vLLM the same greedy tokens as HF+PEFT, with and without
the adapter.

Slow: it starts a vLLM engine (minutes on two cores). The model is the serve tests' tiny Llama in
the shape vLLM's CPU attention accepts (head size 32), sparsified at 50% with residual rank 8 and
task rank 8 (an adapter of rank 16, one of vLLM's slot ranks).
"""

from __future__ import annotations

import pytest

from prunedlora.salr import SparsifyConfig, sparsify
from prunedlora.salr.pipeline import ADAPTER_DIR, BASE_DIR
from tests.serve.helpers import build_vllm_tiny_llama, hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def salr_out(tmp_path_factory, default_model_path):
    root = tmp_path_factory.mktemp("salr-vllm")
    base = build_vllm_tiny_llama(root / "tiny", default_model_path)
    config = SparsifyConfig(sparsity=0.5, residual_rank=8, task_rank=8, lora_alpha=16.0)
    return sparsify(base, root / "salr", config).out_dir


def test_materialised_base_and_residual_adapter_give_hf_pefts_greedy_tokens_in_vllm(salr_out):
    from vllm import SamplingParams

    from prunedlora.serve.engine import OfflineEngine

    base, adapter = salr_out / BASE_DIR, salr_out / ADAPTER_DIR
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    requests = [(prompt, name) for prompt in PROMPTS for name in (None, "salr")]
    with OfflineEngine(
        base, {"salr": adapter}, dtype="float32", max_model_len=128, max_num_seqs=4, seed=0, echo=False
    ) as engine:
        results = engine.generate(requests, sampling_params=params, use_tqdm=False)
    tokens = {(r.prompt, r.adapter): r.token_ids for r in results}
    answers = {}
    for name, path in ((None, None), ("salr", adapter)):
        expected, margin = hf_greedy(base, path, PROMPTS, MAX_TOKENS)
        assert margin > 1e-3, name  # token parity means something only above float32 noise
        answers[name] = [tokens[(prompt, name)] for prompt in PROMPTS]
        assert answers[name] == expected, name
    assert answers["salr"] != answers[None]  # the residual adapter changes what the sparse base says
