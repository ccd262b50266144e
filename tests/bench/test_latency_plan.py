"""The latency bench's plan, engine grouping, memory formula and prompts (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunedlora.bench.adapters import AdapterSet, BenchAdapter
from prunedlora.bench.latency import (
    BENCH_LORA_OPS,
    QUICK_SETTINGS,
    LatencyBenchConfig,
    LatencyBenchError,
    _engine_dir_name,
    _engine_specs,
    _rows,
    bench_prompts,
    lora_slot_bytes_estimate,
    plan_configurations,
    plan_measurements,
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
    config = LatencyBenchConfig(mixes=[1, 4], sweep_slots=[8], lora_ops="rank-aware")  # one mode: one engine each
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
    assert {s["engine"].get("lora_ops") for s in specs[1:]} == {"rank-aware"}  # the LoRA ops asked for
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
        ({"lora_ops": "fast"}, "rank-aware, stock, both"),
        ({"mixed_ranks": [4]}, "at least two distinct positive ranks"),
        ({"mixed_ranks": [4, 4]}, "at least two distinct positive ranks"),
        ({"mixed_ranks": [0, 4]}, "at least two distinct positive ranks"),
        ({"mixed_ranks": [4, 1024]}, "exceeds vLLM's largest slot"),
    ],
)
def test_config_errors_say_what_to_change(kwargs, message):
    with pytest.raises(LatencyBenchError, match=message):
        LatencyBenchConfig(**kwargs)


# -- LoRA ops modes and the mixed-rank batch -------------------------------------------------------------


def _with_mixed_ranks(adapters: AdapterSet, ranks=(4, 8, 16)) -> AdapterSet:
    adapters.families["mixed-rank"] = [
        BenchAdapter(f"mixed-rank-r{r}", "mixed-rank", Path(f"/adapters/mixed-rank-r{r}"), {"a": r, "b": r}, "test")
        for r in ranks
    ]
    return adapters


def test_the_default_measures_every_adapter_configuration_with_stock_then_rank_aware_ops():
    config = LatencyBenchConfig()
    assert config.lora_ops == "both" and BENCH_LORA_OPS == ("rank-aware", "stock", "both")
    adapters = _adapters(global_max=20)
    configurations = plan_configurations(adapters, config)
    plan = plan_measurements(adapters, config)
    # the base model once (no LoRA, no ops), every adapter configuration twice, its two modes side by side
    assert [(row.configuration, row.lora_ops) for row in plan] == [("base", None)] + [
        (row.name, mode) for row in configurations[1:] for mode in ("stock", "rank-aware")
    ]
    assert plan[1].name == "r0 @ slot 32 [stock]" and plan[2].name == "r0 @ slot 32 [rank-aware]"
    assert len({row.name for row in plan}) == len(plan)
    for stock, rank_aware in zip(plan[1::2], plan[2::2]):  # same adapters, slot and batch; only the ops differ
        assert (stock.family, stock.slot, stock.mix, stock.max_loras, stock.role, stock.members) == (
            rank_aware.family,
            rank_aware.slot,
            rank_aware.mix,
            rank_aware.max_loras,
            rank_aware.role,
            rank_aware.members,
        )


def test_each_mode_gets_its_own_engines_on_the_same_prompts(tmp_path):
    config = LatencyBenchConfig(mixes=[1, 4], sweep_slots=[8])
    adapters = _adapters(global_max=20)
    prompts = [[1, 2, 3], [4, 5, 6]]
    specs = _engine_specs(plan_measurements(adapters, config), adapters, config, tmp_path, prompts=prompts)
    keys = [
        (
            s["engine"]["lora"],
            s["engine"].get("max_lora_rank"),
            s["engine"].get("max_loras"),
            s["engine"].get("lora_ops"),
        )
        for s in specs
    ]
    assert keys == [
        (False, None, None, None),
        (True, 32, 1, "stock"),
        (True, 32, 1, "rank-aware"),
        (True, 8, 1, "stock"),
        (True, 8, 1, "rank-aware"),
        (True, 32, 4, "stock"),
        (True, 32, 4, "rank-aware"),
    ]
    assert all(s["prompts"] == prompts for s in specs)
    for stock, rank_aware in zip(specs[1::2], specs[2::2]):
        assert stock["adapters"] == rank_aware["adapters"]
        assert [m["name"].replace("[stock]", "") for m in stock["measurements"]] == [
            m["name"].replace("[rank-aware]", "") for m in rank_aware["measurements"]
        ]
    assert len({_engine_dir_name(s) for s in specs}) == len(specs)
    assert _engine_dir_name(specs[1]) == "slot32-loras1-stock"
    # a plan without modes yet gets the config's: the same engines
    unexpanded = _engine_specs(plan_configurations(adapters, config), adapters, config, tmp_path, prompts=prompts)
    assert unexpanded == specs


def test_one_mode_keeps_the_configuration_names():
    adapters = _adapters(global_max=20)
    for mode in ("stock", "rank-aware"):
        config = LatencyBenchConfig(lora_ops=mode)
        plan = plan_measurements(adapters, config)
        assert [row.name for row in plan] == [row.name for row in plan_configurations(adapters, config)]
        assert {row.lora_ops for row in plan[1:]} == {mode} and plan[0].lora_ops is None


def test_mixed_rank_batch_is_planned_in_the_slot_of_its_largest_rank(tmp_path):
    adapters = _with_mixed_ranks(_adapters(global_max=12))
    config = LatencyBenchConfig(mixes=[1, 4], sweep_slots=[8])
    configurations = plan_configurations(adapters, config)
    mixed = [row for row in configurations if row.family == "mixed-rank"]
    assert [(row.name, row.slot, row.mix, row.max_loras, row.role, row.members) for row in mixed] == [
        ("mixed-rank rank 4 alone @ slot 16 (max_loras 3)", 16, 1, 3, "mixed-rank-alone", (0,)),
        ("mixed-rank rank 8 alone @ slot 16 (max_loras 3)", 16, 1, 3, "mixed-rank-alone", (1,)),
        ("mixed-rank rank 16 alone @ slot 16 (max_loras 3)", 16, 1, 3, "mixed-rank-alone", (2,)),
        ("mixed-rank 4+8+16 @ slot 16 x3 (max_loras 3)", 16, 3, 3, "mixed-rank", (0, 1, 2)),
    ]
    # the family is only in its own rows: not in the smallest/padded rows, the sweep or the mixes
    assert all(row.role.startswith("mixed-rank") for row in configurations if row.family == "mixed-rank")
    assert [row for row in configurations if row.role == "mix"][0].family == "pruned-global"
    plan = plan_measurements(adapters, config)
    specs = _engine_specs(plan, adapters, config, tmp_path, prompts=[[1]])
    mixed_specs = [s for s in specs if s["engine"].get("max_loras") == 3]
    assert [s["engine"]["lora_ops"] for s in mixed_specs] == ["stock", "rank-aware"]
    for spec in mixed_specs:
        assert spec["engine"]["max_lora_rank"] == 16
        assert spec["adapters"] == {f"mixed-rank-r{r}": f"/adapters/mixed-rank-r{r}" for r in (4, 8, 16)}
        measurements = spec["measurements"]
        assert [m["adapters"] for m in measurements] == [
            ["mixed-rank-r4"],
            ["mixed-rank-r8"],
            ["mixed-rank-r16"],
            ["mixed-rank-r4", "mixed-rank-r8", "mixed-rank-r16"],
        ]
        assert [m.get("per_adapter", False) for m in measurements] == [False, False, False, True]


def test_quick_settings_and_the_demo_plan_both_modes_without_the_mixed_rank_batch(tmp_path):
    assert QUICK_SETTINGS["mixed_ranks"] == [] and "lora_ops" not in QUICK_SETTINGS
    config = LatencyBenchConfig.quick(runs=["runs/demo/sst2"])  # what demo_latency asks for
    assert config.lora_ops == "both" and config.mixed_ranks == []
    adapters = AdapterSet(  # what adapters_from_runs gives for one global run capped at 16
        families={
            "r0": _family("r0", [{"a": 32, "b": 32}]),
            "pruned-global": _family("pruned-global", [{"a": 16, "b": 3}]),
        },
        synthetic=False,
    )
    plan = plan_measurements(adapters, config)
    assert [row.name for row in plan] == [
        "base",
        "r0 @ slot 32 [stock]",
        "r0 @ slot 32 [rank-aware]",
        "pruned-global @ slot 16 [stock]",
        "pruned-global @ slot 16 [rank-aware]",
        "pruned-global @ slot 32 [stock]",
        "pruned-global @ slot 32 [rank-aware]",
    ]
    assert len(_engine_specs(plan, adapters, config, tmp_path, prompts=[[1]])) == 5  # base + 2 slots x 2 modes


def _measured(row, tpot: float, **extra) -> dict:
    return {
        "engine": "e",
        "ttft_p50_s": tpot * 2,
        "ttft_p99_s": tpot * 3,
        "tpot_p50_s": tpot,
        "tpot_p99_s": tpot * 1.5,
        "e2e_p50_s": tpot * 10,
        "e2e_p99_s": tpot * 11,
        "output_tokens_per_s": 1 / tpot,
        **extra,
    }


def test_rows_take_ratios_to_the_base_and_to_the_stock_row_and_name_each_adapters_share(tiny_model_path):
    adapters = _with_mixed_ranks(_adapters(global_max=12))
    config = LatencyBenchConfig(mixes=[1], sweep_slots=[])
    plan = plan_measurements(adapters, config)
    tpot = {"base": 0.05}
    measured = {"base": _measured(None, 0.05)}
    for row in plan[1:]:
        tpot[row.name] = 0.2 if row.lora_ops == "stock" else 0.1
        extra = {}
        if row.role == "mixed-rank":
            extra["per_adapter"] = {
                name: _measured(None, tpot[row.name] * (1 + i / 10), requests=2)
                for i, name in enumerate(["mixed-rank-r4", "mixed-rank-r8", "mixed-rank-r16"])
            }
        measured[row.name] = _measured(row, tpot[row.name], **extra)
    measured[plan[-1].name] = {"engine": "e", "error": "boom"}  # the last rank-aware row failed
    engines = {"e": {"model_dtype": "float32", "lora_ops_in_use": "stock"}}
    rows = _rows(plan, measured, engines, tiny_model_path, adapters)
    by_name = {row["name"]: row for row in rows}
    assert by_name["base"]["lora_ops"] is None and "lora_ops_in_use" not in by_name["base"]
    stock, rank_aware = by_name["r0 @ slot 32 [stock]"], by_name["r0 @ slot 32 [rank-aware]"]
    assert stock["configuration"] == rank_aware["configuration"] == "r0 @ slot 32"
    assert (stock["lora_ops"], rank_aware["lora_ops"]) == ("stock", "rank-aware")
    assert rank_aware["lora_ops_in_use"] == "stock"  # what the engine said it ran, kept beside the mode asked
    assert stock["tpot_p50_x_base"] == 0.2 / 0.05 and rank_aware["tpot_p50_x_base"] == 0.1 / 0.05
    assert rank_aware["tpot_p50_x_stock"] == 0.1 / 0.2 and "tpot_p50_x_stock" not in stock
    assert rank_aware["throughput_x_stock"] == (1 / 0.1) / (1 / 0.2)
    batch = by_name["mixed-rank 4+8+16 @ slot 16 x3 (max_loras 3) [stock]"]
    assert batch["adapters"] == ["mixed-rank-r4", "mixed-rank-r8", "mixed-rank-r16"]
    share = batch["per_adapter"]["mixed-rank-r8"]
    assert share["rank"] == 8 and share["tpot_p50_x_base"] == share["tpot_p50_s"] / 0.05
    alone = by_name["mixed-rank rank 8 alone @ slot 16 (max_loras 3) [rank-aware]"]
    assert alone["adapters"] == ["mixed-rank-r8"] and alone["role"] == "mixed-rank-alone"
    failed = by_name[plan[-1].name]
    assert "error" in failed and "tpot_p50_x_stock" not in failed and "tpot_p50_x_base" not in failed


def test_the_worker_summarises_each_adapter_of_a_per_adapter_measurement(monkeypatch):
    from types import SimpleNamespace

    from prunedlora.bench import latency_worker

    def fake_generate(engine, prompts, names, max_tokens):
        outputs = []
        for i, name in enumerate(names):
            slow = {"a4": 1.0, "a16": 2.0}[name]
            stats = SimpleNamespace(first_token_latency=0.1 * slow, first_token_ts=10.0, last_token_ts=10.0 + slow)
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=[0] * max_tokens)], metrics=stats))
        return outputs, 4.0

    monkeypatch.setattr(latency_worker, "_generate", fake_generate)
    spec = {"prompts": [[1], [2], [3]], "output_tokens": 5, "warmup_tokens": 2, "repeats": 1}
    summary = latency_worker._measure(None, spec, {"name": "m", "adapters": ["a4", "a16"], "per_adapter": True})
    assert summary["requests"] == 3 and summary["distinct_adapters"] == 2
    own = summary["per_adapter"]
    assert {name: s["requests"] for name, s in own.items()} == {"a4": 2, "a16": 1}  # prompts cycle over adapters
    assert own["a4"]["tpot_p50_s"] == 1.0 / 4 and own["a16"]["tpot_p50_s"] == 2.0 / 4
    assert own["a4"]["output_tokens"] + own["a16"]["output_tokens"] == summary["output_tokens"]
    plain = latency_worker._measure(None, spec, {"name": "m", "adapters": ["a4", "a16"]})
    assert "per_adapter" not in plain


def test_ops_in_use_is_read_from_the_punica_wrappers():
    from prunedlora.bench.slot_memory import ops_mode

    assert ops_mode(["RankAwarePunicaWrapperCPU"]) == "rank-aware"
    assert ops_mode(["PunicaWrapperCPU"]) == "stock"
    assert ops_mode(["PunicaWrapperGPU"]) == "vLLM PunicaWrapperGPU"  # CUDA keeps vLLM's kernels
    assert ops_mode(["PunicaWrapperCPU", "RankAwarePunicaWrapperCPU"]).startswith("vLLM ")
    assert ops_mode([]) == "none"
