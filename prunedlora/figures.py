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
    """Write ``fig`` as a PNG at ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
