"""Bad inputs give one clear error and leave nothing behind; AdaLoRA adapters convert exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunedlora import metadata
from prunedlora.export.errors import ExportError
from prunedlora.export.exporter import export_adapter
from prunedlora.export.source import load_source
from tests.export.conftest import leftovers, max_abs_diff, peft_logits

WEIGHTS = "adapter_model.safetensors"


def _export_fails(source, tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=match):
        export_adapter(source, out, **kwargs)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def _edit_tensors(adapter_dir, edit):
    tensors = load_file(str(adapter_dir / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(adapter_dir / WEIGHTS), metadata={"format": "pt"})


def _edit_masks(run, edit):
    """Change the masks and keep the run record's ranks in step, so only the masks-vs-weights check can fire."""
    masks = metadata.load_masks(run / metadata.MASKS_FILE)
    edit(masks)
    metadata.save_masks(run / metadata.MASKS_FILE, masks)
    record = metadata.read_run_record(run)
    record.ranks = {n: int(m.sum()) for n, m in masks.items()}
    metadata.write_run_record(run, record)


def test_missing_weights(fake_run, tmp_path):
    run = fake_run()
    (run / "adapter" / WEIGHTS).unlink()
    _export_fails(run, tmp_path, r"adapter_model\.safetensors is missing")


def test_truncated_weights(fake_run, tmp_path):
    run = fake_run()
    path = run / "adapter" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _export_fails(run, tmp_path, "not a readable safetensors file")


def test_truncated_masks(fake_run, tmp_path):
    run = fake_run()
    path = run / metadata.MASKS_FILE
    path.write_bytes(path.read_bytes()[:40])
    _export_fails(run, tmp_path, "incomplete or damaged run directory.*masks.safetensors is not a readable")


def test_missing_masks(fake_run, tmp_path):
    run = fake_run()
    (run / metadata.MASKS_FILE).unlink()
    _export_fails(run, tmp_path, "masks.safetensors is missing")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(fake_run, tmp_path, value):
    run = fake_run(masks_spec="full")

    def poison(tensors):
        key = sorted(k for k in tensors if "lora_B" in k)[0]
        tensors[key][0, 0] = value

    _edit_tensors(run / "adapter", poison)
    _export_fails(run, tmp_path, "holds NaN or Inf values")


def test_masks_naming_other_modules(fake_run, tmp_path):
    run = fake_run()

    def rename(masks):
        name = sorted(masks)[0]
        masks["model.layers.7.self_attn.q_proj"] = masks.pop(name)

    _edit_masks(run, rename)
    _export_fails(run, tmp_path, r"does not match the adapter: 1 adapter module\(s\) have no mask")


def test_masks_of_wrong_length(fake_run, tmp_path):
    run = fake_run(r0=8)
    _edit_masks(run, lambda masks: masks.update({k: torch.ones(4, dtype=torch.bool) for k in masks}))
    _export_fails(run, tmp_path, "has rank 8 but its mask has 4 entries")


def test_masks_pruning_live_components(fake_run, tmp_path):
    run = fake_run(masks_spec="full")
    _edit_masks(run, lambda masks: masks[sorted(masks)[0]].__setitem__(slice(0, 2), False))
    _export_fails(run, tmp_path, r"masks do not match the adapter: .* component\(s\) \[0, 1\] marked pruned")


def test_masks_disagreeing_with_run_record(fake_run, tmp_path):
    run = fake_run(masks_spec="full")
    record = json.loads((run / metadata.RUN_RECORD_FILE).read_text())
    record["ranks"][sorted(record["ranks"])[0]] = 3
    (run / metadata.RUN_RECORD_FILE).write_text(json.dumps(record))
    _export_fails(run, tmp_path, "does not match the run record")


def test_base_model_with_other_shapes(fake_run, tmp_path, default_model_path):
    from tests.conftest import build_tiny_llama

    run = fake_run()
    other = tmp_path / "other-base"
    build_tiny_llama(other, seed=1, tokenizer_from=default_model_path)
    config = json.loads((other / "config.json").read_text())
    assert config["hidden_size"] == 64  # same architecture ...
    config.update(hidden_size=32, head_dim=8)  # ... but other shapes
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"does not fit the adapter: .*model 32->32, adapter 64->64"):
        export_adapter(run, out, base_model=str(other))
    assert not out.exists()


def test_base_model_that_does_not_exist(fake_run, tmp_path):
    _export_fails(fake_run(), tmp_path, "cannot be used.*pass --base-model", base_model=str(tmp_path / "nowhere"))


def test_not_an_adapter(tmp_path):
    (tmp_path / "empty").mkdir()
    _export_fails(tmp_path / "empty", tmp_path, "neither a training run .* nor a PEFT adapter folder")


def test_damaged_adapter_config(fake_run, tmp_path):
    run = fake_run()
    (run / "adapter" / "adapter_config.json").write_text("{not json")
    _export_fails(run, tmp_path, "adapter_config.json is not valid JSON")


def test_dora_adapter_is_refused(fake_run, tmp_path):
    run = fake_run()
    path = run / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["use_dora"] = True
    path.write_text(json.dumps(config))
    _export_fails(run / "adapter", tmp_path, "cannot export an adapter that uses DoRA")


def test_config_rank_disagreeing_with_tensors(fake_run, tmp_path):
    run = fake_run(r0=8)
    path = run / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["r"] = 4
    path.write_text(json.dumps(config))
    _export_fails(run / "adapter", tmp_path, "has rank 8 in its tensors but 4 in adapter_config.json")


def test_every_module_pruned(fake_run, tmp_path):
    run = fake_run(masks_spec=lambda n, i, r0, g: torch.zeros(r0, dtype=torch.bool))
    _export_fails(run, tmp_path, "every module has rank 0")


def test_checkpoint_folders_are_ignored(fake_run):
    run = fake_run()
    assert (run / "checkpoint-50").is_dir()
    source = load_source(run)
    assert source.kind == "run" and source.adapter_dir == run / "adapter"


# -- AdaLoRA ----------------------------------------------------------------------------------------


def make_adalora_adapter(base_path, out_dir, *, rank_pattern=True, seed=0):
    """A PEFT AdaLoRA adapter after budget allocation: random triplets, some masked by rank_pattern."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = AdaLoraConfig(
        init_r=6,
        target_r=3,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        total_step=10,
        tinit=1,
        tfinal=2,
        deltaT=1,
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    pattern = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if "lora_B" in name else 1.0))
            if "lora_E" in name:
                key = name.removeprefix("base_model.model.")
                index = len(pattern)
                keep = torch.rand(6, generator=generator) < 0.6
                if index == 0:
                    keep[:] = False  # a module AdaLoRA pruned to rank 0
                if index == 1:
                    keep[:] = True
                pattern[key] = keep.tolist()
                param[3, 0] = 0.0  # a triplet masked by E == 0 inside a kept slot
    if rank_pattern:
        model.peft_config["default"].rank_pattern = pattern
    model.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("rank_pattern", [True, False], ids=["after-allocation", "before-allocation"])
def test_adalora_conversion_matches_peft_adalora(tiny_model_path, tmp_path, rank_pattern):
    ada = make_adalora_adapter(tiny_model_path, tmp_path / "ada", rank_pattern=rank_pattern)
    out = tmp_path / "out"
    result = export_adapter(ada, out, from_adalora=True)
    assert result.record.source == "peft-adalora"
    assert result.record.r0 == 6
    reference = peft_logits(tiny_model_path, ada)  # PEFT's own AdaLoRA model
    assert max_abs_diff(reference, peft_logits(tiny_model_path, out)) <= 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    ranks = result.record.ranks
    assert all(r <= 5 for r in ranks.values())  # E == 0 in slot 3 drops one triplet everywhere
    if rank_pattern:
        assert len(result.record.dropped_modules) == 1


def test_adalora_needs_the_flag(tiny_model_path, tmp_path):
    ada = make_adalora_adapter(tiny_model_path, tmp_path / "ada")
    _export_fails(ada, tmp_path, "AdaLoRA adapter; pass --from-adalora")


def test_from_adalora_on_plain_lora_is_refused(fake_run, tmp_path):
    _export_fails(fake_run() / "adapter", tmp_path, "not AdaLoRA; drop --from-adalora", from_adalora=True)


def test_adalora_with_svd_truncation_verifies_against_the_truncated_adalora_model(tiny_model_path, tmp_path):
    ada = make_adalora_adapter(tiny_model_path, tmp_path / "ada")
    result = export_adapter(ada, tmp_path / "out", from_adalora=True, max_rank=2, svd_truncate=True)
    assert result.record.svd_truncated and all(r <= 2 for r in result.record.ranks.values())
    assert result.truncation_logit_diff > 0
    # Checked here, not from the exporter's report: each written module's delta W is the best rank-2
    # approximation (SVD, computed here) of the untruncated conversion's, which equals PEFT's AdaLoRA
    # (test_adalora_conversion_matches_peft_adalora). Break: truncate to the first components -> red.
    full = export_adapter(ada, tmp_path / "full", from_adalora=True)
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    untruncated = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    assert set(result.record.ranks) == set(full.record.ranks)
    for name in full.record.ranks:

        def delta(tensors):
            prefix = f"base_model.model.{name}"
            return tensors[f"{prefix}.lora_B.weight"].double() @ tensors[f"{prefix}.lora_A.weight"].double()

        U, S, Vh = torch.linalg.svd(delta(untruncated))
        torch.testing.assert_close(delta(written), U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-5, rtol=0)
