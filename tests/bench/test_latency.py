"""`prunedlora bench latency` end to end with vLLM on a tiny random model (slow: five engines: the base
model, and two slot settings with vLLM's stock LoRA ops and with the rank-aware ones).

Mechanics only: every configuration is measured in both modes and has the documented fields, the base
row is the reference, the engines ran the LoRA ops each row names, the mixed-rank batch has each
adapter's own summary, and the LoRA slot memory read from vLLM equals the closed-form estimate.
"""

from __future__ import annotations

import json

import pytest
import torch

from prunedlora.bench.latency import RATIO_KEYS
from prunedlora.bench.metrics import SUMMARY_FIELDS
from prunedlora.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(vllm_tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-latency")
    code = main(
        [
            "bench",
            "latency",
            "--model",
            str(vllm_tiny_model),
            "--r0",
            "8",
            "--target-rank",
            "2",
            "--prompts",
            "4",
            "--prompt-tokens",
            "16",
            "--output-tokens",
            "4",
            "--slots",
            "8",
            "--mixes",
            "1,2",
            "--mixed-ranks",
            "2,8",  # two adapters in the 8-slot: the same engine as the mixes (max_loras 2)
            "--adapters-per-family",
            "2",
            "--max-model-len",
            "128",
            "--work-dir",
            str(root / "work"),
            "--out",
            str(root / "out"),
            "--quiet",
        ]
    )
    return code, root, json.loads((root / "out" / "latency.json").read_text())


def test_every_configuration_is_measured(bench):
    code, root, payload = bench
    assert code == 0
    configurations = [
        "r0 @ slot 8",
        "pruned-global @ slot 8",
        "pruned-uniform @ slot 8",
        "pruned-global @ slot 8 x1 (max_loras 2)",
        "pruned-global @ slot 8 x2 (max_loras 2)",
        "mixed-rank rank 2 alone @ slot 8 (max_loras 2)",
        "mixed-rank rank 8 alone @ slot 8 (max_loras 2)",
        "mixed-rank 2+8 @ slot 8 x2 (max_loras 2)",
    ]
    names = [row["name"] for row in payload["rows"]]
    assert names == ["base"] + [f"{c} [{mode}]" for c in configurations for mode in ("stock", "rank-aware")]
    assert len(payload["engines"]) == 5
    for row in payload["rows"][1:]:  # each engine really ran the ops its rows name
        assert row["lora_ops_in_use"] == row["lora_ops"], row["name"]
        if row["lora_ops"] == "rank-aware":
            assert row["tpot_p50_x_stock"] > 0
    for row in payload["rows"]:
        assert "error" not in row, row
        assert set(SUMMARY_FIELDS) <= set(row)
        assert row["requests"] == 4 and row["output_tokens"] == 16
        # invariants of how the summary is computed (percentiles ordered, e2e = ttft + decode), not timings
        assert row["ttft_p50_s"] <= row["ttft_p99_s"] and row["e2e_p50_s"] >= row["ttft_p50_s"]
    # Every "x base" ratio is this row's value over the base row's, recomputed here from the JSON.
    # Break: a ratio taken against the wrong row or key (e.g. e2e p99 over e2e p50) -> red.
    base = payload["rows"][0]
    assert base["name"] == "base" and base["lora_slot_bytes"] == 0
    for row in payload["rows"]:
        for key, ratio in RATIO_KEYS.items():
            assert row[ratio] == row[key] / base[key], (row["name"], ratio)
        assert row["throughput_x_base"] == row["output_tokens_per_s"] / base["output_tokens_per_s"], row["name"]
    assert [row["distinct_adapters"] for row in payload["rows"]] == [0] + [
        d for d in (1, 1, 1, 1, 2, 1, 1, 2) for _ in range(2)
    ]
    for row in payload["rows"][-2:]:  # the mixed-rank batch: each adapter's own requests of the batch
        own = row["per_adapter"]
        assert {name: (s["rank"], s["requests"]) for name, s in own.items()} == {
            "mixed-rank-r2": (2, 2),
            "mixed-rank-r8": (8, 2),
        }
        assert sum(s["output_tokens"] for s in own.values()) == row["output_tokens"]


def test_slot_memory_read_from_vllm_matches_the_formula(bench):
    _, _, payload = bench
    for row in payload["rows"][1:]:
        assert row["lora_slot_bytes"] == row["lora_slot_bytes_estimate"] > 0
    single, mixed = payload["rows"][1], payload["rows"][-1]
    assert mixed["lora_slot_bytes"] == 2 * single["lora_slot_bytes"]  # max_loras 2 vs 1


def test_outputs_are_written(bench):
    _, root, payload = bench
    for key, name in (("json", "latency.json"), ("markdown", "latency.md"), ("plot", "latency.png")):
        path = root / "out" / name
        assert payload["files"][key] == str(path) and path.stat().st_size > 0
    table = (root / "out" / "latency.md").read_text()
    assert all(row["name"] in table for row in payload["rows"]) and "x base" in table
    assert set(payload["adapters"]["families"]) == {"r0", "pruned-global", "pruned-uniform", "mixed-rank"}
    assert payload["adapters"]["synthetic"] is True
    assert all(engine["start_s"] > 0 and engine["model_dtype"] for engine in payload["engines"].values())
    assert "LoRA ops side by side" in table and "Mixed-rank batch" in table
    machine = payload["machine"]  # what decides the figures, recorded with them
    assert machine["cpu"] and machine["cores"] >= 1 and isinstance(machine["flags"], list) and machine["thread_binding"]
    assert machine["dtype"] in ("float32", "bfloat16") and "Machine: " + machine["description"] in table
    assert all(engine["model_dtype"] == machine["dtype"] for engine in payload["engines"].values())


def test_demo_comparison_serves_a_runs_own_adapters(vllm_tiny_model, tmp_path, capsys):
    from prunedlora.bench.latency import demo_latency
    from tests.export.conftest import make_fake_run

    run = make_fake_run(
        vllm_tiny_model, tmp_path / "run", r0=32, masks_spec=lambda n, i, r0, g: torch.arange(r0) < 4, seed=1
    )
    payload = demo_latency(run, tmp_path / "out", model=str(vllm_tiny_model), num_prompts=2, output_tokens=3)
    rows = {row["name"]: row for row in payload["rows"]}
    assert list(rows) == ["base"] + [
        f"{c} [{mode}]"
        for c in ("r0 @ slot 32", "pruned-global @ slot 8", "pruned-global @ slot 32")
        for mode in ("stock", "rank-aware")
    ]
    assert all("error" not in row for row in rows.values())
    assert payload["adapters"]["synthetic"] is False
    out = capsys.readouterr().out
    assert "x base" in out and f"plot: {tmp_path / 'out' / 'latency.png'}" in out
    assert "LoRA ops side by side" in out  # stock and rank-aware ratios next to each other
