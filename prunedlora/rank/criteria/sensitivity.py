"""``sensitivity``: AdaLoRA's smoothed importance (Zhang et al. 2023, as PEFT's ``RankAllocator``).

Per entry, ``I = |w * g|`` (the first-order loss change of zeroing it), its exponential moving average
``Ibar`` (beta1) and the moving average of ``|I - Ibar|`` as its uncertainty ``Ubar`` (beta2), both 0.85 as
PEFT's defaults, updated at every optimizer step and never reset (a running average, not a sum since the
last event). A component scores ``mean_i Ibar*Ubar`` over B's column plus the same over A's row (PEFT's
mean over the entries; LoRA has no E). It scales with ``|g|^2 |w|^2`` like obs-fisher, so global
allocation can compare it.
"""

from __future__ import annotations

import torch

from prunedlora.rank.criteria.base import Criterion
from prunedlora.rank.modules import LoraModule
from prunedlora.rank.obs import COMPUTE_DTYPE

SENSITIVITY_BETAS = (0.85, 0.85)  # PEFT AdaLoraConfig's beta1, beta2


def update_sensitivity(
    importance: torch.Tensor,
    uncertainty: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    betas: tuple[float, float] = SENSITIVITY_BETAS,
) -> None:
    """One step of AdaLoRA's moving averages, in place: ``Ibar <- b1 Ibar + (1-b1) I``, then
    ``Ubar <- b2 Ubar + (1-b2) |I - Ibar|`` with ``I = |w * g|`` (the order PEFT's ``update_ipt`` uses)."""
    beta1, beta2 = betas
    entry = (weight.detach() * grad.detach()).abs().to(importance.dtype)
    importance.mul_(beta1).add_(entry, alpha=1 - beta1)
    uncertainty.mul_(beta2).add_((entry - importance).abs(), alpha=1 - beta2)


def sensitivity_scores(
    importance_b: torch.Tensor, uncertainty_b: torch.Tensor, importance_a: torch.Tensor, uncertainty_a: torch.Tensor
) -> torch.Tensor:
    """AdaLoRA's score of each component: mean of ``Ibar*Ubar`` over B's column (out x s) plus over A's row (s x in)."""
    b = (importance_b.to(COMPUTE_DTYPE) * uncertainty_b.to(COMPUTE_DTYPE)).mean(dim=0)
    a = (importance_a.to(COMPUTE_DTYPE) * uncertainty_a.to(COMPUTE_DTYPE)).mean(dim=1)
    return b + a


class Sensitivity(Criterion):
    name = "sensitivity"
    gradient_kinds = ("importance_b", "uncertainty_b", "importance_a", "uncertainty_a")
    per_step_gradients = True

    def setup(self) -> None:
        for name, module in self.modules.items():
            for kind in self.gradient_kinds:
                param = module.lora_b if kind.endswith("_b") else module.lora_a
                self.stats[kind][name] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)

    def accumulate(self) -> None:
        s = self.stats
        for name, module in self.modules.items():
            grad_b, grad_a = module.lora_b.grad, module.lora_a.grad
            update_sensitivity(s["importance_b"][name], s["uncertainty_b"][name], module.lora_b, grad_b)
            update_sensitivity(s["importance_a"][name], s["uncertainty_a"][name], module.lora_a, grad_a)

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        s = self.stats
        return sensitivity_scores(
            s["importance_b"][name][:, active],
            s["uncertainty_b"][name][:, active],
            s["importance_a"][name][active, :],
            s["uncertainty_a"][name][active, :],
        )
