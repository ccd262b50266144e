"""prunedlora.figures: labels of points that share a place do not print on top of each other."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from prunedlora.figures import label_points, new_figure  # noqa: E402


def _label_heights(notes) -> list[float]:
    return [note.xyann[1] for note in notes]


def test_coincident_points_get_labels_at_least_a_gap_apart():
    ax = new_figure(4, 3).add_subplot(1, 1, 1)
    points = [("a", 1.0, 0.5), ("b", 1.0, 0.5), ("c", 1.0, 0.5), ("far", 9.0, 0.1)]
    for _, x, y in points:
        ax.plot([x], [y], "o")
    notes = {note.get_text(): note for note in label_points(ax, points, gap_pt=9.0)}
    stacked = sorted(_label_heights([notes["a"], notes["b"], notes["c"]]))
    assert stacked[0] == pytest.approx(3.0)
    assert stacked[1] - stacked[0] == pytest.approx(9.0)
    assert stacked[2] - stacked[1] == pytest.approx(9.0)
    # a point alone in its column keeps the plain offset and no leader line
    assert notes["far"].xyann == (4.0, 3.0)
    assert notes["far"].arrowprops is None
    assert all(notes[name].arrowprops is not None for name in ("a", "b", "c") if notes[name].xyann[1] > 3.0)


def test_points_far_apart_on_the_axis_are_not_moved():
    ax = new_figure(4, 3).add_subplot(1, 1, 1)
    points = [("low", 1.0, 0.0), ("high", 1.0, 100.0)]
    for _, x, y in points:
        ax.plot([x], [y], "o")
    assert _label_heights(label_points(ax, points)) == [3.0, 3.0]
