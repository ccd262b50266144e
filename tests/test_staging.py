import os
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


def test_a_failed_rename_puts_the_old_target_back(tmp_path, monkeypatch):
    target = tmp_path / "env"
    target.mkdir()
    (target / "old").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".env.tmp-"):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        with staged_directory(target) as staging:
            (staging / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["env"]


def test_the_result_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "out") as staging:
            (staging / "file").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "file").stat().st_mode & 0o777 == 0o644
