"""The latency bench's plan, engine grouping, memory formula and prompts (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunedlora.bench.adapters import AdapterSet, BenchAdapter
from prunedlora.bench.latency import (
    LatencyBenchConfig,
    LatencyBenchError,
    _engine_specs,
    bench_prompts,
    lora_slot_bytes_estimate,
    plan_configurations,
)


def _family(name: str, ranks: list[dict[str, int]]) -> list[BenchAdapter]:
    return [BenchAdapter(f"{name}-{i}", name, Path(f"/adapters/{name}-{i}"), r, "test") for i, r in enumerate(ranks)]


def _adapters(global_max: int = 20) -> AdapterSet:
    return AdapterSet(
        families={
            "r0": _family("r0", [{"a": 32, "b": 32}]),
            "pruned-global": _family("pruned-global", [{"a": global_max, "b": 1}, {"a": 6, "b": 10}]),
            "pruned-uniform": _family("pruned-uniform", [{"a": 8, "b": 8}]),
        }
    )


def _names(plan):
    return [(row.family, row.slot, row.mix, row.max_loras, row.role) for row in plan]


def test_plan_covers_the_issue_configurations_once():
    plan = plan_configurations(_adapters(global_max=20), LatencyBenchConfig())
    assert _names(plan) == [
        (None, None, 1, None, "base"),
        ("r0", 32, 1, 1, "r0"),
        ("pruned-global", 32, 1, 1, "smallest"),  # widest module 20 -> slot 32; padded row is the same one
        ("pruned-uniform", 8, 1, 1, "smallest"),
        ("pruned-uniform", 32, 1, 1, "padded"),
        ("pruned-uniform", 64, 1, 1, "sweep"),
        ("pruned-global", 32, 1, 16, "mix"),
        ("pruned-global", 32, 4, 16, "mix"),
        ("pruned-global", 32, 16, 16, "mix"),
    ]
    assert len({row.name for row in plan}) == len(plan)


def test_plan_with_a_tight_global_family_measures_its_padding():
    plan = plan_configurations(_adapters(global_max=12), LatencyBenchConfig(sweep_slots=[8, 16], mixes=[1, 4]))
    rows = _names(plan)
    assert ("pruned-global", 16, 1, 1, "smallest") in rows and ("pruned-global", 32, 1, 1, "padded") in rows
    assert ("pruned-uniform", 16, 1, 1, "sweep") in rows
    assert [r for r in rows if r[4] == "mix"] == [
        ("pruned-global", 16, 1, 4, "mix"),
        ("pruned-global", 16, 4, 4, "mix"),
    ]
    # a slot below what a family needs is skipped, never planned
    assert all(not (family == "pruned-global" and slot == 8) for family, slot, *_ in rows)


def test_engine_specs_group_by_slot_and_max_loras(tmp_path):
    config = LatencyBenchConfig(mixes=[1, 4], sweep_slots=[8])
    adapters = _adapters(global_max=20)
    plan = plan_configurations(adapters, config)
    specs = _engine_specs(plan, adapters, config, tmp_path, prompts=[[1, 2, 3]])
    keys = [(s["engine"]["lora"], s["engine"].get("max_lora_rank"), s["engine"].get("max_loras")) for s in specs]
    assert keys == [(False, None, None), (True, 32, 1), (True, 8, 1), (True, 32, 4)]
    slot32 = specs[1]
    assert [m["name"] for m in slot32["measurements"]] == [
        "r0 @ slot 32",
        "pruned-global @ slot 32",
        "pruned-uniform @ slot 32",
    ]
    mix4 = specs[3]["measurements"][-1]["adapters"]
    assert len(mix4) == len(set(mix4)) == 4  # distinct names (and ids) even with 2 adapter folders
    assert {specs[3]["adapters"][n] for n in mix4} == {"/adapters/pruned-global-0", "/adapters/pruned-global-1"}
    assert specs[0]["adapters"] == {} and specs[0]["measurements"][0]["adapters"] == []
    assert {s["engine"].get("lora_ops") for s in specs[1:]} == {"rank-aware"}  # the default LoRA ops
    stock = _engine_specs(plan, adapters, LatencyBenchConfig(mixes=[1], lora_ops="stock"), tmp_path, [[1]])
    assert {s["engine"].get("lora_ops") for s in stock[1:]} == {"stock"}


def test_slot_memory_formula_on_the_tiny_model(tiny_model_path):
    hidden, inter, vocab, layers = 64, 128, None, 2
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_path)
    vocab = config.vocab_size
    q = o = hidden + config.num_attention_heads * config.head_dim
    kv = hidden + config.num_key_value_heads * config.head_dim
    per_layer = q + 2 * kv + o + 3 * (hidden + inter)
    per_rank = layers * per_layer + 2 * (vocab + hidden)
    assert lora_slot_bytes_estimate(tiny_model_path, 16, 4, 2) == per_rank * 16 * 4 * 2


def test_prompts_have_the_exact_length(tiny_model_path):
    prompts = bench_prompts(tiny_model_path, 7, 24)
    assert len(prompts) == 7 and {len(p) for p in prompts} == {24}
    assert len({tuple(p) for p in prompts}) == 7
    with pytest.raises(LatencyBenchError, match="lower --prompt-tokens"):
        bench_prompts(tiny_model_path, 3, 100_000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sweep_slots": [12]}, "not slot ranks vLLM allows"),
        ({"output_tokens": 1}, "at least 2"),
        ({"num_prompts": 0}, "--num-prompts must be at least 1"),
        ({"prompt_tokens": 500, "output_tokens": 32}, "exceed --max-model-len"),
        ({"mixes": [0]}, "positive"),
        ({"lora_ops": "fast"}, "--lora-ops must be one of rank-aware, stock"),
    ],
)
def test_config_errors_say_what_to_change(kwargs, message):
    with pytest.raises(LatencyBenchError, match=message):
        LatencyBenchConfig(**kwargs)
