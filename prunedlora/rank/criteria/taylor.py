"""``taylor``: the first-order importance ``sum |g * w|`` over a component's entries (as LLM-Pruner)."""

from __future__ import annotations

import torch

from prunedlora.rank.criteria.base import Criterion
from prunedlora.rank.modules import LoraModule, active_grads
from prunedlora.rank.obs import COMPUTE_DTYPE


def taylor_scores(
    lora_b: torch.Tensor, lora_a: torch.Tensor, grad_b: torch.Tensor, grad_a: torch.Tensor
) -> torch.Tensor:
    """First-order importance ``sum |g * w|`` over the component's entries (as LLM-Pruner)."""
    b = (grad_b.to(COMPUTE_DTYPE) * lora_b.to(COMPUTE_DTYPE)).abs().sum(dim=0)
    a = (grad_a.to(COMPUTE_DTYPE) * lora_a.to(COMPUTE_DTYPE)).abs().sum(dim=1)
    return b + a


class Taylor(Criterion):
    name = "taylor"

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        grad_b, grad_a = active_grads(module, active)
        b, a = module.lora_b.detach()[:, active], module.lora_a.detach()[active, :]
        return taylor_scores(b, a, grad_b, grad_a)
