"""Each supported family served by vLLM (slow): two adapters trained with pruning on the family's tiny
model (tests/families.py) and exported, served together from one engine; one batch mixing the base
model and both adapters gives HF+PEFT's greedy tokens. One engine per family and LoRA ops mode
(rank-aware for every family, vLLM's stock ops too for Llama and Phi-3, whose packed modules are the
likeliest to differ), every check of that family against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prunedlora import metadata
from prunedlora.serve.engine import OfflineEngine
from tests.families import FAMILIES, build_tiny_family

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):"]
MAX_TOKENS = 6
NOISE = 1e-4  # logit gaps below this are float noise: greedy choices there may differ
CASES = [(family, ops) for family in FAMILIES for ops in family.lora_ops]
_MADE: dict[str, tuple[Path, dict[str, Path]]] = {}  # family -> (model, adapters), shared by its ops modes


def _made(family, root: Path, tokenizer_from: Path) -> tuple[Path, dict[str, Path]]:
    """The family's tiny model and two exports of short pruned runs on it (different targets, allocation
    and seed, so their rank patterns differ), made once per session."""
    if family.slug in _MADE:
        return _MADE[family.slug]
    from prunedlora.export.exporter import export_adapter
    from prunedlora.train.recipe import recipe_from_dict
    from prunedlora.train.runner import train
    from tests.test_families import family_recipe

    model = build_tiny_family(family, root / "model", tokenizer_from)
    adapters = {}
    for name, seed, method in (
        ("global", 1, {}),  # all-linear, global allocation: variable ranks
        ("uniform", 2, {"target_modules": list(family.projections[-2:]), "allocation": "uniform"}),
    ):
        recipe = family_recipe(model, root / f"run-{name}", **method)
        recipe["training"].update(seed=seed, learning_rate=family.serve_lr)
        train(recipe_from_dict(recipe))
        adapters[name] = export_adapter(root / f"run-{name}", root / name).out_dir
    ranks = [metadata.read_adapter_record(a).ranks for a in adapters.values()]
    assert ranks[0] != ranks[1]
    _MADE[family.slug] = (model, adapters)
    return _MADE[family.slug]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0].slug}-{case[1]}")
def served(request, tmp_path_factory, default_model_path):
    """(family, ops, model, adapters, tokens): one engine's greedy tokens for a batch mixing the base
    model and both adapters over every prompt."""
    from vllm import SamplingParams

    family, ops = request.param
    model, adapters = _made(family, tmp_path_factory.mktemp(family.slug), default_model_path)
    requests = [(prompt, name) for prompt in PROMPTS for name in (None, *adapters)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with OfflineEngine(
        model, adapters, dtype="float32", max_model_len=128, max_num_seqs=8, seed=0, lora_ops=ops, echo=False
    ) as engine:
        results = engine.generate(requests, sampling_params=params, use_tqdm=False)
    return family, ops, model, adapters, {(r.prompt, r.adapter): r.token_ids for r in results}


def _hf_greedy(model: Path, adapter: Path | None) -> list[tuple[list[int], list[float]]]:
    """HF (+PEFT) greedy tokens of each prompt with the gap between the best and second-best logit at
    each step (full forward each step, no cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    results = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            tokens, margins = list(ids), []
            for _ in range(MAX_TOKENS):
                top = torch.topk(net(input_ids=torch.tensor([tokens])).logits[0, -1], 2)
                margins.append(float(top.values[0] - top.values[1]))
                tokens.append(int(top.indices[0]))
            results.append((tokens[len(ids) :], margins))
    return results


def test_greedy_tokens_equal_hf_peft_in_a_mixed_batch(served):
    """Token ids are compared up to the first step where HF's best two logits are within float noise
    of each other (after it the two may rightly part), and most tokens must be compared."""
    family, ops, model, adapters, tokens = served
    answers, compared = {}, 0
    for name in (None, *adapters):
        expected = _hf_greedy(model, adapters.get(name))
        for prompt, (want, margins) in zip(PROMPTS, expected):
            upto = next((i + 1 for i, m in enumerate(margins) if m < NOISE), len(want))
            assert tokens[(prompt, name)][:upto] == want[:upto], (family.name, ops, name, prompt)
            compared += upto
        answers[name] = [want for want, _ in expected]
    assert compared >= 0.6 * MAX_TOKENS * len(PROMPTS) * (1 + len(adapters))
    assert any(answers[name] != answers[None] for name in adapters), "no adapter changed an answer"
