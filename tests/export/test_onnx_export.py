"""ONNX export of the merged model through the separate optimum environment.

The slow tests create that environment on first use (PyPI, about a minute) and reuse it after.
"""

from __future__ import annotations

import json

import pytest

from prunedlora.export._onnx_worker import legacy_config
from prunedlora.export.errors import ExportError
from prunedlora.export.exporter import export_adapter
from tests.export.conftest import hf_logits, leftovers, make_fake_run, max_abs_diff, peft_logits


def test_legacy_config_carries_rope_theta_for_transformers_4(default_model_path):
    config = json.loads((default_model_path / "config.json").read_text())
    assert "rope_parameters" in config and "rope_theta" not in config  # what transformers 5 writes
    legacy = legacy_config(config)
    assert legacy["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert "rope_scaling" not in legacy  # default rope has no scaling
    scaled = legacy_config({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert scaled["rope_theta"] == 5e5 and scaled["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert legacy_config({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0}})["rope_theta"] == 1.0


def test_onnx_requirements_pin_the_main_torch_release():
    import torch

    from prunedlora.export.onnx_export import onnx_requirements

    reqs = onnx_requirements()
    assert reqs[0] == f"torch=={torch.__version__.split('+')[0]}"
    assert any(r.startswith("optimum-onnx") for r in reqs) and any("transformers" in r and "<4.58" in r for r in reqs)


@pytest.mark.slow
def test_onnx_export_of_smollm2_matches_transformers_5(default_model_path, tmp_path):
    """Real SmolLM2 (rope_theta 100000, which transformers 4.57 would misread from a v5 config)."""
    run = make_fake_run(default_model_path, tmp_path / "run", r0=8, target_modules=("q_proj", "v_proj"), b_std=0.02)
    out = tmp_path / "out"
    result = export_adapter(run, out, onnx=True)
    assert result.onnx_max_diff is not None and result.onnx_max_diff <= 1e-3
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "tokenizer.json").is_file()
    assert max_abs_diff(peft_logits(default_model_path, out), hf_logits(out / "merged")) <= 1e-4
    onnx_config = json.loads((out / "onnx" / "config.json").read_text())
    assert onnx_config["rope_theta"] == 100000.0


@pytest.mark.slow
def test_onnx_check_failure_leaves_nothing(fake_run, tmp_path, monkeypatch):
    """Shift the main environment's reference logits: the ONNX check must notice and write nothing.

    (PEFT verification sees the same shift on both sides, so it still passes.)
    """
    from prunedlora.export import verify

    real = verify.logits_of
    monkeypatch.setattr(verify, "logits_of", lambda model, ids: [x + 0.01 for x in real(model, ids)])
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="ONNX check failed"):
        export_adapter(fake_run(), out, onnx=True)
    assert not out.exists() and leftovers(tmp_path) == []
