"""Markdown tables and PNG plots of the bench results (read from their JSON payloads only).

Figures come from ``prunedlora.figures`` (matplotlib's object API on an Agg canvas), so they draw
headless without touching global matplotlib state. Paths in results go through ``portable_path``: a
committed result names the repository's folders and the user's cache, never one machine's absolute path.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path

from prunedlora.cpu import machine_line
from prunedlora.figures import new_figure, save_figure
from prunedlora.staging import staged_files


def portable_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` as results write it: relative to ``root`` (default: the current folder, the repository
    the benches run from, where ``benchmarks/results`` lives) when inside it, else from ``~`` when in
    the home folder (``~/.cache/prunedlora/models/...``), else as given."""
    path = Path(path).expanduser().resolve()
    root, home = Path(root or Path.cwd()).resolve(), Path.home().resolve()
    if path.is_relative_to(root):
        return str(path.relative_to(root))
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def write_result_files(
    out_dir: str | os.PathLike,
    names: dict[str, str],
    payload: dict,
    plot: Callable[[dict, Path], object],
    markdown: Callable[[dict], str],
) -> dict:
    """Write a bench's ``json``, ``markdown`` and ``plot`` files (``names``: key -> file name) into
    ``out_dir`` together and return ``payload`` with their paths under ``files``.

    Why together: the three are staged beside their targets and renamed only when all are written
    (``staging.staged_files``), so a full disk or an unwritable folder leaves the previous results as
    they were (never a new table beside an old plot) and is one line that names the path.
    """
    files = {key: str(Path(out_dir) / name) for key, name in names.items()}
    payload["files"] = files
    with staged_files(files["plot"], files["markdown"], files["json"]) as (png, md, data):
        plot(payload, png)
        md.write_text(markdown(payload))
        data.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return payload


def _fmt(value, digits: int = 3, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}g}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


# -- latency -----------------------------------------------------------------------------------------

# how each LoRA ops mode is drawn (results older than the modes have none: drawn as one)
_MODE_STYLE = {"stock": {"linestyle": "--", "hatch": "//"}, "rank-aware": {"linestyle": "-", "hatch": ""}}
_MODE_COLOURS = {"stock": "tab:gray", "rank-aware": "tab:blue"}


def paired_rows(rows: list[dict]) -> tuple[list[tuple[str, dict[str, dict]]], list[str]]:
    """The adapter rows grouped by configuration: ([(configuration, {mode: row})] in run order, the
    modes in run order). The base row is left out (it is 1x in every mode); rows of results older than
    the LoRA ops modes count as one mode, ``""``."""
    configurations: dict[str, dict[str, dict]] = {}
    modes: list[str] = []
    for row in rows:
        if row.get("family") is None:
            continue
        mode = row.get("lora_ops") or ""
        if mode not in modes:
            modes.append(mode)
        configurations.setdefault(row.get("configuration") or row["name"], {})[mode] = row
    return list(configurations.items()), modes


def _ops_cell(row: dict) -> str:
    asked, used = row.get("lora_ops"), row.get("lora_ops_in_use")
    if not asked:
        return "-"
    return asked if used in (None, asked) else f"{asked} (ran: {used})"


def _mixed_rank_tables(payload: dict, modes: list[str]) -> list[str]:
    """Each adapter of the mixed-rank batch: its own requests in the batch, and alone in the same engine."""
    rows = [r for r in payload["rows"] if r.get("role") in ("mixed-rank", "mixed-rank-alone")]
    batch = {r.get("lora_ops") or "": r for r in rows if r["role"] == "mixed-rank"}
    if not batch:
        return []
    alone = {
        ((r.get("adapters") or [None])[0], r.get("lora_ops") or ""): r for r in rows if r["role"] == "mixed-rank-alone"
    }
    adapters = list(dict.fromkeys(a for r in batch.values() for a in (r.get("per_adapter") or {})))
    first = next(iter(batch.values()))
    header = (
        "| adapter | rank | requests in the batch | "
        + " | ".join(f"TPOT p50 x base in the batch: {m or 'measured'}" for m in modes)
        + " | "
        + " | ".join(f"E2E p50 x base in the batch: {m or 'measured'}" for m in modes)
        + " | "
        + " | ".join(f"TPOT p50 x base alone: {m or 'measured'}" for m in modes)
        + " |"
    )
    lines = [
        "",
        f"Mixed-rank batch: `{first.get('configuration') or first['name']}`: adapters of different ranks served together, the "
        f"{payload['settings']['num_prompts']} requests spread over them. 'In the batch' is that adapter's own "
        "requests of the batch; vLLM decodes every request of a batch in the same steps, so these are close "
        "between adapters, and what each adapter costs shows in 'alone' (the same engine, every request on that "
        "adapter).",
        "",
        header,
        "|" + "---|" * (3 + 3 * len(modes)),
    ]
    for adapter in adapters:
        own = {m: (batch.get(m) or {}).get("per_adapter", {}).get(adapter) or {} for m in modes}
        any_own = next((o for o in own.values() if o), {})
        cells = [adapter, str(any_own.get("rank", "-")), str(any_own.get("requests", "-"))]
        cells += [_fmt(own[m].get("tpot_p50_x_base")) for m in modes]
        cells += [_fmt(own[m].get("e2e_p50_x_base")) for m in modes]
        cells += [_fmt((alone.get((adapter, m)) or {}).get("tpot_p50_x_base")) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def latency_markdown(payload: dict) -> str:
    """The latency table: absolute numbers, then the ratios against the base model (the headline);
    with two LoRA ops modes, a table of the two side by side per configuration; with a mixed-rank
    batch, each of its adapters."""
    settings = payload["settings"]
    adapters = payload["adapters"]
    source = (
        "synthetic adapters (ranks of real runs, weights random; exported by `prunedlora export`)"
        if adapters["synthetic"]
        else "exported adapters of the given training runs"
    )
    configurations, modes = paired_rows(payload["rows"])
    ops = " and ".join(m for m in modes if m) or "not recorded"
    lines = [
        f"Machine: {machine_line(payload['machine'])}; vLLM {payload.get('vllm')}; model `{Path(payload['model']).name}`; "
        f"{settings['num_prompts']} prompts x {settings['prompt_tokens']} prompt tokens -> "
        f"{settings['output_tokens']} output tokens (greedy, ignore_eos), submitted as one batch; "
        f"{settings['repeats']} measured repeat(s) after a warm-up; adapters: {source}; LoRA ops: {ops}.",
        "",
        "| configuration | slot | LoRA ops | adapters in batch | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | E2E p50 / p99 (s) "
        "| output tok/s | LoRA slot memory (MiB) | TTFT x base | TPOT x base | E2E x base | tok/s x base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        if "error" in row:
            lines.append(
                f"| {row['name']} | {row['slot'] or '-'} | {_ops_cell(row)} | {row['mix']} "
                f"| error: {row['error'][:80]} | | | | | | | | |"
            )
            continue
        memory = row.get("lora_slot_bytes")
        if memory is None:
            memory = row.get("lora_slot_bytes_estimate")
        lines.append(
            f"| {row['name']} | {row['slot'] or '-'} | {_ops_cell(row)} | {row.get('distinct_adapters', 0)} "
            f"| {_fmt(row['ttft_p50_s'])} / {_fmt(row['ttft_p99_s'])} "
            f"| {_fmt(row['tpot_p50_s'], scale=1000)} / {_fmt(row['tpot_p99_s'], scale=1000)} "
            f"| {_fmt(row['e2e_p50_s'])} / {_fmt(row['e2e_p99_s'])} "
            f"| {_fmt(row['output_tokens_per_s'])} | {_mib(memory)} "
            f"| {_fmt(row.get('ttft_p50_x_base'))} | {_fmt(row.get('tpot_p50_x_base'))} "
            f"| {_fmt(row.get('e2e_p50_x_base'))} | {_fmt(row.get('throughput_x_base'))} |"
        )
    if len(modes) > 1:
        last, first = modes[-1], modes[0]
        lines += [
            "",
            f"LoRA ops side by side: each configuration with {' and with '.join(modes)} ops, as multiples of the "
            f"base model of this run (same prompts); the last column is {last} over {first} (below 1: faster).",
            "",
            "| configuration | slot | adapters in batch | "
            + " | ".join(f"TPOT p50 x base: {m}" for m in modes)
            + " | "
            + " | ".join(f"E2E p50 x base: {m}" for m in modes)
            + " | "
            + " | ".join(f"tok/s x base: {m}" for m in modes)
            + f" | TPOT {last} / {first} |",
            "|" + "---|" * (4 + 3 * len(modes)),
        ]
        for name, by_mode in configurations:
            any_row = next(iter(by_mode.values()))
            cells = [name, str(any_row["slot"] or "-"), str(any_row.get("distinct_adapters", any_row["mix"]))]
            for key in ("tpot_p50_x_base", "e2e_p50_x_base", "throughput_x_base"):
                cells += [_fmt((by_mode.get(m) or {}).get(key)) for m in modes]
            cells.append(_fmt((by_mode.get(last) or {}).get("tpot_p50_x_stock")))
            lines.append("| " + " | ".join(cells) + " |")
    lines += _mixed_rank_tables(payload, modes)
    lines.append("")
    lines.append("Adapters (family: largest module rank / average rank, where the ranks come from):")
    for family, members in adapters["families"].items():
        ranks = ", ".join(f"{m['max_rank']}/{m['average_rank']:g}" for m in members)
        sources = sorted({m["source"] for m in members})
        lines.append(f"- {family}: {ranks} ({'; '.join(sources)})")
    return "\n".join(lines) + "\n"


def _paired_bars(ax, groups: list[tuple[str, dict[str, float | None]]], modes: list[str], ylabel: str) -> None:
    """One group of bars per label, one bar per mode (hatched: stock), the base model as a line at 1."""
    width = 0.8 / max(len(modes), 1)
    for j, mode in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(groups))]
        values = [values.get(mode) for _, values in groups]
        heights = [float("nan") if v is None else v for v in values]
        style = _MODE_STYLE.get(mode, {})
        ax.bar(
            xs,
            heights,
            width=width,
            color=_MODE_COLOURS.get(mode, "tab:blue"),
            hatch=style.get("hatch", ""),
            edgecolor="white",
            label=f"{mode} LoRA ops" if mode else None,
        )
        for x, v in zip(xs, values):
            if v is not None:
                ax.annotate(f"{v:.2g}", (x, v), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)), labels=[label for label, _ in groups], rotation=30, ha="right", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=1, label="base model")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_latency(payload: dict, path: str | os.PathLike) -> Path:
    """Top: each configuration's time per output token as a multiple of the base model, a bar per LoRA
    ops mode (stock hatched, rank-aware plain). Below: decode and end-to-end latency against slot rank,
    output tokens per second against slot rank (base model as a line), and, when measured, the mixes
    and the mixed-rank batch (each adapter alone and in the batch); lines dashed for stock ops."""
    rows = [r for r in payload["rows"] if "error" not in r]
    base = next((r for r in rows if r["family"] is None), None)
    configurations, modes = paired_rows(rows)
    two_modes = len(modes) > 1
    mixes = [r for r in rows if r["role"] == "mix"]
    mixed_rank = [r for r in rows if r.get("role") in ("mixed-rank", "mixed-rank-alone")]
    panels = 2 + bool(mixes) + bool(mixed_rank)
    fig = new_figure(max(9.0, 4.5 * panels), 8.5)
    grid = fig.add_gridspec(2, panels, height_ratios=(1.1, 1.0), hspace=0.75)
    ax_pairs = fig.add_subplot(grid[0, :])
    ax_latency, ax_tput = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    _paired_bars(
        ax_pairs,
        [(name, {m: r.get("tpot_p50_x_base") for m, r in by_mode.items()}) for name, by_mode in configurations],
        modes,
        "TPOT p50, x base model",
    )
    ax_pairs.set_title(
        "time per output token per configuration"
        + (f": {' vs '.join(modes)} LoRA ops (same run, same prompts)" if two_modes else ""),
        fontsize=10,
    )
    single = [r for r in rows if r["family"] is not None and r["mix"] == 1 and r["max_loras"] == 1]
    families = sorted({r["family"] for r in single})
    markers = dict(zip(families, "osD^v<>"))
    colours = dict(zip(families, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for family in families:
        for mode in modes:
            points = sorted(
                (r["slot"], r) for r in single if r["family"] == family and (r.get("lora_ops") or "") == mode
            )
            if not points:
                continue
            slots = [s for s, _ in points]
            style = _MODE_STYLE.get(mode, {}).get("linestyle", "-") if two_modes else "-"
            label = f"{family}, {mode}" if two_modes else family
            ax_latency.plot(
                slots,
                [r.get("tpot_p50_x_base") for _, r in points],
                marker=markers[family],
                color=colours[family],
                linestyle=style,
                label=f"{label}: TPOT p50",
            )
            if not two_modes:
                ax_latency.plot(
                    slots,
                    [r.get("e2e_p50_x_base") for _, r in points],
                    marker=markers[family],
                    linestyle="--",
                    color=colours[family],
                    label=f"{family}: E2E p50",
                )
            ax_tput.plot(
                slots,
                [r["output_tokens_per_s"] for _, r in points],
                marker=markers[family],
                color=colours[family],
                linestyle=style,
                label=label,
            )
    slots = sorted({r["slot"] for r in single})
    for ax in (ax_latency, ax_tput):
        ax.set_xscale("log", base=2)
        if slots:
            ax.set_xticks(slots, labels=[str(s) for s in slots])
            ax.minorticks_off()
    ax_latency.axhline(1.0, color="grey", linewidth=1)
    ax_latency.set_xlabel("LoRA slot rank (max_lora_rank)")
    ax_latency.set_ylabel("x base model (same run)")
    ax_latency.set_title(
        "latency vs slot rank" + (" (dashed: stock ops)" if two_modes else ""),
        fontsize=10,
    )
    ax_latency.legend(fontsize=6)
    ax_latency.grid(alpha=0.3)
    if base is not None:
        ax_tput.axhline(base["output_tokens_per_s"], color="grey", linewidth=1, label="base model")
    ax_tput.set_xlabel("LoRA slot rank (max_lora_rank)")
    ax_tput.set_ylabel("output tokens / s")
    ax_tput.set_ylim(bottom=0)
    ax_tput.set_title("throughput vs slot rank", fontsize=10)
    ax_tput.legend(fontsize=6)
    ax_tput.grid(alpha=0.3)
    column = 2
    if mixes:
        ax_mix = fig.add_subplot(grid[1, column])
        column += 1
        xs = sorted({r["mix"] for r in mixes})
        for mode in modes:
            points = sorted((r["mix"], r) for r in mixes if (r.get("lora_ops") or "") == mode)
            if not points:
                continue
            style = _MODE_STYLE.get(mode, {}).get("linestyle", "-") if two_modes else "-"
            suffix = f", {mode}" if two_modes else ""
            px = [m for m, _ in points]
            ax_mix.plot(
                px,
                [r.get("tpot_p50_x_base") for _, r in points],
                marker="o",
                linestyle=style,
                label=f"TPOT p50 x base{suffix}",
            )
            if not two_modes:
                ax_mix.plot(px, [r.get("e2e_p50_x_base") for _, r in points], marker="s", label="E2E p50 x base")
            ax_mix.plot(
                px,
                [r.get("throughput_x_base") for _, r in points],
                marker="^",
                linestyle=style,
                label=f"tok/s x base{suffix}",
            )
        ax_mix.set_title(f"{mixes[0]['family']} @ slot {mixes[0]['slot']}: distinct adapters per batch", fontsize=9)
        ax_mix.set_xscale("log", base=2)
        ax_mix.set_xticks(xs, labels=[str(x) for x in xs])
        ax_mix.minorticks_off()
        ax_mix.legend(fontsize=6)
        ax_mix.axhline(1.0, color="grey", linewidth=1)
        ax_mix.set_xlabel("distinct adapters in the batch")
        ax_mix.grid(alpha=0.3)
    if mixed_rank:
        ax_ranks = fig.add_subplot(grid[1, column])
        groups: dict[str, dict[str, float | None]] = {}
        for r in mixed_rank:
            mode = r.get("lora_ops") or ""
            if r["role"] == "mixed-rank-alone":
                name = (r.get("adapters") or [r["name"]])[0]
                groups.setdefault(f"{name} alone", {})[mode] = r.get("tpot_p50_x_base")
        for r in mixed_rank:
            mode = r.get("lora_ops") or ""
            if r["role"] == "mixed-rank":
                for name, own in (r.get("per_adapter") or {}).items():
                    groups.setdefault(f"{name} in batch", {})[mode] = own.get("tpot_p50_x_base")
        _paired_bars(ax_ranks, list(groups.items()), modes, "TPOT p50, x base model")
        ax_ranks.set_title(f"mixed ranks @ slot {mixed_rank[0]['slot']}: alone and batched together", fontsize=9)
    fig.suptitle(f"vLLM multi-LoRA on {Path(payload['model']).name}: {machine_line(payload['machine'])}", fontsize=9)
    return save_figure(fig, path)


# -- quality -----------------------------------------------------------------------------------------

_METRIC_LABELS = {
    ("sst2", "accuracy"): "SST-2 dev accuracy",
    ("sst2", "margin"): "SST-2 gold-label log-prob margin",
    ("rte", "accuracy"): "RTE dev accuracy",
    ("rte", "margin"): "RTE gold-label log-prob margin",
    ("gsm8k", "exact_match"): "GSM8K exact match",
    ("gsm8k", "answer_nll"): "GSM8K answer NLL",
    ("codealpaca", "nll"): "CodeAlpaca held-out NLL",
}


def _metric_columns(payload: dict) -> list[tuple[str, str, str]]:
    from prunedlora.bench.scoring import TASK_METRICS

    tasks = payload["settings"]["tasks"]
    return [(task, metric, better) for task in tasks for metric, better in TASK_METRICS[task]]


def _cell_stat(stat: dict | None) -> str:
    if not stat:
        return "-"
    spread = "" if stat["std"] is None else f" ± {stat['std']:.3f}"
    return f"{stat['mean']:.3f}{spread} (n={stat['n']})"


def _parameters_text(parameters: float) -> str:
    return f"{parameters / 1e6:.2f}M ({parameters * 4 / 2**20:.1f})" if parameters else "0"


def _cell_machines_text(payload: dict) -> str:
    """The machines the table's finished cells ran on, with how many each (seconds compare only within one)."""
    counts = payload.get("cell_machines") or {}
    return "; ".join(f"{line} ({n} cell{'s' if n != 1 else ''})" for line, n in counts.items()) or "no finished cell"


def quality_markdown(payload: dict) -> str:
    """Mean ± standard deviation over seeds per method and metric, then every cell with its command."""
    settings = payload["settings"]
    columns = _metric_columns(payload)
    steps = settings["max_steps"] if settings["max_steps"] is not None else "the recipe's"
    lines = [
        f"Table built on: {machine_line(payload['machine'])}; cells ran on: {_cell_machines_text(payload)}; "
        f"model `{Path(payload['model']).name}`; data: "
        f"{payload.get('data_dir') or 'slices vendored in the package'}; {steps} optimizer steps per run; "
        f"seeds {settings['seeds']}; held-out examples per task: "
        f"{settings['eval_examples'] if settings['eval_examples'] is not None else 'all'}. "
        "Mean ± sample standard deviation over seeds (n = seeds); arrows say which way is better.",
        "",
    ]
    header = (
        "| method | final rank: average (largest module) | adapter parameters (MB in fp32) | "
        + " | ".join(f"{_METRIC_LABELS.get((t, m), f'{t} {m}')} {'↑' if b == 'higher' else '↓'}" for t, m, b in columns)
        + " |"
    )
    lines += [header, "|" + "---|" * (3 + len(columns))]
    summary = {(row["task"], row["method"]): row for row in payload["summary"]}
    methods = list(settings["methods"])
    for method in methods:
        ranks = [summary[(t, method)] for t in settings["tasks"] if (t, method) in summary]
        rank_text = (
            "-"
            if not ranks
            else f"{sum(r['average_rank'] for r in ranks) / len(ranks):.2f} ({max(r['max_rank'] for r in ranks)})"
        )
        params = [r["adapter_parameters"] for r in ranks if r.get("adapter_parameters") is not None]
        params_text = "-" if len(params) != len(ranks) or not ranks else _parameters_text(statistics.fmean(params))
        cells = [_cell_stat(summary.get((t, method), {}).get(m)) for t, m, _ in columns]
        lines.append(f"| {method} | {rank_text} | {params_text} | " + " | ".join(cells) + " |")
    from prunedlora.bench.paired import PRUNED_REFERENCES, paired_markdown

    if "lora-target" in methods:
        lines += ["", paired_markdown(payload["cells"], reference="lora-target").rstrip()]
    pruned = [m for m in methods if m.startswith("pruned-")]
    for reference in PRUNED_REFERENCES:
        compared = [m for m in pruned if m != reference]
        if reference in methods and compared:
            lines += ["", paired_markdown(payload["cells"], reference=reference, methods=compared).rstrip()]
    failed = [c for c in payload["cells"] if "error" in c]
    if failed:
        lines += ["", f"{len(failed)} cell(s) failed:"]
        lines += [f"- {c['task']} {c['method']} seed {c['seed']}: {c['error']}" for c in failed]
    pending = [c for c in payload["cells"] if c.get("pending")]
    if pending:
        lines += [
            "",
            f"{len(pending)} cell(s) not run yet: the tables above are without them; the cells below give the "
            "command that runs each one.",
        ]
    lines += [
        "",
        "Cells (rerun one alone with its command; results are cached by configuration):",
        "",
        "| task | method | seed | metrics | train s | eval s | machine | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in payload["cells"]:
        if "eval" not in cell:
            metrics = "error" if "error" in cell else "not run yet"
            train_s = eval_s = "-"
        else:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in cell["eval"].items() if isinstance(v, float))
            train_s = f"{cell['train'].get('seconds', 0):.0f}"
            eval_s = f"{cell.get('eval_seconds', 0):.0f}"
        machine = cell.get("machine")
        machine_text = f"{machine.get('cpu')} ({', '.join(machine.get('flags') or [])})" if machine else "-"
        lines.append(
            f"| {cell['task']} | {cell['method']} | {cell['seed']} | {metrics} | {train_s} | {eval_s} "
            f"| {machine_text} | `{cell['command']}` |"
        )
    return "\n".join(lines) + "\n"


def _plot_paired(ax, found: list[dict], reference: str) -> None:
    """One metric's paired differences against ``reference``: per method, each seed's difference with
    its paired-bootstrap interval (small, grey) and the mean over seeds with its t interval (black)."""
    from matplotlib.ticker import MaxNLocator

    for row, comparison in enumerate(found):
        seeds = comparison["seeds"]
        for k, seed in enumerate(seeds):
            y = row + 0.25 * (k - (len(seeds) - 1) / 2) / max(1, len(seeds) - 1) if len(seeds) > 1 else row
            ax.errorbar(
                seed["diff"],
                y,
                xerr=[[seed["diff"] - seed["low"]], [seed["high"] - seed["diff"]]],
                fmt="o",
                color="tab:gray",
                markersize=3,
                elinewidth=1,
            )
        low, high = comparison["low"], comparison["high"]
        xerr = None if low is None else [[comparison["mean"] - low], [high - comparison["mean"]]]
        ax.errorbar(comparison["mean"], row, xerr=xerr, fmt="D", color="black", markersize=6, elinewidth=2.5)
    ax.axvline(0.0, color="tab:red", linewidth=1)
    ax.set_yticks(range(len(found)), labels=[c["method"] for c in found], fontsize=8)
    ax.set_ylim(-0.6, len(found) - 0.4)
    first = found[0]
    label = _METRIC_LABELS.get((first["task"], first["metric"]), f"{first['task']} {first['metric']}")
    ax.set_title(f"{label}: method - {reference}\n({first['better']} is better)", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=3))  # small differences (NLL: -0.0075) otherwise overlap
    ax.grid(axis="x", alpha=0.3)


def plot_quality(payload: dict, path: str | os.PathLike) -> Path:
    """One panel per metric: each method's mean over seeds as a bar, each seed as a dot; below, where
    methods can be compared paired with LoRA at the target rank, their differences with intervals
    (the figure that says whether a method wins: an interval clear of zero)."""
    from prunedlora.bench.paired import paired_comparisons

    columns = _metric_columns(payload)
    methods = list(payload["settings"]["methods"])
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for cell in payload["cells"]:
        if "eval" in cell:
            by_cell.setdefault((cell["task"], cell["method"]), []).append(cell)
    paired: dict[tuple[str, str], list[dict]] = {}
    for comparison in paired_comparisons(payload["cells"]):
        paired.setdefault((comparison["task"], comparison["metric"]), []).append(comparison)
    # Columns grouped by task, so each task's paired panels sit under its bars: a task takes as many
    # columns as it has bar panels or paired panels (SST-2: one bar metric, two paired ones).
    tasks = list(dict.fromkeys([t for t, _, _ in columns] + [t for t, _ in paired]))
    blocks = []
    for task in tasks:
        bars = [column for column in columns if column[0] == task]
        order = {metric: i for i, (_, metric, _) in enumerate(bars)}
        pairs = sorted(
            (found for (t, _), found in paired.items() if t == task),
            key=lambda f: order.get(f[0]["metric"], len(order)),
        )
        blocks.append((bars, pairs))
    n_cols = max(1, sum(max(len(bars), len(pairs)) for bars, pairs in blocks))
    width = max(4.0, 0.55 * len(methods) + 1.5)
    fig = new_figure(width * n_cols, 4.2 + (0.6 * len(methods) + 2.0 if paired else 0.0))
    grid = fig.subplots(2 if paired else 1, n_cols, squeeze=False)
    bar_axes, used = [], set()
    start = 0
    for bars, pairs in blocks:
        bar_axes += [(grid[0][start + i], column) for i, column in enumerate(bars)]
        used |= {(0, start + i) for i in range(len(bars))} | {(1, start + i) for i in range(len(pairs))}
        for i, found in enumerate(pairs):
            _plot_paired(grid[1][start + i], found, "lora-target")
        start += max(len(bars), len(pairs))
    for row, axes_row in enumerate(grid):
        for col, ax in enumerate(axes_row):
            if (row, col) not in used:
                ax.set_visible(False)
    for ax, (task, metric, better) in bar_axes:
        means = []
        for i, method in enumerate(methods):
            values = [float(c["eval"][metric]) for c in by_cell.get((task, method), []) if metric in c["eval"]]
            means.append(sum(values) / len(values) if values else float("nan"))
            ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
        colours = [
            "tab:orange"
            if m.startswith("pruned")
            else "tab:green"
            if m == "adalora"
            else "tab:gray"
            if m == "base"
            else "tab:blue"
            for m in methods
        ]
        ax.bar(range(len(methods)), means, color=colours, alpha=0.7)
        ax.set_xticks(range(len(methods)), labels=methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{_METRIC_LABELS.get((task, metric), f'{task} {metric}')} ({better} is better)", fontsize=9)
        finite = [m for m in means if m == m]
        if finite and better == "lower":
            low, high = min(finite), max(finite)
            pad = (high - low) * 0.5 or abs(high) * 0.05 or 0.1
            ax.set_ylim(max(0.0, low - pad), high + pad)
        ax.grid(axis="y", alpha=0.3)
    title = (
        f"{Path(payload['model']).name}: bars = mean over seeds, dots = seeds (blue LoRA, orange "
        "PrunedLoRA, green AdaLoRA, grey base model)"
    )
    if paired:
        title += (
            "\nbelow, paired on the same examples and seeds: black = mean difference over seeds with its t 95% "
            "interval, grey = each seed with its paired-bootstrap 95% interval; a win clears the red zero line"
        )
    fig.suptitle(title, fontsize=9)
    fig.set_layout_engine("constrained")
    return save_figure(fig, path)
