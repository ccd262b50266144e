"""``taylor-ema``: LoRAPrune's moving average (Zhang et al. 2023, ``update_sensitivity_dict`` in its code).

The first-order score ``taylor`` of each component, ``sum |g * w|`` over its entries, smoothed over steps
as ``Sbar <- 0.9 Sbar + 0.1 S`` at every optimizer step and never reset, so one noisy batch does not
decide. It scales with ``|g| |w|``. (LoRAPrune scores groups of the *base* weight and divides by each
module's norm because it prunes every module by the same ratio; global allocation needs the raw scale,
so no division.)
"""

from __future__ import annotations

import torch

from prunedlora.rank.criteria.base import Criterion
from prunedlora.rank.criteria.taylor import taylor_scores
from prunedlora.rank.modules import LoraModule

TAYLOR_EMA_BETA = 0.9  # LoRAPrune's s_dict = 0.9 * s_dict + 0.1 * s


def update_taylor_ema(average: torch.Tensor, scores: torch.Tensor, beta: float = TAYLOR_EMA_BETA) -> None:
    """One step of LoRAPrune's moving average of the per-component first-order score, in place."""
    average.mul_(beta).add_(scores.to(average.dtype), alpha=1 - beta)


class TaylorEma(Criterion):
    name = "taylor-ema"
    gradient_kinds = ("taylor_ema",)
    per_step_gradients = True

    def setup(self) -> None:
        self.stats["taylor_ema"] = {n: torch.zeros(self.config.r0, dtype=torch.float64) for n in self.modules}

    def accumulate(self) -> None:
        for name, average in self.stats["taylor_ema"].items():
            module = self.modules[name]  # a pruned component's weights are zero, so it adds nothing
            step_scores = taylor_scores(module.lora_b, module.lora_a, module.lora_b.grad, module.lora_a.grad)
            update_taylor_ema(average, step_scores.cpu())

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        return self.stats["taylor_ema"][name][active]
