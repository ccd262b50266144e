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
