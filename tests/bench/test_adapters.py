"""Bench adapters: synthetic runs in train's format go through the real export and come out with
exactly the intended ranks, in a form serve's validation (what vLLM would see) accepts."""

from __future__ import annotations

import pytest

from prunedlora import metadata
from prunedlora.bench.adapters import (
    BenchAdapterError,
    adapters_from_runs,
    load_bundled_patterns,
    mixed_rank_adapters,
    random_global_pattern,
    synthetic_adapters,
    target_module_shapes,
    write_synthetic_run,
)
from prunedlora.export.exporter import export_adapter
from prunedlora.serve.validate import validate_adapter
from prunedlora.vllm_compat import smallest_slot_rank
from tests.export.conftest import make_fake_run, max_abs_diff, peft_logits


def test_synthetic_run_exports_to_the_given_ranks_with_peft_parity(tiny_model_path, tmp_path):
    modules = list(target_module_shapes(tiny_model_path))
    ranks = {m: (i % 5) + 1 for i, m in enumerate(modules)}
    run = write_synthetic_run(tiny_model_path, tmp_path / "run", ranks, r0=8, lora_alpha=16, seed=3)
    masks = metadata.load_masks(run / metadata.MASKS_FILE)
    assert {n: int(m.sum()) for n, m in masks.items()} == ranks
    export_adapter(run, tmp_path / "out")
    # parity computed here: the run's r0 adapter and the export, each loaded by PEFT on the base
    exported = peft_logits(tiny_model_path, tmp_path / "out")
    assert max_abs_diff(peft_logits(tiny_model_path, run / "adapter"), exported) <= 1e-5
    assert metadata.read_adapter_record(tmp_path / "out").ranks == ranks


def test_write_synthetic_run_refuses_ranks_above_r0_and_unknown_modules(tiny_model_path, tmp_path):
    modules = list(target_module_shapes(tiny_model_path))
    with pytest.raises(BenchAdapterError, match=r"\[0, r0=4\]"):
        write_synthetic_run(tiny_model_path, tmp_path / "a", {modules[0]: 5}, r0=4)
    with pytest.raises(BenchAdapterError, match="lacks"):
        write_synthetic_run(tiny_model_path, tmp_path / "b", {"model.layers.9.self_attn.q_proj": 1}, r0=4)


def test_random_global_pattern_hits_the_average_within_bounds():
    modules = [f"m{i}" for i in range(14)]
    ranks = random_global_pattern(modules, r0=8, target=2, seed=1)
    assert sum(ranks.values()) == 28 and all(1 <= r <= 8 for r in ranks.values())
    assert len(set(ranks.values())) > 1
    assert ranks == random_global_pattern(modules, r0=8, target=2, seed=1)


def test_synthetic_families_validate_and_are_cached(tiny_model_path, tmp_path):
    adapters = synthetic_adapters(tiny_model_path, tmp_path / "ad", r0=8, target_rank=2, per_family=2)
    assert list(adapters.families) == ["r0", "pruned-global", "pruned-uniform"]
    modules = set(target_module_shapes(tiny_model_path))
    for family, members in adapters.families.items():
        assert len(members) == 2
        for adapter in members:
            info = validate_adapter(adapter.path, tiny_model_path)  # what serve checks before vLLM sees it
            assert info.ranks == adapter.ranks and set(adapter.ranks) == modules
    assert {r for a in adapters.families["r0"] for r in a.ranks.values()} == {8}
    assert {r for a in adapters.families["pruned-uniform"] for r in a.ranks.values()} == {2}
    for adapter in adapters.families["pruned-global"]:
        assert adapter.average_rank == 2 and "no real run" in adapter.source
    # a second call reuses the exported folders
    stamp = (adapters.families["r0"][0].path / "adapter_model.safetensors").stat().st_mtime_ns
    again = synthetic_adapters(tiny_model_path, tmp_path / "ad", r0=8, target_rank=2, per_family=2)
    assert (again.families["r0"][0].path / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_mixed_rank_adapters_have_one_rank_each_and_share_the_slot_of_the_largest(tiny_model_path, tmp_path):
    members = mixed_rank_adapters(tiny_model_path, tmp_path / "ad", (1, 2, 4), r0=2)  # r0 below a rank is raised
    assert [(a.name, a.family) for a in members] == [(f"mixed-rank-r{r}", "mixed-rank") for r in (1, 2, 4)]
    modules = set(target_module_shapes(tiny_model_path))
    for adapter, rank in zip(members, (1, 2, 4)):
        info = validate_adapter(adapter.path, tiny_model_path, max_lora_rank=8)  # all fit the 8-slot together
        assert info.ranks == adapter.ranks == dict.fromkeys(modules, rank)
        assert "mixed-rank batch" in adapter.source
    with pytest.raises(BenchAdapterError, match="two distinct positive ranks"):
        mixed_rank_adapters(tiny_model_path, tmp_path / "ad", (4,))


def test_a_uniform_rank_adapter_has_every_module_at_its_rank_and_refuses_rank_zero(tiny_model_path, tmp_path):
    from prunedlora.bench.adapters import uniform_rank_adapter

    adapter = uniform_rank_adapter(tiny_model_path, tmp_path / "ad", 1, name="rank-1", family="floor", r0=2)
    assert (adapter.name, adapter.family, adapter.path.name) == ("rank-1", "floor", "rank-1")
    assert adapter.ranks == dict.fromkeys(target_module_shapes(tiny_model_path), 1)
    with pytest.raises(BenchAdapterError, match="rank must be positive, got 0"):
        uniform_rank_adapter(tiny_model_path, tmp_path / "other", 0, name="rank-0", family="floor")
    assert not (tmp_path / "other").exists()  # refused before anything is written


def test_synthetic_global_family_uses_a_matching_real_pattern(tiny_model_path, tmp_path):
    modules = list(target_module_shapes(tiny_model_path))
    pattern = {m: (3 if i % 2 else 1) for i, m in enumerate(modules)}
    adapters = synthetic_adapters(
        tiny_model_path,
        tmp_path / "ad",
        r0=8,
        target_rank=2,
        per_family=1,
        patterns=[{"task": "sst2", "allocation": "global", "r0": 8, "ranks": pattern, "source": "unit test"}],
    )
    assert adapters.families["pruned-global"][0].ranks == pattern
    assert "real sst2 run" in adapters.families["pruned-global"][0].source


def test_adapters_from_runs_give_pruned_and_r0_families(tiny_model_path, tmp_path):
    run = make_fake_run(tiny_model_path, tmp_path / "run", r0=8, masks_spec="random", seed=2)
    adapters = adapters_from_runs([run], tmp_path / "ad")
    assert set(adapters.families) == {"r0", "pruned-global"} and not adapters.synthetic
    r0 = adapters.families["r0"][0]
    assert set(r0.ranks.values()) == {8}
    pruned = adapters.families["pruned-global"][0]
    record = metadata.read_run_record(run)
    assert pruned.ranks == {n: r for n, r in record.ranks.items() if r > 0}
    with pytest.raises(BenchAdapterError, match="not a finished"):
        adapters_from_runs([tmp_path], tmp_path / "ad2")


def test_bundled_patterns_are_real_runs_of_the_default_model(default_model_path):
    patterns = load_bundled_patterns()
    assert patterns, "prunedlora/bench/rank_patterns.json should ship at least one real run"
    modules = set(target_module_shapes(default_model_path))
    for pattern in patterns:
        assert set(pattern["ranks"]) == modules
        average = sum(pattern["ranks"].values()) / len(pattern["ranks"])
        assert average == pytest.approx(pattern["target_rank"])
        assert max(pattern["ranks"].values()) <= pattern["r0"]
        assert pattern["command"].startswith("prunedlora train")
        assert smallest_slot_rank(max(pattern["ranks"].values())) in (8, 16, 32, 64)
