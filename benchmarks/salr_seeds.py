"""SALR over seeds: how much of the gap to dense LoRA each residual cell closes, pooled over every seed run.

``salr_tasks.py`` writes one table per seed; a single seed of a 60-step run moves a cell's share of the gap
by tens of points (SST-2's no-residual cell scored 0.725 in one seed and 0.596 in another). Issue 13 asks
whether SALR is *nearer dense LoRA* than sparse + LoRA, i.e. whether the share it closes is above one half.
This script reads the seeds' ``tasks.json`` files of one task and, for every residual cell present with
dense LoRA and its no-residual cell in the same seed, gives:

- the share of the task metric's gap closed in each seed, and pooled over the seeds with a bootstrap 95%
  interval (``prunedlora.bench.paired.gap_closed``: the dev examples resampled together across seeds);
- the share of the WikiText-2 log-perplexity gap closed in each seed, and, where every seed's rows kept
  their per-window NLL (``PerplexityResult.window_nlls``), pooled with a bootstrap 95% interval over the
  windows (8 of 512 tokens a seed: a coarse interval, the text's own variation, not the training's).

    python benchmarks/salr_seeds.py --task gsm8k benchmarks/results/salr/tasks_60steps \\
        benchmarks/results/salr/tasks_60steps_seed1 benchmarks/results/salr/tasks_60steps_seed2

writes benchmarks/results/salr/seeds_<task>/seeds.{json,md,png}. It trains nothing and reads only the tables.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from salr_tasks import METRICS, NO_RESIDUAL, TASK_NAMES, rel

OUT_DIR = Path(__file__).parent / "results" / "salr"
DENSE = "dense-lora"


def load_tables(folders: list[Path], task: str) -> list[dict]:
    """The seeds' tables in seed order; each must be of ``task``, and no seed may come twice.

    Errors name a table by the path as given; the summary names it relative to the repository (``rel``)."""
    tables = []
    for folder in folders:
        path = folder / "tasks.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
        data = json.loads(path.read_text())
        if data["settings"].get("task", "gsm8k") != task:
            raise SystemExit(f"error: {path} is a {data['settings'].get('task', 'gsm8k')} table, not {task}")
        data["folder"] = rel(folder)
        tables.append(data)
    seeds = [t["settings"]["seed"] for t in tables]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: the same seed twice among {seeds}")
    settings = [{k: v for k, v in t["settings"].items() if k != "seed"} for t in tables]
    if any(s != settings[0] for s in settings):
        raise SystemExit("error: the tables differ in settings other than the seed")
    return sorted(tables, key=lambda t: t["settings"]["seed"])


def per_example(row: dict, metric: str) -> dict[int, float]:
    from prunedlora.bench.paired import example_values

    return example_values({"eval": row}, metric)[0]


def log_gap_closed(reference: float, cell: float, target: float) -> float:
    """The share of the log-perplexity gap from ``reference`` to ``target`` that ``cell`` removes."""
    return math.log(reference / cell) / math.log(reference / target)


def pooled_log_gap(windows: list[list[list[float]]], seeds: int) -> dict | None:
    """The WikiText-2 log-perplexity gap closed over every seed's windows, with a bootstrap 95% interval.

    ``windows``: per seed, the (no-residual cell, cell, dense LoRA) lists of per-window summed NLL. Every
    window predicts the same number of tokens, so the share of summed NLL is the share of the log gap
    pooled over seeds; the windows are resampled together across seeds and models (the same text, so
    paired). None unless every seed has all three models' windows, of one length (rows scored before
    perplexity kept its windows have none)."""
    from prunedlora.bench.paired import gap_closed

    if len(windows) != seeds or not windows:
        return None
    lengths = {len(w) for seed in windows for w in seed}
    if len(lengths) != 1 or 0 in lengths:
        return None
    ref, mine, dense = ([seed[k] for seed in windows] for k in range(3))
    pooled = gap_closed(ref, mine, dense)
    return {"mean": pooled.mean, "low": pooled.low, "high": pooled.high, "windows": lengths.pop()}


def summarise(tables: list[dict], task: str) -> dict:
    """For each residual cell, per seed and pooled: the task metric's and WikiText-2's gap closed."""
    from prunedlora.bench.paired import gap_closed

    metric, _, _ = METRICS[task]
    names = [n for n in NO_RESIDUAL if any(n in t["cells"] for t in tables)]
    cells = {}
    for name in names:
        reference = NO_RESIDUAL[name]
        seeds, rows, windows = [], [], []
        for table in tables:
            c = table["cells"]
            if not all(k in c for k in (name, reference, DENSE)):
                continue
            mine, ref, dense = (per_example(c[k], metric) for k in (name, reference, DENSE))
            rows.append((mine, ref, dense))
            entry = {
                "seed": table["settings"]["seed"],
                "table": table["folder"],
                metric: c[name][metric],
                "reference": c[reference][metric],
                "dense": c[DENSE][metric],
                "gap_closed": (c[reference][metric] - c[name][metric]) / (c[reference][metric] - c[DENSE][metric]),
            }
            if all("wikitext2" in c[k] for k in (name, reference, DENSE)):
                ppl = [c[k]["wikitext2"]["ppl"] for k in (name, reference, DENSE)]
                entry["wikitext2_ppl"] = ppl[0]
                entry["wikitext2_log_gap_closed"] = log_gap_closed(ppl[1], ppl[0], ppl[2])
                windows.append([c[k]["wikitext2"].get("window_nlls") or [] for k in (reference, name, DENSE)])
            seeds.append(entry)
        if not seeds:
            continue
        common = sorted(set.intersection(*(set(d) for row in rows for d in row)))
        pooled = gap_closed(
            [[r[i] for i in common] for _, r, _ in rows],
            [[m[i] for i in common] for m, _, _ in rows],
            [[d[i] for i in common] for _, _, d in rows],
        )
        cells[name] = {
            "reference": reference,
            "seeds": seeds,
            "examples": len(common),
            "pooled_gap_closed": {"mean": pooled.mean, "low": pooled.low, "high": pooled.high},
        }
        ppl_pooled = pooled_log_gap(windows, len(seeds))
        if ppl_pooled is not None:
            cells[name]["pooled_wikitext2_log_gap_closed"] = ppl_pooled
    return {"task": task, "metric": metric, "tables": [t["folder"] for t in tables], "cells": cells}


def interval(cell: dict) -> str:
    """A cell's pooled WikiText-2 share as the table shows it ('-' where it has none)."""
    p = cell.get("pooled_wikitext2_log_gap_closed")
    return "-" if p is None else f"**{p['mean']:.0%}** [{p['low']:.0%}, {p['high']:.0%}]"


def markdown(summary: dict, tables: list[dict]) -> str:
    from prunedlora.cpu import machine_line

    task, metric = summary["task"], summary["metric"]
    _, label, _ = METRICS[task]
    s = tables[0]["settings"]
    lines = [
        f"# SALR on {TASK_NAMES[task]} over seeds: the share of the gap to dense LoRA closed (benchmarks/salr_seeds.py)",
        "",
        f"Tables: {', '.join(summary['tables'])} ({s['steps']} steps x {s['batch']}, {s['eval_examples']} dev "
        f"examples, sparsity {s['sparsity']:.0%}, rank {s['residual_rank']} + {s['task_rank']}). Gap closed: "
        f"(no-residual cell - cell) / (no-residual cell - dense LoRA) in {label}; 50% is the midpoint, above it "
        "the cell is nearer dense LoRA. Pooled: over every seed's dev examples, resampled together across seeds "
        "(bootstrap 95%). WikiText-2: the same share of the log-perplexity gap, per seed, and pooled over the "
        "seeds' windows of 512 tokens (resampled together across seeds; '-' where a seed's rows predate kept windows).",
        "",
        f"| cell | seeds | {label} per seed | gap closed per seed | pooled gap closed | WikiText-2 ppl per seed "
        "(log gap closed) | WikiText-2 pooled |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cell in summary["cells"].items():
        seeds = cell["seeds"]
        pooled = cell["pooled_gap_closed"]
        ppl = ", ".join(
            f"{e['wikitext2_ppl']:,.1f} ({e['wikitext2_log_gap_closed']:.0%})" if "wikitext2_ppl" in e else "-"
            for e in seeds
        )
        lines.append(
            f"| {name} | {', '.join(str(e['seed']) for e in seeds)} | {', '.join(f'{e[metric]:.4f}' for e in seeds)} "
            f"| {', '.join(format(e['gap_closed'], '.0%') for e in seeds)} "
            f"| **{pooled['mean']:.0%}** [{pooled['low']:.0%}, {pooled['high']:.0%}] | {ppl} | {interval(cell)} |"
        )
    lines += ["", "References per seed (dense LoRA / no-residual cell):", ""]
    for table in tables:
        c = table["cells"]
        refs = [k for k in (DENSE, "sparse-lora", "wanda-lora") if k in c]
        lines.append(
            f"- seed {table['settings']['seed']} ({table['folder']}): "
            + "; ".join(
                f"{k} {c[k][metric]:.4f}" + (f", ppl {c[k]['wikitext2']['ppl']:,.1f}" if "wikitext2" in c[k] else "")
                for k in refs
            )
        )
    machines = sorted({machine_line(row.get("machine")) for t in tables for row in t["cells"].values()})
    lines += ["", f"- Machine: {'; '.join(machines)}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Each cell's gap closed per seed (dots) and pooled (bar with its interval), task metric and perplexity."""
    from prunedlora.figures import new_figure, save_figure

    names = list(summary["cells"])
    fig = new_figure(11, 0.5 * len(names) + 2)
    for k, (key, title) in enumerate(
        (
            ("gap_closed", f"{TASK_NAMES[summary['task']]} {METRICS[summary['task']][1]}"),
            ("wikitext2_log_gap_closed", "WikiText-2 log perplexity"),
        )
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        for y, name in enumerate(names):
            cell = summary["cells"][name]
            values = [e[key] for e in cell["seeds"] if key in e]
            ax.plot([100 * v for v in values], [y] * len(values), "o", color="tab:blue", alpha=0.7)
            p = cell.get("pooled_gap_closed" if key == "gap_closed" else "pooled_wikitext2_log_gap_closed")
            if p is not None:
                ax.errorbar(
                    [100 * p["mean"]],
                    [y - 0.2],
                    xerr=[[100 * (p["mean"] - p["low"])], [100 * (p["high"] - p["mean"])]],
                    fmt="s",
                    color="black",
                    capsize=3,
                )
        ax.axvline(50, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(100, color="tab:green", linewidth=0.8)
        ax.axvline(0, color="tab:red", linewidth=0.8)
        ax.set_yticks(range(len(names)), names if k == 0 else [""] * len(names), fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("% of the gap closed (dots: seeds; square: pooled, 95%)", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(
        "SALR over seeds: 0% = LoRA on the same sparse base without a residual, 100% = dense LoRA, dashed = midpoint",
        fontsize=9,
    )
    save_figure(fig, path)


def main() -> None:
    from prunedlora.metadata import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="salr_tasks.py --out folders, one per seed")
    parser.add_argument("--task", choices=list(METRICS), required=True)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/salr/seeds_<task>")
    args = parser.parse_args()
    tables = load_tables(args.folders, args.task)
    summary = summarise(tables, args.task)
    if not summary["cells"]:
        parser.error("no residual cell has dense LoRA and its no-residual cell in the same seed")
    out = args.out or OUT_DIR / f"seeds_{args.task}"
    write_json_atomic(out / "seeds.json", summary)
    (out / "seeds.md").write_text(markdown(summary, tables))
    plot(summary, out / "seeds.png")
    print((out / "seeds.md").read_text())


if __name__ == "__main__":
    main()
