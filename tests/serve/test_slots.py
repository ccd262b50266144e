"""plan_slots: the vLLM slot settings chosen for given adapter sets, and forced ones checked (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunedlora.serve.slots import SlotError, padding_fraction, plan_slots
from prunedlora.serve.validate import AdapterInfo, ModuleLoRA
from prunedlora.vllm_compat import ALLOWED_MAX_LORA_RANKS


def adapter(name: str, ranks: list[int], r: int | None = None, rank_pattern: dict | None = None) -> AdapterInfo:
    modules = {f"model.layers.{i}.self_attn.q_proj": ModuleLoRA(rank, 64, 64, 1.0) for i, rank in enumerate(ranks)}
    return AdapterInfo(
        name=name,
        path=Path("/nowhere") / name,
        r=max(ranks) if r is None else r,
        lora_alpha=1.0,
        use_rslora=False,
        rank_pattern=rank_pattern or {},
        modules=modules,
    )


@pytest.mark.parametrize(
    "rank_sets, expected",
    [
        ([[1]], 1),
        ([[2]], 8),
        ([[8, 3]], 8),
        ([[9]], 16),
        ([[4, 2], [12, 1], [5]], 16),
        ([[17]], 32),
        ([[33], [2]], 64),
        ([[100]], 128),
        ([[200]], 256),
        ([[257]], 320),
        ([[321]], 512),
        ([[512]], 512),
    ],
)
def test_smallest_allowed_slot(rank_sets, expected):
    adapters = {f"a{i}": adapter(f"a{i}", ranks) for i, ranks in enumerate(rank_sets)}
    plan = plan_slots(adapters)
    assert plan.max_lora_rank == expected
    assert plan.max_lora_rank in ALLOWED_MAX_LORA_RANKS
    assert plan.forced == ()


def test_config_r_sets_the_slot_even_when_tensors_are_smaller():
    plan = plan_slots({"a": adapter("a", [4, 4], r=16, rank_pattern={"q_proj": 4})})
    assert plan.max_lora_rank == 16
    assert "r=16" in plan.widest


def test_padding_is_fraction_of_zero_slot_rows():
    plan = plan_slots({"small": adapter("small", [2, 6]), "full": adapter("full", [8, 8])})
    assert plan.max_lora_rank == 8
    assert plan.adapter_padding == {"small": pytest.approx(0.5), "full": pytest.approx(0.0)}
    assert plan.padding == pytest.approx(1 - (2 + 6 + 8 + 8) / 32)
    assert padding_fraction({"m": 3}, 16) == pytest.approx(13 / 16)
    text = plan.describe()
    assert "max_lora_rank=8 (chosen; widest: adapter 'full'" in text and "25.0%" in text and "50.0%" in text


def test_default_counts():
    many = {f"a{i}": adapter(f"a{i}", [4]) for i in range(6)}
    plan = plan_slots(many)
    assert plan.max_loras == 4 and plan.max_cpu_loras == 6
    two = plan_slots({k: many[k] for k in ("a0", "a1")})
    assert two.max_loras == 2 and two.max_cpu_loras == 2
    empty = plan_slots({})
    assert (empty.max_lora_rank, empty.max_loras, empty.max_cpu_loras, empty.padding) == (16, 1, 1, 0.0)
    assert plan.vllm_args() == ["--max-lora-rank", "8", "--max-loras", "4", "--max-cpu-loras", "6"]


def test_forced_values_are_kept_and_marked():
    plan = plan_slots({"a": adapter("a", [3])}, max_lora_rank=64, max_loras=2, max_cpu_loras=5)
    assert (plan.max_lora_rank, plan.max_loras, plan.max_cpu_loras) == (64, 2, 5)
    assert set(plan.forced) == {"max_lora_rank", "max_loras", "max_cpu_loras"}
    assert plan.adapter_padding["a"] == pytest.approx(61 / 64)
    assert "(forced" in plan.describe()


def test_forced_slot_smaller_than_an_adapter_names_it():
    adapters = {"ok": adapter("ok", [4]), "wide": adapter("wide", [2, 20])}
    with pytest.raises(
        SlotError,
        match=r"--max-lora-rank 16 is smaller than adapter 'wide' model\.layers\.1\.self_attn\.q_proj rank 20.*--max-lora-rank 32",
    ):
        plan_slots(adapters, max_lora_rank=16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_lora_rank": 12}, "not a value vLLM allows"),
        ({"max_loras": 0}, "at least 1"),
        ({"max_loras": 3, "max_cpu_loras": 2}, "max_cpu_loras >= max_loras"),
    ],
)
def test_forced_values_vllm_would_refuse(kwargs, match):
    with pytest.raises(SlotError, match=match):
        plan_slots({"a": adapter("a", [4])}, **kwargs)


def test_rank_beyond_largest_slot():
    with pytest.raises(SlotError, match="exceeds vLLM's largest LoRA slot"):
        plan_slots({"huge": adapter("huge", [600])})


def test_fewer_cpu_slots_than_adapters_is_explained():
    plan = plan_slots({f"a{i}": adapter(f"a{i}", [4]) for i in range(3)}, max_loras=1, max_cpu_loras=2)
    assert "evicts the least recently used" in plan.describe()
