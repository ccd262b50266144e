"""Facts about a base model and its PEFT adapters that every stage shares, owned in one place.

Why: train, export, serve and bench all name the same projections, read the same PEFT files and
look at the same base weights. Keeping those facts here (rather than in whichever stage needed them
first) lets ``export`` and ``serve`` use them without importing ``train``, and a change happens once.
Nothing here imports PEFT or vLLM, nor torch at import time: the base model's shapes come from
safetensors headers, and torch is imported only to name a dtype.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from pathlib import Path

from prunedlora.errors import PrunedLoraError

# The linear projections of a Llama-style decoder layer (SmolLM2, Llama, Qwen, Mistral), in the
# order they run: the default LoRA targets, the modules vLLM wraps with LoRA layers (it packs q/k/v
# and gate/up, which changes no count) and the column order of every rank table and heatmap.
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The same order as short column labels (q_proj -> q).
MODULE_ORDER: tuple[str, ...] = tuple(name.removesuffix("_proj") for name in PROJECTIONS)

# PEFT's adapter files: the config and the weights that can be read without unpickling.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT names a LoRA tensor ``base_model.model.<module path>.lora_A.weight`` (and lora_B).
PEFT_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


class BaseModelError(PrunedLoraError):
    """A base model folder whose weights cannot be read for their shapes."""


def short_type(module_name: str) -> str:
    """The column label of a module: its last path part without ``_proj`` (``...q_proj`` -> ``q``)."""
    last = module_name.rsplit(".", 1)[-1]
    return last[: -len("_proj")] if last.endswith("_proj") and len(last) > len("_proj") else last


def safetensors_header(path: Path) -> tuple[int, dict]:
    """The header length and JSON header of a safetensors file (names, dtypes, shapes, offsets).

    Reads no tensor data, so checking a large base model costs a few kilobytes. Raises ValueError
    for a file too short or damaged to have a header.
    """
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100_000_000:
            raise ValueError(f"header length {length} is implausible")
        raw = handle.read(length)
    if len(raw) < length:
        raise ValueError(f"the header promises {length} bytes but the file ends after {len(raw)}")
    try:
        return length, json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"the header is not JSON ({err})") from err


def tensor_data_end(header: dict) -> int:
    """Where the last tensor's bytes end, counted from the end of the header."""
    return max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)


def base_weight_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every weight of a Hugging Face model folder with its shape, from the safetensors headers only.

    Cached per folder (and invalidated when its files change), because every adapter of a server is
    checked against the same base.
    """
    root = Path(model_dir).resolve()
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in root.glob("*.safetensors*")))
    return _base_shapes_cached(str(root), stamp)


def base_linear_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) for every 2-D ``.weight`` of the base model.

    PEFT names an adapter's modules by the base model's module paths, which are these names without
    ``.weight``.
    """
    return {
        name[: -len(".weight")]: (shape[0], shape[1])
        for name, shape in base_weight_shapes(model_dir).items()
        if name.endswith(".weight") and len(shape) == 2
    }


def unmatched_targets(target_modules, module_names) -> list[str]:
    """The ``target_modules`` entries PEFT would match to no module of ``module_names``.

    PEFT's rule: a string is a regex over whole module paths (``all-linear`` is a keyword); a list
    entry matches a path equal to it or ending in ``.entry``. Train, export and serve all check an
    adapter's targets with it, so an adapter one stage accepts is not refused by another.
    """
    names = list(module_names)
    if isinstance(target_modules, str):
        matched = target_modules == "all-linear" or any(re.fullmatch(target_modules, n) for n in names)
        return [] if matched else [target_modules]
    return [t for t in target_modules or [] if not any(n == t or n.endswith("." + t) for n in names)]


def saved_dtype(model):
    """The floating dtype a model's weights are saved in, as its config declares it (``dtype``, or
    ``torch_dtype`` in older configs); float32 when it declares none usable.

    ``model`` is a Hugging Face folder, a loaded config or a config dict. Export's merged model and
    LoRAPrune's sliced base are written back in this dtype, so a bfloat16 base stays bfloat16.
    """
    import torch

    if isinstance(model, (str, os.PathLike)):
        try:
            config = json.loads((Path(model) / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        named = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    elif isinstance(model, dict):
        named = model.get("dtype") or model.get("torch_dtype")
    else:
        named = getattr(model, "dtype", None) or getattr(model, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


def safetensors_files(model_dir: str | Path) -> list[str] | None:
    """The safetensors files of a Hugging Face folder (its index's shards, or ``model.safetensors``),
    None when it has neither."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (root / "model.safetensors").is_file():
        return ["model.safetensors"]
    return None


@functools.lru_cache(maxsize=8)
def _base_shapes_cached(model_dir: str, stamp: tuple) -> dict[str, tuple[int, ...]]:
    root = Path(model_dir)
    files = safetensors_files(root)
    if files is None:
        raise BaseModelError(
            f"base model {root} has no safetensors weights (model.safetensors or its index); vLLM and "
            "this check read safetensors: re-save the model with save_pretrained(safe_serialization=True)"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        try:
            _, header = safetensors_header(root / name)
        except (OSError, ValueError) as err:
            raise BaseModelError(f"base model file {root / name} is unreadable: {err}") from err
        for key, info in header.items():
            if key != "__metadata__":
                shapes[key] = tuple(info["shape"])
    return shapes
