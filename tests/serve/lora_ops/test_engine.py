"""The rank-aware ops in a real vLLM engine: one batch mixing the base model and three adapters of
different per-module ranks gives the same greedy tokens with ``stock`` and ``rank-aware`` ops, and
the same as HF+PEFT.

The adapters: one with a rank_pattern (a module pruned to rank 1, others at 3, 5 and 8; scaling
folded in as ``export`` writes it), a plain rank-2 one on two modules, and one covering only layer 1
and only part of the packed qkv and gate_up layers (its other slices and layer 0 are empty slots).
The rank-aware engine against HF+PEFT is in the fast suite (one tiny engine, about a minute on two
cores); stock vLLM against the rank-aware engine starts a second engine and is slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prunedlora.serve.engine import OfflineEngine
from tests.serve.helpers import fold_scaling_like_export, hf_greedy, make_adapter

PROMPTS = ["The capital of France is", "def add(a, b):"]
MAX_TOKENS = 6
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(vllm_tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    base, root = vllm_tiny_model_path, tmp_path_factory.mktemp("rank-aware-adapters")
    pattern = {"layers.0.mlp.down_proj": 1, "k_proj": 3, "layers.1.self_attn.v_proj": 5}
    return {
        "pattern": fold_scaling_like_export(
            make_adapter(base, root / "pattern", r=8, lora_alpha=8, target_modules=ALL, rank_pattern=pattern, seed=21)
        ),
        "small": make_adapter(base, root / "small", r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], seed=22),
        "partial": make_adapter(
            base,
            root / "partial",
            r=4,
            target_modules=["layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"],
            seed=25,
            b_std=0.5,  # with seed 25: greedy margins well above float noise on the tiny model
        ),
    }


def _generate(model: Path, adapters: dict[str, Path], lora_ops: str) -> dict[tuple[str, str | None], list[int]]:
    from vllm import SamplingParams

    requests = [(prompt, name) for prompt in PROMPTS for name in (None, *adapters)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with OfflineEngine(
        model, adapters, dtype="float32", max_model_len=128, max_num_seqs=8, seed=0, lora_ops=lora_ops, echo=False
    ) as engine:
        assert engine.plan.max_lora_rank == 8 and engine.plan.max_loras >= 3
        results = engine.generate(requests, sampling_params=params, use_tqdm=False)
    return {(r.prompt, r.adapter): r.token_ids for r in results}


def test_rank_aware_ops_give_hf_pefts_greedy_tokens(vllm_tiny_model_path, adapters, capfd):
    tokens = _generate(vllm_tiny_model_path, adapters, "rank-aware")
    logs = capfd.readouterr()
    assert "Using RankAwarePunicaWrapperCPU" in logs.out + logs.err  # vLLM's own line: the wrapper it built
    for name in (None, *adapters):
        expected, margin = hf_greedy(vllm_tiny_model_path, adapters.get(name), PROMPTS, MAX_TOKENS)
        assert margin > 1e-3, name
        for prompt, want in zip(PROMPTS, expected):
            assert tokens[(prompt, name)] == want, (name, prompt)
    answers = {name: [tokens[(p, name)] for p in PROMPTS] for name in (None, *adapters)}
    assert all(answers[name] != answers[None] for name in adapters)  # every adapter changes the answer
    _RESULTS["rank-aware"] = tokens


_RESULTS: dict[str, dict] = {}  # the fast test's tokens, reused by the slow comparison when both run


@pytest.mark.slow
def test_stock_ops_give_the_same_greedy_tokens(vllm_tiny_model_path, adapters, capfd):
    stock = _generate(vllm_tiny_model_path, adapters, "stock")
    logs = capfd.readouterr()
    assert "Using PunicaWrapperCPU" in logs.out + logs.err
    rank_aware = _RESULTS.get("rank-aware") or _generate(vllm_tiny_model_path, adapters, "rank-aware")
    assert stock == rank_aware
    for name in (None, *adapters):
        expected, _ = hf_greedy(vllm_tiny_model_path, adapters.get(name), PROMPTS, MAX_TOKENS)
        assert [stock[(p, name)] for p in PROMPTS] == expected, name
