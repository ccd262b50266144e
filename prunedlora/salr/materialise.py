"""From a compressed store back to an ordinary Hugging Face folder that vLLM and PEFT load unchanged.

vLLM has no bitmap format, so the sparse base is served dense: the zeros are written out as zeros by
``save_pretrained`` of a model built from the plain config (no ``quantization_config`` or sparsity
entry), and the existing ``prunedlora export`` and ``serve`` take it like any base. vLLM then runs
dense GEMMs: the zeros save disk and download, not time; a speed-up needs a sparse kernel.

Optionally ``add`` dense deltas on the way out: with a frozen residual shared by several task
adapters, E_r can be merged into the base once (W = M*W0 + E_r) and each adapter carries only its
task rank.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from prunedlora.modelfacts import safetensors_files
from prunedlora.salr.errors import SalrError
from prunedlora.salr.storage import MANIFEST_FILE, load_store

# config.json keys that would make a loader treat the folder as quantized or sparse-packed
_LOADER_KEYS = ("quantization_config", "sparsity_config", "compression_config")


def is_weight_file(path: Path) -> bool:
    name = path.name
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".gguf", ".pt"))


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a model folder's config and tokenizer files (everything but weights, hidden files, ``skip``
    and files ``dst`` already has)."""
    for path in sorted(src.iterdir()):
        wanted = not path.name.startswith(".") and not is_weight_file(path) and path.name not in skip
        if path.is_file() and wanted and not (dst / path.name).exists():
            shutil.copy2(path, dst / path.name)


def read_model_tensors(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors (one file or an index of shards)."""
    from safetensors.torch import load_file

    root = Path(model_dir)
    files = safetensors_files(root)
    if files is None:
        raise SalrError(f"{root} has no safetensors weights (model.safetensors or its index)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(root / name)))
    return tensors


def plain_config(model_dir: Path):
    """The model's config without any quantization or sparsity entry."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    for key in _LOADER_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    return config


def build_model(config, tensors: dict[str, torch.Tensor]):
    """A fresh model from ``config`` holding exactly ``tensors`` (tied weights re-tied)."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(tensors.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SalrError(f"the stored tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model


def materialise(
    store_dir: str | os.PathLike, out_dir: str | os.PathLike, add: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the store's model densely to ``out_dir`` (the caller stages it), plus ``add`` if given."""
    store_dir, out_dir = Path(store_dir), Path(out_dir)
    tensors = load_store(store_dir)
    for name, delta in (add or {}).items():
        if name not in tensors or tensors[name].shape != delta.shape:
            raise SalrError(f"cannot add a delta of shape {tuple(delta.shape)} to {name}")
        tensors[name] = tensors[name] + delta.to(tensors[name].dtype)
    model = build_model(plain_config(store_dir), tensors)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    copy_side_files(store_dir, out_dir, skip=(MANIFEST_FILE,))
    return out_dir


def materialise_store(store_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``prunedlora materialise``: a compressed store to a dense Hugging Face folder, built beside
    ``out_dir`` and renamed into place; the store is checked whole before anything is written."""
    from prunedlora.salr.storage import check_store
    from prunedlora.staging import staged_directory

    store_dir, out_dir = Path(store_dir), Path(out_dir)
    if out_dir.resolve() == store_dir.resolve():
        raise SalrError(f"OUT_DIR {out_dir} is the store itself; choose another folder")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise SalrError(f"{out_dir} exists and is not an empty folder; pass --overwrite to replace it")
    check_store(store_dir)
    if not (store_dir / "config.json").is_file():
        raise SalrError(f"{store_dir} has no config.json; a store needs its model's config to be materialised")
    with staged_directory(out_dir) as stage:
        materialise(store_dir, stage)
    return out_dir
