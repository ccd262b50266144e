"""PrunedLoraConfig: everything the method needs, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from prunedlora.errors import PrunedLoraError
from prunedlora.modelfacts import ALL_LINEAR

# Criteria are registered classes (prunedlora.rank.criteria: one module each, with its derivation and its
# default recovery); this module asks the registry, on construction, which names exist.
SCHEDULES = ("cubic", "constant")
ALLOCATIONS = ("global", "uniform")


class ConfigError(PrunedLoraError):
    """A PrunedLoraConfig that cannot work, with the reason."""


@dataclass
class PrunedLoraConfig:
    """The PrunedLoRA method: LoRA at rank ``r0`` pruned to an average of ``target_rank``.

    Steps count optimizer steps (not micro-batches), as the Trainer's ``global_step`` does. Pruning
    events happen at ``prune_start_step``, then every ``prune_every`` steps; with the cubic schedule
    the last event is at ``prune_end_step`` and leaves exactly the target, with the constant schedule
    (the paper's released code) every event removes ``components_per_event`` per module until the
    target is reached.
    """

    r0: int = 32
    lora_alpha: float = 64.0
    use_rslora: bool = False
    lora_dropout: float = 0.0
    # PEFT's "all-linear": every linear module of the model's decoder layers, as its family has them
    # (modelfacts.resolve_targets makes it concrete when the model is known); or a list of module names
    target_modules: list[str] | str = ALL_LINEAR
    target_rank: float | None = 8.0
    total_rank_budget: int | None = None
    min_rank: int = 1
    max_rank: int | None = None
    prune_start_step: int = 10
    prune_end_step: int = 80
    prune_every: int = 10
    schedule: str = "cubic"
    components_per_event: int = 2
    allocation: str = "global"
    criterion: str = "obs"  # a registered criterion's name or alias, resolved to its name on construction
    # None = the update measured best for the criterion (its default_recovery, mostly "none"): with H built from
    # one batch's gradients the OBS compensation overshoots on SmolLM2 (benchmarks/recovery_modes.py), while
    # obs-input's re-fit over B's inputs has the right scale and recovers loss (score_screening).
    recovery: str | None = None
    hessian_damping: float = 0.01

    def __post_init__(self) -> None:
        from prunedlora.fieldtypes import type_problem

        for f in fields(self):  # before target_modules is copied into a list (a str would split into letters)
            problem = type_problem(f.name, f.type, getattr(self, f.name))
            if problem is not None:
                raise ConfigError(problem)
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            raise ConfigError(
                f"target_modules must be a list of names or {ALL_LINEAR}, got {self.target_modules!r} (str)"
            )
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        criterion = self.criterion_class()
        if criterion is not None:
            self.criterion = criterion.name
        if self.recovery is None:
            self.recovery = "none" if criterion is None else criterion.default_recovery
        if self.max_rank is None:
            self.max_rank = self.r0
        self._validate()

    # -- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        from prunedlora.fieldtypes import check_field_types

        check_field_types(self, ConfigError)  # types first: the range checks below compare values
        need(isinstance(self.r0, int) and self.r0 >= 1, f"r0 must be a positive integer, got {self.r0!r}")
        need(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(len(self.target_modules) > 0, "target_modules is empty: name at least one module, e.g. q_proj")
        from prunedlora.rank import criteria

        for name, value, allowed in (
            ("criterion", self.criterion, criteria.names()),
            ("schedule", self.schedule, SCHEDULES),
            ("allocation", self.allocation, ALLOCATIONS),
            ("recovery", self.recovery, criteria.RECOVERIES),
        ):
            need(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        need(
            (self.target_rank is None) != (self.total_rank_budget is None),
            "give exactly one of target_rank (average final rank) and total_rank_budget "
            f"(got target_rank={self.target_rank}, total_rank_budget={self.total_rank_budget})",
        )
        need(0 <= self.min_rank, f"min_rank must be >= 0, got {self.min_rank}")
        need(
            self.min_rank <= self.max_rank,
            f"min_rank ({self.min_rank}) is above max_rank ({self.max_rank}): no module could satisfy both",
        )
        need(self.max_rank <= self.r0, f"max_rank ({self.max_rank}) is above r0 ({self.r0}): a module cannot grow")
        if self.target_rank is not None:
            need(
                0 < self.target_rank <= self.r0,
                f"target_rank ({self.target_rank}) must be in (0, r0={self.r0}]: pruning only removes components",
            )
            need(
                self.min_rank <= self.target_rank <= self.max_rank,
                f"target_rank ({self.target_rank}) must lie between min_rank ({self.min_rank}) and "
                f"max_rank ({self.max_rank})",
            )
            if self.allocation == "uniform":
                need(
                    self.target_rank == int(self.target_rank),
                    f"uniform allocation gives every module the same rank, so target_rank must be an integer "
                    f"(got {self.target_rank}); use allocation: global for fractional averages",
                )
        else:
            need(self.total_rank_budget > 0, f"total_rank_budget must be positive, got {self.total_rank_budget}")
        need(self.prune_every >= 1, f"prune_every must be >= 1, got {self.prune_every}")
        need(self.prune_start_step >= 0, f"prune_start_step must be >= 0, got {self.prune_start_step}")
        if self.schedule == "cubic":
            need(
                self.prune_end_step >= self.prune_start_step,
                f"prune_end_step ({self.prune_end_step}) is before prune_start_step ({self.prune_start_step})",
            )
        need(
            self.components_per_event >= 1,
            f"components_per_event must be >= 1, got {self.components_per_event}",
        )
        need(self.hessian_damping > 0, f"hessian_damping must be positive, got {self.hessian_damping}")

    # -- derived quantities -------------------------------------------------------------------
    def criterion_class(self):
        """The registered ``Criterion`` class ``criterion`` names (None when it names none)."""
        from prunedlora.rank import criteria

        return criteria.find(self.criterion)

    @property
    def scaling(self) -> float:
        """The LoRA scaling PEFT applies at rank r0: alpha/r0, or alpha/sqrt(r0) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r0) if self.use_rslora else self.r0)

    def final_total_rank(self, num_modules: int) -> int:
        """The number of components left after the last event, over ``num_modules`` modules."""
        if self.total_rank_budget is not None:
            total = self.total_rank_budget
        else:
            exact = self.target_rank * num_modules
            total = round(exact)
            if abs(exact - total) > 1e-9:
                raise ConfigError(
                    f"target_rank {self.target_rank} x {num_modules} modules = {exact:g} components is not a whole "
                    f"number, so the final average could not equal the target; pick a target_rank that is a "
                    f"multiple of 1/{num_modules} or give total_rank_budget"
                )
        low, high = self.min_rank * num_modules, self.max_rank * num_modules
        if not low <= total <= high:
            raise ConfigError(
                f"the final budget of {total} components cannot be met by {num_modules} modules with ranks in "
                f"[{self.min_rank}, {self.max_rank}] (possible totals {low}..{high})"
            )
        return total

    def check_modules(self, module_names: Iterable[str], linear_names: Iterable[str]) -> None:
        """Fail when a target module name matches no module, listing the names that exist."""
        from prunedlora.modelfacts import unmatched_targets

        for target in unmatched_targets(self.target_modules, module_names)[:1]:
            existing = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ConfigError(
                f"target module {target!r} matches no module of this model; its linear layers are named: "
                f"{', '.join(existing)}"
            )

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrunedLoraConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"the method options must be a mapping of option: value, got {type(values).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(map(str, set(values) - set(known)))
        if unknown:
            raise ConfigError(f"unknown PrunedLoRA option(s) {unknown}; known options: {sorted(known)}")
        return cls(**values)  # __post_init__ checks each value's type
