"""`prunedlora export` refuses a LoRAPrune run (its adapter fits only the pruned base) in one line."""

from __future__ import annotations

from prunedlora.cli import main
from prunedlora.loraprune.pruner import STATE_FILE


def test_export_refuses_loraprune_run_and_points_to_prune_export(fake_run, tmp_path, capsys):
    run = fake_run()
    (run / STATE_FILE).write_bytes(b"masks of a pruned base")  # only its presence matters
    out = tmp_path / "out"
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("prunedlora export: error:") and "LoRAPrune run" in err
    assert f"prunedlora prune-export {run} OUT" in err
    assert not out.exists()
