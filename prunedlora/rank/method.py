"""PrunedLoRA behind the method seam (``prunedlora.method``): the recipe's LoRA at rank r0, pruned by a
``RankPruner`` on the schedule of the ``method:`` section."""

from __future__ import annotations

from typing import Any

from prunedlora.method import Method
from prunedlora.rank.callback import PrunedLoraCallback
from prunedlora.rank.pruner import RankPruner


class PrunedLora(Method):
    name = "prunedlora"
    prunes_rank = True

    def start(self, model: Any, max_steps: int) -> list[Any]:
        self.pruner = RankPruner(model, self.recipe.method)
        return [PrunedLoraCallback(self.pruner)]

    def finish(self, run_dir) -> None:
        self.pruner.mask_weights()  # the adapter's pruned components exactly zero in what is saved

    @property
    def masks(self) -> dict[str, Any]:
        return self.pruner.masks

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.pruner.history
