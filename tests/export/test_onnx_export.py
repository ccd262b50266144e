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
    assert result.onnx_max_diff is not None  # the check ran; onnxruntime is run by the test further down
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


# Run in the ONNX environment by the test below: onnxruntime on a model.onnx, nothing of the project's.
_ORT_SCRIPT = r"""
import sys
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
ids = np.load(sys.argv[2]).astype(np.int64)
batch, length = ids.shape
feeds = {}
for arg in session.get_inputs():
    if arg.name == "input_ids":
        feeds[arg.name] = ids
    elif arg.name == "attention_mask":
        feeds[arg.name] = np.ones_like(ids)
    elif arg.name == "position_ids":
        feeds[arg.name] = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    elif arg.name.startswith("past_key_values"):  # an empty cache: (batch, kv heads, 0, head dim)
        dims = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(arg.shape)]
        feeds[arg.name] = np.zeros(dims, dtype=np.float32)
    else:
        sys.exit(f"unexpected ONNX input {arg.name}")
logits = session.run(["logits"], feeds)[0]
np.save(sys.argv[3], logits.astype(np.float32))
"""

_PERTURB_SCRIPT = r"""
import sys
import numpy as np
import onnx
from onnx import numpy_helper

model = onnx.load(sys.argv[1])
vocab = int(sys.argv[3])
for init in model.graph.initializer:
    array = numpy_helper.to_array(init)
    if array.dtype == np.float32 and array.ndim == 2 and vocab not in array.shape:
        init.CopyFrom(numpy_helper.from_array(array * 2.0, init.name))  # one weight matrix, doubled
        print(init.name)
        break
else:
    sys.exit("no weight matrix found")
onnx.save(model, sys.argv[2])
"""


def _onnxruntime_logits(python, model_file, ids, work):
    """onnxruntime's logits for ``ids``, computed by the test in the ONNX environment."""
    import subprocess

    import numpy as np
    import torch

    script = work / "ort_logits.py"
    script.write_text(_ORT_SCRIPT)
    np.save(work / "ids.npy", ids.numpy())
    subprocess.run(
        [str(python), "-I", str(script), str(model_file), str(work / "ids.npy"), str(work / "logits.npy")],
        check=True,
        capture_output=True,
        text=True,
    )
    return torch.from_numpy(np.load(work / "logits.npy")).double()


@pytest.mark.slow
def test_onnxruntime_run_by_the_test_matches_peft_and_rejects_a_perturbed_file(fake_run, tiny_model_path, tmp_path):
    """The exporter reports its own ONNX difference; here the test runs the written model.onnx through
    onnxruntime itself (a plain InferenceSession, not the exporter's worker) and compares with the
    exported adapter loaded by PEFT on the base model (not the merged folder the exporter checked).

    Break, kept as the second half: the same file with one weight matrix doubled must fail the same
    comparison (seen: scaled by 1.1 it already moves the logits by 1.7e-3), so the comparison can fail.
    """
    import subprocess

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prunedlora.export.onnx_export import ONNX_TOLERANCE, ensure_onnx_env

    out = tmp_path / "out"
    export_adapter(fake_run(r0=8, target_modules=("q_proj", "v_proj", "down_proj")), out, onnx=True)
    python = ensure_onnx_env(progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits.double()
    (tmp_path / "w1").mkdir()
    got = _onnxruntime_logits(python, out / "onnx" / "model.onnx", ids, tmp_path / "w1")
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= ONNX_TOLERANCE

    perturbed = tmp_path / "perturbed.onnx"
    script = tmp_path / "perturb.py"
    script.write_text(_PERTURB_SCRIPT)
    subprocess.run(
        [str(python), "-I", str(script), str(out / "onnx" / "model.onnx"), str(perturbed), str(base.config.vocab_size)],
        check=True,
        capture_output=True,
        text=True,
    )
    (tmp_path / "w2").mkdir()
    bad = _onnxruntime_logits(python, perturbed, ids, tmp_path / "w2")
    assert float((bad - expected).abs().max()) > ONNX_TOLERANCE
