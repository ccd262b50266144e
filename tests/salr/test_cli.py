"""The commands end to end: `prunedlora sparsify` and `prunedlora materialise`, with their refusals
printed as one line (exit 2) and nothing written."""

import json
import shutil

import pytest
import torch

from prunedlora.cli import main
from prunedlora.salr.materialise import read_model_tensors
from prunedlora.salr.pipeline import BASE_DIR, STORE_DIR
from prunedlora.salr.storage import MANIFEST_FILE, STORE_FILE


def refused(capsys, argv, command):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prunedlora {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_sparsity_outside_zero_one_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_model_path, value):
    err = refused(capsys, ["sparsify", str(tiny_model_path), str(tmp_path / "out"), f"--sparsity={value}"], "sparsify")
    assert "strictly between 0 and 1" in err
    assert list(tmp_path.iterdir()) == []


def test_sparsify_prints_the_bytes(capsys, tmp_path, tiny_model_path):
    argv = ["sparsify", str(tiny_model_path), str(tmp_path / "out"), "--residual-rank", "2", "--task-rank", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compressed " in out and "bytes vs" in out and "x smaller" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter", "base", "compressed", "salr.json"]


@pytest.fixture
def store(tmp_path, tiny_salr):
    return shutil.copytree(tiny_salr.out_dir / STORE_DIR, tmp_path / "store")


def test_materialise_writes_the_dense_base(capsys, tmp_path, store, tiny_salr):
    assert main(["materialise", str(store), str(tmp_path / "dense")]) == 0
    written, base = read_model_tensors(tmp_path / "dense"), read_model_tensors(tiny_salr.out_dir / BASE_DIR)
    assert set(written) == set(base) and all(torch.equal(written[k], base[k]) for k in base)


def truncate(store):
    data = (store / STORE_FILE).read_bytes()
    (store / STORE_FILE).write_bytes(data[: len(data) // 2])


def flip(store):
    data = bytearray((store / STORE_FILE).read_bytes())
    data[len(data) - 100] ^= 0x01
    (store / STORE_FILE).write_bytes(bytes(data))


def mismatch(store):
    manifest = json.loads((store / MANIFEST_FILE).read_text())
    entry = manifest["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    entry["nnz"] += 1
    (store / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, match", [(truncate, "is truncated"), (flip, "is corrupt"), (mismatch, "does not match the tensors")]
)
def test_a_damaged_store_is_one_line_and_an_old_output_stays(capsys, tmp_path, store, damage, match):
    damage(store)
    err = refused(capsys, ["materialise", str(store), str(tmp_path / "dense")], "materialise")
    assert match in err
    assert not (tmp_path / "dense").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    refused(capsys, ["materialise", str(store), str(old), "--overwrite"], "materialise")
    assert [p.name for p in old.iterdir()] == ["config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--pattern", "2:4", "--sparsity", "0.4"], "use sparsity 0.5"),
        (["--residual-rank", "0", "--task-rank", "0"], "positive sum"),
        (["--mask", "wanda", "--calibration", "EMPTY"], "is empty"),
        (["--target-modules", "qkv"], "no linear module named qkv"),
    ],
)
def test_other_bad_settings_are_one_line_and_write_nothing(capsys, tmp_path, tiny_model_path, extra, match):
    (tmp_path / "empty.txt").write_text("")
    extra = [str(tmp_path / "empty.txt") if e == "EMPTY" else e for e in extra]
    err = refused(capsys, ["sparsify", str(tiny_model_path), str(tmp_path / "out"), *extra], "sparsify")
    assert match in err
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]
