"""``activation``: Wanda-style ``||X A_j^T|| * ||B[:, j]||``, from B's squared inputs summed since the last event."""

from __future__ import annotations

import torch

from prunedlora.rank.criteria.inputs import InputStatistics
from prunedlora.rank.modules import LoraModule
from prunedlora.rank.obs import COMPUTE_DTYPE


def activation_scores(lora_b: torch.Tensor, activation_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda-style ``||X A_j^T|| * ||B[:, j]||`` from the squared activations summed since the last event."""
    return activation_sq_sum.to(COMPUTE_DTYPE).clamp_min(0).sqrt() * lora_b.to(COMPUTE_DTYPE).norm(dim=0)


class Activation(InputStatistics):
    name = "activation"
    kind = "activation_sq"

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.config.r0, dtype=torch.float64)

    def fold(self, stats: torch.Tensor, flat: torch.Tensor) -> None:
        stats += flat.square().sum(dim=0).cpu()

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        return activation_scores(module.lora_b.detach()[:, active], self.stats[self.kind][name][active])
