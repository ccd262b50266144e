"""``obs-input``: the layer-wise objective of SparseGPT applied to B, with its own re-fit as recovery.

The module adds ``s B z`` with ``z = A x``; removing column j of B while re-fitting the others to keep
``s B z`` over the inputs seen since the last event costs ``1/2 s^2 sum_i B_ij^2 / [H_z^-1]_jj`` with
``H_z = sum z z^T`` (damped), and the re-fit is ``B -= B[:, j] [H_z^-1]_{j,:} / [H_z^-1]_jj`` (recovery
``compensate``, this criterion's default: measured to recover loss in benchmarks/score_screening.py), the
update of ``prunedlora.rank.obs`` with a Hessian of the right scale. It is what ``obs`` names: the
second-order score the quality protocol measured best (docs/results.md).
"""

from __future__ import annotations

import torch

from prunedlora.rank.criteria.inputs import InputStatistics
from prunedlora.rank.modules import LoraModule
from prunedlora.rank.obs import classic_obs_costs, damped_inverse


def obs_input_scores(
    lora_b: torch.Tensor, input_cov: torch.Tensor, damping: float, scaling: float = 1.0
) -> torch.Tensor:
    """SparseGPT's cost for each column of B: ``1/2 s^2 sum_i B_ij^2 / [H_z^-1]_jj`` with ``H_z = sum z z^T``."""
    return (scaling**2) * classic_obs_costs(lora_b, damped_inverse(input_cov, damping))


class ObsInput(InputStatistics):
    name = "obs-input"
    aliases = ("obs",)
    default_recovery = "compensate"
    kind = "input_cov"

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.config.r0, self.config.r0, dtype=torch.float64)

    def fold(self, stats: torch.Tensor, flat: torch.Tensor) -> None:
        stats += (flat.T @ flat).cpu()

    def covariance(self, name: str, active: torch.Tensor) -> torch.Tensor:
        return self.stats[self.kind][name][active][:, active]

    def score(self, name: str, module: LoraModule, active: torch.Tensor) -> torch.Tensor:
        b = module.lora_b.detach()[:, active]
        return obs_input_scores(b, self.covariance(name, active), self.config.hessian_damping, self.config.scaling)

    def recovery_hessians(self, name, active, grad_b, grad_a):
        """B re-fit against its inputs; A's other rows stay as they are (None: its removed rows are zeroed)."""
        return damped_inverse(self.covariance(name, active), self.config.hessian_damping), None
