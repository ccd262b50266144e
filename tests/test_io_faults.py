"""I/O faults are bad input too: a full disk, a read-only or unwritable folder, a file vanishing
mid-read give one stderr line naming the path, exit 2, and nothing half-written, in every command
outside ``train`` that writes: export, sparsify, prune-export and the bench results.

The full disk is a patched writer: ``safetensors.torch.save_file``, through which every one of these
commands writes its tensors, raises what a full disk raises (an ``OSError`` with ENOSPC, or the
``SafetensorError`` safetensors itself raises then). The read-only target is a folder without write
permission (skipped as root, whom permissions do not stop) and, so that root runs it too, a patched
``tempfile`` that answers EROFS as a read-only mount does.

Break, made once for each: drop the ``io_fault`` translation in ``staging.staged_directory`` -> the
full-disk cases of export, sparsify and prune-export go red (a traceback, or a line naming no path);
in ``cli.main`` -> the vanished file and the read-only cases end in a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from prunedlora.cli import main

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder``, with size and mtime: what 'nothing written' compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def refused(argv: list, capsys, name: str | Path, folder: Path) -> str:
    """Exit 2, one stderr line naming ``name`` without a traceback, and ``folder`` as it was."""
    before = snapshot(folder)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    # transformers' progress bars (loading the base before the fault) are progress, not the error
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert code == 2, f"exit {code}; stderr: {err}"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"prunedlora {argv[0]}: error: ") and str(name) in lines[0], lines[0]
    assert snapshot(folder) == before, "the failed command left files behind"
    return lines[0]


def disk_full(monkeypatch, kind: str) -> None:
    """Make every safetensors write fail as on a full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*args, **kwargs):
        if kind == "oserror":
            raise ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def read_only_mount(monkeypatch) -> None:
    """Make creating anything new in a folder fail as on a read-only mount (EROFS), for root too."""

    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dir or ".") / "x"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)


@pytest.fixture
def out_folder(tmp_path) -> Path:
    """An empty folder the command writes into (the output goes to ``out_folder / "out"``)."""
    folder = tmp_path / "target"
    folder.mkdir()
    return folder


@pytest.fixture
def unwritable(out_folder):
    out_folder.chmod(0o555)
    yield out_folder
    out_folder.chmod(0o755)


# -- the commands ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prunedlora_run(tiny_model_path, tmp_path_factory) -> Path:
    from tests.export.conftest import make_fake_run

    return make_fake_run(tiny_model_path, tmp_path_factory.mktemp("io") / "run")


@pytest.fixture(scope="module")
def loraprune_run(tiny_model_path, tmp_path_factory) -> Path:
    """A LoRAPrune run directory as training leaves it (adapter, run record, pruner state), untrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prunedlora import metadata
    from prunedlora.loraprune import LorapruneConfig, LoraPruner

    run = tmp_path_factory.mktemp("io") / "loraprune-run"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(run / metadata.RUN_ADAPTER_DIR)
    LoraPruner(peft_model, LorapruneConfig(sparsity=0.5), total_steps=10).save(run)
    record = metadata.RunRecord(
        base_model=str(tiny_model_path), r0=4, lora_alpha=8, use_rslora=False, target_modules=ALL, ranks={}
    )
    metadata.write_run_record(run, record)
    return run


@pytest.fixture
def command(request, prunedlora_run, loraprune_run, tiny_model_path):
    """argv of one writing command with OUT as its output folder."""

    def argv(out: Path) -> list:
        return {
            "export": ["export", prunedlora_run, out, "--no-verify"],
            "sparsify": ["sparsify", tiny_model_path, out, "--residual-rank", "2", "--task-rank", "2"],
            "prune-export": ["prune-export", loraprune_run, out],
        }[request.param]

    return argv


WRITERS = ["export", "sparsify", "prune-export"]


def test_the_commands_write_when_nothing_fails(prunedlora_run, loraprune_run, tiny_model_path, tmp_path, capsys):
    """The fixtures are good: without a fault each command writes its output (so a refusal below is
    the fault's, not a broken input's)."""
    assert main(["export", str(prunedlora_run), str(tmp_path / "a"), "--no-verify"]) == 0
    assert main(["prune-export", str(loraprune_run), str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and (tmp_path / "b" / "adapter").is_dir()


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
@pytest.mark.parametrize("command", WRITERS, indirect=True)
def test_a_full_disk_is_one_line(command, kind, out_folder, monkeypatch, capsys):
    disk_full(monkeypatch, kind)
    line = refused(command(out_folder / "out"), capsys, out_folder / "out", out_folder)
    assert "No space left on device" in line and "free space" in line


@pytest.mark.parametrize("command", WRITERS, indirect=True)
def test_a_read_only_mount_is_one_line(command, out_folder, monkeypatch, capsys):
    read_only_mount(monkeypatch)
    line = refused(command(out_folder / "out"), capsys, out_folder / "out", out_folder)
    assert "Read-only file system" in line


@as_root
@pytest.mark.parametrize("command", WRITERS, indirect=True)
def test_an_unwritable_folder_is_one_line(command, unwritable, capsys):
    line = refused(command(unwritable / "out"), capsys, unwritable / "out", unwritable)
    assert "Permission denied" in line


def test_a_file_vanishing_mid_read_is_one_line(prunedlora_run, out_folder, monkeypatch, capsys):
    """A read that finds its file gone (another process removed it) names the file, whoever reads it."""
    import prunedlora.export.exporter as exporter

    gone = prunedlora_run / "adapter" / "adapter_model.safetensors"

    def load_source(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(gone))

    monkeypatch.setattr(exporter, "load_source", load_source)
    line = refused(["export", prunedlora_run, out_folder / "out"], capsys, gone, out_folder)
    assert "vanished" in line


def test_a_bug_keeps_its_traceback(prunedlora_run, out_folder, monkeypatch):
    """Only I/O faults become one line: any other error is a bug and must show where it happened."""
    import prunedlora.export.exporter as exporter

    def load_source(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(exporter, "load_source", load_source)
    with pytest.raises(KeyError):
        main(["export", str(prunedlora_run), str(out_folder / "out")])


# -- bench results ---------------------------------------------------------------------------------


def bench_argv(out: Path, cells: Path) -> list:
    """The quality bench rebuilding its table from the committed cells: it writes only the results."""
    return ["bench", "quality", "--report-only", "--quiet", "--out", out, "--cells-dir", cells]


def test_bench_results_on_a_full_disk_leave_the_old_ones(tmp_path, out_folder, monkeypatch, capsys):
    assert main([str(a) for a in bench_argv(out_folder, tmp_path / "cells")]) == 0
    written = snapshot(out_folder)
    assert {"quality.json", "quality.md", "quality.png"} <= set(written)

    from pathlib import Path as RealPath

    real = RealPath.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.startswith(".quality.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(RealPath, "write_text", write_text)
    line = refused(bench_argv(out_folder, tmp_path / "cells"), capsys, out_folder / "quality.json", out_folder)
    assert "No space left on device" in line  # and the earlier plot and table were not replaced (snapshot)


def test_bench_results_in_a_read_only_mount(tmp_path, out_folder, monkeypatch, capsys):
    read_only_mount(monkeypatch)
    line = refused(bench_argv(out_folder, tmp_path / "cells"), capsys, out_folder / "quality.", out_folder)
    assert "Read-only file system" in line


@as_root
def test_bench_results_in_an_unwritable_folder(tmp_path, unwritable, capsys):
    refused(bench_argv(unwritable / "out", tmp_path / "cells"), capsys, unwritable / "out", unwritable)


def test_the_one_line_from_the_console_script(prunedlora_run, tmp_path):
    """The same for the installed command, as a user meets it: a read-only target ends in one line."""
    import subprocess

    target = tmp_path / "ro"
    target.mkdir()
    script = (
        "import errno, os, sys, tempfile\n"
        "def refuse(*a, dir=None, **k): raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))\n"
        "tempfile.mkdtemp = refuse\n"
        "from prunedlora.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", script, "export", str(prunedlora_run), str(target / "out"), "--no-verify"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and f"{target / 'out'}: Read-only file system" in done.stderr
    assert list(target.iterdir()) == []
