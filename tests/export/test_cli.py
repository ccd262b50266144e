"""`prunedlora export` / `prunedlora inspect` call the public functions and print one-line errors."""

from __future__ import annotations

from prunedlora import metadata
from prunedlora.cli import main
from prunedlora.errors import PrunedLoraError


def test_export_command_writes_and_prints_the_table(fake_run, tmp_path, capsys):
    run = fake_run()
    out = tmp_path / "out"
    assert main(["export", str(run), str(out), "--pad-to", "2"]) == 0
    printed = capsys.readouterr().out
    assert "verified with PEFT" in printed and "parameters" in printed
    assert metadata.read_adapter_record(out).pad_to == 2


def test_export_command_reports_bad_input_in_one_line(fake_run, tmp_path, capsys):
    run = fake_run()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunedlora export: error:") and "not a readable safetensors file" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_inspect_command(fake_run, capsys):
    run = fake_run()
    assert main(["inspect", str(run)]) == 0
    assert "kept components per module" in capsys.readouterr().out
    assert main(["inspect", str(run / "adapter")]) == 0
    assert "PEFT LORA adapter" in capsys.readouterr().out


def test_a_damaged_run_record_is_one_line(fake_run, tmp_path, capsys):
    # any command that meets MetadataError unwrapped prints it as one line too: it is a PrunedLoraError
    assert issubclass(metadata.MetadataError, PrunedLoraError)
    run = fake_run()
    (run / metadata.RUN_RECORD_FILE).write_text('{"base_model": "x", "r0": ')  # cut short
    for argv in (["export", str(run), str(tmp_path / "out")], ["inspect", str(run)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"prunedlora {argv[0]}: error:") and "is not valid JSON" in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
