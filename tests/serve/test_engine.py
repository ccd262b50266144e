"""OfflineEngine: one vllm.LLM batch with a different adapter (or none) per prompt equals HF+PEFT greedy.

This module uses the real default model (SmolLM2-135M-Instruct), so the parity check also holds on
real logits; the server tests use a tiny random model.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from prunedlora.serve.engine import EngineError, OfflineEngine
from prunedlora.serve.validate import AdapterValidationError
from tests.serve.helpers import alive, fold_scaling_like_export, hf_greedy, make_adapter

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def adapters(default_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-adapters")
    base = default_model_path
    return {
        "plain": make_adapter(
            base, root / "plain", r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], seed=11, b_std=0.1
        ),
        "pruned": fold_scaling_like_export(
            make_adapter(
                base,
                root / "pruned",
                r=8,
                lora_alpha=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                rank_pattern={"layers.0.mlp.down_proj": 1, "layers.1.self_attn.v_proj": 5, "k_proj": 3},
                seed=12,
                b_std=0.3,
            )
        ),
    }


@pytest.fixture(scope="module")
def engine(default_model_path, adapters):
    with OfflineEngine(
        default_model_path, adapters, dtype="float32", max_model_len=256, max_num_seqs=8, seed=0
    ) as running:
        yield running


def test_one_batch_mixing_adapters_equals_hf_peft(engine, default_model_path, adapters):
    from vllm import SamplingParams

    requests = [(prompt, name) for prompt in PROMPTS for name in (None, "plain", "pruned")]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    results = engine.generate(requests, sampling_params=params, use_tqdm=False)
    assert [(r.prompt, r.adapter) for r in results] == requests

    references = {}
    for name in (None, "plain", "pruned"):
        tokens, margin = hf_greedy(default_model_path, adapters.get(name), PROMPTS, MAX_TOKENS)
        assert margin > 1e-3
        references[name] = dict(zip(PROMPTS, tokens))
    for result in results:
        assert result.token_ids == references[result.adapter][result.prompt], (result.adapter, result.prompt)
    assert references["plain"] != references[None] and references["pruned"] != references[None]


def test_plan_and_unknown_names(engine):
    assert engine.plan.max_lora_rank == 8 and engine.plan.max_loras == 2
    with pytest.raises(EngineError, match="no adapter named 'nope'.*plain, pruned"):
        engine.generate([("hi", "nope")])


def test_add_adapter_is_validated_against_the_slot(engine, default_model_path, tmp_path):
    wide = make_adapter(default_model_path, tmp_path / "wide", r=12, target_modules=["q_proj"])
    with pytest.raises(AdapterValidationError, match="above the server's max_lora_rank 8"):
        engine.add_adapter("wide", wide)
    small = make_adapter(default_model_path, tmp_path / "small", r=3, target_modules=["v_proj"], seed=5, b_std=0.1)
    engine.add_adapter("small", small)
    expected, _ = hf_greedy(default_model_path, small, PROMPTS[:1], MAX_TOKENS)
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    [result] = engine.generate([(PROMPTS[0], "small")], sampling_params=params, use_tqdm=False)
    assert result.token_ids == expected[0]


def test_bad_adapter_refused_before_vllm_starts(default_model_path, adapters):
    """A bad adapter is refused before vLLM starts (no engine is built)."""
    with pytest.raises(AdapterValidationError):
        OfflineEngine(default_model_path, {"bad": adapters["plain"].parent / "missing"})


def test_close_stops_vllm_processes(engine):
    """Runs last in this module: closing the engine ends vLLM's engine-core and worker processes."""
    import psutil

    # vLLM's engine core and its worker run as child processes (multiprocessing's resource tracker,
    # also a child, lives as long as this process and is not vLLM's).
    tree = [p.pid for p in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(tree) >= 2
    engine.close()
    deadline = time.monotonic() + 30
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive(tree) == []
    with pytest.raises(EngineError, match="closed"):
        engine.generate([("hi", None)])
