"""Figure helpers every stage's plots share (train's rank heatmap, bench's latency and quality plots).

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch), so plotting works headless and inside a training process without touching the user's
matplotlib state.
"""

from __future__ import annotations

import os
from pathlib import Path


def new_figure(width: float, height: float):
    """A matplotlib Figure of ``width`` x ``height`` inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created, through a temporary sibling so a failed
    write leaves no half image) and return the path."""
    from prunedlora.staging import staged_files

    path = Path(path)
    with staged_files(path) as (temporary,):
        fig.savefig(temporary, format="png", bbox_inches="tight")
    return path


def label_points(ax, points, *, gap_pt: float = 9.0, fontsize: float = 7) -> list:
    """Name each ``(label, x, y)`` point on ``ax`` with its labels stacked so that none overlap.

    Points that share an x (several cells with the same bytes on disk, say) would otherwise print their
    names on top of each other. Labels sit right of their point; going up the axis, a label that would
    come within ``gap_pt`` points of the one below it in the same column moves up, with a thin leader
    line back to its point. Call it after the axis scales are set (log or linear), since the spacing
    is worked out in display space. Returns the annotations, bottom to top within each column.
    """
    ax.autoscale_view()
    to_pt = 72.0 / ax.figure.dpi
    where = [(name, *(ax.transData.transform((x, y)) * to_pt), x, y) for name, x, y in points]
    where.sort(key=lambda w: (w[2], w[1]))
    columns: list[tuple[float, float]] = []  # (x, top label y) in points
    notes = []
    for name, px, py, x, y in where:
        lift = 3.0
        column = next((i for i, (cx, _) in enumerate(columns) if abs(cx - px) < 40.0), None)
        if column is not None:
            lift = max(lift, columns[column][1] + gap_pt - py)
            columns[column] = (columns[column][0], py + lift)
        else:
            columns.append((px, py + lift))
        notes.append(
            ax.annotate(
                name,
                (x, y),
                textcoords="offset points",
                xytext=(4.0 if lift <= 3.0 else 10.0, lift),
                fontsize=fontsize,
                va="bottom",
                arrowprops=None if lift <= 3.0 else {"arrowstyle": "-", "lw": 0.5, "color": "grey"},
            )
        )
    return notes
