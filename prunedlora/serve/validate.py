"""Check an adapter directory before vLLM sees it.

vLLM 0.32 validates an adapter inside its engine, and a bad one (a DoRA, an AdaLoRA, a truncated
safetensors file) leaves the engine dead for every later request. So every adapter is read here
first, without vLLM and without loading the base model's weights: the base model's shapes come from
its safetensors headers. The result is an :class:`AdapterInfo` that ``slots`` plans from, or one
:class:`AdapterValidationError` line that names every problem found (separated by '; ', as vLLM's
``PEFTHelper`` collects its errors) with how to fix each, so a user fixes them in one pass.
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


class _Problems:
    """Every problem found in one adapter, raised once as one line (as vLLM's PEFTHelper collects its
    errors): a user fixes them all in one pass instead of one per run.

    Why grouped: a problem of every module (DoRA vectors, NaN weights, the wrong rank) would otherwise
    repeat once per module; a message added again with another ``about`` names the first one and how
    many more there are.
    """

    ABOUT = "\x00"  # where ``about`` goes in a message added for many subjects

    def __init__(self, label: str):
        self.label = label
        self._found: dict[str, list[str]] = {}

    def add(self, message: str, about: str | None = None) -> None:
        """Record a problem; with ``about``, ``message`` holds ``_Problems.ABOUT`` where it is named."""
        self._found.setdefault(message, [])
        if about is not None:
            self._found[message].append(about)

    def __bool__(self) -> bool:
        return bool(self._found)

    def error(self) -> AdapterValidationError:
        parts = []
        for message, subjects in self._found.items():
            if subjects:
                more = f" (and {len(subjects) - 1} more)" if len(subjects) > 1 else ""
                message = message.replace(self.ABOUT, subjects[0] + more)
            parts.append(message)
        return AdapterValidationError(f"adapter {self.label}: {'; '.join(parts)}")

    def raise_if_any(self) -> None:
        if self:
            raise self.error()


_ABOUT = _Problems.ABOUT

# Config keys with a check of their own in _check_config, left out of vLLM's feature list so a
# problem is named once.
_CHECKED_ON_THEIR_OWN = ("peft_type", "use_dora", "bias", "modules_to_save")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _linear_layer_names(base_shapes: dict) -> str:
    """The base model's linear layers by short name, for messages that say what an adapter may target."""
    names = {n.rsplit(".", 1)[-1] for n in base_shapes}
    return ", ".join(sorted(names - EMBEDDING_MODULE_NAMES))


# -- the adapter -----------------------------------------------------------------------------------


def _read_config(path: Path, problems: _Problems) -> dict | None:
    """The adapter's config, or None with the problem recorded (the checks of the config then stop)."""
    config_path = path / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        problems.add(f"{config_path} is missing; an adapter directory is what PEFT's save_pretrained writes")
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.add(f"{config_path} is not valid JSON ({err}); re-save the adapter")
        return None
    if not isinstance(config, dict):
        problems.add(f"{config_path} does not hold a JSON object; re-save the adapter")
        return None
    return config


def _check_config(config: dict, problems: _Problems) -> bool:
    """Record what vLLM cannot serve, the common cases with their own fix first. False when the
    adapter is not a LoRA at all: checks of LoRA fields and tensors would then only add noise."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type == "ADALORA":
        problems.add(
            "is an AdaLoRA adapter, which vLLM cannot load; convert it to a plain LoRA with "
            "`prunedlora export ADAPTER OUT_DIR --from-adalora`"
        )
        return False
    if peft_type not in SUPPORTED_PEFT_TYPES:
        problems.add(f"is a {peft_type} adapter; vLLM serves only LoRA ({', '.join(sorted(SUPPORTED_PEFT_TYPES))})")
        return False
    if config.get("use_dora"):
        problems.add(
            "uses DoRA (use_dora: true), which vLLM does not support; retrain without DoRA (or merge it into "
            "the base model and serve that)"
        )
    if config.get("bias", "none") != "none":
        problems.add(
            f"trains biases (bias: {config.get('bias')!r}), which vLLM does not apply; retrain with bias='none'"
        )
    if config.get("modules_to_save"):
        problems.add(
            f"saves full modules (modules_to_save: {config.get('modules_to_save')}), which vLLM does not load "
            "for a causal LM; retrain without modules_to_save"
        )
    missing = [key for key in REQUIRED_LORA_CONFIG_FIELDS if key not in config]
    if missing:
        problems.add(f"{ADAPTER_CONFIG_FILE} lacks {', '.join(missing)}; re-save the adapter with PEFT")
    features = unsupported_lora_features({k: v for k, v in config.items() if k not in _CHECKED_ON_THEIR_OWN})
    if features:
        problems.add(f"uses {', '.join(features)}, which vLLM does not support; retrain it as a plain LoRA")
    if "r" in config and not _positive_int(config["r"]):
        problems.add(f"r must be a positive integer in {ADAPTER_CONFIG_FILE}, got {config['r']!r}")
    if "lora_alpha" in config and not _positive_number(config["lora_alpha"]):
        problems.add(f"lora_alpha must be a positive number, got {config['lora_alpha']!r}")
    for field_name, valid, kind in (
        ("rank_pattern", _positive_int, "a positive integer"),
        ("alpha_pattern", _positive_number, "a positive number"),
    ):
        pattern = config.get(field_name) or {}
        if not isinstance(pattern, dict):
            problems.add(f"{field_name} must be a JSON object of module -> value, got {pattern!r}")
            continue
        for key, value in pattern.items():
            if not valid(value):
                problems.add(f"{field_name}[{key!r}] must be {kind}, got {value!r}")
    return True


def _check_weights_file(path: Path, problems: _Problems) -> Path | None:
    """The safetensors weights file, or None when it is missing or damaged (its tensors cannot be read)."""
    pickled = [name for name in PICKLED_ADAPTER_FILES if (path / name).exists()]
    if pickled:
        problems.add(
            f"ships a pickled {pickled[0]}; loading a pickle runs code from whoever made the file, so only "
            f"{ADAPTER_WEIGHTS_FILE} is served. If you trust its source, convert it with `prunedlora export "
            f"ADAPTER OUT_DIR` (or PEFT's save_pretrained(safe_serialization=True)) and remove {pickled[0]}"
        )
    weights = path / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        if not pickled:
            problems.add(f"{weights} is missing; save the adapter with PEFT's save_pretrained")
        return None
    try:
        length, header = safetensors_header(weights)
        expected = 8 + length + tensor_data_end(header)
        size = weights.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        problems.add(f"{weights} is damaged or truncated ({err}); copy or export it again")
        return None
    if size < expected:
        problems.add(
            f"{weights} is truncated: its header describes {expected} bytes but the file has {size}; copy or "
            "export it again"
        )
        return None
    return weights


def _parse_tensor_name(key: str, problems: _Problems) -> tuple[str, str] | None:
    """(module name, "A" or "B") for a PEFT LoRA tensor name; anything else is recorded as a problem."""
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    if name.endswith(LORA_A_SUFFIX):
        return name[: -len(LORA_A_SUFFIX)], "A"
    if name.endswith(LORA_B_SUFFIX):
        return name[: -len(LORA_B_SUFFIX)], "B"
    if "lora_magnitude_vector" in name:
        problems.add(f"holds DoRA magnitude vectors ({_ABOUT}); vLLM does not support DoRA, retrain without it", key)
    elif "lora_embedding_" in name or EMBEDDING_MODULE_NAMES.intersection(name.split(".")):
        problems.add(
            f"adapts an embedding ({_ABOUT}); `prunedlora serve` serves LoRA on linear layers only, retrain "
            "without embed_tokens/lm_head in target_modules",
            key,
        )
    else:
        problems.add(
            f"holds tensor {_ABOUT}, which is not a LoRA A/B weight (bias, modules_to_save or trainable tokens?); "
            "vLLM would not apply it, retrain as a plain LoRA",
            key,
        )
    return None


def _read_tensor_shapes(weights: Path, problems: _Problems, check_finite: bool) -> dict[str, dict[str, tuple]]:
    """Module -> {"A": shape, "B": shape} for every LoRA tensor; unreadable, non-float and non-finite
    tensors and foreign names are recorded."""
    import torch
    from safetensors import safe_open

    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        handle = safe_open(str(weights), framework="pt")
    except Exception as err:  # safetensors raises several types for a damaged file
        problems.add(f"{weights} is not a readable safetensors file ({err}); copy or export it again")
        return pairs
    with handle:
        for key in handle.keys():
            parsed = _parse_tensor_name(key, problems)
            if parsed is not None:
                module, side = parsed
                pairs.setdefault(module, {})[side] = tuple(handle.get_slice(key).get_shape())
            if not check_finite:
                continue
            try:
                tensor = handle.get_tensor(key)
            except Exception as err:
                problems.add(f"tensor {_ABOUT} cannot be read ({err}); copy or export it again", key)
                continue
            if not torch.is_floating_point(tensor):
                problems.add(f"tensor {_ABOUT} has dtype {tensor.dtype}; LoRA weights must be floating point", key)
            elif not bool(torch.isfinite(tensor).all()):
                problems.add(
                    f"tensor {_ABOUT} holds NaN or infinite values; the training diverged, fix it and export again", key
                )
    if not pairs and not problems:
        problems.add(f"{weights} holds no LoRA tensors; the adapter is empty")
    return pairs


def _check_modules(
    pairs: dict[str, dict[str, tuple]], config: dict, base_shapes: dict, base_dir: Path, problems: _Problems
) -> dict[str, ModuleLoRA]:
    """The modules whose tensors fit the base model and the config; every one that does not is recorded."""
    r = config.get("r")
    rank_pattern = config.get("rank_pattern") or {}
    ranks_readable = (
        _positive_int(r) and isinstance(rank_pattern, dict) and all(map(_positive_int, rank_pattern.values()))
    )
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha_readable = (
        _positive_number(config.get("lora_alpha"))
        and isinstance(alpha_pattern, dict)
        and all(map(_positive_number, alpha_pattern.values()))
    )
    use_rslora = bool(config.get("use_rslora"))
    misfits: list[str] = []
    modules: dict[str, ModuleLoRA] = {}
    for module in sorted(pairs):
        sides = pairs[module]
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            problems.add(f"module {_ABOUT} has no {missing} weight; the file is incomplete, export it again", module)
            continue
        if module.rsplit(".", 1)[-1] in EMBEDDING_MODULE_NAMES:
            problems.add(
                f"adapts {_ABOUT}; `prunedlora serve` serves LoRA on the decoder's linear layers only, retrain "
                "without it in target_modules",
                module,
            )
            continue
        if module not in base_shapes:
            problems.add(
                f"targets {_ABOUT}, which is not a linear layer of base model {base_dir} (its linear layers are "
                f"named {_linear_layer_names(base_shapes)}); serve it with the base model it was trained on",
                module,
            )
            continue
        (rank_a, in_a), (out_b, rank_b) = sides["A"], sides["B"]
        out_features, in_features = base_shapes[module]
        if (in_a, out_b) != (in_features, out_features) or rank_a != rank_b:
            misfits.append(
                f"module {module} has lora_A {list(sides['A'])} and lora_B {list(sides['B'])}, but the base "
                f"weight is {out_features}x{in_features} (lora_A must be [r, {in_features}], lora_B "
                f"[{out_features}, r])"
            )
            continue
        if not (ranks_readable and alpha_readable):
            continue
        declared = pattern_value(rank_pattern, module)
        declared = r if declared is None else int(declared)
        if declared != rank_a:
            problems.add(
                f"module {_ABOUT} has rank {rank_a} in its tensors but {ADAPTER_CONFIG_FILE} declares rank "
                f"{declared} (r / rank_pattern); vLLM would scale it wrongly, export it again",
                module,
            )
            continue
        alpha = pattern_value(alpha_pattern, module)
        alpha = float(config["lora_alpha"] if alpha is None else alpha)
        scaling = alpha / (math.sqrt(declared) if use_rslora else declared)
        modules[module] = ModuleLoRA(rank=rank_a, in_features=in_features, out_features=out_features, scaling=scaling)
    if misfits:  # one adapter for another base misfits everywhere: the first says enough
        more = f" (and {len(misfits) - 1} more modules)" if len(misfits) > 1 else ""
        problems.add(f"{misfits[0]}{more}; this adapter belongs to another base model")
    return modules


def validate_adapter(
    path: str | os.PathLike,
    base_model: str | os.PathLike,
    *,
    name: str | None = None,
    max_lora_rank: int | None = None,
    check_finite: bool = True,
) -> AdapterInfo:
    """Read an adapter directory and return what vLLM will load, or raise one AdapterValidationError
    that names every problem found, separated by '; '.

    Checks: the directory and its config; a PEFT LoRA config vLLM supports; safetensors weights only
    (a pickled adapter_model.bin is refused), complete on disk; every tensor a LoRA A/B pair of a
    linear module that exists in ``base_model`` with matching shapes and the rank the config
    declares; ranks within ``max_lora_rank`` when a server's slot is given (and within vLLM's largest
    slot always); finite weights. It stops early only where later checks would be meaningless: no
    directory; a config that cannot be read or is not a LoRA (the weights file is still checked);
    weights that cannot be read. ``name`` is only used in messages.
    """
    adapter_dir = Path(path).expanduser()
    label = f"{name!r} ({adapter_dir})" if name else str(adapter_dir)
    problems = _Problems(label)
    if not adapter_dir.is_dir():
        problems.add("is not a directory; pass the folder PEFT's save_pretrained or `prunedlora export` wrote")
        raise problems.error()
    config = _read_config(adapter_dir, problems)
    is_lora = config is not None and _check_config(config, problems)
    weights = _check_weights_file(adapter_dir, problems)
    if not is_lora or weights is None:
        raise problems.error()

    base_dir = Path(base_model).expanduser()
    base_shapes = base_linear_shapes(base_dir)
    missing = unmatched_targets(config.get("target_modules"), list(base_shapes))
    if missing:
        _missing_targets(missing, base_shapes, base_dir, problems)
    pairs = _read_tensor_shapes(weights, problems, check_finite)
    modules = _check_modules(pairs, config, base_shapes, base_dir, problems)
    problems.raise_if_any()

    record, notes = None, []
    try:
        record = read_adapter_record(adapter_dir)
    except MetadataError as err:
        notes.append(f"ignored an unreadable prunedlora_adapter.json ({err})")
    info = AdapterInfo(
        name=name or adapter_dir.name,
        path=adapter_dir.resolve(),
        r=int(config["r"]),
        lora_alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora")),
        rank_pattern=dict(config.get("rank_pattern") or {}),
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
        problems.add(f"needs rank {info.slot_rank} ({info.widest_module}), above {where}; {fix}")
        raise problems.error()
    return info


def _missing_targets(missing: list[str], base_shapes: dict, base_dir: Path, problems: _Problems) -> None:
    """Record target_modules entries that match no module of the base (PEFT's rule: a list entry matches
    a module path equal to it or ending in ``.entry``, a string is a regex over whole paths): PEFT would
    refuse such an adapter while vLLM loads only the tensors, so the two would serve different models."""
    problems.add(
        f"target_modules {missing} in {ADAPTER_CONFIG_FILE} match no module of base model {base_dir} (its linear "
        f"layers are named {_linear_layer_names(base_shapes)}); remove them or serve it with the base model it was "
        "trained on"
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
    """Validate several named adapters against one base; every bad one is named in one error, its
    problems after its name, the adapters separated by '; ' like the problems."""
    infos, errors = {}, []
    for name, path in adapters.items():
        try:
            infos[name] = validate_adapter(
                path, base_model, name=name, max_lora_rank=max_lora_rank, check_finite=check_finite
            )
        except AdapterValidationError as err:
            errors.append(str(err))
    if errors:
        raise AdapterValidationError("; ".join(errors))
    return infos
