"""Training recipes: one YAML file -> one TrainRecipe, with ``--key value`` overrides.

The shipped recipes are package data (``prunedlora/recipes/*.yaml``, read with importlib.resources),
so an installed wheel has them too: ``prunedlora train --config smollm2-sst2`` names one by its name.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prunedlora.config import ConfigError, PrunedLoraConfig
from prunedlora.train.data import DataConfig


@dataclass
class TrainingOptions:
    """The subset of transformers.TrainingArguments a recipe sets (steps are optimizer steps)."""

    output_dir: str = "runs/default"
    max_steps: int = 80
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    save_steps: int = 20
    save_total_limit: int | None = 2
    seed: int = 0
    dtype: str = "float32"
    gradient_checkpointing: bool = False


@dataclass
class TrainRecipe:
    """Model, data, method and training settings of one run.

    ``prune: false`` trains plain LoRA at rank r0 with the same everything else (the baseline).
    """

    model: str = "default"
    data: DataConfig = field(default_factory=lambda: DataConfig(task="sst2"))
    method: PrunedLoraConfig = field(default_factory=PrunedLoraConfig)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    prune: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prune": self.prune,
            "data": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.data).items()},
            "method": self.method.to_dict(),
            "training": asdict(self.training),
        }


_SECTIONS = {"data": DataConfig, "method": PrunedLoraConfig, "training": TrainingOptions}


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if isinstance(text, str) else text


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"training.max_steps": "20"}`` -> raw["training"]["max_steps"] = 20 (YAML-typed)."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] not in _SECTIONS and len(parts) == 1 and parts[0] not in ("model", "prune"):
            # a bare key: find the one section that has it
            owners = [s for s, cls in _SECTIONS.items() if parts[0] in {f.name for f in fields(cls)}]
            if len(owners) != 1:
                raise ConfigError(
                    f"unknown option --{key}; use section.key, e.g. --training.max_steps 20 or --method.r0 16"
                )
            parts = [owners[0], parts[0]]
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(value)
    return raw


def recipe_from_dict(raw: dict[str, Any]) -> TrainRecipe:
    unknown = sorted(set(raw) - {"model", "prune", *_SECTIONS})
    if unknown:
        raise ConfigError(f"unknown recipe section(s) {unknown}; a recipe has model, prune, data, method, training")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = dict(raw.get(name) or {})
        if cls is PrunedLoraConfig:
            sections[name] = PrunedLoraConfig.from_dict(values)
            continue
        known = {f.name for f in fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise ConfigError(f"unknown {name} option(s) {bad}; known: {sorted(known)}")
        sections[name] = cls(**values)
    return TrainRecipe(model=str(raw.get("model", "default")), prune=bool(raw.get("prune", True)), **sections)


def packaged_recipes() -> dict[str, Any]:
    """Name (file name without ``.yaml``) -> the packaged recipe file (an importlib.resources Traversable)."""
    folder = resources.files("prunedlora").joinpath("recipes")
    return {p.name[: -len(".yaml")]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def read_recipe_text(spec: str | Path) -> tuple[str, str]:
    """(YAML text, label for messages) of a recipe file, or of a packaged recipe named ``NAME``,
    ``NAME.yaml`` or ``recipes/NAME.yaml`` (the README's paths, so they work outside a checkout too)."""
    path = Path(spec)
    if path.is_file():
        return path.read_text(), str(path)
    packaged = packaged_recipes()
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if name in packaged and (len(path.parts) == 1 or path.parent == Path("recipes")):
        return packaged[name].read_text(), f"packaged recipe {name}"
    raise ConfigError(
        f"recipe {spec} not found; give a YAML file or a shipped recipe's name: {', '.join(sorted(packaged))}"
    )


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """The recipe at ``path`` (a YAML file, or a shipped recipe's name) with ``overrides`` applied."""
    text, label = read_recipe_text(path)
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label} must hold a mapping with model, data, method, training")
    return recipe_from_dict(apply_overrides(raw, overrides or {}))
