"""``magnitude``: the norm bound of a component's rank-1 product, from the weights alone."""

from __future__ import annotations

import torch

from prunedlora.rank.criteria.base import Criterion
from prunedlora.rank.modules import LoraModule
from prunedlora.rank.obs import COMPUTE_DTYPE


def magnitude_scores(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``||B[:, j]|| * ||A[j, :]||``: the norm bound of the component's rank-1 product."""
    return lora_b.to(COMPUTE_DTYPE).norm(dim=0) * lora_a.to(COMPUTE_DTYPE).norm(dim=1)


class Magnitude(Criterion):
    name = "magnitude"

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        return magnitude_scores(module.lora_b.detach()[:, active], module.lora_a.detach()[active, :])
