"""The package as a user installs it: the built wheel, in a fresh virtual environment, run from a
folder that is not the checkout. Catches what only works from the source tree (files found with
``parents[N]``, data that the wheel does not ship)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its other packages come from this venv through a .pth line
    (a plain path line: this venv's own .pth files, such as the editable install's finder, stay off)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # build from a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO / "prunedlora", source / "prunedlora", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source],
        cwd=root,
    )
    (wheel,) = (root / "dist").glob("prunedlora-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    )
    (site / "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], cwd=root)
    return venv


def test_the_wheel_is_what_runs(installed, tmp_path):
    where = _run([installed / "bin" / "python", "-c", "import prunedlora; print(prunedlora.__file__)"], cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout  # not the checkout's source


def test_train_help_and_a_one_step_train_from_a_packaged_recipe(installed, tmp_path, tiny_model_path):
    cli = installed / "bin" / "prunedlora"
    assert "--config" in _run([cli, "train", "--help"], cwd=tmp_path).stdout
    run_dir = tmp_path / "run"
    # `demo` is a packaged recipe (no recipes/ folder here); its data are the slices vendored in the wheel
    _run(
        [
            cli,
            "train",
            "--config",
            "demo",
            "--model",
            tiny_model_path,
            "--training.output_dir",
            run_dir,
            "--training.max_steps",
            "1",
            "--training.per_device_train_batch_size",
            "2",
            "--training.warmup_steps",
            "0",
            "--data.max_examples",
            "8",
            "--data.max_length",
            "96",
            "--method.r0",
            "4",
            "--method.lora_alpha",
            "8",
            "--method.target_rank",
            "2",
            "--method.max_rank",
            "4",
            "--method.target_modules",
            "[q_proj, v_proj]",
            "--method.prune_start_step",
            "0",
            "--method.prune_end_step",
            "0",
            "--method.prune_every",
            "1",
        ],
        cwd=tmp_path,
    )
    record = json.loads((run_dir / "prunedlora_run.json").read_text())
    assert record["global_step"] == 1 and record["base_model"] == str(tiny_model_path)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "ranks.png").is_file()
    assert set(record["ranks"].values()) <= set(range(5)) and len(record["ranks"]) == 2 * 2  # 2 layers x q, v


def test_the_quality_protocol_finds_its_frozen_recipes_in_the_wheel(installed, tmp_path, tiny_model_path):
    """The protocol's recipes are package data (bench/protocol_recipes): listing the full table's cells
    reads every task's recipe, and fails with 'recipe ... not found' if the wheel does not ship them."""
    cli = installed / "bin" / "prunedlora"
    args = ["--preset", "full", "--seeds", "0", "--list", "--model", tiny_model_path, "--cells-dir", tmp_path / "c"]
    done = _run([cli, "bench", "quality", *args], cwd=tmp_path)
    for task in ("sst2", "gsm8k", "codealpaca"):
        assert f"{task}-pruned-obs-input-compensate-global-s0-" in done.stdout, done.stdout[-2000:]
