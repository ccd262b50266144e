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


def test_a_fault_inside_the_staging_folder_names_the_target_path(tmp_path):
    """The staging folder is removed, so the message names where the file was going."""
    import errno

    from prunedlora.iofaults import IOFaultError

    target = tmp_path / "out"
    with pytest.raises(IOFaultError) as info:
        with staged_directory(target) as staging:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "model.safetensors"))
    assert str(info.value).startswith(f"{target / 'model.safetensors'}: No space left on device; the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_staged_files_replace_their_targets_together_or_not_at_all(tmp_path):
    import errno

    from prunedlora.iofaults import IOFaultError
    from prunedlora.staging import staged_files

    table, data = tmp_path / "r.md", tmp_path / "r.json"
    with staged_files(table, data) as (md, js):
        md.write_text("old table")
        js.write_text("old data")
    with pytest.raises(IOFaultError, match=r"r\.json: No space left on device"):
        with staged_files(table, data) as (md, js):
            md.write_text("new table")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(js))
    assert (table.read_text(), data.read_text()) == ("old table", "old data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_an_error_that_is_not_an_io_fault_is_left_alone(tmp_path):
    from prunedlora.staging import staged_files

    with pytest.raises(ValueError, match="a bug"):
        with staged_files(tmp_path / "x"):
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []
