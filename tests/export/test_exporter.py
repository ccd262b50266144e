"""export_adapter end to end on tiny random models: parity with the training model through PEFT,
the written format, options, and that failures leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prunedlora import metadata
from prunedlora.export.errors import ExportError
from prunedlora.export.exporter import export_adapter
from tests.export.conftest import leftovers, max_abs_diff, peft_logits

PARITY = 1e-5
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_format(out, record):
    """The invariants every loader relies on: scaling 1 everywhere, exact keys, PEFT tensor names."""
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA" and not config["use_rslora"]
    assert config["r"] == config["lora_alpha"] == record.max_rank  # old vLLM: lora_alpha / r == 1
    assert config["rank_pattern"] == config["alpha_pattern"]  # PEFT and vLLM 0.32: alpha_m / r_m == 1
    assert sorted(config["target_modules"]) == sorted(record.ranks)
    assert len(config["rank_pattern"]) == len(record.ranks)
    for name, rank in record.ranks.items():
        A = tensors[f"base_model.model.{name}.lora_A.weight"]
        B = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape[0] == B.shape[1] == rank
    assert len(tensors) == 2 * len(record.ranks)
    assert not any(n in record.ranks for n in record.dropped_modules)


@pytest.mark.parametrize(
    "r0, alpha, rslora, targets, masks",
    [
        (8, 16.0, False, ("q_proj", "v_proj"), "random"),
        (8, 16.0, True, ALL_LINEAR, "random"),
        (4, 8.0, False, ("o_proj", "down_proj"), "full"),
        (16, 4.0, True, ("k_proj", "up_proj", "gate_proj"), lambda n, i, r0, g: torch.arange(r0) % (i + 2) == 0),
    ],
    ids=["qv", "all-linear-rslora", "nothing-pruned", "strided-rslora"],
)
def test_exported_adapter_matches_training_model(
    fake_run, tiny_model_path, tmp_path, r0, alpha, rslora, targets, masks
):
    run = fake_run(r0=r0, alpha=alpha, use_rslora=rslora, target_modules=targets, masks_spec=masks, seed=r0)
    out = tmp_path / "out"
    result = export_adapter(run, out)
    assert result.max_logit_diff is not None  # verification ran; the parity is checked here, not from its report
    reference = peft_logits(tiny_model_path, run / "adapter")
    assert max_abs_diff(reference, peft_logits(tiny_model_path, out)) <= PARITY

    record = metadata.read_adapter_record(out)
    masks_saved = metadata.load_masks(run / metadata.MASKS_FILE)
    expected = {n: int(m.sum()) for n, m in masks_saved.items() if m.any()}
    assert record.ranks == expected
    assert record.dropped_modules == sorted(n for n, m in masks_saved.items() if not m.any())
    assert record.r0 == r0 and record.source == "prunedlora"
    assert record.training["method"]["r0"] == r0
    A_in = dict(load_file(str(run / "adapter" / "adapter_model.safetensors")).items())
    assert record.params_before == sum(t.numel() for t in A_in.values())
    assert record.params_after == sum(t.numel() for t in load_file(str(out / "adapter_model.safetensors")).values())
    assert record.bytes_after == (out / "adapter_model.safetensors").stat().st_size
    _check_format(out, record)
    assert leftovers(tmp_path) == []


def test_random_masks_include_full_and_empty_modules(fake_run):
    run = fake_run(masks_spec="random")
    masks = metadata.load_masks(run / metadata.MASKS_FILE)
    assert any(bool(m.all()) for m in masks.values()) and any(not m.any() for m in masks.values())


def test_adapter_changes_the_model(fake_run, tiny_model_path, tmp_path):
    """The parity tests could not fail if the fake adapters did nothing."""
    from tests.export.conftest import hf_logits

    run = fake_run(masks_spec="full")
    out = tmp_path / "out"
    export_adapter(run, out)
    assert max_abs_diff(hf_logits(tiny_model_path), peft_logits(tiny_model_path, out)) > 1e-2


def test_plain_peft_adapter_is_exported_unchanged_in_compact_form(fake_run, tiny_model_path, tmp_path):
    run = fake_run(r0=6, alpha=3.0, use_rslora=True, masks_spec="full")
    out = tmp_path / "out"
    result = export_adapter(run / "adapter", out)
    assert result.record.source == "peft-lora"
    assert set(result.record.ranks.values()) == {6}
    assert max_abs_diff(peft_logits(tiny_model_path, run / "adapter"), peft_logits(tiny_model_path, out)) <= PARITY
    # exporting an export changes nothing: it reads rank_pattern/alpha_pattern like PEFT does
    again = tmp_path / "again"
    export_adapter(out, again)
    first, second = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(again / "adapter_model.safetensors")),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_pad_to_pads_with_zero_components(fake_run, tiny_model_path, tmp_path):
    run = fake_run(r0=8, masks_spec="random", target_modules=ALL_LINEAR, seed=3)
    plain, padded = tmp_path / "plain", tmp_path / "padded"
    export_adapter(run, plain, verify=False)
    result = export_adapter(run, padded, pad_to=4)
    compact_ranks = metadata.read_adapter_record(plain).ranks
    assert result.record.pad_to == 4
    assert result.record.ranks == {n: -(-r // 4) * 4 for n, r in compact_ranks.items()}
    tensors = load_file(str(padded / "adapter_model.safetensors"))
    for name, rank in compact_ranks.items():
        assert not tensors[f"base_model.model.{name}.lora_A.weight"][rank:].any()
        assert not tensors[f"base_model.model.{name}.lora_B.weight"][:, rank:].any()
    assert max_abs_diff(peft_logits(tiny_model_path, plain), peft_logits(tiny_model_path, padded)) <= PARITY
    _check_format(padded, result.record)


def test_max_rank_refuses_and_names_the_modules(fake_run, tmp_path):
    run = fake_run(r0=8, masks_spec="full")
    out = tmp_path / "out"
    with pytest.raises(
        ExportError, match=r"4 module\(s\) have a rank above --max-rank 6: model\.layers\.0\.self_attn\.q_proj \(8\)"
    ):
        export_adapter(run, out, max_rank=6)
    assert not out.exists() and leftovers(tmp_path) == []


def test_svd_truncate_reduces_big_modules_and_reports_the_error(fake_run, tiny_model_path, tmp_path):
    keep_few = lambda n, i, r0, g: torch.arange(r0) < (3 if i % 2 else 8)  # noqa: E731
    run = fake_run(r0=8, masks_spec=keep_few, target_modules=("q_proj", "v_proj"))
    out = tmp_path / "out"
    result = export_adapter(run, out, max_rank=5, svd_truncate=True)
    record = result.record
    big = {n for n, m in metadata.load_masks(run / metadata.MASKS_FILE).items() if int(m.sum()) > 5}
    assert set(record.svd_truncated) == big and big
    assert all(r <= 5 for r in record.ranks.values())
    assert all(0 < e < 1 for e in record.svd_truncated.values())
    # the reported error is the relative Frobenius error of that module's delta W
    source = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    written = load_file(str(out / "adapter_model.safetensors"))
    name = sorted(big)[0]
    full = (
        source[f"base_model.model.{name}.lora_B.weight"].double()
        @ source[f"base_model.model.{name}.lora_A.weight"].double()
        * 2.0
    )
    approx = (
        written[f"base_model.model.{name}.lora_B.weight"].double()
        @ written[f"base_model.model.{name}.lora_A.weight"].double()
    )
    assert float(torch.linalg.norm(full - approx) / torch.linalg.norm(full)) == pytest.approx(
        record.svd_truncated[name], rel=1e-3
    )
    assert result.truncation_logit_diff is not None and result.truncation_logit_diff > 0
    # the written module is the best rank-k approximation of the source's delta W (Eckart-Young),
    # computed here; break: keep the first k components instead of the top singular ones -> red
    k = record.ranks[name]
    U, S, Vh = torch.linalg.svd(full)
    torch.testing.assert_close(approx, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], atol=1e-5, rtol=0)
    _check_format(out, record)


def test_svd_truncate_with_pad_to_stays_within_max_rank(fake_run, tmp_path):
    run = fake_run(r0=8, masks_spec="full")
    result = export_adapter(run, tmp_path / "out", max_rank=7, svd_truncate=True, pad_to=4)
    assert set(result.record.ranks.values()) == {4}


def test_plain_adapter_reduced_by_svd(fake_run, tmp_path):
    run = fake_run(r0=8, masks_spec="full")
    result = export_adapter(run / "adapter", tmp_path / "out", max_rank=2, svd_truncate=True)
    assert set(result.record.ranks.values()) == {2}
    assert len(result.record.svd_truncated) == 4


def test_svd_truncate_needs_max_rank(fake_run, tmp_path):
    with pytest.raises(ExportError, match="--svd-truncate needs --max-rank"):
        export_adapter(fake_run(), tmp_path / "out", svd_truncate=True)


def _break_scaling(monkeypatch):
    """Make export write B with a wrong scaling, as a folding bug would."""
    from prunedlora.export import exporter

    real_write = exporter._write_adapter

    def wrong_scaling(staging, source, compact, base_model):
        for factors in compact.values():
            factors.B = factors.B * 1.5
        real_write(staging, source, compact, base_model)

    monkeypatch.setattr(exporter, "_write_adapter", wrong_scaling)


def test_failed_verification_leaves_nothing(fake_run, tmp_path, monkeypatch):
    _break_scaling(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="verification failed"):
        export_adapter(fake_run(), out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(fake_run, tiny_model_path, tmp_path):
    run = fake_run()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export_adapter(run, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_adapter(run, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_existing_empty_output_is_used(fake_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    export_adapter(fake_run(), out, verify=False)
    assert (out / "adapter_config.json").is_file()


def test_failed_overwrite_keeps_the_previous_adapter(fake_run, tmp_path, monkeypatch):
    run = fake_run()
    out = tmp_path / "out"
    export_adapter(run, out, verify=False)
    before = (out / "adapter_model.safetensors").read_bytes()
    _break_scaling(monkeypatch)
    with pytest.raises(ExportError, match="verification failed"):
        export_adapter(run, out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_output_inside_the_input_is_refused(fake_run):
    run = fake_run()
    with pytest.raises(ExportError, match="overlaps the input"):
        export_adapter(run, run / "export", overwrite=True)


def test_written_files_are_readable_by_others(fake_run, tmp_path):
    out = tmp_path / "out"
    export_adapter(fake_run(), out, verify=False)
    assert out.stat().st_mode & 0o005 == 0o005
    assert (out / "adapter_model.safetensors").stat().st_mode & 0o004


def test_merge_writes_a_model_equal_to_base_plus_adapter(fake_run, tiny_model_path, tmp_path):
    from tests.export.conftest import hf_logits

    out = tmp_path / "out"
    result = export_adapter(fake_run(masks_spec="random"), out, merge=True)
    assert result.merged_dir == out / "merged"
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    assert max_abs_diff(peft_logits(tiny_model_path, out), hf_logits(out / "merged")) <= PARITY


def test_merge_without_verification(fake_run, tiny_model_path, tmp_path):
    from tests.export.conftest import hf_logits

    out = tmp_path / "out"
    export_adapter(fake_run(), out, merge=True, verify=False)
    assert max_abs_diff(peft_logits(tiny_model_path, out), hf_logits(out / "merged")) <= PARITY


def test_bf16_adapter_is_exported_exactly(fake_run, tiny_model_path, tmp_path):
    from safetensors.torch import save_file

    run = fake_run(r0=8, alpha=24.0, masks_spec="random")
    path = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
    out = tmp_path / "out"
    export_adapter(run, out)
    assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.float32}
    # the bf16 training adapter as PEFT loads it vs the float32 export, computed here
    assert max_abs_diff(peft_logits(tiny_model_path, run / "adapter"), peft_logits(tiny_model_path, out)) <= PARITY


def test_export_does_not_import_vllm(fake_run, tmp_path):
    """Export runs where vLLM is not installed: it must never import it."""
    import subprocess
    import sys

    run = fake_run()
    code = (
        "import sys\n"
        "from prunedlora.export import export_adapter, inspect_adapter\n"
        f"export_adapter({str(run)!r}, {str(tmp_path / 'out')!r})\n"
        f"inspect_adapter({str(tmp_path / 'out')!r})\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'vllm')\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
