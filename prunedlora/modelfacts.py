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
from dataclasses import dataclass
from pathlib import Path

from prunedlora.errors import PrunedLoraError

# Which projections a model has, how vLLM packs them and in what order they run is a fact of its
# family, read from its config.json and weights by ``model_facts`` (see ``FAMILIES`` below), never
# assumed. PEFT's keyword for "every linear layer of the decoder" is the recipes' default target.
ALL_LINEAR = "all-linear"

# PEFT's adapter files: the config and the weights that can be read without unpickling.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT names a LoRA tensor ``base_model.model.<module path>.lora_A.weight`` (and lora_B).
PEFT_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


class BaseModelError(PrunedLoraError):
    """A base model folder whose weights cannot be read for their shapes."""


class UnsupportedModelError(BaseModelError):
    """A model folder whose family (config.json ``model_type`` / ``architectures``) is not one this
    project knows the layers of."""


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


# -- model families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What this project knows of a decoder family: how config.json names it, the LoRA-targetable
    linear modules of one decoder layer in the order they run, and which of them vLLM packs into one
    layer (``qkv_proj`` of q/k/v, ``gate_up_proj`` of gate/up; a family whose weights are already
    fused packs one module into itself)."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    projections: tuple[str, ...]
    packed: tuple[tuple[str, tuple[str, ...]], ...]
    notes: str = ""

    def packed_layer(self, projection: str) -> str:
        """The vLLM layer that holds ``projection`` (itself when vLLM does not pack it)."""
        return next((layer for layer, members in self.packed if projection in members), projection)


_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA_PACKED = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))

FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), ("LlamaForCausalLM",), _LLAMA_PROJECTIONS, _LLAMA_PACKED, "SmolLM2, Llama 2/3"),
    Family("Mistral", ("mistral",), ("MistralForCausalLM",), _LLAMA_PROJECTIONS, _LLAMA_PACKED),
    Family("Qwen2", ("qwen2",), ("Qwen2ForCausalLM",), _LLAMA_PROJECTIONS, _LLAMA_PACKED, "biases on q/k/v"),
    Family("Qwen3", ("qwen3",), ("Qwen3ForCausalLM",), _LLAMA_PROJECTIONS, _LLAMA_PACKED, "per-head q/k norms"),
    Family(
        "Gemma 3",
        ("gemma3_text",),
        ("Gemma3ForCausalLM",),
        _LLAMA_PROJECTIONS,
        _LLAMA_PACKED,
        "text-only checkpoints (Gemma-3-270M, 1B); head_dim apart from hidden/heads",
    ),
    Family(
        "Phi-3",
        ("phi3",),
        ("Phi3ForCausalLM",),
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        (("qkv_proj", ("qkv_proj",)), ("gate_up_proj", ("gate_up_proj",))),
        "q/k/v and gate/up fused in the weights",
    ),
)


def _projection_order() -> tuple[str, ...]:
    """Every family's projections merged into one order (each after its predecessor in its family):
    the column order of rank tables and heatmaps, which see module names but no model."""
    order: list[str] = []
    for family in FAMILIES:
        previous = None
        for name in family.projections:
            if name not in order:
                order.insert(order.index(previous) + 1 if previous is not None else 0, name)
            previous = name
    return tuple(order)


PROJECTION_ORDER: tuple[str, ...] = _projection_order()


def module_sort_key(column: str) -> tuple[int, str]:
    """Sorts module types (``q_proj`` or its short label ``q``) in the order they run in a decoder layer
    of the known families; unknown types after them, alphabetically."""
    shorts = [p.removesuffix("_proj") for p in PROJECTION_ORDER]
    for names in (PROJECTION_ORDER, shorts):
        if column in names:
            return names.index(column), column
    return len(PROJECTION_ORDER), column


def family_names() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_of(config: dict, where: str | os.PathLike | None = None) -> Family:
    """The family of a config.json's contents; UnsupportedModelError naming the family (and the folder
    ``where`` it came from) otherwise."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    archs = config.get("architectures") if isinstance(config, dict) else None
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    for family in FAMILIES:
        if model_type in family.model_types or any(a in family.architectures for a in archs):
            return family
    shown = f"{model_type!r}" if model_type else "with no model_type"
    arch = f" ({', '.join(archs)})" if archs else ""
    hint = ""
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        hint = "; for a multimodal checkpoint, save its text model (e.g. Gemma3ForCausalLM) as its own folder"
    raise UnsupportedModelError(
        (f"{where}: " if where is not None else "")
        + f"model family {shown}{arch} is not supported: prunedlora knows the layers of {family_names()}{hint}"
    )


@dataclass(frozen=True)
class LinearModule:
    """One targetable linear module of a decoder layer: its name (``q_proj``), its path inside the layer
    (``self_attn.q_proj``), (out_features, in_features) and whether it has a bias."""

    name: str
    path: str
    out_features: int
    in_features: int
    bias: bool


@dataclass(frozen=True)
class ModelFacts:
    """A model's decoder layers as its config and weights say: family, architecture, layer count, the
    path prefix of the layers (``model.layers``) and layer 0's targetable modules in the order they run."""

    family: Family
    architecture: str
    num_layers: int
    layer_prefix: str
    modules: tuple[LinearModule, ...]

    @property
    def projections(self) -> tuple[str, ...]:
        """The targetable module names of a decoder layer, in order (PEFT's ``all-linear`` for this model)."""
        return tuple(m.name for m in self.modules)

    def module_paths(self) -> list[str]:
        """Every targetable module's full path, layer by layer, each layer in running order."""
        return [f"{self.layer_prefix}.{i}.{m.path}" for i in range(self.num_layers) for m in self.modules]

    def packed_layers(self) -> dict[str, tuple[str, ...]]:
        """vLLM's layer -> the projections it packs, as far as this model has them."""
        found: dict[str, tuple[str, ...]] = {}
        for name in self.projections:
            found.setdefault(self.family.packed_layer(name), ())
            found[self.family.packed_layer(name)] += (name,)
        return found


_LAYER_WEIGHT = re.compile(r"^(?P<prefix>.+?\.layers)\.(?P<index>\d+)\.(?P<path>.+)\.weight$")


def read_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a Hugging Face folder as a dict; BaseModelError when missing or not JSON."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaseModelError(f"{model_dir} has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as err:
        raise BaseModelError(f"{path} is unreadable: {err}") from None
    if not isinstance(config, dict):
        raise BaseModelError(f"{path} is not a JSON object")
    return config


def model_facts(model_dir: str | os.PathLike) -> ModelFacts:
    """The decoder layers of a Hugging Face folder, read from config.json and the safetensors headers
    (no tensor data): UnsupportedModelError for a family not in ``FAMILIES``, BaseModelError when the
    weights lack the family's projections."""
    config = read_config(model_dir)
    family = family_of(config, model_dir)
    shapes = base_weight_shapes(model_dir)
    layers: dict[str, set[int]] = {}
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _LAYER_WEIGHT.match(key)
        if match is None or len(shape) != 2:
            continue
        layers.setdefault(match["prefix"], set()).add(int(match["index"]))
        if match["index"] == "0":
            name = match["path"].rsplit(".", 1)[-1]
            if name in family.projections:
                found[name] = (f"{match['prefix']}.0.{match['path']}", shape)
    missing = [p for p in family.projections if p not in found]
    if not layers or missing:
        raise BaseModelError(
            f"{model_dir} is a {family.name} model but its weights have no decoder layer "
            + (f"with {', '.join(missing)}" if layers else "(no *.layers.N.*.weight)")
        )
    prefix = found[family.projections[0]][0].rsplit(".0.", 1)[0]
    modules = []
    for name in family.projections:
        full, shape = found[name]
        path = full[len(prefix) + len(".0.") :]
        modules.append(LinearModule(name, path, shape[0], shape[1], f"{full}.bias" in shapes))
    archs = config.get("architectures") or [family.architectures[0]]
    return ModelFacts(family, str(archs[0]), len(layers[prefix]), prefix, tuple(modules))


def resolve_targets(model_dir: str | os.PathLike, target_modules) -> list[str] | str:
    """``target_modules`` made concrete for one model: PEFT's ``all-linear`` becomes the projections the
    model's family has, in running order (UnsupportedModelError for a family not known); explicit names
    are returned unchanged (each stage checks them against the model with ``unmatched_targets``)."""
    if target_modules == ALL_LINEAR or (
        isinstance(target_modules, (list, tuple)) and list(target_modules) == [ALL_LINEAR]
    ):
        return list(model_facts(model_dir).projections)
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def check_servable(model_dir: str | os.PathLike) -> None:
    """Refuse, in one line, a model whose architecture the installed vLLM lacks (serving checks this
    before it starts anything); nothing is said when vLLM is not installed (serve says that itself)."""
    from prunedlora.vllm_compat import vllm_has_architecture

    config = read_config(model_dir)
    family = family_of(config, model_dir)
    architecture = str((config.get("architectures") or [family.architectures[0]])[0])
    if vllm_has_architecture(architecture) is False:
        import importlib.metadata

        try:
            version = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        raise UnsupportedModelError(
            f"{model_dir}: the installed vLLM ({version}) has no {architecture} ({family.name}): "
            "serve it with a vLLM release that has it"
        )
