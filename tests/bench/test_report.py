"""The latency bench's report from a results payload (no vLLM, no timing): the markdown puts stock and
rank-aware LoRA ops side by side per configuration and lists each adapter of the mixed-rank batch; the
plot is written for one mode, two modes and results older than the modes; ``make demo``'s latency
stage prints both modes' ratios."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from prunedlora.bench.adapters import AdapterSet, BenchAdapter
from prunedlora.bench.latency import LatencyBenchConfig, _rows, format_comparison, plan_measurements
from prunedlora.bench.report import latency_markdown, paired_rows, plot_latency

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# TPOT per mode: rank-aware a third of stock; the base model 50 ms
TPOT = {None: 0.05, "stock": 0.3, "rank-aware": 0.1}


def _adapters() -> AdapterSet:
    def family(name, ranks):
        return [BenchAdapter(f"{name}-{i}", name, Path(f"/a/{name}-{i}"), r, "test") for i, r in enumerate(ranks)]

    adapters = AdapterSet(
        families={
            "r0": family("r0", [{"a": 32, "b": 32}]),
            "pruned-global": family("pruned-global", [{"a": 16, "b": 3}, {"a": 9, "b": 2}]),
            "pruned-uniform": family("pruned-uniform", [{"a": 8, "b": 8}]),
        }
    )
    adapters.families["mixed-rank"] = [
        BenchAdapter(f"mixed-rank-r{r}", "mixed-rank", Path(f"/a/mixed-rank-r{r}"), {"a": r, "b": r}, "test")
        for r in (4, 8, 16)
    ]
    return adapters


def _summary(tpot: float, requests: int = 4) -> dict:
    return {
        "requests": requests,
        "ttft_p50_s": 4 * tpot,
        "ttft_p99_s": 5 * tpot,
        "tpot_p50_s": tpot,
        "tpot_p99_s": 1.2 * tpot,
        "e2e_p50_s": 20 * tpot,
        "e2e_p99_s": 21 * tpot,
        "output_tokens": 16 * requests,
        "wall_s": 20 * tpot,
        "output_tokens_per_s": 16 * requests / (20 * tpot),
    }


@pytest.fixture(scope="module")
def payload(tiny_model_path) -> dict:
    """A two-mode payload as run_latency_bench writes it, from the real plan and row builder."""
    config = LatencyBenchConfig(mixes=[1, 4], sweep_slots=[8, 64])
    adapters = _adapters()
    plan = plan_measurements(adapters, config)
    measured, engines = {}, {}
    for row in plan:
        engine = f"{row.slot}-{row.max_loras}-{row.lora_ops}"
        # the rank-aware 64-slot engine fell back to vLLM's own ops (its start-up check failed)
        fell_back = row.lora_ops == "rank-aware" and row.slot == 64
        engines[engine] = {"model_dtype": "float32", "lora_ops_in_use": "stock" if fell_back else row.lora_ops}
        values = {"engine": engine, **_summary(TPOT[row.lora_ops]), "distinct_adapters": row.mix if row.family else 0}
        if row.role == "mixed-rank":
            values["per_adapter"] = {
                name: _summary(TPOT[row.lora_ops] * (1 + i / 10), requests=2)
                for i, name in enumerate(("mixed-rank-r4", "mixed-rank-r8", "mixed-rank-r16"))
            }
        measured[row.name] = values
    rows = _rows(plan, measured, engines, tiny_model_path, adapters)
    return {
        "bench": "latency",
        "model": str(tiny_model_path),
        "machine": {"cpu": "test CPU", "flags": ["avx2"], "cores": 2, "dtype": "float32", "thread_binding": "0-1"},
        "vllm": "0.32.0",
        "settings": {"num_prompts": 4, "prompt_tokens": 16, "output_tokens": 16, "repeats": 1},
        "adapters": {
            "synthetic": True,
            "families": {
                family: [
                    {"name": a.name, "max_rank": a.max_rank, "average_rank": a.average_rank, "source": a.source}
                    for a in members
                ]
                for family, members in adapters.families.items()
            },
        },
        "rows": rows,
    }


def _table(markdown: str, header_start: str) -> list[list[str]]:
    """The rows of the markdown table whose header starts with ``header_start``, as cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def test_markdown_puts_both_modes_side_by_side_per_configuration(payload):
    markdown = latency_markdown(payload)
    assert "LoRA ops: stock and rank-aware" in markdown
    main = _table(markdown, "| configuration | slot | LoRA ops |")
    assert len(main) == 2 + len(payload["rows"])  # header, rule, one line per measurement
    assert {row[2] for row in main[2:]} == {"-", "stock", "rank-aware", "rank-aware (ran: stock)"}
    side = _table(markdown, "| configuration | slot | adapters in batch | TPOT p50 x base: stock")
    header, body = side[0], side[2:]
    assert header[3:5] == ["TPOT p50 x base: stock", "TPOT p50 x base: rank-aware"]
    assert header[-1] == "TPOT rank-aware / stock"
    configurations = [name for name, _ in paired_rows(payload["rows"])[0]]
    assert [row[0] for row in body] == configurations and "base" not in configurations
    assert "r0 @ slot 32" in configurations and "pruned-global @ slot 16 x4 (max_loras 4)" in configurations
    for row in body:  # stock 6x, rank-aware 2x the base model, rank-aware a third of stock
        assert (row[3], row[4], row[-1]) == ("6", "2", "0.333"), row


def test_markdown_lists_each_adapter_of_the_mixed_rank_batch(payload):
    markdown = latency_markdown(payload)
    assert "Mixed-rank batch: `mixed-rank 4+8+16 @ slot 16 x3 (max_loras 3)`" in markdown
    table = _table(markdown, "| adapter | rank | requests in the batch |")
    body = table[2:]
    assert [(row[0], row[1], row[2]) for row in body] == [
        ("mixed-rank-r4", "4", "2"),
        ("mixed-rank-r8", "8", "2"),
        ("mixed-rank-r16", "16", "2"),
    ]
    r8 = body[1]
    # in the batch (stock, rank-aware), then alone in the same engine (stock, rank-aware), x base
    assert r8[3:5] == [f"{0.3 * 1.1 / 0.05:.3g}", f"{0.1 * 1.1 / 0.05:.3g}"]
    assert r8[-2:] == ["6", "2"]


def test_one_mode_and_older_results_have_no_side_by_side_table(payload):
    stock_only = copy.deepcopy(payload)
    stock_only["rows"] = [r for r in stock_only["rows"] if r.get("lora_ops") != "rank-aware"]
    markdown = latency_markdown(stock_only)
    assert "LoRA ops: stock." in markdown and "LoRA ops side by side" not in markdown
    assert format_comparison(stock_only) == ""
    older = copy.deepcopy(stock_only)  # results written before the LoRA ops modes existed
    for row in older["rows"]:
        for key in ("lora_ops", "lora_ops_in_use", "configuration"):
            row.pop(key, None)
    assert "LoRA ops: not recorded" in latency_markdown(older)


def test_the_plot_is_written_for_two_modes_one_mode_and_older_results(payload, tmp_path):
    stock_only = copy.deepcopy(payload)
    stock_only["rows"] = [r for r in stock_only["rows"] if r.get("lora_ops") != "rank-aware"]
    older = copy.deepcopy(stock_only)
    for row in older["rows"]:
        for key in ("lora_ops", "lora_ops_in_use", "configuration", "per_adapter"):
            row.pop(key, None)
    with_error = copy.deepcopy(payload)
    with_error["rows"][3] = {
        k: with_error["rows"][3][k]
        for k in ("name", "configuration", "family", "slot", "mix", "max_loras", "role", "lora_ops")
    }
    with_error["rows"][3]["error"] = "engine exited with code 1"
    for name, case in (("both", payload), ("stock", stock_only), ("older", older), ("error", with_error)):
        path = plot_latency(case, tmp_path / f"{name}.png")
        assert path == tmp_path / f"{name}.png" and path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 10_000


def test_the_demo_prints_stock_and_rank_aware_ratios_side_by_side(payload, monkeypatch, capsys, tmp_path):
    import prunedlora.bench.latency as latency

    seen = []

    def fake_run(config):
        seen.append(config)
        return {**payload, "files": {"plot": str(tmp_path / "latency.png"), "markdown": str(tmp_path / "latency.md")}}

    monkeypatch.setattr(latency, "run_latency_bench", fake_run)
    latency.demo_latency("runs/demo/sst2", tmp_path)
    (config,) = seen
    assert config.lora_ops == "both" and config.mixed_ranks == [] and config.runs == ["runs/demo/sst2"]
    out = capsys.readouterr().out
    assert "r0 @ slot 32 [stock]" in out and "r0 @ slot 32 [rank-aware]" in out  # one line per measurement
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("LoRA ops side by side"))
    assert re.search(r"TPOT p50:\s+stock\s+rank-aware\s+E2E p50:\s+stock\s+rank-aware\s+rank-aware / stock", head)
    r0 = next(line for line in lines if line.startswith("r0 @ slot 32 ") and "[" not in line)
    assert r0.split()[-5:] == ["6.00x", "2.00x", "6.00x", "2.00x", "0.33x"]
    assert "  mixed-rank-r16 in the batch" in out
    assert f"plot: {tmp_path / 'latency.png'}" in out


def _sst2_cell(method: str, seed: int, margins: list[float]) -> dict:
    """A finished SST-2 cell as the quality bench records it, from its per-example gold-label margins."""
    return {
        "task": "sst2",
        "method": method,
        "seed": seed,
        "command": f"prunedlora bench quality --methods {method} --seeds {seed}",
        "train": {"average_rank": 8.0, "max_rank": 16, "adapter_parameters": 1000, "seconds": 1.0},
        "eval": {
            "accuracy": sum(m > 0 for m in margins) / len(margins),
            "per_example": {"index": list(range(len(margins))), "margin": margins},
        },
    }


def _sst2_two_seed_markdown(methods: list[str], cells: list[dict]) -> str:
    """The quality table's markdown for SST-2 cells of seeds 0 and 1, as the bench writes it."""
    from prunedlora.bench.quality import aggregate
    from prunedlora.bench.report import quality_markdown

    payload = {
        "model": "default",
        "machine": {"cpu": "test CPU", "flags": ["avx2"], "cores": 2, "dtype": "float32", "thread_binding": "0-1"},
        "settings": {"tasks": ["sst2"], "methods": methods, "seeds": [0, 1], "max_steps": 150, "eval_examples": None},
        "cells": cells,
        "summary": aggregate(cells),
    }
    return quality_markdown(payload)


def _quality_payload() -> dict:
    cells = [_sst2_cell("lora-target", s, [1.0, -1.0, 0.5, -0.2]) for s in (0, 1)]
    cells += [_sst2_cell("pruned-x", s, [1.5, 0.3, 0.9, -0.1 + s]) for s in (0, 1)]
    cells.append(_sst2_cell("base", 0, [-1.0, -1.0, 0.5, -0.2]))
    return {
        "model": "default",
        "settings": {"tasks": ["sst2"], "methods": ["base", "lora-target", "pruned-x"]},
        "cells": cells,
    }


def test_the_quality_plot_adds_the_paired_differences_under_the_bars(tmp_path, monkeypatch):
    """Below the bars, one panel per paired metric (SST-2: accuracy and the margin), each with the
    method's mean difference, its seeds and the zero line. Break: drop the paired row -> red."""
    from prunedlora.bench import report

    figures = []
    real_save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    path = report.plot_quality(_quality_payload(), tmp_path / "quality.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_visible()]
    assert titles == [
        "SST-2 dev accuracy (higher is better)",
        "SST-2 dev accuracy: method - lora-target\n(higher is better)",
        "SST-2 gold-label log-prob margin: method - lora-target\n(higher is better)",
    ]
    paired = [ax for ax in figures[0].axes if ax.get_visible()][1:]
    for ax in paired:
        assert [t.get_text() for t in ax.get_yticklabels()] == ["pruned-x"]  # base is not compared
        assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.get_lines())  # the zero line


def test_each_tasks_paired_panels_sit_under_its_own_bars(tmp_path, monkeypatch):
    """Two tasks: SST-2 (one bar metric, two paired) then CodeAlpaca (one of each). CodeAlpaca's paired
    panel is in the column of its bars, not under SST-2's. Break: fill the paired row left to right in
    the order comparisons come (CodeAlpaca's first) -> red."""
    from prunedlora.bench import report

    payload = _quality_payload()

    def code_cell(method, seed, nlls):
        return {
            "task": "codealpaca",
            "method": method,
            "seed": seed,
            "eval": {
                "nll": sum(nlls) / len(nlls),
                "per_example": {"index": list(range(len(nlls))), "logprob_sum": [-x for x in nlls], "tokens": [1] * 4},
            },
        }

    # CodeAlpaca's cells first, so a layout in comparison order would put its panel in column 0.
    payload["cells"] = (
        [code_cell("lora-target", s, [0.9, 0.8, 0.7, 0.6]) for s in (0, 1)]
        + [code_cell("pruned-x", s, [0.8, 0.8, 0.6, 0.5 + 0.05 * s]) for s in (0, 1)]
        + payload["cells"]
    )
    payload["settings"]["tasks"] = ["sst2", "codealpaca"]
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or Path(path))
    report.plot_quality(payload, tmp_path / "quality.png")
    placed = {
        (ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start): ax.get_title()
        .split(" (")[0]
        .split(":")[0]
        for ax in figures[0].axes
        if ax.get_visible()
    }
    assert placed == {
        (0, 0): "SST-2 dev accuracy",
        (1, 0): "SST-2 dev accuracy",
        (1, 1): "SST-2 gold-label log-prob margin",
        (0, 2): "CodeAlpaca held-out NLL",
        (1, 2): "CodeAlpaca held-out NLL",
    }


def test_the_quality_plot_has_no_paired_row_without_the_reference(tmp_path, monkeypatch):
    from prunedlora.bench import report

    payload = _quality_payload()
    payload["cells"] = [c for c in payload["cells"] if c["method"] != "lora-target"]
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or Path(path))
    report.plot_quality(payload, tmp_path / "quality.png")
    assert [ax.get_title() for ax in figures[0].axes if ax.get_visible()] == ["SST-2 dev accuracy (higher is better)"]


def _reference_section(margins: dict[str, list[float]], reference: str) -> tuple[set[str], str]:
    """The quality table's paired section against ``reference`` for SST-2 cells of seeds 0 and 1 (the same
    margins in both) of each method in ``margins``, with the base model at seed 0: the methods it lists and
    its text."""
    cells = [_sst2_cell("base", 0, [-1.0, -1.0, 0.5, -0.2])]
    cells += [_sst2_cell(method, seed, m) for seed in (0, 1) for method, m in margins.items()]
    text = _sst2_two_seed_markdown(["base", *margins], cells)
    section = text.split(f"### Paired differences against `{reference}`")[1].split("\n\n")[1]
    rows = [line for line in section.splitlines() if line.startswith("| sst2 ")]
    return {row.split(" | ")[2] for row in rows}, section


def test_the_quality_table_compares_each_pruned_method_with_magnitude_pruning():
    """Issue 9's second question: does the score matter, or only pruning from r0? Below the table against
    LoRA r8, every other pruned method is compared paired with magnitude pruning (LoRA r8 and the base
    model are not). Break: drop the second table, or compare every method with it -> red."""
    margins = {
        "lora-target": [1.0, -1.0, 0.5, -0.2],
        "pruned-obs-x": [1.5, 0.3, 0.9, 0.1],
        "pruned-magnitude-global": [1.2, -0.3, 0.9, 0.1],
    }
    listed, section = _reference_section(margins, "pruned-magnitude-global")
    assert listed == {"pruned-obs-x"}
    assert "| sst2 | accuracy (higher is better) | pruned-obs-x | 2 | +0.2500 |" in section  # one more right of 4


def test_the_quality_table_compares_each_pruned_method_with_lora_at_r0():
    """The third question: what does pruning from r0 to the target cost against keeping all of r0? Every
    pruned method, magnitude included, is compared paired with LoRA r0; LoRA r8 and the base model are
    not. Break: drop the third table, or leave magnitude out of it -> red."""
    margins = {
        "lora-target": [1.0, -1.0, 0.5, -0.2],
        "lora-r0": [1.5, 0.3, -0.9, 0.1],
        "pruned-obs-x": [1.5, 0.3, 0.9, 0.1],
        "pruned-magnitude-global": [1.2, -0.3, 0.9, -0.1],
    }
    listed, section = _reference_section(margins, "lora-r0")
    assert listed == {"pruned-magnitude-global", "pruned-obs-x"}
    assert "| sst2 | accuracy (higher is better) | pruned-obs-x | 2 | +0.2500 |" in section  # one more right of 4
    assert "| sst2 | accuracy (higher is better) | pruned-magnitude-global | 2 | -0.2500 |" in section  # 2 of 4 vs 3


def test_the_quality_table_compares_each_pruned_method_with_adalora_at_its_learning_rate():
    """The fourth question: does PrunedLoRA beat AdaLoRA at the same budget? Every pruned method is compared
    paired with adalora-lr5x (the AdaLoRA that trains in the recipes' steps); plain LoRA and the AdaLoRA at
    the shared rate are not. Break: drop the fourth table, or compare the other AdaLoRA with it -> red."""
    margins = {
        "lora-target": [1.0, -1.0, 0.5, -0.2],
        "adalora": [-1.0, -1.0, 0.5, -0.2],
        "adalora-lr5x": [1.5, -0.3, -0.9, 0.1],
        "pruned-obs-x": [1.5, 0.3, 0.9, 0.1],
    }
    listed, section = _reference_section(margins, "adalora-lr5x")
    assert listed == {"pruned-obs-x"}
    assert "| sst2 | accuracy (higher is better) | pruned-obs-x | 2 | +0.5000 |" in section  # 4 of 4 vs 2


def test_the_quality_table_compares_the_defaults_variants_with_the_default():
    """The fifth question: what do uniform allocation or r0 = 64 change against the default itself? Every
    other pruned method is compared paired with it; LoRA and AdaLoRA are not. Break: drop the fifth
    table, or compare a non-pruned method with it -> red."""
    default = "pruned-obs-input-compensate-global"
    margins = {
        "lora-target": [1.0, -1.0, 0.5, -0.2],
        "adalora-lr5x": [1.5, -0.3, -0.9, 0.1],
        default: [1.5, 0.3, 0.9, -0.1],
        "pruned-obs-input-compensate-uniform": [1.5, 0.3, 0.9, 0.1],
    }
    listed, section = _reference_section(margins, default)
    assert listed == {"pruned-obs-input-compensate-uniform"}
    assert "| sst2 | accuracy (higher is better) | pruned-obs-input-compensate-uniform | 2 | +0.2500 |" in section


def test_the_quality_table_says_where_each_cell_ran():
    """Cells are filled across sessions on machines that differ: the table names each cell's own machine
    and counts the cells per machine, not only the machine that rebuilt it. Break: report only the
    builder's machine, or drop the per-cell column -> red."""
    from prunedlora.bench.quality import aggregate, cell_machines
    from prunedlora.bench.report import quality_markdown

    avx2 = {"cpu": "EPYC", "flags": ["avx2"], "cores": 2, "dtype": "float32"}
    bf16 = {"cpu": "EPYC", "flags": ["avx2", "avx512_bf16"], "cores": 2, "dtype": "float32"}
    cells = [
        {**_sst2_cell("lora-target", 0, [1.0, -1.0]), "machine": avx2},
        {**_sst2_cell("lora-target", 1, [1.0, 1.0]), "machine": bf16},
        _sst2_cell("lora-target", 2, [1.0, 1.0]),  # committed before cells recorded their machine
        {"task": "sst2", "method": "lora-target", "seed": 3, "command": "c", "pending": True},
    ]
    counts = cell_machines(cells)
    assert counts == {
        "EPYC (avx2), 2 cores, float32": 1,
        "EPYC (avx2, avx512_bf16), 2 cores, float32": 1,
        "not recorded": 1,
    }
    payload = {
        "model": "default",
        "machine": {"cpu": "builder CPU", "flags": ["avx2"], "cores": 2},
        "cell_machines": counts,
        "settings": {
            "tasks": ["sst2"],
            "methods": ["lora-target"],
            "seeds": [0, 1, 2, 3],
            "max_steps": 150,
            "eval_examples": None,
        },
        "cells": cells,
        "summary": aggregate(cells),
    }
    text = quality_markdown(payload)
    assert text.startswith(
        "Table built on: builder CPU (avx2), 2 cores; cells ran on: EPYC (avx2), 2 cores, float32 "
        "(1 cell); EPYC (avx2, avx512_bf16), 2 cores, float32 (1 cell); not recorded (1 cell);"
    )
    rows = [line for line in text.splitlines() if line.startswith("| sst2 | lora-target |")]
    assert [row.split(" | ")[6] for row in rows] == ["EPYC (avx2)", "EPYC (avx2, avx512_bf16)", "-", "-"]
