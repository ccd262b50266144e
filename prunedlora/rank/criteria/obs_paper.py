"""``obs-paper``: PrunedLoRA's second-order score as the paper's code computes it (H = G^T G from one batch).

The score is ``sum_rows 1/2 lambda^2 Hinv_jj`` of the derivation in ``prunedlora.rank.obs``. (The
paper's released code multiplies an s x s inverse by a d-long gradient; this is derived from the
objective instead.)

Why that score hardly sees the weights: with ``H = G^T G + delta I`` from the *same* gradient, the
gradient-only part of ``lambda^2 Hinv_jj`` is ``[Hinv g]_j^2 / Hinv_jj``, which sums over the rows to
``1 - delta [H^-2]_jj / Hinv_jj``: a number in [0, 1] that involves neither W nor the gradient's scale.
On SmolLM2 it is orders of magnitude above the weight term, so the score ranks components by the shape
of one batch's gradient and its values have no common scale across modules; ``obs-fisher`` and
``obs-input`` fix that.
"""

from __future__ import annotations

import torch

from prunedlora.rank.criteria.base import Criterion
from prunedlora.rank.modules import LoraModule, active_grads
from prunedlora.rank.obs import damped_inverse_hessian, obs_row_costs


def obs_scores(
    lora_b: torch.Tensor, lora_a: torch.Tensor, grad_b: torch.Tensor, grad_a: torch.Tensor, damping: float
) -> torch.Tensor:
    """PrunedLoRA's second-order score for each column of ``lora_b`` / row of ``lora_a`` given.

    Arguments hold only the active components: B is (out x s), A is (s x in).
    """
    hinv_b = damped_inverse_hessian(grad_b, damping)
    hinv_a = damped_inverse_hessian(grad_a.T, damping)
    return obs_row_costs(lora_b, grad_b, hinv_b) + obs_row_costs(lora_a.T, grad_a.T, hinv_a)


class ObsPaper(Criterion):
    name = "obs-paper"

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        grad_b, grad_a = active_grads(module, active)
        b, a = module.lora_b.detach()[:, active], module.lora_a.detach()[active, :]
        return obs_scores(b, a, grad_b, grad_a, self.config.hessian_damping)
