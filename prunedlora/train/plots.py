"""Pictures of where the rank went: a layers x module-types heatmap of final ranks, and the average
rank over the pruning events.

Figures come from ``prunedlora.figures`` (matplotlib's object API on an Agg canvas: headless, no
global state); the column order and labels from ``prunedlora.modelfacts``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from prunedlora.errors import PrunedLoraError
from prunedlora.figures import new_figure, save_figure
from prunedlora.modelfacts import module_sort_key, short_type

OTHER_ROW = "other"
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ANY_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class PlotError(PrunedLoraError):
    """Ranks or a rank history that cannot be drawn, with what is wrong."""


def _layer_of(name: str) -> int | None:
    match = _LAYER.search(name) or _ANY_INDEX.search(name)
    return int(match.group(1)) if match else None


def rank_table(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """(row labels, column labels, grid) for ``ranks``: rows are layers in order (then ``other``
    for modules outside the numbered layers, such as ``lm_head``), columns are module types
    (``q_proj`` -> ``q``) in the order they run in a decoder layer of their family (q, k, v, o, gate, up,
    down; Phi-3's qkv, o, gate_up, down; ``modelfacts.module_sort_key``), any others sorted after;
    a cell is None where that layer has no such module."""
    if not ranks:
        raise PlotError("no ranks to plot: the ranks dict is empty")
    cells: dict[tuple[str, str], tuple[str, int]] = {}
    layers: set[int] = set()
    has_other = False
    for name, rank in ranks.items():
        if not isinstance(name, str) or not name.strip("."):
            raise PlotError(f"module name {name!r} is not a dotted module path such as model.layers.0.self_attn.q_proj")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise PlotError(f"rank of {name} must be a non-negative integer, got {rank!r}")
        layer = _layer_of(name)
        row = OTHER_ROW if layer is None else str(layer)
        if layer is None:
            has_other = True
        else:
            layers.add(layer)
        key = (row, short_type(name))
        if key in cells:
            raise PlotError(
                f"{cells[key][0]} and {name} fall in the same heatmap cell (layer {row}, {key[1]}); "
                "plot their ranks separately"
            )
        cells[key] = (name, rank)
    rows = [str(layer) for layer in sorted(layers)] + ([OTHER_ROW] if has_other else [])
    types = {col for _, col in cells}
    cols = sorted(types, key=module_sort_key)
    grid = [[cells[(row, col)][1] if (row, col) in cells else None for col in cols] for row in rows]
    return rows, cols, grid


def plot_rank_heatmap(ranks: dict[str, int], path: str | os.PathLike, r0: int, title: str | None = None) -> Path:
    """A PNG heatmap of ``ranks`` (layers as rows, module types as columns), colours on 0..r0,
    each cell annotated with its rank when the grid is small enough to read. Returns the path."""
    import numpy as np

    if isinstance(r0, bool) or not isinstance(r0, int) or r0 < 1:
        raise PlotError(f"r0 must be a positive integer, got {r0!r}")
    rows, cols, grid = rank_table(ranks)
    too_big = {name: rank for name, rank in ranks.items() if rank > r0}
    if too_big:
        name, rank = next(iter(too_big.items()))
        raise PlotError(
            f"{len(too_big)} rank(s) exceed r0={r0} (e.g. {name}: {rank}); pass the r0 the run started from"
        )
    values = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float))

    height = min(max(2.5, 0.28 * len(rows) + 1.6), 40.0)
    width = min(max(3.5, 0.75 * len(cols) + 2.4), 30.0)
    fig = new_figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: a layer without that module
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=r0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8 if len(rows) > 20 else 9)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    if len(rows) <= 64 and len(cols) <= 16:
        size = 7 if len(rows) > 24 else 8
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value is None:
                    continue
                colour = "white" if value < 0.6 * r0 else "black"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=size, color=colour)
    bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
    bar.set_label(f"rank (of r0={r0})")
    total = sum(ranks.values())
    ax.set_title(title or f"LoRA rank per module: average {total / len(ranks):.2f} of r0={r0}", fontsize=10, pad=10)
    return save_figure(fig, path)


def plot_rank_history(history: list[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """A PNG of the average rank (line) and the min..max range over modules (band) at each event
    step of ``history`` (events with ``step`` and ``ranks``: {module: rank}). Returns the path."""
    if not history:
        raise PlotError("the rank history is empty: no pruning event to plot")
    points = []
    for i, event in enumerate(history):
        if not isinstance(event, dict) or "step" not in event or "ranks" not in event:
            found = ", ".join(event) if isinstance(event, dict) else type(event).__name__
            raise PlotError(f"rank history event {i} needs 'step' and 'ranks', found {found}")
        ranks = event["ranks"]
        if not isinstance(ranks, dict) or not ranks:
            raise PlotError(f"rank history event {i} (step {event['step']}) has no ranks")
        values = list(ranks.values())
        points.append((int(event["step"]), sum(values) / len(values), min(values), max(values)))
    points.sort()
    steps = [p[0] for p in points]

    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.fill_between(
        steps,
        [p[2] for p in points],
        [p[3] for p in points],
        step="post" if len(points) > 1 else None,
        alpha=0.2,
        color="tab:blue",
        label="min..max over modules",
    )
    ax.plot(steps, [p[1] for p in points], marker="o", drawstyle="steps-post", color="tab:blue", label="average")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rank")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"LoRA rank over training (final average {points[-1][1]:.2f})", fontsize=10)
    return save_figure(fig, path)
