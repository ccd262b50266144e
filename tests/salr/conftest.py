"""Fixtures of the SALR tests: one sparsified tiny model shared by the module, and single weights of
the real default model (read from its safetensors one tensor at a time; skipped where its cache is
missing, so these tests never materialise it)."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_MODULES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight")


def real_model_dir() -> Path | None:
    from prunedlora.models import DEFAULT_MODEL_NAME, cache_dir

    folder = cache_dir() / "models" / DEFAULT_MODEL_NAME
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.fixture(scope="session")
def real_weights():
    """Two projections of SmolLM2-135M-Instruct (576x576 and 576x1536), as stored in the cache."""
    from safetensors import safe_open

    folder = real_model_dir()
    if folder is None:
        pytest.skip("the default model's cache folder is missing (run `prunedlora demo` or any real-model test once)")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in REAL_MODULES}


@pytest.fixture(scope="session")
def tiny_salr(tmp_path_factory, tiny_model_path):
    """The tiny model sparsified at 50% with residual rank 4 and task rank 4 (alpha 16)."""
    from prunedlora.salr import SparsifyConfig, sparsify

    out = tmp_path_factory.mktemp("salr") / "out"
    config = SparsifyConfig(sparsity=0.5, residual_rank=4, task_rank=4, lora_alpha=16.0)
    return sparsify(tiny_model_path, out, config)
