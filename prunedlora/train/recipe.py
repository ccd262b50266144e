"""Training recipes: one YAML file -> one TrainRecipe, with ``--key value`` overrides.

The shipped recipes are package data (``prunedlora/recipes/*.yaml``, read with importlib.resources),
so an installed wheel has them too: ``prunedlora train --config smollm2-sst2`` names one by its name.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prunedlora.errors import PrunedLoraError
from prunedlora.fieldtypes import check_field_types
from prunedlora.method import METHODS, Method
from prunedlora.rank.config import ConfigError, PrunedLoraConfig
from prunedlora.tasks import TASKS, DataConfig


@dataclass
class TrainingOptions:
    """The subset of transformers.TrainingArguments a recipe sets (steps are optimizer steps)."""

    output_dir: str = "runs/default"
    max_steps: int | None = None  # None: from epochs (one epoch when neither is given)
    epochs: float | None = None
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
    # dev loss every N steps when a dev split exists; None: five times a run on your own data (off for the
    # built-in tasks, whose quality the demo and `bench quality` score after training); 0: off
    eval_steps: int | None = None
    eval_examples: int = 100  # dev examples the dev loss is taken over (the first N of the dev split)

    def steps_for(self, train_examples: int) -> int:
        """Optimizer steps of the run: ``max_steps``, else ``epochs`` (default 1) over ``train_examples``."""
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        return max(1, math.ceil((self.epochs or 1.0) * train_examples / per_step))

    def __post_init__(self) -> None:
        # Checked here, not when transformers builds TrainingArguments: that happens after the model
        # is loaded, and its errors are tracebacks.
        import torch
        from transformers.trainer_utils import SchedulerType

        check_field_types(self, ConfigError)
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError(
                f"give max_steps ({self.max_steps}) or epochs ({self.epochs}), not both: they say the same thing"
            )
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        for name, low in (
            ("max_steps", 1),
            ("eval_steps", 0),
            ("eval_examples", 1),
            ("per_device_train_batch_size", 1),
            ("gradient_accumulation_steps", 1),
            ("warmup_steps", 0),
            ("logging_steps", 1),
            ("save_steps", 1),
            ("seed", 0),
        ):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name, positive in (("learning_rate", True), ("weight_decay", False), ("max_grad_norm", False)):
            value = getattr(self, name)
            if value < 0 or (positive and value == 0):
                raise ConfigError(f"{name} must be {'positive' if positive else '>= 0'}, got {value}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(
                f"save_total_limit must be >= 1 or null (keep every checkpoint), got {self.save_total_limit}"
            )
        if self.seed >= 2**32:
            raise ConfigError(f"seed must be below 2**32 (numpy's limit), got {self.seed}")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty; name the run directory, e.g. runs/my-run")
        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ConfigError(
                f"lr_scheduler_type must be one of {', '.join(schedulers)}; got {self.lr_scheduler_type!r}"
            )
        if not (
            isinstance(getattr(torch, self.dtype, None), torch.dtype) and getattr(torch, self.dtype).is_floating_point
        ):
            raise ConfigError(
                f"dtype must name a torch floating-point type, e.g. float32 or bfloat16; got {self.dtype!r}"
            )


@dataclass
class TrainRecipe:
    """Model, data, method and training settings of one run.

    ``method`` describes the adapter (its LoRA at rank r0, and for PrunedLoRA how its rank is pruned);
    which method trains it is ``method_class()``: the recipe's ``method.name`` (``prunedlora``, ``lora``,
    ``loraprune``, ``salr``, or a registered one; ``prunedlora.method``), or in the older spelling
    ``prune: false`` (plain LoRA at r0) and a method's own section (``loraprune:``, ``salr:``).
    ``sections`` holds that section, parsed by its method.
    """

    model: str = "default"
    data: DataConfig = field(default_factory=lambda: DataConfig(task="sst2"))
    method: PrunedLoraConfig = field(default_factory=PrunedLoraConfig)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    prune: bool = True
    sections: dict[str, Any] = field(default_factory=dict)
    method_name: str | None = None  # the recipe's method.name; None: from prune and sections
    # the method section as written: pruning steps it leaves out are fractions of the run's length,
    # filled in once that length is known (``with_steps``)
    method_section: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def method_class(self) -> type[Method]:
        """The method that trains this recipe's adapter."""
        return METHODS.find(_method_name(self.method_name, self.prune, [s for s, v in self.sections.items() if v]))

    def with_steps(self, max_steps: int) -> TrainRecipe:
        """This recipe for a run of ``max_steps``: the training length set, and the method's pruning
        steps the recipe left out placed at fractions of it (``schedule_defaults``)."""
        from dataclasses import replace

        method = self.method
        if self.method_section is not None:
            method = _method_config(self.method_section, self.method_class().prunes_rank, max_steps, check_end=True)
        # the length as steps, the one spelling a run record needs (epochs said how to count them)
        return replace(self, method=method, training=replace(self.training, max_steps=max_steps, epochs=None))

    def to_dict(self) -> dict[str, Any]:
        sections = {s: None if self.sections.get(s) is None else self.sections[s].to_dict() for s in _section_owners()}
        return {
            "model": self.model,
            "prune": self.prune,
            **sections,
            "data": self.data.to_dict(),
            "method": {"name": self.method_class().name, **self.method.to_dict()},  # the tagged spelling
            "training": asdict(self.training),
        }


def _section_owners() -> dict[str, str]:
    """Recipe section -> the method whose options it holds (``loraprune`` -> loraprune, ``salr`` -> salr)."""
    return {cls.section: cls.name for cls in METHODS.classes() if cls.section}


def _method_name(tag: str | None, prune: bool, sections: list[str]) -> str:
    """The method a recipe names: ``method.name`` when given, else the older spelling's (a method's own
    section, else ``prune``: true is PrunedLoRA, false plain LoRA)."""
    if tag is not None:
        return tag
    if sections:
        return _section_owners()[sections[0]]
    return "prunedlora" if prune else "lora"


_SECTIONS = {"data": DataConfig, "method": PrunedLoraConfig, "training": TrainingOptions}
# Where pruning happens when a recipe does not say, as fractions of the run: start after a tenth
# (the adapter has moved off its initialisation), reach the target by two thirds (a third of the run
# trains the final ranks), eight events in between (the cubic ramp's shape, whatever the length).
PRUNE_START_FRACTION = 0.1
PRUNE_END_FRACTION = 2 / 3
PRUNE_EVENTS = 8
SCHEDULE_KEYS = ("prune_start_step", "prune_end_step", "prune_every")
# options that only mean something when the adapter's rank is pruned
PRUNING_ONLY = ("target_rank", "total_rank_budget", "min_rank", "max_rank", *SCHEDULE_KEYS)


def schedule_defaults(method: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """``method`` with the pruning steps it leaves out set from ``max_steps``; the ones it gives stay."""
    out = dict(method)
    start = out.setdefault("prune_start_step", int(max_steps * PRUNE_START_FRACTION))
    if isinstance(start, int) and not isinstance(start, bool):
        end = out.setdefault("prune_end_step", max(start, min(max_steps - 1, int(max_steps * PRUNE_END_FRACTION))))
        if isinstance(end, int) and not isinstance(end, bool):
            out.setdefault("prune_every", max(1, round((end - start) / PRUNE_EVENTS)))
    return out


def _method_config(
    section: dict[str, Any], prune: bool, max_steps: int | None, check_end: bool = False
) -> PrunedLoraConfig:
    """The method section as a PrunedLoraConfig for a run of ``max_steps`` (None: not known yet);
    ``check_end`` refuses a cubic schedule that does not end inside the run (the runner asks, before
    the model loads; tools that stretch a recipe's schedule load it first and check in their own words).

    A method that does not prune the adapter's rank (plain LoRA, ``prune: false``; LoRAPrune; SALR)
    trains at r0 and never prunes, so the pruning options do not constrain it: a recipe written for
    pruning trains plain LoRA at any r0 (``--method.r0 8``)."""
    values = dict(section)
    if not prune:
        r0 = values.get("r0", PrunedLoraConfig.r0)
        if isinstance(r0, int) and not isinstance(r0, bool) and r0 >= 1:
            for key in PRUNING_ONLY:
                values.pop(key, None)
            values.update(target_rank=float(r0), max_rank=r0, min_rank=min(1, r0))
        return PrunedLoraConfig.from_dict(values)
    if max_steps is not None:
        values = schedule_defaults(values, max_steps)
        config = PrunedLoraConfig.from_dict(values)
        if check_end and config.schedule == "cubic" and config.prune_end_step >= max_steps:
            raise ConfigError(
                f"prune_end_step ({config.prune_end_step}) must be before max_steps ({max_steps}) so that the run "
                "ends at the target rank; lower it, or leave it out to place it at two thirds of the run"
            )
        return config
    return PrunedLoraConfig.from_dict(values)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` as a number (YAML 1.1 wants ``1.0e-4``; the string it
    would give instead fails the type check of learning_rate, which no user would understand)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python value; a syntax error is a ConfigError naming ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{where} is not valid YAML{at}: {problem}; check the indentation and brackets there"
        ) from None


def _parse_value(text: str, key: str = "") -> Any:
    if not isinstance(text, str):
        return text
    return parse_yaml(text, f"the value of --{key} ({text!r})")


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
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or an empty section (``method:`` with nothing under it)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict) or depth > 0:
                raise ConfigError(
                    f"--{key} names nothing: {'.'.join(parts[: depth + 1])} holds no options; "
                    "use section.key, e.g. --training.max_steps 20 or --method.r0 16"
                )
        node[parts[-1]] = _parse_value(value, key)
    return raw


def recipe_from_dict(raw: dict[str, Any]) -> TrainRecipe:
    """A TrainRecipe from a recipe mapping; ``model`` and ``data.task`` are required, the rest has defaults.

    Every problem is a ConfigError (a PrunedLoraError) that names the section and key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping with model, data, method, training; got a {type(raw).__name__}")
    owners = _section_owners()
    unknown = sorted(map(str, set(raw) - {"model", "prune", *owners, *_SECTIONS}))
    if unknown:
        raise ConfigError(
            f"unknown recipe section(s) {unknown}; a recipe has model, prune, data, method, training "
            f"(and {' or '.join(owners)})"
        )
    if "model" not in raw:
        raise ConfigError(
            "the recipe names no model; add e.g. model: default (SmolLM2-135M-Instruct) or a model folder"
        )
    model, prune = raw["model"], raw.get("prune", True)
    model = str(model) if isinstance(model, Path) else model  # Python callers may pass a Path
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"model must be 'default' or a model folder, got {model!r}")
    if not isinstance(prune, bool):
        raise ConfigError(f"prune must be true or false, got {prune!r}; false trains plain LoRA at r0")
    if "data" not in raw:
        raise ConfigError(
            f"the recipe has no data section; add data: with path: (your data file) or task: (one of {', '.join(TASKS)})"
        )
    sections = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name)
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"{name} must be a mapping of option: value, got {type(values).__name__} {values!r}")
        try:
            if cls is PrunedLoraConfig:
                continue  # after training: its pruning steps may depend on the run's length
            known = {f.name for f in fields(cls)}
            bad = sorted(map(str, set(values) - known))
            if bad:
                raise ConfigError(f"unknown option(s) {bad}; known: {sorted(known)}")
            required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
            missing = [key for key in required if key not in values]
            if missing:
                raise ConfigError(f"{missing[0]} is missing; set {name}.{missing[0]}")
            sections[name] = cls(**values)
        except PrunedLoraError as err:
            raise ConfigError(f"{name}: {err}") from None
    method_section = dict(raw.get("method") or {})  # a mapping: checked with the other sections above
    method_cls, tag = _recipe_method(raw, method_section.pop("name", None))
    parsed = {}
    try:
        method_cls.check_recipe(raw)
        if method_cls.section is not None:
            parsed[method_cls.section] = method_cls.parse_section(raw.get(method_cls.section))
    except PrunedLoraError as err:
        raise ConfigError(str(err)) from None
    try:
        method = _method_config(method_section, method_cls.prunes_rank, sections["training"].max_steps)
    except PrunedLoraError as err:
        raise ConfigError(f"method: {err}") from None
    return TrainRecipe(
        model=model,
        prune=method_cls.prunes_rank,
        sections=parsed,
        method_name=tag,
        method=method,
        method_section=method_section,
        **sections,
    )


def _recipe_method(raw: dict[str, Any], tag: Any) -> tuple[type[Method], str | None]:
    """(the method class, the recipe's ``method.name`` or None) of a recipe, refused where its parts disagree."""
    owners = _section_owners()
    present = [s for s in owners if raw.get(s) is not None]
    if len(present) > 1:
        raise ConfigError(
            f"a recipe has a {present[-1]} or a {present[0]} section, not both: they prune the base differently"
        )
    if tag is None:
        return METHODS.find(_method_name(None, raw.get("prune", True), present)), None
    cls = METHODS.find(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ConfigError(f"method.name must be one of {', '.join(METHODS.names())}; got {tag!r}")
    if present and present[0] != cls.section:
        raise ConfigError(
            f"method.name {tag} has no {present[0]} section: drop it, or name method {owners[present[0]]}"
        )
    if "prune" in raw and raw["prune"] != cls.prunes_rank:
        raise ConfigError(
            f"prune: {str(raw['prune']).lower()} contradicts method.name {tag}: drop prune (the name says "
            "which method trains)"
        )
    return cls, tag


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
    try:
        text, label = read_recipe_text(path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; a recipe is YAML (see the shipped recipes)") from None
    raw = parse_yaml(text, label)
    if not isinstance(raw, dict):
        held = "nothing" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{label} must hold a mapping with model, data, method, training; it holds {held}")
    try:
        return recipe_from_dict(apply_overrides(raw, overrides or {}))
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None
