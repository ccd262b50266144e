"""``obs-fisher``: classic OBS (Hassibi & Stork) on each factor under the Fisher accumulated between events.

At a point where the quadratic model's gradient term is dropped, removing coordinate j of a row w under
``1/2 d^T H d`` costs ``1/2 w_j^2 / Hinv_jj``. H is the empirical Fisher *accumulated between events*
(the mean over steps of ``G^T G / n_rows``: per-row, pooled over the rows, so a module made of two
copies of another costs twice as much, not four times), plus relative damping. The score scales with
``|g|^2 |w|^2``: an estimated loss increase with a common scale across modules, which global allocation
needs. The recovery update uses the same Fisher.
"""

from __future__ import annotations

from typing import Any

import torch

from prunedlora.rank.criteria.base import Criterion
from prunedlora.rank.modules import LoraModule
from prunedlora.rank.obs import classic_obs_costs, damped_inverse


def obs_fisher_scores(
    lora_b: torch.Tensor, lora_a: torch.Tensor, fisher_b: torch.Tensor, fisher_a: torch.Tensor, damping: float
) -> torch.Tensor:
    """Classic OBS cost of each active component under the accumulated per-row Fisher of each factor.

    ``fisher_b`` is the (s x s) mean of ``G_B^T G_B / out`` over the steps since the last event (B's rows
    as the rows), ``fisher_a`` the mean of ``G_A G_A^T / in`` (A's columns as the rows).
    """
    return classic_obs_costs(lora_b, damped_inverse(fisher_b, damping)) + classic_obs_costs(
        lora_a.T, damped_inverse(fisher_a, damping)
    )


class ObsFisher(Criterion):
    name = "obs-fisher"
    gradient_kinds = ("fisher_b", "fisher_a")
    reset_kinds = ("fisher_b", "fisher_a")
    per_step_gradients = True

    def setup(self) -> None:
        r0 = self.config.r0
        for kind in self.gradient_kinds:
            self.stats[kind] = {n: torch.zeros(r0, r0, dtype=torch.float64) for n in self.modules}
        self.steps = 0  # optimizer steps the sums hold

    def accumulate(self) -> None:
        """Add this step's ``G_B^T G_B / out`` and ``G_A G_A^T / in`` to the running sums."""
        for name, module in self.modules.items():
            grad_b = module.lora_b.grad.detach().to(torch.float64)
            grad_a = module.lora_a.grad.detach().to(torch.float64)
            self.stats["fisher_b"][name] += (grad_b.T @ grad_b).cpu() / grad_b.shape[0]
            self.stats["fisher_a"][name] += (grad_a @ grad_a.T).cpu() / grad_a.shape[1]
        self.steps += 1

    def mean_fisher(self, name: str, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = max(self.steps, 1)
        fisher_b, fisher_a = self.stats["fisher_b"][name], self.stats["fisher_a"][name]
        return fisher_b[active][:, active] / steps, fisher_a[active][:, active] / steps

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        fisher_b, fisher_a = self.mean_fisher(name, active)
        b, a = module.lora_b.detach()[:, active], module.lora_a.detach()[active, :]
        return obs_fisher_scores(b, a, fisher_b, fisher_a, self.config.hessian_damping)

    def recovery_hessians(self, name, active, grad_b, grad_a):
        fisher_b, fisher_a = self.mean_fisher(name, active)
        damping = self.config.hessian_damping
        return damped_inverse(fisher_b, damping), damped_inverse(fisher_a, damping)

    def counters(self) -> dict[str, int]:
        return {"fisher_steps": self.steps}

    def load_counters(self, values: dict[str, Any]) -> None:
        self.steps = int(values.get("fisher_steps", 0))

    def reset_counters(self) -> None:
        self.steps = 0
