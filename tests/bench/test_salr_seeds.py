"""benchmarks/salr_seeds.py: the seeds' tables it refuses to pool, each in one line, before it writes anything."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import salr_seeds  # noqa: E402


def _table(folder: Path, seed: int, task: str = "sst2", steps: int = 60) -> Path:
    folder.mkdir(parents=True)
    settings = {"task": task, "seed": seed, "steps": steps}
    (folder / "tasks.json").write_text(json.dumps({"settings": settings, "cells": {}}))
    return folder


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ({"seed": 0}, "the same seed twice"),
        ({"seed": 1, "task": "gsm8k"}, "is a gsm8k table, not sst2"),
        ({"seed": 1, "steps": 30}, "differ in settings other than the seed"),
    ],
)
def test_tables_that_cannot_be_pooled_are_refused(tmp_path, second, match):
    folders = [_table(tmp_path / "s0", 0), _table(tmp_path / "s1", **second)]
    with pytest.raises(SystemExit, match=match):
        salr_seeds.load_tables(folders, "sst2")


def test_a_missing_table_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["salr_seeds.py", str(_table(tmp_path / "s0", 0)), str(tmp_path / "absent"), "--task", "sst2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    with pytest.raises(SystemExit, match="absent/tasks.json does not exist"):
        salr_seeds.main()
    assert not out.exists()


def test_tables_without_a_comparable_cell_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys, "argv", ["salr_seeds.py", str(_table(tmp_path / "s0", 0)), "--task", "sst2", "--out", str(out)]
    )
    with pytest.raises(SystemExit) as err:
        salr_seeds.main()
    assert err.value.code == 2 and "no residual cell has dense LoRA" in capsys.readouterr().err
    assert not out.exists()


def test_the_pooled_perplexity_share_is_over_every_seeds_windows():
    # seed 0 closes 1 of a 2-nat gap in each window, seed 1 3 of 4: pooled (2 + 6) / (4 + 8) = 2/3, not
    # the mean of the seeds' shares (1/2 and 3/4); every resample of windows keeps it between them
    windows = [[[5.0, 5.0], [4.0, 4.0], [3.0, 3.0]], [[9.0, 9.0], [6.0, 6.0], [5.0, 5.0]]]
    pooled = salr_seeds.pooled_log_gap(windows, seeds=2)
    assert pooled["mean"] == pytest.approx(2 / 3) and pooled["windows"] == 2
    assert 0.5 <= pooled["low"] <= pooled["mean"] <= pooled["high"] <= 0.75


@pytest.mark.parametrize(
    "windows",
    [
        [[[5.0], [4.0], [3.0]], [[], [], []]],  # seed 1's rows predate kept windows
        [[[5.0], [4.0], [3.0]], [[5.0, 1.0], [4.0, 1.0], [3.0, 0.0]]],  # seeds scored different windows
    ],
)
def test_no_pooled_perplexity_share_without_every_seeds_windows(windows):
    assert salr_seeds.pooled_log_gap(windows, seeds=2) is None
    assert salr_seeds.pooled_log_gap(windows[:1], seeds=2) is None  # a seed's rows had no perplexity at all
