"""`inspect_adapter` on the three kinds of folder it accepts."""

from __future__ import annotations

import re

import pytest

from prunedlora import metadata
from prunedlora.export.errors import ExportError
from prunedlora.export.exporter import export_adapter
from prunedlora.export.inspection import inspect_adapter, rank_grid


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(label))
    return line.split()


def test_exported_adapter_table_shows_ranks_and_sizes(fake_run, tmp_path):
    run = fake_run(r0=8, target_modules=("q_proj", "v_proj", "down_proj"))
    out = tmp_path / "out"
    export_adapter(run, out, verify=False)
    record = metadata.read_adapter_record(out)
    table = inspect_adapter(out)
    assert "exported adapter" in table and "r0 = 8" in table
    header = _row(table, "layer")
    assert header[1:] == ["q_proj", "v_proj", "down_proj"]  # the order of the training table
    masks = metadata.load_masks(run / metadata.MASKS_FILE)
    for layer in (0, 1):
        cells = dict(zip(header[1:], _row(table, f"{layer} ")[1:]))
        for column, cell in cells.items():
            name = next(n for n in masks if n.startswith(f"model.layers.{layer}.") and n.endswith(column))
            assert int(cell) == int(masks[name].sum())
    assert f"{record.params_before:,}" in table and f"{record.params_after:,}" in table
    assert f"{record.bytes_before:,}" in table and f"{record.bytes_after:,}" in table
    assert re.search(r"parameters\s+[\d,]+\s+[\d,]+ \(\d+\.\d%\)", table)


def test_run_table_predicts_the_export(fake_run, tmp_path):
    run = fake_run(r0=8)
    table = inspect_adapter(run)
    assert table.startswith("training run")
    out = tmp_path / "out"
    export_adapter(run, out, verify=False)
    params_after = metadata.read_adapter_record(out).params_after
    assert f"{params_after:,}" in _row(table, "parameters")


def test_plain_peft_adapter_table(fake_run):
    table = inspect_adapter(fake_run(r0=4) / "adapter")
    assert table.startswith("PEFT LORA adapter")
    assert set(_row(table, "0 ")[1:]) == {"4"}


def test_grid_handles_modules_outside_layers():
    lines = rank_grid({"model.layers.0.self_attn.q_proj": 3, "model.layers.1.self_attn.q_proj": 2, "lm_head": 5})
    assert lines[0].split() == ["layer", "q_proj"]
    assert lines[1].split() == ["0", "3"] and lines[2].split() == ["1", "2"]
    assert lines[3].split() == ["lm_head", "5"]


def test_inspect_refuses_other_folders(tmp_path):
    with pytest.raises(ExportError, match="not an adapter folder"):
        inspect_adapter(tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        inspect_adapter(tmp_path / "missing")
