"""``prunedlora bench quality``: is a pruned adapter as good as the plain LoRA a user would train?

For each task (GSM8K, CodeAlpaca, SST-2) every method trains from the task's protocol recipe
(``bench/protocol_recipes/smollm2-<task>.yaml``: a frozen copy of the shipped recipe, so that improving
the shipped recipes does not orphan the committed cells) with the same base model, data, data order,
steps, learning rate and seed, and is scored on the task's held-out split (``scoring``):

==========================  ===================================================================
``base``                    the base model without an adapter (no training): the reference
``lora-target``             plain LoRA at the target rank (prune: false, r0 = target)
``lora-r0``                 plain LoRA at r0 (prune: false)
``pruned-obs-paper-global`` PrunedLoRA r0 -> target, obs-paper criterion (the paper's score), global allocation
``pruned-obs-paper-uniform`` the same with uniform allocation (every module ends at the target)
``pruned-obs-fisher-global`` obs-fisher criterion (classic OBS, Fisher accumulated between events)
``pruned-obs-fisher-uniform`` the same with uniform allocation
``pruned-obs-input-global`` obs-input criterion (SparseGPT's Hessian of B's inputs)
``pruned-obs-input-compensate-global`` the same with SparseGPT's compensation of the kept components
``pruned-obs-input-compensate-uniform`` the same with uniform allocation
``pruned-obs-input-compensate-global-r64`` the default from r0 = 64 (alpha scaled to keep alpha / r0)
``pruned-sensitivity-global`` sensitivity criterion (AdaLoRA's smoothed importance x uncertainty)
``pruned-taylor-global``    taylor criterion, global allocation, same final budget
``pruned-taylor-ema-global`` taylor-ema criterion (LoRAPrune's moving average of taylor)
``pruned-activation-global`` activation criterion, global allocation, same final budget
``pruned-magnitude-global`` magnitude criterion, global allocation, same final budget
``pruned-magnitude-global-r64`` the same from r0 = 64 (alpha scaled to keep alpha / r0)
``adalora``                 PEFT's AdaLoRA, init_r = r0 -> target_r = target (same budget)
``adalora-lr5x``            the same at 5x the recipe's learning rate (AdaLoRA's init needs it; see METHODS)
==========================  ===================================================================

A *cell* is one (task, method, seed) with everything that determines its result (the resolved
recipe, the evaluation settings, the model). Its hash names its folder, which holds ``cell.json``,
the training run and ``result.json``; a cell whose ``result.json`` exists is not run again, and an
interrupted training resumes from its checkpoints, so an interrupted table resumes by running the
same command again. Every cell can be printed as the exact command that reruns it alone.

The spec names the model as given (``default``) and the shared data as ``../shared/data/<task>``
(relative to the repository), so a cell's hash is the same on every machine. Each finished cell is
also written, without adapters or paths of the machine, to ``<out>/cells/<cell>.json`` with its
per-example results: committed, these let the table be built across sessions (a committed cell is
not run again) and methods be compared paired on the same examples (``prunedlora.bench.paired``).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import shlex
import shutil
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prunedlora.cpu import machine_line, machine_record
from prunedlora.errors import PrunedLoraError
from prunedlora.staging import write_text_atomic

QUALITY_TASKS = ("gsm8k", "codealpaca", "sst2")  # the tasks the table covers (tasks.TASKS also has rte)
METHODS: dict[str, dict[str, Any]] = {
    "base": {"base": True, "prune": False},
    "lora-target": {"prune": False, "r0": "target"},
    "lora-r0": {"prune": False},
    "pruned-obs-paper-global": {"prune": True, "criterion": "obs-paper", "allocation": "global"},
    "pruned-obs-paper-uniform": {"prune": True, "criterion": "obs-paper", "allocation": "uniform"},
    "pruned-obs-fisher-global": {"prune": True, "criterion": "obs-fisher", "allocation": "global"},
    "pruned-obs-fisher-uniform": {"prune": True, "criterion": "obs-fisher", "allocation": "uniform"},
    "pruned-obs-input-global": {"prune": True, "criterion": "obs-input", "allocation": "global"},
    # the screening's best (benchmarks/results/score_screening.md): obs-input with its compensation update,
    # what criterion "obs" with the default recovery now means
    "pruned-obs-input-compensate-global": {
        "prune": True,
        "criterion": "obs-input",
        "recovery": "compensate",
        "allocation": "global",
    },
    "pruned-obs-input-compensate-uniform": {
        "prune": True,
        "criterion": "obs-input",
        "recovery": "compensate",
        "allocation": "uniform",
    },
    # issue 9's "r0 64 as well as 32": twice the components to choose from, the same final budget
    "pruned-obs-input-compensate-global-r64": {
        "prune": True,
        "criterion": "obs-input",
        "recovery": "compensate",
        "allocation": "global",
        "r0": 64,
    },
    "pruned-sensitivity-global": {"prune": True, "criterion": "sensitivity", "allocation": "global"},
    "pruned-taylor-global": {"prune": True, "criterion": "taylor", "allocation": "global"},
    "pruned-taylor-ema-global": {"prune": True, "criterion": "taylor-ema", "allocation": "global"},
    "pruned-activation-global": {"prune": True, "criterion": "activation", "allocation": "global"},
    "pruned-magnitude-global": {"prune": True, "criterion": "magnitude", "allocation": "global"},
    # magnitude from the same r0 = 64: does the score matter when seven of eight components go?
    "pruned-magnitude-global-r64": {"prune": True, "criterion": "magnitude", "allocation": "global", "r0": 64},
    "adalora": {"adalora": True},
    # AdaLoRA at five times the recipe's learning rate (1e-3 at the protocol's 2e-4, the AdaLoRA paper's
    # range for SST-2). PEFT starts AdaLoRA with E = 0 and P, Q ~ N(0, 0.02), so at LoRA's learning rate
    # its update P·diag(E)·Q stays about 30x smaller than LoRA's B·A over 150 steps and it barely learns
    # (docs/results.md); a method is compared at a learning rate it can train at, not only at LoRA's.
    "adalora-lr5x": {"adalora": True, "lr_scale": 5.0},
}
# The protocol's frozen copies of the task recipes (package data; see the module docstring).
PROTOCOL_RECIPES_DIR = Path(str(resources.files("prunedlora").joinpath("bench", "protocol_recipes")))
RESULT_FILE = "result.json"
CELL_FILE = "cell.json"
RESULT_FILES = {"json": "quality.json", "markdown": "quality.md", "plot": "quality.png"}
CELL_FORMAT = 2  # bump when a change to training or scoring makes old cached cells incomparable

# The presets: the default is small (minutes to an hour here); "full" is the whole table.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "tasks": ["sst2"],
        "methods": ["base", "lora-target", "lora-r0", "pruned-obs-input-compensate-global", "adalora"],
        "seeds": [0],
        "max_steps": 40,
        "eval_examples": 200,
    },
    # The protocol (docs/results.md): the screening's two best scores (obs-input with compensation,
    # obs-fisher; benchmarks/score_screening.py), the recipes' 150 steps, whole dev splits (GSM8K: NLL on a 500-example
    # carve, exact match on its first 200; CodeAlpaca: a 300-example carve), 3 seeds, serving-friendly
    # max rank 16, compared paired against LoRA at the target rank.
    "full": {
        "tasks": list(QUALITY_TASKS),
        "methods": [
            "base",
            "lora-target",
            "lora-r0",
            "pruned-obs-input-compensate-global",
            "pruned-obs-input-compensate-uniform",
            "pruned-obs-fisher-global",
            "pruned-magnitude-global",
            "adalora",
        ],
        "seeds": [0, 1, 2],
        "max_steps": None,
        "eval_examples": None,
        "max_rank": 16,
        "dev_size": 500,
        "exact_match_examples": 200,
    },
}
SHARED_DATA = "../shared/data"  # how specs name the shared data folder (relative to the repository)


class QualityBenchError(PrunedLoraError):
    """The quality bench cannot run as asked."""


@dataclass
class QualityBenchConfig:
    """The table to fill: tasks x methods x seeds, and the settings every cell shares.

    ``None`` for ``max_steps``, ``learning_rate``, ``batch_size``, ``train_examples`` and ``r0`` /
    ``target_rank`` means the recipe's value. ``data_dir`` None means ``../shared/data`` when it
    exists (else the slices vendored in the package). ``eval_examples`` caps each held-out split
    (None: all of it). ``cells_dir`` holds the cached cells (default: the prunedlora cache).
    """

    model: str = "default"
    tasks: list[str] = field(default_factory=lambda: list(PRESETS["small"]["tasks"]))
    methods: list[str] = field(default_factory=lambda: list(PRESETS["small"]["methods"]))
    seeds: list[int] = field(default_factory=lambda: list(PRESETS["small"]["seeds"]))
    max_steps: int | None = PRESETS["small"]["max_steps"]
    learning_rate: float | None = None
    batch_size: int | None = None
    train_examples: int | None = None
    max_length: int | None = None
    r0: int | None = None
    target_rank: float | None = None
    max_rank: int | None = None
    dev_size: int | None = None
    exact_match_examples: int | None = None
    eval_examples: int | None = PRESETS["small"]["eval_examples"]
    gen_tokens: int = 256
    eval_batch_size: int = 16
    data_dir: str | None = None
    recipes_dir: str = str(PROTOCOL_RECIPES_DIR)
    cells_dir: str | None = None
    out_dir: str = "benchmarks/results"
    force: bool = False
    keep_checkpoints: bool = False
    report_only: bool = False  # build the table from the finished cells; train nothing, list the rest as pending
    echo: bool = True

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in QUALITY_TASKS]
        if unknown:
            raise QualityBenchError(f"unknown task(s) {unknown}; choose from {', '.join(QUALITY_TASKS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise QualityBenchError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not self.tasks or not self.methods or not self.seeds:
            raise QualityBenchError("give at least one task, one method and one seed")
        if self.report_only and self.force:
            raise QualityBenchError("--report-only trains nothing, so it cannot --force a cell to run again")
        for name in (
            "max_steps",
            "batch_size",
            "train_examples",
            "eval_examples",
            "r0",
            "max_length",
            "max_rank",
            "dev_size",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise QualityBenchError(f"--{name.replace('_', '-')} must be positive, got {value}")


@dataclass
class Cell:
    """One (task, method, seed): the resolved recipe and evaluation settings, and its folder."""

    task: str
    method: str
    seed: int
    spec: dict[str, Any]
    key: str
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.task} {self.method} seed {self.seed}"


# -- building cells ------------------------------------------------------------------------------------


def _scale_schedule(method: dict[str, Any], from_steps: int, to_steps: int) -> dict[str, Any]:
    """The recipe's pruning schedule stretched to ``to_steps``: every step count scaled alike, so the
    same share of training happens before, during and after pruning."""
    if from_steps == to_steps:
        return method
    method = dict(method)
    factor = to_steps / from_steps
    for key in ("prune_start_step", "prune_end_step", "prune_every"):
        if key in method and method[key] is not None:
            method[key] = max(1, int(round(method[key] * factor)))
    if method.get("schedule", "cubic") == "cubic" and method.get("prune_end_step", 0) >= to_steps:
        method["prune_end_step"] = to_steps - 1
    return method


def shared_data_dir() -> Path:
    from prunedlora.tasks import shared_data_dir as shared

    return shared()


def resolve_data_dir(data_dir: str | None) -> str | None:
    """How specs name the data: ``data_dir`` as given (absolute); None -> ``SHARED_DATA`` if present,
    else None (the vendored slices). ``real_data_path`` turns the name into a path on this machine."""
    if data_dir in ("vendored", ""):
        return None
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise QualityBenchError(f"--data-dir {path} is not a folder (it should hold gsm8k/, codealpaca/, sst2/)")
        return SHARED_DATA if path.resolve() == shared_data_dir().resolve() else str(path.resolve())
    return SHARED_DATA if shared_data_dir().is_dir() else None


def real_data_path(path: str | None) -> str | None:
    """A spec's data path on this machine (``../shared/data/...`` is the shared folder beside the checkout)."""
    if path is None or not str(path).startswith(SHARED_DATA):
        return path
    return str(shared_data_dir() / str(path)[len(SHARED_DATA) :].lstrip("/"))


def cell_recipe(
    config: QualityBenchConfig, task: str, method: str, seed: int, model_dir: Path, data_dir: str | None, run_dir: Path
) -> dict[str, Any]:
    """The recipe dict (``recipe_from_dict`` format) of one cell, from the task's shipped recipe."""
    path = Path(config.recipes_dir) / f"smollm2-{task}.yaml"
    if not path.is_file():
        raise QualityBenchError(f"recipe {path} not found; pass --recipes-dir (it should hold smollm2-{task}.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    raw = copy.deepcopy(raw)
    raw["model"] = config.model
    data = dict(raw.get("data") or {})
    data["path"] = f"{data_dir}/{task}" if data_dir else None
    if config.dev_size is not None and task not in ("sst2", "rte"):  # tasks whose dev split is carved
        data["dev_size"] = config.dev_size
    if config.train_examples is not None:
        data["max_examples"] = config.train_examples
    if config.max_length is not None:
        data["max_length"] = config.max_length
    data["seed"] = 0  # the dev carve never moves with the training seed
    raw["data"] = data
    training = dict(raw.get("training") or {})
    recipe_steps = int(training.get("max_steps", 80))
    steps = config.max_steps or recipe_steps
    training.update(output_dir=str(run_dir), max_steps=steps, seed=seed)
    if config.learning_rate is not None:
        training["learning_rate"] = config.learning_rate
    if "lr_scale" in METHODS[method]:  # a method trained at its own multiple of the shared learning rate
        from prunedlora.train.recipe import TrainingOptions

        shared = float(training.get("learning_rate", TrainingOptions.learning_rate))
        training["learning_rate"] = shared * METHODS[method]["lr_scale"]
    if config.batch_size is not None:
        training["per_device_train_batch_size"] = config.batch_size
    training["save_steps"] = max(1, min(int(training.get("save_steps", 50)), steps))
    training["logging_steps"] = max(1, min(int(training.get("logging_steps", 5)), steps))
    training["warmup_steps"] = int(round(int(training.get("warmup_steps", 0)) * steps / recipe_steps))
    raw["training"] = training
    spec = METHODS[method]
    m = _scale_schedule(dict(raw.get("method") or {}), recipe_steps, steps)
    if config.r0 is not None:
        m["r0"] = config.r0
        m["max_rank"] = min(int(m.get("max_rank") or config.r0), config.r0)
    if config.target_rank is not None:
        m["target_rank"] = config.target_rank
    if isinstance(spec.get("r0"), int):  # a method that starts from its own r0, at the same scaling alpha / r0
        old = int(m.get("r0", 32))
        m["lora_alpha"] = m.get("lora_alpha", 2 * old) / old * spec["r0"]
        m["r0"] = spec["r0"]
    r0 = int(m.get("r0", 32))
    if config.max_rank is not None:
        m["max_rank"] = config.max_rank
    if m.get("max_rank") is not None and m["max_rank"] > r0:
        m["max_rank"] = r0
    for key in ("criterion", "recovery", "allocation"):
        if key in spec:
            m[key] = spec[key]
    if spec.get("r0") == "target":
        target = m.get("target_rank", 8)
        if not float(target).is_integer():
            raise QualityBenchError(f"lora-target needs an integer target rank, got {target}")
        scale = m.get("lora_alpha", 2 * r0) / r0  # the same scaling alpha / r as at r0
        m["r0"] = int(target)
        m["lora_alpha"] = scale * int(target)
        m["max_rank"] = int(target)
        m["min_rank"] = min(int(m.get("min_rank", 1)), int(target))
    raw["method"] = m
    raw["prune"] = bool(spec.get("prune", True))
    return raw


def make_cell(
    config: QualityBenchConfig,
    task: str,
    method: str,
    seed: int,
    model_dir: Path,
    data_dir: str | None,
    cells_dir: Path,
) -> Cell:
    """The cell with its configuration hash (its folder name ends in the hash)."""
    placeholder = Path("RUN_DIR")
    recipe = cell_recipe(config, task, method, seed, model_dir, data_dir, placeholder)
    spec = {
        "format": CELL_FORMAT,
        "task": task,
        "method": method,
        "seed": seed,
        "adalora": bool(METHODS[method].get("adalora")),
        "base": bool(METHODS[method].get("base")),
        "recipe": recipe,
        "eval": {
            "max_examples": config.eval_examples,
            "max_new_tokens": config.gen_tokens,
            "max_length": int(recipe["data"].get("max_length", 512)),
            "exact_match_examples": config.exact_match_examples,
        },
    }
    spec = _canonical(spec)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = cells_dir / f"{task}-{method}-s{seed}-{key}"
    spec["recipe"]["training"]["output_dir"] = str(folder / "run")
    return Cell(task=task, method=method, seed=seed, spec=spec, key=key, dir=folder)


def _canonical(value: Any) -> Any:
    """The spec with whole floats written as ints, so ``--target-rank 8`` and ``8.0`` are one cell."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def plan_cells(config: QualityBenchConfig) -> list[Cell]:
    """Every cell of the table, task-major then method then seed (the base model, untrained, once)."""
    from prunedlora.models import resolve_model

    model_dir = resolve_model(config.model)
    data_dir = resolve_data_dir(config.data_dir)
    cells_dir = _cells_dir(config)
    return [
        make_cell(config, task, method, seed, model_dir, data_dir, cells_dir)
        for task in config.tasks
        for method in config.methods
        for seed in (config.seeds[:1] if METHODS[method].get("base") else config.seeds)
    ]  # base: no training, one cell


def _cells_dir(config: QualityBenchConfig) -> Path:
    from prunedlora.models import cache_dir

    return Path(config.cells_dir) if config.cells_dir else cache_dir() / "bench" / "quality" / "cells"


def cell_command(config: QualityBenchConfig, cell: Cell) -> str:
    """The exact ``prunedlora bench quality`` command that (re)runs this one cell."""
    args = [
        "prunedlora",
        "bench",
        "quality",
        "--tasks",
        cell.task,
        "--methods",
        cell.method,
        "--seeds",
        str(cell.seed),
        "--model",
        config.model,
    ]
    options = {
        "--max-steps": config.max_steps if config.max_steps is not None else "recipe",
        "--learning-rate": config.learning_rate,
        "--batch-size": config.batch_size,
        "--train-examples": config.train_examples,
        "--max-length": config.max_length,
        "--r0": config.r0,
        "--target-rank": config.target_rank,
        "--max-rank": config.max_rank,
        "--dev-size": config.dev_size,
        "--exact-match-examples": config.exact_match_examples,
        "--eval-examples": config.eval_examples if config.eval_examples is not None else "all",
        "--gen-tokens": config.gen_tokens,
        "--eval-batch-size": config.eval_batch_size,
        "--data-dir": config.data_dir,
        "--recipes-dir": None if Path(config.recipes_dir).resolve() == PROTOCOL_RECIPES_DIR else config.recipes_dir,
        "--cells-dir": config.cells_dir,
        "--out": config.out_dir,
    }
    for flag, value in options.items():
        if value is not None:
            args += [flag, str(value)]
    return shlex.join(args)


# -- running one cell ---------------------------------------------------------------------------------


def run_cell(cell: Cell, config: QualityBenchConfig) -> dict[str, Any]:
    """Train (or resume) and score one cell; write and return its result. Cached unless ``force``."""
    from prunedlora.bench.scoring import EvalSettings, score_adapter
    from prunedlora.models import resolve_model
    from prunedlora.train.recipe import recipe_from_dict

    result_path, committed = cell.dir / RESULT_FILE, committed_cell_path(config, cell)
    if not config.force:
        for path in (result_path, committed):  # the cache first: it also knows the run folder
            if path.is_file():
                return json.loads(path.read_text())
    if config.force and cell.dir.exists():
        shutil.rmtree(cell.dir)
    cell.dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        cell.dir / CELL_FILE,
        json.dumps({**cell.spec, "command": cell_command(config, cell)}, indent=2, default=str) + "\n",
    )
    runnable = copy.deepcopy(cell.spec["recipe"])
    runnable["data"]["path"] = real_data_path(runnable["data"].get("path"))
    recipe = recipe_from_dict(runnable)
    check_schedule(recipe)
    run_dir = Path(recipe.training.output_dir)
    start = time.perf_counter()
    if cell.spec.get("base"):
        adapter_dir, ranks = None, {}
        train = {"global_step": 0, "train_loss": None, "losses": []}
    elif cell.spec["adalora"]:
        from prunedlora.bench.adalora import train_adalora

        trained = train_adalora(recipe, run_dir)
        adapter_dir, ranks = trained.adapter_dir, trained.ranks
        train = {"train_loss": trained.train_loss, "global_step": trained.global_step, "losses": trained.losses}
    else:
        train = _train_lora(recipe, run_dir)
        ranks = train.pop("ranks")
        adapter_dir = run_dir / "adapter"
    train_seconds = time.perf_counter() - start
    if not config.keep_checkpoints:
        for checkpoint in run_dir.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
    values = sorted(ranks.values()) or [0]
    train.update(
        seconds=train_seconds,
        average_rank=sum(values) / len(values),
        min_rank=values[0],
        max_rank=values[-1],
        components=sum(values),
        modules=len(ranks),
        ranks=dict(ranks),
        adapter_parameters=adapter_parameters(ranks, resolve_model(recipe.model)),
    )
    start = time.perf_counter()
    eval_spec = cell.spec["eval"]
    settings = EvalSettings(
        max_examples=eval_spec["max_examples"],
        max_length=eval_spec["max_length"],
        batch_size=config.eval_batch_size,
        max_new_tokens=eval_spec["max_new_tokens"],
        exact_match_examples=eval_spec.get("exact_match_examples"),
        dev_size=runnable["data"].get("dev_size"),
    )  # the carve training left out
    data_path = runnable["data"].get("path")
    metrics = score_adapter(resolve_model(recipe.model), adapter_dir, cell.task, data_path, settings, data_seed=0)
    result = {
        **_cell_record(config, cell),
        "train": train,
        "eval": metrics,
        "eval_seconds": time.perf_counter() - start,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # where it ran: cells are filled across sessions on machines that differ, so each keeps its own
        # (the seconds above are this machine's); the table's "machine" is only the one that built it
        "machine": machine_record(dtype=recipe.training.dtype),
    }
    from prunedlora.metadata import write_json_atomic

    write_json_atomic(result_path, result)
    # the committed copy: no adapter, no path of this machine
    portable = {k: v for k, v in result.items() if k != "dir"}
    portable["spec"] = json.loads(json.dumps(cell.spec, default=str).replace(str(cell.dir), "CELL_DIR"))
    write_json_atomic(committed, portable)
    return result


def adapter_parameters(ranks: dict[str, int], model_dir) -> int:
    """Parameters of the compact adapter these per-module ranks make: sum of rank x (in + out) over
    modules (what export writes; bytes are this times the saved dtype's size). Module names are the
    base model's (``model.layers.0.mlp.down_proj``), as run records and PEFT's rank_pattern give them."""
    from prunedlora.modelfacts import base_linear_shapes

    shapes = base_linear_shapes(model_dir)
    missing = [name for name in ranks if name not in shapes]
    if missing:
        raise QualityBenchError(f"adapter modules not in the base model: {missing[:3]}")
    return sum(rank * sum(shapes[name]) for name, rank in ranks.items())


def _cell_record(config: QualityBenchConfig, cell: Cell) -> dict[str, Any]:
    """What every result of a cell starts with, finished or failed: which cell, where, how to rerun it."""
    return {
        "task": cell.task,
        "method": cell.method,
        "seed": cell.seed,
        "key": cell.key,
        "dir": str(cell.dir),
        "command": cell_command(config, cell),
    }


def committed_cell_path(config: QualityBenchConfig, cell: Cell) -> Path:
    """Where a finished cell's portable record lives under the results folder (committed to the repo)."""
    return Path(config.out_dir) / "cells" / f"{cell.dir.name}.json"


def is_cached(config: QualityBenchConfig, cell: Cell) -> bool:
    """Whether the cell has finished: in the cache, or committed under the results folder."""
    return (cell.dir / RESULT_FILE).is_file() or committed_cell_path(config, cell).is_file()


def check_schedule(recipe) -> None:
    """Refuse a pruned cell whose last pruning event would not happen before the run ends (the run
    would stop above the target rank and the comparison would not be at the same budget)."""
    if not recipe.prune:
        return
    from prunedlora.modelfacts import base_linear_shapes, resolve_targets
    from prunedlora.models import resolve_model
    from prunedlora.rank.schedule import PruningSchedule

    model_dir = resolve_model(recipe.model)
    targets = set(resolve_targets(model_dir, recipe.method.target_modules))
    modules = [n for n in base_linear_shapes(model_dir) if n.rsplit(".", 1)[-1] in targets]
    last = PruningSchedule.build(recipe.method, len(modules)).last_step
    if last >= recipe.training.max_steps:
        raise QualityBenchError(
            f"the pruning schedule's last event is at step {last}, not before max_steps {recipe.training.max_steps}; "
            "give more --max-steps"
        )


def _train_lora(recipe, run_dir: Path) -> dict[str, Any]:
    """Plain LoRA or PrunedLoRA through ``prunedlora.train`` (resuming from checkpoints); a finished run
    (its run record at max_steps) is reused."""
    from prunedlora import metadata
    from prunedlora.train.runner import train

    record_path = run_dir / metadata.RUN_RECORD_FILE
    if record_path.is_file():
        record = metadata.read_run_record(run_dir)
        if record.global_step >= recipe.training.max_steps:
            return {
                "ranks": record.ranks,
                "global_step": record.global_step,
                "train_loss": None,
                "losses": [],
                "reused_run": True,
            }
    result = train(recipe, resume="auto")
    return {
        "ranks": result.ranks,
        "global_step": result.global_step,
        "train_loss": result.train_loss,
        "losses": result.losses,
    }


# -- the table ----------------------------------------------------------------------------------------


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample standard deviation, min, max and n over seeds, per (task, method, metric)."""
    from prunedlora.bench.scoring import TASK_METRICS

    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        if "eval" not in result:  # failed, or not run yet
            continue
        groups.setdefault((result["task"], result["method"]), []).append(result)
    rows = []
    for (task, method), members in groups.items():
        row: dict[str, Any] = {
            "task": task,
            "method": method,
            "seeds": sorted(m["seed"] for m in members),
            "average_rank": statistics.fmean(m["train"]["average_rank"] for m in members),
            "max_rank": max(m["train"]["max_rank"] for m in members),
            "adapter_parameters": (
                statistics.fmean(m["train"]["adapter_parameters"] for m in members)
                if all("adapter_parameters" in m["train"] for m in members)
                else None
            ),
        }
        for metric, better in TASK_METRICS[task]:
            values = [float(m["eval"][metric]) for m in members if metric in m["eval"]]
            if not values:
                continue
            row[metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "min": min(values),
                "max": max(values),
                "n": len(values),
                "better": better,
            }
        rows.append(row)
    return rows


def cell_machines(results: list[dict[str, Any]]) -> dict[str, int]:
    """How many finished cells ran on each machine (its one-line description); cells that predate the
    record count under ``not recorded``."""
    counts: dict[str, int] = {}
    for result in results:
        if "eval" in result:
            line = machine_line(result["machine"]) if result.get("machine") else "not recorded"
            counts[line] = counts.get(line, 0) + 1
    return counts


def run_quality_bench(config: QualityBenchConfig) -> dict[str, Any]:
    """Run (or reuse) every cell, then write quality.json, quality.md and quality.png to ``out_dir``.

    A cell that fails is recorded with its error and the rest still run. Returns the JSON payload:
    ``cells`` (each cell's result or error, with its command), ``summary`` (mean and spread per task
    and method) and ``files``.
    """
    from prunedlora.bench.report import plot_quality, portable_path, quality_markdown, write_result_files

    started = time.perf_counter()
    cells = plan_cells(config)
    say = (lambda text: print(text, flush=True)) if config.echo else (lambda text: None)
    say(
        f"bench quality: {len(cells)} cells ({len(config.tasks)} task(s) x {len(config.methods)} method(s) x "
        f"{len(config.seeds)} seed(s)) in {_cells_dir(config)}"
    )
    results = []
    for i, cell in enumerate(cells, start=1):
        cached = is_cached(config, cell) and not config.force
        if config.report_only and not cached:
            say(f"[{i}/{len(cells)}] {cell.label}: not run yet ({cell.dir.name})")
            results.append({**_cell_record(config, cell), "pending": True})
            continue
        say(f"[{i}/{len(cells)}] {cell.label}: {'cached' if cached else 'running'} ({cell.dir.name})")
        if not cached:
            say(f"    rerun alone: {cell_command(config, cell)}")
        try:
            results.append(run_cell(cell, config))
        except KeyboardInterrupt:
            raise
        except Exception as err:  # record and go on: one bad cell must not cost the table
            message = str(err) if isinstance(err, PrunedLoraError) else f"{type(err).__name__}: {err}"
            say(f"    failed: {message}")
            results.append(
                {
                    **_cell_record(config, cell),
                    "error": message,
                    "traceback": traceback.format_exc(limit=8),
                }
            )
        gc.collect()
    payload = {
        "bench": "quality",
        "model": str(cells[0].spec["recipe"]["model"]),
        "machine": machine_record(dtype=cells[0].spec["recipe"].get("training", {}).get("dtype", "float32")),
        "cell_machines": cell_machines(results),
        "settings": {
            k: (portable_path(v) if k.endswith("_dir") and v else v)
            for k, v in asdict(config).items()
            if k not in ("echo", "force", "report_only")
        },
        "data_dir": resolve_data_dir(config.data_dir),
        "cells": [_home_relative(cell) for cell in results],
        "summary": aggregate(results),
        "elapsed_s": time.perf_counter() - started,
    }
    return write_result_files(config.out_dir, RESULT_FILES, payload, plot_quality, quality_markdown)


def _home_relative(cell: dict[str, Any]) -> dict[str, Any]:
    """The cell with its cache folder written from ``~`` (results name no user's home)."""
    from prunedlora.bench.report import portable_path

    return {**cell, "dir": portable_path(cell["dir"])} if "dir" in cell else cell


def preset_config(name: str, **overrides: Any) -> QualityBenchConfig:
    """A QualityBenchConfig from a preset (``small`` or ``full``) with explicit overrides on top."""
    if name not in PRESETS:
        raise QualityBenchError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values.update(overrides)  # only what the caller set explicitly; None means "the recipe's" / "all"
    return QualityBenchConfig(**values)
