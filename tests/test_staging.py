from pathlib import Path

import pytest

from prunedlora.staging import staged_directory


def test_a_finished_build_replaces_the_target(tmp_path):
    target = tmp_path / "env"
    target.mkdir()
    (target / "old").write_text("old")
    with staged_directory(target) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["env"]


def test_a_failed_build_leaves_the_target_and_nothing_else(tmp_path):
    target = tmp_path / "env"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError, match="pip failed"):
        with staged_directory(target) as staging:
            (staging / "half").write_text("half")
            raise RuntimeError("pip failed")
    assert (target / "old").read_text() == "old" and not (target / "half").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["env"]
