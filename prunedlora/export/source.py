"""Reading what export compacts: a training run, a plain PEFT LoRA adapter, or a PEFT AdaLoRA adapter.

Everything is validated here, before a single output byte is written: a damaged file, masks that
describe another adapter or NaN weights all stop the export with one line that says what to fix.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunedlora import metadata
from prunedlora.export.compact import ModuleFactors, adalora_module, check_finite, compact_module, lora_scaling
from prunedlora.export.errors import ExportError
from prunedlora.modelfacts import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_PREFIX
from prunedlora.vllm_compat import pattern_value, unsupported_lora_features

# LoRA config fields export cannot compact into plain B @ A factors (on top of what vLLM refuses).
_UNCOMPACTABLE = (
    "fan_in_fan_out",
    "target_parameters",
    "trainable_token_indices",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "arrow_config",
)


@dataclass
class SourceModule:
    """One module of the input adapter, with everything needed to compute its compact factors."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    keep: torch.Tensor | None = None  # None: every component is alive
    E: torch.Tensor | None = None  # AdaLoRA only
    ranknum: float | None = None  # AdaLoRA only

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel() + (self.E.numel() if self.E is not None else 0)

    def compact(self) -> ModuleFactors | None:
        if self.E is not None:
            return adalora_module(self.name, self.A, self.E, self.B, self.keep, self.scaling, self.ranknum or 0.0)
        return compact_module(self.name, self.A, self.B, self.keep, self.scaling)


@dataclass
class SourceAdapter:
    """A validated input: its modules, its base model, and where PEFT loads it from as the reference."""

    kind: str  # "run", "lora" or "adalora"
    path: Path
    adapter_dir: Path
    base_model: str | None
    r0: int
    config: dict[str, Any]
    modules: dict[str, SourceModule]
    bytes: int
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())


def is_run_dir(path: Path) -> bool:
    return (path / metadata.RUN_RECORD_FILE).is_file() or (
        path / metadata.RUN_ADAPTER_DIR / ADAPTER_CONFIG_FILE
    ).is_file()


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing: {adapter_dir} is not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON ({err}); the adapter folder is damaged") from err
    if not isinstance(config, dict):
        raise ExportError(f"{path} does not hold a JSON object; the adapter folder is damaged")
    return config


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, with a clear error for a missing, truncated or non-finite file."""
    from safetensors.torch import load_file

    path = adapter_dir / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        other = [p.name for p in adapter_dir.glob("adapter_model.*")]
        hint = f" (found {other}; re-save it with safetensors)" if other else ""
        raise ExportError(f"{path} is missing{hint}")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ExportError(f"{path} is not a readable safetensors file (truncated or damaged: {err})") from err
    for name, tensor in tensors.items():
        check_finite(f"{path}: {name}", tensor)
    return tensors


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_E)(?:\.weight)?$")


def _split_tensors(
    tensors: dict[str, torch.Tensor], path: Path, parts: tuple[str, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if not key.startswith(PEFT_PREFIX) or match is None or match["part"] not in parts:
            raise ExportError(
                f"{path}: tensor {key} is not a {'/'.join(parts)} matrix of a linear layer; export handles plain "
                "LoRA on linear layers only (no embedding LoRA, DoRA magnitudes or saved modules)"
            )
        modules.setdefault(match["module"][len(PEFT_PREFIX) :], {})[match["part"]] = tensor
    for module, parts_found in modules.items():
        missing = [p for p in parts if p not in parts_found]
        if missing:
            raise ExportError(f"{path}: module {module} lacks {missing}; the adapter file is incomplete")
    if not modules:
        raise ExportError(f"{path} holds no LoRA tensors")
    return modules


def _match_pattern(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's per-module value of rank_pattern/alpha_pattern (the same rule vLLM uses), else ``default``."""
    value = pattern_value(pattern, name)
    return default if value is None else value


def _check_lora_config(config: dict[str, Any], path: Path) -> None:
    problems = unsupported_lora_features(config)
    problems += [name for name in _UNCOMPACTABLE if config.get(name)]
    if problems:
        raise ExportError(
            f"{path}: cannot export an adapter that uses {', '.join(problems)}; only plain LoRA is supported"
        )


def _lora_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> dict[str, SourceModule]:
    """Plain LoRA modules with PEFT's per-module rank and scaling (rank_pattern/alpha_pattern aware)."""
    modules = {}
    use_rslora = bool(config.get("use_rslora", False))
    for name, parts in sorted(_split_tensors(tensors, path, ("lora_A", "lora_B")).items()):
        rank = int(_match_pattern(config.get("rank_pattern"), name, config["r"]))
        alpha = float(_match_pattern(config.get("alpha_pattern"), name, config["lora_alpha"]))
        A, B = parts["lora_A"], parts["lora_B"]
        if A.shape[0] != rank:
            raise ExportError(
                f"{path}: module {name} has rank {A.shape[0]} in its tensors but {rank} in adapter_config.json; "
                "the config and the weights belong to different adapters"
            )
        modules[name] = SourceModule(name=name, A=A, B=B, scaling=lora_scaling(rank, alpha, use_rslora))
    return modules


def _adalora_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> dict[str, SourceModule]:
    """AdaLoRA triplets; PEFT's saved rank_pattern maps ``<module>.lora_E`` to one bool per triplet.

    PEFT saves the tensors already cut to the kept triplets (then the pattern only tells the count)
    or, before the final budget, at full size (then the pattern selects).
    """
    init_r = int(config.get("init_r", config.get("r", 0)))
    alpha = float(config.get("lora_alpha", 0))
    scaling = alpha if alpha > 0 else float(init_r)
    pattern = {}
    for key, value in (config.get("rank_pattern") or {}).items():
        module = re.sub(r"\.lora_E(\.[^.]+)?$", "", key)
        pattern[module] = torch.tensor(value, dtype=torch.bool).reshape(-1)
    modules = {}
    for name, parts in sorted(_split_tensors(tensors, path, ("lora_A", "lora_B", "lora_E")).items()):
        A, B, E = parts["lora_A"], parts["lora_B"], parts["lora_E"]
        keep = pattern.get(name)
        if keep is not None:
            if int(keep.sum()) == A.shape[0] and keep.numel() != A.shape[0]:
                keep = None  # already cut to the kept triplets
            elif keep.numel() != A.shape[0]:
                raise ExportError(
                    f"{path}: module {name} has {A.shape[0]} triplets but its rank_pattern has {keep.numel()} "
                    f"entries ({int(keep.sum())} kept); the config and the weights belong to different adapters"
                )
        modules[name] = SourceModule(name=name, A=A, B=B, E=E, keep=keep, scaling=scaling, ranknum=float(init_r))
    return modules


def _apply_masks(modules: dict[str, SourceModule], masks: dict[str, torch.Tensor], masks_path: Path) -> None:
    missing = sorted(set(modules) - set(masks))
    extra = sorted(set(masks) - set(modules))
    if missing or extra:
        raise ExportError(
            f"{masks_path} does not match the adapter: {len(missing)} adapter module(s) have no mask "
            f"(e.g. {missing[:3]}) and {len(extra)} mask(s) name no adapter module (e.g. {extra[:3]}); "
            "use the masks saved by the same run"
        )
    for name, module in modules.items():
        mask = masks[name]
        if mask.numel() != module.rank:
            raise ExportError(
                f"{masks_path} does not match the adapter: module {name} has rank {module.rank} but its mask "
                f"has {mask.numel()} entries; use the masks saved by the same run"
            )
        module.keep = mask


def _refuse_loraprune_run(path: Path) -> None:
    """A LoRAPrune run's adapter fits only its pruned base: compacting it alone onto the dense base
    would serve a model training never ran, so send the user to ``prunedlora prune-export``."""
    if (path / metadata.LORAPRUNE_STATE_FILE).is_file():
        raise ExportError(
            f"{path} is a LoRAPrune run ({metadata.LORAPRUNE_STATE_FILE}): its adapter belongs to the pruned base; "
            f"use `prunedlora prune-export {path} OUT` to write the pruned base with its adapter"
        )


def refuse_dense_base_for_salr(source: SourceAdapter, base_path: Path) -> None:
    """A SALR run's adapter repairs a sparse base (its first components are that base's pruning
    residual): over the dense model it was pruned from it would add the residual a second time and
    serve a model training never ran. Its own base is the run's recorded one (``sparsify``'s base/)."""
    salr = (source.training.get("training") or {}).get("salr_source") or {}
    dense = salr.get("source_model")
    if dense and Path(dense).resolve() == Path(base_path).resolve():
        raise ExportError(
            f"{source.path} is a SALR run: its adapter belongs to the sparse base {salr.get('base')}, not to the "
            f"dense model {dense} it was pruned from; drop --base-model (or pass that sparse base)"
        )


def load_source(path: str | os.PathLike, *, from_adalora: bool = False) -> SourceAdapter:
    """Read and validate a run directory or a PEFT adapter folder (LoRA, or AdaLoRA with ``from_adalora``)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    run_record = None
    masks = None
    if is_run_dir(path):
        _refuse_loraprune_run(path)
        kind = "run"
        adapter_dir = path / metadata.RUN_ADAPTER_DIR
        try:
            run_record = metadata.read_run_record(path)
            masks = metadata.load_masks(path / metadata.MASKS_FILE)
        except metadata.MetadataError as err:
            raise ExportError(f"incomplete or damaged run directory: {err}") from err
    elif (path / ADAPTER_CONFIG_FILE).is_file():
        adapter_dir = path
        kind = "lora"
    else:
        raise ExportError(
            f"{path} is neither a training run (with {metadata.RUN_RECORD_FILE} and {metadata.RUN_ADAPTER_DIR}/) "
            f"nor a PEFT adapter folder (with {ADAPTER_CONFIG_FILE})"
        )
    config = _read_config(adapter_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "ADALORA":
        if not from_adalora:
            raise ExportError(f"{adapter_dir} is an AdaLoRA adapter; pass --from-adalora to convert it to plain LoRA")
        kind = "adalora" if kind == "lora" else kind
    elif peft_type != "LORA":
        raise ExportError(f"{adapter_dir} is a {peft_type or 'unknown'} adapter; export handles LoRA and AdaLoRA only")
    elif from_adalora:
        raise ExportError(f"{adapter_dir} is a plain LoRA adapter, not AdaLoRA; drop --from-adalora")
    tensors = read_adapter_tensors(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS_FILE
    if peft_type == "ADALORA":
        check = {k: v for k, v in config.items() if k not in ("peft_type",)}
        _check_lora_config({**check, "peft_type": "LORA"}, adapter_dir / ADAPTER_CONFIG_FILE)
        modules = _adalora_modules(config, tensors, weights)
        r0 = int(config.get("init_r", 0))
    else:
        _check_lora_config(config, adapter_dir / ADAPTER_CONFIG_FILE)
        if "r" not in config or "lora_alpha" not in config:
            raise ExportError(f"{adapter_dir / ADAPTER_CONFIG_FILE} lacks r or lora_alpha")
        modules = _lora_modules(config, tensors, weights)
        r0 = max(m.rank for m in modules.values())
    training: dict[str, Any] = {}
    base_model = config.get("base_model_name_or_path")
    if run_record is not None:
        _apply_masks(modules, masks, path / metadata.MASKS_FILE)
        if run_record.r0 != r0 or any(m.rank != run_record.r0 for m in modules.values()):
            raise ExportError(
                f"{path / metadata.RUN_RECORD_FILE} says r0={run_record.r0} but the adapter has ranks "
                f"{sorted({m.rank for m in modules.values()})}; the run directory mixes two runs"
            )
        kept = {name: int(m.keep.sum()) for name, m in modules.items()}
        if set(run_record.ranks) == set(kept) and run_record.ranks != kept:
            wrong = [n for n in kept if kept[n] != run_record.ranks[n]]
            raise ExportError(
                f"{path / metadata.MASKS_FILE} does not match the run record: ranks differ for {wrong[:3]}; "
                "the masks come from another checkpoint"
            )
        base_model = run_record.base_model or base_model
        training = {
            "method": run_record.method,
            "training": run_record.training,
            "global_step": run_record.global_step,
            "lora_alpha": run_record.lora_alpha,
            "use_rslora": run_record.use_rslora,
            "target_modules": run_record.target_modules,
        }
    return SourceAdapter(
        kind=kind,
        path=path,
        adapter_dir=adapter_dir,
        base_model=base_model,
        r0=r0,
        config=config,
        modules=modules,
        bytes=weights.stat().st_size,
        training=training,
    )
