import json

import pytest
import torch

from prunedlora.salr import SalrError, SparsifyConfig, sparsify
from prunedlora.salr.mask import keep_mask
from prunedlora.salr.materialise import read_model_tensors
from prunedlora.salr.pipeline import ADAPTER_DIR, BASE_DIR, RECORD_FILE, STORE_DIR
from prunedlora.salr.residual import residual_factors
from prunedlora.salr.storage import load_store

PROBE = [[1, 15, 300, 42, 7, 9000, 12, 5]]


def expected_weights(model_dir, config):
    """M*W0 + E_r for every target, computed from the source weights without the pipeline."""
    tensors = read_model_tensors(model_dir)
    out = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and w.ndim == 2 and name.split(".")[-2] in config.target_modules:
            keep = keep_mask(w, config.sparsity, config.pattern)
            f = residual_factors(torch.where(keep, torch.zeros(()), w), config.residual_rank)
            out[name] = (torch.where(keep, w, torch.zeros(())), f.B @ f.A)
    return tensors, out


def test_every_target_loses_exactly_half_and_the_record_says_so(tiny_salr):
    record = json.loads((tiny_salr.out_dir / RECORD_FILE).read_text())
    assert len(record["modules"]) == 14  # 2 layers x 7 projections
    for name, module in record["modules"].items():
        assert module["zeros"] * 2 == module["numel"], name
        assert 0 < module["residual_relative_error"] < 1
    assert record["bytes"]["compressed_file"] < record["bytes"]["materialised_base_file"]
    assert tiny_salr.store.sparse_ratio > 1.7  # 1.88x less the row offsets, large on tiny weights


def test_the_materialised_base_is_a_plain_folder_holding_the_store_bit_for_bit(tiny_salr):
    base = tiny_salr.out_dir / BASE_DIR
    config = json.loads((base / "config.json").read_text())
    assert not {"quantization_config", "sparsity_config", "compression_config"} & set(config)
    assert (base / "tokenizer.json").is_file()
    stored, written = load_store(tiny_salr.out_dir / STORE_DIR), read_model_tensors(base)
    assert set(written) <= set(stored)
    for name, tensor in written.items():
        assert torch.equal(tensor, stored[name]), name


def test_base_plus_adapter_under_peft_is_the_dense_sparse_model_plus_residual(tiny_salr, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tensors, expected = expected_weights(tiny_model_path, tiny_salr.config)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    state = dense.state_dict()
    for name, (sparse, residual) in expected.items():
        state[name] = sparse + residual
    dense.load_state_dict(state)
    base = AutoModelForCausalLM.from_pretrained(tiny_salr.out_dir / BASE_DIR)
    for name, (sparse, _) in expected.items():
        assert torch.equal(base.state_dict()[name], sparse), name
    peft = PeftModel.from_pretrained(base, tiny_salr.out_dir / ADAPTER_DIR)
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        assert torch.allclose(peft(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=0)
    adapter_config = json.loads((tiny_salr.out_dir / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    assert adapter_config["base_model_name_or_path"] == str((tiny_salr.out_dir / BASE_DIR).resolve())


def test_the_existing_export_and_serve_take_the_adapter_over_the_materialised_base(tiny_salr, tmp_path):
    from prunedlora.cli import main
    from prunedlora.export import export_adapter

    base = tiny_salr.out_dir / BASE_DIR
    result = export_adapter(tiny_salr.out_dir / ADAPTER_DIR, tmp_path / "exported" / "salr", base_model=str(base))
    assert result.max_logit_diff is not None and result.max_logit_diff < 1e-4
    # serve validates the exported adapter against the materialised base and plans its slots (no vLLM start)
    assert main(["serve", "--model", str(base), "--adapters-dir", str(tmp_path / "exported"), "--dry-run"]) == 0


def test_two_four_with_wanda_and_no_residual(tmp_path, tiny_model_path):
    config = SparsifyConfig(
        pattern="2:4", mask="wanda", residual_rank=0, task_rank=4, calibration_samples=2, calibration_length=32
    )
    result = sparsify(tiny_model_path, tmp_path / "out", config)
    base = read_model_tensors(tmp_path / "out" / BASE_DIR)
    weight = base["model.layers.1.mlp.gate_proj.weight"]
    assert torch.equal(
        (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1), torch.full((weight.shape[0], weight.shape[1] // 4), 2)
    )
    assert all(m.residual_relative_error == 1.0 for m in result.modules.values())
    # wanda compares within rows, so every row loses exactly half
    assert torch.equal((weight == 0).sum(1), torch.full((weight.shape[0],), weight.shape[1] // 2))


def test_the_whitened_fit_writes_the_truncation_best_for_the_calibration_output(tmp_path, tiny_model_path):
    """sparsify --residual-fit whitened: the adapter holds E_r of each module's calibration Gram matrix
    (checked against the written files by sparsify itself), and on those inputs it misses less of E's
    output than the plain SVD of the same rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunedlora.salr.calibration import calibration_batch, default_calibration_text, input_grams
    from prunedlora.salr.residual import whitened_residual_factors

    config = SparsifyConfig(
        residual_rank=3, task_rank=2, residual_fit="whitened", calibration_samples=2, calibration_length=32
    )
    result = sparsify(tiny_model_path, tmp_path / "out", config)
    record = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert record["config"]["residual_fit"] == "whitened" and result.max_fold_error < 1e-5
    name = "model.layers.0.self_attn.q_proj"
    batch = calibration_batch(AutoTokenizer.from_pretrained(tiny_model_path), default_calibration_text(), 2, 32)
    gram = input_grams(AutoModelForCausalLM.from_pretrained(tiny_model_path), [name], batch)[name]
    w = read_model_tensors(tiny_model_path)[f"{name}.weight"]
    E = torch.where(keep_mask(w, 0.5, "unstructured"), torch.zeros(()), w)
    whitened, plain = whitened_residual_factors(E, gram, 3), residual_factors(E, 3)
    assert result.modules[name].residual_relative_error == pytest.approx(whitened.relative_error, rel=1e-6)

    def output_error(f):
        return float(
            (
                (E.double() - f.B.double() @ f.A.double()) @ gram.double() * (E.double() - f.B.double() @ f.A.double())
            ).sum()
        )

    assert output_error(whitened) < output_error(plain)


def test_wanda_takes_its_norms_from_the_whitened_fits_gram_matrix(tmp_path, tiny_model_path):
    """One calibration pass serves both: the Wanda mask is the same whether the fit is svd or whitened."""
    common = {"mask": "wanda", "residual_rank": 2, "task_rank": 2, "calibration_samples": 2, "calibration_length": 32}
    sparsify(tiny_model_path, tmp_path / "svd", SparsifyConfig(**common))
    sparsify(tiny_model_path, tmp_path / "white", SparsifyConfig(**common, residual_fit="whitened"))
    svd, white = (read_model_tensors(tmp_path / d / BASE_DIR) for d in ("svd", "white"))
    for name, weight in svd.items():
        assert torch.equal(weight == 0, white[name] == 0), name


def test_the_record_names_the_calibration_text_that_made_the_folder(tmp_path, tiny_model_path):
    """The mask and the fit depend on the calibration text, so salr.json says which text (name, hash,
    tokens) made them; a magnitude mask with the plain fit reads none and records none."""
    import hashlib

    from prunedlora.salr.calibration import default_calibration_text

    common = {"mask": "wanda", "residual_rank": 2, "task_rank": 2, "calibration_samples": 2, "calibration_length": 32}
    text = tmp_path / "task.txt"
    text.write_text("Natalia sold clips to 48 of her friends in April. " * 40)
    sparsify(tiny_model_path, tmp_path / "default", SparsifyConfig(**common))
    sparsify(tiny_model_path, tmp_path / "task", SparsifyConfig(**common), calibration=text)
    sparsify(tiny_model_path, tmp_path / "plain", SparsifyConfig(residual_rank=2, task_rank=2))
    default, task, plain = (json.loads((tmp_path / d / RECORD_FILE).read_text()) for d in ("default", "task", "plain"))
    assert default["calibration"] == {
        "text": "default (the vendored CodeAlpaca slice)",
        "sha256": hashlib.sha256(default_calibration_text().encode("utf-8")).hexdigest(),
        "tokens": 64,
    }
    assert task["calibration"] == {
        "text": "task.txt",
        "sha256": hashlib.sha256(text.read_text().encode("utf-8")).hexdigest(),
        "tokens": 64,
    }
    assert plain["calibration"] is None


def test_refusals_leave_nothing_behind(tmp_path, tiny_model_path):
    out = tmp_path / "out"
    with pytest.raises(SalrError, match="exceeds the smaller side"):
        sparsify(tiny_model_path, out, SparsifyConfig(residual_rank=33))
    with pytest.raises(SalrError, match="no linear module"):
        sparsify(tiny_model_path, out, SparsifyConfig(target_modules=["qkv"]))
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(SalrError, match="--overwrite"):
        sparsify(tiny_model_path, out, SparsifyConfig(residual_rank=2))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(SalrError, match="overlaps the model"):
        sparsify(tiny_model_path, tiny_model_path / "salr", SparsifyConfig(residual_rank=2))


def test_a_bfloat16_model_stays_bfloat16_and_its_residual_is_folded_in_float32(tmp_path, tiny_model_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from prunedlora.salr.materialise import copy_side_files

    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).save_pretrained(source)
    copy_side_files(tiny_model_path, source)
    result = sparsify(source, tmp_path / "out", SparsifyConfig(residual_rank=2, task_rank=2))
    assert {t.dtype for t in load_store(tmp_path / "out" / STORE_DIR).values()} == {torch.bfloat16}
    assert {t.dtype for t in read_model_tensors(tmp_path / "out" / BASE_DIR).values()} == {torch.bfloat16}
    with safe_open(str(tmp_path / "out" / ADAPTER_DIR / "adapter_model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float32}
    assert result.max_fold_error < 1e-6
