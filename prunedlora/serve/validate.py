"""Check an adapter directory before vLLM sees it.

vLLM 0.32 validates an adapter inside its engine, and a bad one (a DoRA, an AdaLoRA, a truncated
safetensors file) leaves the engine dead for every later request. So every adapter is read here
first, without vLLM and without loading the base model's weights: the base model's shapes come from
its safetensors headers. The result is an :class:`AdapterInfo` that ``slots`` plans from, or one
:class:`AdapterValidationError` line that says what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from prunedlora.errors import PrunedLoraError
from prunedlora.metadata import AdapterRecord, MetadataError, read_adapter_record
from prunedlora.modelfacts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    PEFT_PREFIX,
    base_linear_shapes,
    safetensors_header,
    tensor_data_end,
    unmatched_targets,
)
from prunedlora.vllm_compat import (
    ALLOWED_MAX_LORA_RANKS,
    EMBEDDING_MODULE_NAMES,
    PICKLED_ADAPTER_FILES,
    REQUIRED_LORA_CONFIG_FIELDS,
    SUPPORTED_PEFT_TYPES,
    lora_rank_for_slot,
    pattern_value,
    unsupported_lora_features,
)


class AdapterValidationError(PrunedLoraError):
    """An adapter vLLM must not be given; the message names the adapter, the problem and the fix."""


@dataclass(frozen=True)
class ModuleLoRA:
    """One adapted module: B @ A has shape (out_features, in_features) and rank ``rank``."""

    rank: int
    in_features: int
    out_features: int
    scaling: float


@dataclass
class AdapterInfo:
    """A validated adapter: what vLLM will load, per module."""

    name: str
    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    modules: dict[str, ModuleLoRA]
    base_model_name_or_path: str | None = None
    record: AdapterRecord | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: module.rank for name, module in self.modules.items()}

    @property
    def max_rank(self) -> int:
        """The largest rank any module's tensors have."""
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def slot_rank(self) -> int:
        """The rank vLLM compares with max_lora_rank (config ``r`` and rank_pattern included)."""
        return max(lora_rank_for_slot(self.r, self.rank_pattern), self.max_rank)

    @property
    def widest_module(self) -> str:
        """The module that sets ``slot_rank`` (or ``r`` in adapter_config.json when the config does)."""
        if not self.modules or self.slot_rank > self.max_rank:
            return f"r={self.slot_rank} in {ADAPTER_CONFIG_FILE}"
        return max(self.modules, key=lambda n: self.modules[n].rank)

    @property
    def num_params(self) -> int:
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules.values())


def _fail(label: str, message: str) -> AdapterValidationError:
    return AdapterValidationError(f"adapter {label}: {message}")


# -- the adapter -----------------------------------------------------------------------------------


def _read_config(path: Path, label: str) -> dict:
    config_path = path / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise _fail(label, f"{config_path} is missing; an adapter directory is what PEFT's save_pretrained writes")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _fail(label, f"{config_path} is not valid JSON ({err}); re-save the adapter") from err
    if not isinstance(config, dict):
        raise _fail(label, f"{config_path} does not hold a JSON object; re-save the adapter")
    return config


def _check_config(config: dict, label: str) -> None:
    """Refuse what vLLM cannot serve, the common cases with their own fix first."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type == "ADALORA":
        raise _fail(
            label,
            "is an AdaLoRA adapter, which vLLM cannot load; convert it to a plain LoRA with "
            "`prunedlora export ADAPTER OUT_DIR --from-adalora`",
        )
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise _fail(
            label, f"is a {peft_type} adapter; vLLM serves only LoRA ({', '.join(sorted(SUPPORTED_PEFT_TYPES))})"
        )
    if config.get("use_dora"):
        raise _fail(
            label,
            "uses DoRA (use_dora: true), which vLLM does not support; retrain without DoRA (or merge it into "
            "the base model and serve that)",
        )
    if config.get("bias", "none") != "none":
        raise _fail(
            label,
            f"trains biases (bias: {config.get('bias')!r}), which vLLM does not apply; retrain with bias='none'",
        )
    if config.get("modules_to_save"):
        raise _fail(
            label,
            f"saves full modules (modules_to_save: {config.get('modules_to_save')}), which vLLM does not load "
            "for a causal LM; retrain without modules_to_save",
        )
    missing = [key for key in REQUIRED_LORA_CONFIG_FIELDS if key not in config]
    if missing:
        raise _fail(label, f"{ADAPTER_CONFIG_FILE} lacks {', '.join(missing)}; re-save the adapter with PEFT")
    problems = unsupported_lora_features(config)
    if problems:
        raise _fail(label, f"uses {', '.join(problems)}, which vLLM does not support; retrain it as a plain LoRA")
    r = config["r"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _fail(label, f"r must be a positive integer in {ADAPTER_CONFIG_FILE}, got {r!r}")
    for key, rank in (config.get("rank_pattern") or {}).items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise _fail(label, f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
    alpha = config["lora_alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise _fail(label, f"lora_alpha must be a positive number, got {alpha!r}")


def _check_weights_file(path: Path, label: str) -> Path:
    pickled = [name for name in PICKLED_ADAPTER_FILES if (path / name).exists()]
    if pickled:
        raise _fail(
            label,
            f"ships a pickled {pickled[0]}; loading a pickle runs code from whoever made the file, so only "
            f"{ADAPTER_WEIGHTS_FILE} is served. If you trust its source, convert it with `prunedlora export "
            f"ADAPTER OUT_DIR` (or PEFT's save_pretrained(safe_serialization=True)) and remove {pickled[0]}",
        )
    weights = path / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise _fail(label, f"{weights} is missing; save the adapter with PEFT's save_pretrained")
    try:
        length, header = safetensors_header(weights)
        expected = 8 + length + tensor_data_end(header)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise _fail(label, f"{weights} is damaged or truncated ({err}); copy or export it again") from err
    size = weights.stat().st_size
    if size < expected:
        raise _fail(
            label,
            f"{weights} is truncated: its header describes {expected} bytes but the file has {size}; copy or "
            "export it again",
        )
    return weights


def _parse_tensor_name(key: str, label: str) -> tuple[str, str]:
    """(module name, "A" or "B") for a PEFT LoRA tensor name; anything else is refused."""
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    if name.endswith(LORA_A_SUFFIX):
        return name[: -len(LORA_A_SUFFIX)], "A"
    if name.endswith(LORA_B_SUFFIX):
        return name[: -len(LORA_B_SUFFIX)], "B"
    if "lora_magnitude_vector" in name:
        raise _fail(label, f"holds DoRA magnitude vectors ({key}); vLLM does not support DoRA, retrain without it")
    if "lora_embedding_" in name or EMBEDDING_MODULE_NAMES.intersection(name.split(".")):
        raise _fail(
            label,
            f"adapts an embedding ({key}); `prunedlora serve` serves LoRA on linear layers only, retrain "
            "without embed_tokens/lm_head in target_modules",
        )
    raise _fail(
        label,
        f"holds tensor {key}, which is not a LoRA A/B weight (bias, modules_to_save or trainable tokens?); "
        "vLLM would not apply it, retrain as a plain LoRA",
    )


def validate_adapter(
    path: str | os.PathLike,
    base_model: str | os.PathLike,
    *,
    name: str | None = None,
    max_lora_rank: int | None = None,
    check_finite: bool = True,
) -> AdapterInfo:
    """Read an adapter directory and return what vLLM will load, or raise AdapterValidationError.

    Checks, in order: the directory and its config; a PEFT LoRA config vLLM supports; safetensors
    weights only (a pickled adapter_model.bin is refused), complete on disk; every tensor a LoRA A/B
    pair of a linear module that exists in ``base_model`` with matching shapes and the rank the config
    declares; ranks within ``max_lora_rank`` when a server's slot is given (and within vLLM's largest
    slot always); finite weights. ``name`` is only used in messages.
    """
    import torch
    from safetensors import safe_open

    adapter_dir = Path(path).expanduser()
    label = f"{name!r} ({adapter_dir})" if name else str(adapter_dir)
    if not adapter_dir.is_dir():
        raise _fail(label, "is not a directory; pass the folder PEFT's save_pretrained or `prunedlora export` wrote")
    config = _read_config(adapter_dir, label)
    _check_config(config, label)
    weights = _check_weights_file(adapter_dir, label)

    base_dir = Path(base_model).expanduser()
    base_shapes = base_linear_shapes(base_dir)
    _check_targets(config.get("target_modules"), base_shapes, base_dir, label)
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    r, lora_alpha, use_rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora"))

    try:
        handle = safe_open(str(weights), framework="pt")
    except Exception as err:  # safetensors raises several types for a damaged file
        raise _fail(label, f"{weights} is not a readable safetensors file ({err}); copy or export it again") from err
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    with handle:
        for key in handle.keys():
            module, side = _parse_tensor_name(key, label)
            pairs.setdefault(module, {})[side] = tuple(handle.get_slice(key).get_shape())
            if check_finite:
                try:
                    tensor = handle.get_tensor(key)
                except Exception as err:
                    raise _fail(label, f"tensor {key} cannot be read ({err}); copy or export it again") from err
                if not torch.is_floating_point(tensor):
                    raise _fail(label, f"tensor {key} has dtype {tensor.dtype}; LoRA weights must be floating point")
                if not bool(torch.isfinite(tensor).all()):
                    raise _fail(
                        label,
                        f"tensor {key} holds NaN or infinite values; the training diverged, fix it and export again",
                    )
    if not pairs:
        raise _fail(label, f"{weights} holds no LoRA tensors; the adapter is empty")

    modules: dict[str, ModuleLoRA] = {}
    for module in sorted(pairs):
        sides = pairs[module]
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise _fail(label, f"module {module} has no {missing} weight; the file is incomplete, export it again")
        short = module.rsplit(".", 1)[-1]
        if short in EMBEDDING_MODULE_NAMES:
            raise _fail(
                label,
                f"adapts {module}; `prunedlora serve` serves LoRA on the decoder's linear layers only, retrain "
                "without it in target_modules",
            )
        if module not in base_shapes:
            near = sorted(
                {n.rsplit(".", 1)[-1] for n in base_shapes if n.rsplit(".", 1)[-1] not in EMBEDDING_MODULE_NAMES}
            )
            raise _fail(
                label,
                f"targets {module}, which is not a linear layer of base model {base_dir} (its linear layers are "
                f"named {', '.join(near)}); serve it with the base model it was trained on",
            )
        (rank_a, in_a), (out_b, rank_b) = sides["A"], sides["B"]
        out_features, in_features = base_shapes[module]
        if (in_a, out_b) != (in_features, out_features) or rank_a != rank_b:
            raise _fail(
                label,
                f"module {module} has lora_A {list(sides['A'])} and lora_B {list(sides['B'])}, but the base "
                f"weight is {out_features}x{in_features} (lora_A must be [r, {in_features}], lora_B "
                f"[{out_features}, r]); this adapter belongs to another base model",
            )
        declared = pattern_value(rank_pattern, module)
        declared = r if declared is None else int(declared)
        if declared != rank_a:
            raise _fail(
                label,
                f"module {module} has rank {rank_a} in its tensors but {ADAPTER_CONFIG_FILE} declares rank "
                f"{declared} (r / rank_pattern); vLLM would scale it wrongly, export it again",
            )
        alpha = pattern_value(alpha_pattern, module)
        alpha = lora_alpha if alpha is None else float(alpha)
        scaling = alpha / (math.sqrt(declared) if use_rslora else declared)
        modules[module] = ModuleLoRA(rank=rank_a, in_features=in_features, out_features=out_features, scaling=scaling)

    record, notes = None, []
    try:
        record = read_adapter_record(adapter_dir)
    except MetadataError as err:
        notes.append(f"ignored an unreadable prunedlora_adapter.json ({err})")
    info = AdapterInfo(
        name=name or adapter_dir.name,
        path=adapter_dir.resolve(),
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        modules=modules,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        record=record,
        notes=notes,
    )
    largest = ALLOWED_MAX_LORA_RANKS[-1]
    slot = largest if max_lora_rank is None else max_lora_rank
    if info.slot_rank > slot:
        if max_lora_rank is None:
            fix = "prune it harder or cut it with `prunedlora export --svd-truncate --max-rank R`"
            where = f"vLLM's largest LoRA slot ({largest})"
        else:
            fix = (
                f"restart the server with --max-lora-rank {_slot_at_least(info.slot_rank)} or cut the adapter with "
                "`prunedlora export --svd-truncate --max-rank R`"
            )
            where = f"the server's max_lora_rank {max_lora_rank}"
        raise _fail(label, f"needs rank {info.slot_rank} ({info.widest_module}), above {where}; {fix}")
    return info


def _check_targets(target_modules, base_shapes: dict, base_dir: Path, label: str) -> None:
    """Refuse target_modules entries that match no module of the base (PEFT's rule: a list entry matches
    a module path equal to it or ending in ``.entry``, a string is a regex over whole paths): PEFT would
    refuse such an adapter while vLLM loads only the tensors, so the two would serve different models."""
    names = list(base_shapes)
    missing = unmatched_targets(target_modules, names)
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n in names if n.rsplit(".", 1)[-1] not in EMBEDDING_MODULE_NAMES})
        raise _fail(
            label,
            f"target_modules {missing} in {ADAPTER_CONFIG_FILE} match no module of base model {base_dir} (its linear "
            f"layers are named {', '.join(known)}); remove them or serve it with the base model it was trained on",
        )


def _slot_at_least(rank: int) -> str:
    for slot in ALLOWED_MAX_LORA_RANKS:
        if slot >= rank:
            return str(slot)
    return "(none is large enough)"


def validate_adapters(
    adapters: dict[str, str | os.PathLike],
    base_model: str | os.PathLike,
    *,
    max_lora_rank: int | None = None,
    check_finite: bool = True,
) -> dict[str, AdapterInfo]:
    """Validate several named adapters against one base; the first bad one raises."""
    return {
        name: validate_adapter(path, base_model, name=name, max_lora_rank=max_lora_rank, check_finite=check_finite)
        for name, path in adapters.items()
    }
