"""LoRAPrune behind the method seam (``prunedlora.method``): the recipe's plain LoRA trains while
``LoraPruner`` masks the base model's KV groups and MLP channels; ``prunedlora prune-export`` then
slices the base and the adapter with the final masks the run directory keeps.

A recipe says ``method: {name: loraprune, ...LoRA options}`` and holds LoRAPrune's options in its
``loraprune:`` section; the older spelling, ``prune: false`` with that section, means the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunedlora.errors import PrunedLoraError
from prunedlora.method import Method


class Loraprune(Method):
    name = "loraprune"
    section = "loraprune"
    export_command = "prune-export"
    prune_refusal = (
        "a loraprune recipe prunes the base model while plain LoRA trains: set prune: false "
        "(rank pruning of the adapter at the same time is not supported)"
    )

    @classmethod
    def parse_section(cls, values: Any):
        from prunedlora.loraprune.config import LorapruneConfig
        from prunedlora.loraprune.errors import LorapruneError

        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise LorapruneError(f"loraprune must be a mapping of option: value, got {type(values).__name__}")
        try:
            return LorapruneConfig.from_dict(values)
        except PrunedLoraError as err:
            raise LorapruneError(f"loraprune: {err}") from None

    def start(self, model: Any, max_steps: int) -> list[Any]:
        from prunedlora.loraprune.callback import LorapruneCallback
        from prunedlora.loraprune.pruner import LoraPruner

        callbacks = super().start(model, max_steps)
        self.pruner = LoraPruner(model, self.options, total_steps=max_steps)
        return [*callbacks, LorapruneCallback(self.pruner)]

    def finish(self, run_dir: Path) -> None:
        self.pruner.save(run_dir)  # the final masks: `prunedlora prune-export RUN OUT` slices with them
