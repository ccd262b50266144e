"""Scores that say how much the loss would rise if a rank component were removed.

A LoRA module's rank component j is column j of B together with row j of A. Every criterion returns
one score per *active* component; lower means cheaper to remove. Global allocation ranks scores across
modules, so a score must be an estimated loss increase with a common scale (see why ``obs-paper``'s is not).
Criterion ``obs`` names the variant the quality protocol measured best (``config.CRITERION_ALIASES``).

The second-order machinery works on a *row view* of a weight matrix: ``W`` is (n x s), each of its n
rows is a weight vector over the s active components, ``G`` holds the loss gradients in the same
layout. For B (out x r) the rows are B's rows; for A (r x in) they are A's columns, i.e. ``A.T``.
All rows share one Hessian ``H = G^T G + damping * I`` (s x s), as in the PrunedLoRA paper.

Derivation (per row w with gradient g): minimise the quadratic model ``g^T d + 1/2 d^T H d`` subject to
``(w + d)_j = 0``. With ``Hinv = H^-1`` the Lagrangian gives

    lambda = (w_j - [Hinv g]_j) / Hinv_jj
    d      = -Hinv g - lambda * Hinv e_j
    cost   = 1/2 lambda^2 Hinv_jj  -  1/2 g^T Hinv g

and the last term is the same for every j, so the score is ``sum_rows 1/2 lambda^2 Hinv_jj``.
(The paper's released code multiplies an s x s inverse by a d-long gradient; this is derived from the
objective instead.) This is criterion ``obs-paper``.

Why that score hardly sees the weights: with ``H = G^T G + delta I`` from the *same* gradient, the
gradient-only part of ``lambda^2 Hinv_jj`` is ``[Hinv g]_j^2 / Hinv_jj``, which sums over the rows to
``1 - delta [H^-2]_jj / Hinv_jj``: a number in [0, 1] that involves neither W nor the gradient's scale.
On SmolLM2 it is orders of magnitude above the weight term, so the score ranks components by the shape
of one batch's gradient and its values have no common scale across modules. Two variants fix that:

``obs-fisher`` -- classic OBS (Hassibi & Stork) on each factor at a point where the quadratic model's
gradient term is dropped: removing coordinate j of a row w under ``1/2 d^T H d`` costs
``1/2 w_j^2 / Hinv_jj``. H is the empirical Fisher *accumulated between events* (the mean over steps of
``G^T G / n_rows``: per-row, pooled over the rows, so a module made of two copies of another costs
twice as much, not four times), plus relative damping. The score scales with ``|g|^2 |w|^2``: an
estimated loss increase with a common scale across modules, which global allocation needs.

``obs-input`` -- the layer-wise objective of SparseGPT applied to B: the module adds ``s B z`` with
``z = A x``; removing column j of B while re-fitting the others to keep ``s B z`` over the inputs seen
since the last event costs ``1/2 s^2 sum_i B_ij^2 / [H_z^-1]_jj`` with ``H_z = sum z z^T`` (damped),
and the re-fit is ``B -= B[:, j] [H_z^-1]_{j,:} / [H_z^-1]_jj`` (recovery ``compensate``), the same
update as above with a Hessian of the right scale.

``sensitivity`` -- AdaLoRA's smoothed importance (Zhang et al. 2023, as PEFT's ``RankAllocator``): per entry,
``I = |w * g|`` (the first-order loss change of zeroing it), its exponential moving average ``Ibar`` (beta1)
and the moving average of ``|I - Ibar|`` as its uncertainty ``Ubar`` (beta2), both 0.85 as PEFT's defaults,
updated at every optimizer step and never reset (a running average, not a sum since the last event). A
component scores ``mean_i Ibar*Ubar`` over B's column plus the same over A's row (PEFT's mean over the
entries; LoRA has no E). It scales with ``|g|^2 |w|^2`` like obs-fisher, so global allocation can compare it.

``taylor-ema`` -- LoRAPrune's moving average (Zhang et al. 2023, ``update_sensitivity_dict`` in its code):
the first-order score ``taylor`` of each component, ``sum |g * w|`` over its entries, smoothed over steps as
``Sbar <- 0.9 Sbar + 0.1 S`` at every optimizer step and never reset, so one noisy batch does not decide. It
scales with ``|g| |w|``. (LoRAPrune scores groups of the *base* weight and divides by each module's norm
because it prunes every module by the same ratio; global allocation needs the raw scale, so no division.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_COMPUTE_DTYPE = torch.float64


def damped_inverse_hessian(grad_rows: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G^T G + delta I)^-1`` with ``delta = damping * mean(diag(G^T G))``.

    The damping is relative so that it means the same thing for modules whose gradients differ by
    orders of magnitude; an all-zero gradient falls back to an absolute damping so H stays invertible.
    """
    g = grad_rows.to(_COMPUTE_DTYPE)
    return damped_inverse(g.T @ g, damping)


def damped_inverse(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """``(H + delta I)^-1`` for a symmetric PSD ``H`` with ``delta = damping * mean(diag(H))``."""
    hessian = hessian.to(_COMPUTE_DTYPE).clone()
    s = hessian.shape[0]
    delta = damping * hessian.diagonal().mean().item() if s else 0.0
    if not delta > 0.0:
        delta = damping
    hessian.diagonal().add_(delta)
    chol, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.pinv(hessian, hermitian=True)


def obs_row_costs(weight_rows: torch.Tensor, grad_rows: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """Estimated loss increase of removing each of the s components (summed over rows), shape (s,)."""
    w = weight_rows.to(_COMPUTE_DTYPE)
    g = grad_rows.to(_COMPUTE_DTYPE)
    diag = hinv.diagonal().clamp_min(torch.finfo(_COMPUTE_DTYPE).tiny)
    lam = (w - g @ hinv) / diag  # (n, s): lambda for row i, component j
    return 0.5 * (lam.square() * diag).sum(dim=0)


@dataclass
class RemovalResult:
    """Rows after removing the requested components, and the downdated inverse Hessian."""

    weight_rows: torch.Tensor
    hinv: torch.Tensor


def remove_components(
    weight_rows: torch.Tensor,
    grad_rows: torch.Tensor,
    hinv: torch.Tensor,
    remove: list[int],
    recovery: str,
) -> RemovalResult:
    """Remove components one at a time, applying the recovery update and downdating ``Hinv``.

    recovery:
      - ``"none"``: zero the components, touch nothing else.
      - ``"compensate"``: the OBS compensation ``d = -(w_j / Hinv_jj) Hinv e_j`` that moves the
        surviving components to make up for component j (the gradient term is left out; this update
        does not depend on the scale of H, which a one-batch gradient estimates poorly).
      - ``"newton"``: the full solution of the derivation above, including ``-Hinv g``. After the
        first removal the quadratic model's gradient on the surviving components is zero, so later
        removals in the same event are pure compensations.

    Sequential removal with the downdate ``Hinv <- Hinv - Hinv[:, j] Hinv[j, :] / Hinv_jj`` equals
    removing the whole set jointly (tested).
    """
    w = weight_rows.to(_COMPUTE_DTYPE).clone()
    g = grad_rows.to(_COMPUTE_DTYPE).clone()
    hinv = hinv.to(_COMPUTE_DTYPE).clone()
    for j in remove:
        if recovery != "none":
            hjj = hinv[j, j].clamp_min(torch.finfo(_COMPUTE_DTYPE).tiny)
            if recovery == "newton":
                hg = g @ hinv
                lam = (w[:, j] - hg[:, j]) / hjj
                w -= hg + lam[:, None] * hinv[j, :][None, :]
                g.zero_()
            else:
                lam = w[:, j] / hjj
                w -= lam[:, None] * hinv[j, :][None, :]
            col = hinv[:, j].clone()
            hinv -= torch.outer(col, col) / hjj
        w[:, j] = 0.0
        hinv[j, :] = 0.0
        hinv[:, j] = 0.0
    return RemovalResult(weight_rows=w, hinv=hinv)


# --- criteria on a whole module ------------------------------------------------------------------


def obs_scores(
    lora_b: torch.Tensor, lora_a: torch.Tensor, grad_b: torch.Tensor, grad_a: torch.Tensor, damping: float
) -> torch.Tensor:
    """PrunedLoRA's second-order score for each column of ``lora_b`` / row of ``lora_a`` given.

    Arguments hold only the active components: B is (out x s), A is (s x in).
    """
    hinv_b = damped_inverse_hessian(grad_b, damping)
    hinv_a = damped_inverse_hessian(grad_a.T, damping)
    return obs_row_costs(lora_b, grad_b, hinv_b) + obs_row_costs(lora_a.T, grad_a.T, hinv_a)


def classic_obs_costs(weight_rows: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """``1/2 sum_rows w_j^2 / Hinv_jj`` for each of the s components, shape (s,)."""
    diag = hinv.diagonal().clamp_min(torch.finfo(_COMPUTE_DTYPE).tiny)
    return 0.5 * weight_rows.to(_COMPUTE_DTYPE).square().sum(dim=0) / diag


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


def obs_input_scores(
    lora_b: torch.Tensor, input_cov: torch.Tensor, damping: float, scaling: float = 1.0
) -> torch.Tensor:
    """SparseGPT's cost for each column of B: ``1/2 s^2 sum_i B_ij^2 / [H_z^-1]_jj`` with ``H_z = sum z z^T``."""
    return (scaling**2) * classic_obs_costs(lora_b, damped_inverse(input_cov, damping))


def taylor_scores(
    lora_b: torch.Tensor, lora_a: torch.Tensor, grad_b: torch.Tensor, grad_a: torch.Tensor
) -> torch.Tensor:
    """First-order importance ``sum |g * w|`` over the component's entries (as LLM-Pruner)."""
    b = (grad_b.to(_COMPUTE_DTYPE) * lora_b.to(_COMPUTE_DTYPE)).abs().sum(dim=0)
    a = (grad_a.to(_COMPUTE_DTYPE) * lora_a.to(_COMPUTE_DTYPE)).abs().sum(dim=1)
    return b + a


def magnitude_scores(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``||B[:, j]|| * ||A[j, :]||``: the norm bound of the component's rank-1 product."""
    return lora_b.to(_COMPUTE_DTYPE).norm(dim=0) * lora_a.to(_COMPUTE_DTYPE).norm(dim=1)


def activation_scores(lora_b: torch.Tensor, activation_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda-style ``||X A_j^T|| * ||B[:, j]||`` from the squared activations summed since the last event."""
    return activation_sq_sum.to(_COMPUTE_DTYPE).clamp_min(0).sqrt() * lora_b.to(_COMPUTE_DTYPE).norm(dim=0)


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


TAYLOR_EMA_BETA = 0.9  # LoRAPrune's s_dict = 0.9 * s_dict + 0.1 * s


def update_taylor_ema(average: torch.Tensor, scores: torch.Tensor, beta: float = TAYLOR_EMA_BETA) -> None:
    """One step of LoRAPrune's moving average of the per-component first-order score, in place."""
    average.mul_(beta).add_(scores.to(average.dtype), alpha=1 - beta)


def sensitivity_scores(
    importance_b: torch.Tensor, uncertainty_b: torch.Tensor, importance_a: torch.Tensor, uncertainty_a: torch.Tensor
) -> torch.Tensor:
    """AdaLoRA's score of each component: mean of ``Ibar*Ubar`` over B's column (out x s) plus over A's row (s x in)."""
    b = (importance_b.to(_COMPUTE_DTYPE) * uncertainty_b.to(_COMPUTE_DTYPE)).mean(dim=0)
    a = (importance_a.to(_COMPUTE_DTYPE) * uncertainty_a.to(_COMPUTE_DTYPE)).mean(dim=1)
    return b + a
