"""What a criterion is: one class that says how the rank components of a LoRA module are scored.

A criterion owns everything that differs between scores, so the pruner holds no per-criterion branch:
the statistics it collects (a forward hook on B's input, or a fold of each optimizer step's gradients),
how they accumulate and when they restart, the score itself, the inverse Hessians the recovery update
uses if it has its own, and its state in a checkpoint. Adding one is a subclass and ``register`` (see
``registry``); docs/training.md has a worked example.

Statistics are per-module tensors grouped by *kind* (``self.stats[kind][module_name]``); the kind is
also their key prefix in a checkpoint (``kind::module``), so a checkpoint written before criteria were
objects resumes unchanged. Two kinds of kinds, because DDP treats them differently:

- ``gradient_kinds``: built from gradients, which DDP has already all-reduced: every process holds
  the same values and each restores them from the checkpoint as they are;
- ``input_kinds``: built from each process's own inputs (forward hooks): summed over processes before
  scoring, consolidated on process 0 before a checkpoint, restored there only (the others restart at 0).

``reset_kinds`` restart at zero after every event (statistics "since the last event"); the others are
running averages that never restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from prunedlora.rank.modules import LoraModule
from prunedlora.rank.obs import damped_inverse_hessian

if TYPE_CHECKING:
    from prunedlora.rank.config import PrunedLoraConfig


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Criterion:
    """Scores the active rank components of each module; lower means cheaper to remove.

    Subclasses set ``name`` (what a recipe's ``method.criterion`` says) and override ``score``; the rest
    has defaults for a criterion that needs nothing but the weights and this step's gradients.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()  # other names a recipe may use for it
    # the recovery update measured best for it (config ``recovery: null`` resolves to this)
    default_recovery: ClassVar[str] = "none"
    gradient_kinds: ClassVar[tuple[str, ...]] = ()
    input_kinds: ClassVar[tuple[str, ...]] = ()
    reset_kinds: ClassVar[tuple[str, ...]] = ()
    # fold every optimizer step's gradients into the statistics (``accumulate``) until pruning ends
    per_step_gradients: ClassVar[bool] = False

    def __init__(self, modules: dict[str, LoraModule], config: PrunedLoraConfig, adapter_name: str = "default"):
        self.modules = modules
        self.config = config
        self.adapter_name = adapter_name
        self.stats: dict[str, dict[str, torch.Tensor]] = {
            kind: {} for kind in (*self.input_kinds, *self.gradient_kinds)
        }
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.setup()

    # -- what a subclass says ---------------------------------------------------------------------
    def setup(self) -> None:
        """Allocate ``self.stats`` and install hooks (called once, on construction)."""

    def accumulate(self) -> None:
        """Fold this optimizer step's gradients into ``self.stats`` (under no_grad, every module has them).
        Called only when ``per_step_gradients``."""

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        """One score per active component of module ``name`` (``active``: their indices), shape (s,)."""
        raise NotImplementedError(f"criterion {self.name!r} does not define score()")

    def recovery_hessians(
        self, name: str, active: torch.Tensor, grad_b: torch.Tensor, grad_a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse Hessians (over the active components) the recovery update uses for B's rows and A's
        columns; None for A leaves A's other rows as they are. Default: each factor's from this step's
        gradient, ``(G^T G + damping)^-1``, as the PrunedLoRA paper."""
        damping = self.config.hessian_damping
        return damped_inverse_hessian(grad_b, damping), damped_inverse_hessian(grad_a.T, damping)

    def counters(self) -> dict[str, int]:
        """Integers a checkpoint keeps beside the tensors (e.g. how many steps a sum holds)."""
        return {}

    def load_counters(self, values: dict[str, Any]) -> None:
        """Restore what ``counters`` gave (a key may be missing in an older checkpoint)."""

    def reset_counters(self) -> None:
        """Restart the counters at an event (with ``reset_kinds``)."""

    # -- what the pruner calls --------------------------------------------------------------------
    def before_scoring(self) -> None:
        """Sum the input statistics over processes (every process then scores the same numbers)."""
        if world_size() > 1:
            import torch.distributed as dist

            for stats in self.input_statistics():
                dist.all_reduce(stats)

    def after_event(self) -> None:
        for kind in self.reset_kinds:
            for stats in self.stats[kind].values():
                stats.zero_()
        self.reset_counters()

    def input_statistics(self) -> list[torch.Tensor]:
        return [t for kind in self.input_kinds for t in self.stats[kind].values()]

    def consolidate(self) -> None:
        """Gather the input statistics on process 0 (call on every process, before saving).

        Each process accumulates its own inputs and the event sums them; a checkpoint written by
        process 0 must hold that sum, and the other processes restart from zero, so a resumed run
        sums to the same totals as an uninterrupted one.
        """
        if not self.input_statistics() or world_size() <= 1:
            return
        self.before_scoring()
        if process_rank() != 0:
            for stats in self.input_statistics():
                stats.zero_()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {kind: {n: t.clone() for n, t in held.items()} for kind, held in self.stats.items()}
        state.update(self.counters())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for kind, held in self.stats.items():
            local = kind in self.input_kinds and process_rank() != 0  # process 0 holds the sum (consolidate)
            for name, saved in state.get(kind, {}).items():
                if name in held:
                    held[name].copy_(torch.zeros_like(saved) if local else saved)
        self.load_counters(state)

    def close(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
