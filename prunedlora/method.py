"""The seam between the training runner and a method: what a method gives the runner.

A recipe names one method (``method: {name: prunedlora, ...}``; older recipes say it with ``prune:``
and a ``loraprune:`` or ``salr:`` section, read the same way). The runner (``prunedlora.train``) builds
the method from the recipe and calls its hooks in this order, knowing no method by name:

1. ``parse_section`` / ``check_recipe`` when the recipe is read: the method's own section, and the
   refusals that need the whole recipe (one line each);
2. ``build_model``: the trainable PEFT model (the runner offers the recipe's plain LoRA as ``build_lora``);
3. ``start``: the Trainer callbacks that drive the method during training;
4. ``finish``: the method's own files in the run directory (process 0, before the run record);
5. ``masks``, ``history``, ``base_model_dir``, ``record``: what the runner writes into the run directory;
   ``export_command`` names the command that turns that directory into what serves.

This class is also the simplest method, plain LoRA (``lora``): the recipe's LoRA at rank r0, trained as
it is. The others live in their own packages (``rank/``, ``loraprune/``, ``salr/``), each a subclass in
its ``method.py``; a new one is a package with such a class and ``METHODS.register`` (or an entry point
in the group ``prunedlora.methods``). Core level: it imports no stage, so every stage may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from prunedlora.registry import Registry


class Method:
    """Plain LoRA, and the hooks every method may override (see the module docstring)."""

    name: ClassVar[str] = "lora"
    aliases: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str | None] = None  # the recipe key of the method's own options, if it has one
    # whether the ``method:`` section's pruning options apply; without, they are dropped (plain LoRA at r0)
    prunes_rank: ClassVar[bool] = False
    export_command: ClassVar[str] = "export"
    # the one-line refusal of an explicit ``prune: true`` (a method whose adapter keeps its rank)
    prune_refusal: ClassVar[str | None] = None

    # -- reading the recipe ---------------------------------------------------------------------------
    @classmethod
    def parse_section(cls, values: Any) -> Any:
        """The method's section of the recipe (``values``, as written) as its typed config."""
        return None

    @classmethod
    def check_recipe(cls, raw: dict[str, Any]) -> None:
        """Refuse, with one line, a recipe whose other parts contradict this method."""
        if cls.prune_refusal is not None and raw.get("prune") is True:
            from prunedlora.errors import PrunedLoraError

            raise PrunedLoraError(cls.prune_refusal)

    # -- the run ----------------------------------------------------------------------------------------
    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe  # a prunedlora.train.recipe.TrainRecipe (its ``method`` may be replaced)
        self._masks: dict[str, Any] = {}
        self.model_dir: Path | None = None

    @property
    def options(self) -> Any:
        """The parsed section (``parse_section``'s result), None for a method without one."""
        return self.recipe.sections.get(self.section) if self.section else None

    def build_model(self, model_dir: Path, build_lora: Callable[[Any], Any]) -> Any:
        """The PEFT model to train; ``build_lora(config)`` is the base model with the LoRA ``config``
        describes (``PrunedLoraConfig``'s LoRA fields) at rank r0."""
        self.model_dir = model_dir
        return build_lora(self.recipe.method)

    def start(self, model: Any, max_steps: int) -> list[Any]:
        """Trainer callbacks for a run of ``max_steps`` optimizer steps on ``model`` (after any resume
        they restore their own state in ``on_train_begin``)."""
        import torch

        from prunedlora.loralayers import find_lora_modules

        r0 = self.recipe.method.r0
        self._masks = {name: torch.ones(r0, dtype=torch.bool) for name in find_lora_modules(model)}
        return []

    def finish(self, run_dir: Path) -> None:
        """Write the method's own files into ``run_dir`` (process 0, before the runner's run record)."""

    # -- what the run directory records -------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, Any]:
        """Which rank components of each LoRA module are alive (bool vectors of length r0)."""
        return self._masks

    @property
    def history(self) -> list[dict[str, Any]]:
        """The pruning events of the adapter's rank (none without rank pruning)."""
        return []

    def ranks(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    @property
    def average_rank(self) -> float:
        ranks = self.ranks()
        return sum(ranks.values()) / len(ranks) if ranks else 0.0

    @property
    def base_model_dir(self) -> Path | None:
        """The model folder the trained adapter belongs to (the recipe's model unless the method changes it)."""
        return self.model_dir

    def record(self) -> dict[str, Any]:
        """Fields the method adds to the run record's ``training``."""
        return {}


# The shipped methods, imported on first use (this module is core: it names their modules, imports none).
METHODS: Registry[type[Method]] = Registry(
    "method",
    Method,
    "prunedlora.methods",
    shipped={
        "prunedlora": "prunedlora.rank.method:PrunedLora",
        "lora": "prunedlora.method:Method",
        "loraprune": "prunedlora.loraprune.method:Loraprune",
        "salr": "prunedlora.salr.method:Salr",
    },
)
