"""The second-order machinery the OBS criteria and every recovery update share.

A LoRA module's rank component j is column j of B together with row j of A. The machinery works on a
*row view* of a weight matrix: ``W`` is (n x s), each of its n rows is a weight vector over the s active
components, ``G`` holds the loss gradients in the same layout. For B (out x r) the rows are B's rows;
for A (r x in) they are A's columns, i.e. ``A.T``. All rows share one Hessian ``H = G^T G + damping * I``
(s x s), as in the PrunedLoRA paper.

Derivation (per row w with gradient g): minimise the quadratic model ``g^T d + 1/2 d^T H d`` subject to
``(w + d)_j = 0``. With ``Hinv = H^-1`` the Lagrangian gives

    lambda = (w_j - [Hinv g]_j) / Hinv_jj
    d      = -Hinv g - lambda * Hinv e_j
    cost   = 1/2 lambda^2 Hinv_jj  -  1/2 g^T Hinv g

and the last term is the same for every j, so the score is ``sum_rows 1/2 lambda^2 Hinv_jj``
(criterion ``obs-paper``, ``criteria/obs_paper.py``; why its values lack a common scale, and the two
variants that fix it, are in ``criteria/obs_fisher.py`` and ``criteria/obs_input.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPUTE_DTYPE = torch.float64  # every score and recovery is computed in float64


def damped_inverse_hessian(grad_rows: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G^T G + delta I)^-1`` with ``delta = damping * mean(diag(G^T G))``.

    The damping is relative so that it means the same thing for modules whose gradients differ by
    orders of magnitude; an all-zero gradient falls back to an absolute damping so H stays invertible.
    """
    g = grad_rows.to(COMPUTE_DTYPE)
    return damped_inverse(g.T @ g, damping)


def damped_inverse(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """``(H + delta I)^-1`` for a symmetric PSD ``H`` with ``delta = damping * mean(diag(H))``."""
    hessian = hessian.to(COMPUTE_DTYPE).clone()
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
    w = weight_rows.to(COMPUTE_DTYPE)
    g = grad_rows.to(COMPUTE_DTYPE)
    diag = hinv.diagonal().clamp_min(torch.finfo(COMPUTE_DTYPE).tiny)
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
    w = weight_rows.to(COMPUTE_DTYPE).clone()
    g = grad_rows.to(COMPUTE_DTYPE).clone()
    hinv = hinv.to(COMPUTE_DTYPE).clone()
    for j in remove:
        if recovery != "none":
            hjj = hinv[j, j].clamp_min(torch.finfo(COMPUTE_DTYPE).tiny)
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


def classic_obs_costs(weight_rows: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """``1/2 sum_rows w_j^2 / Hinv_jj`` for each of the s components, shape (s,)."""
    diag = hinv.diagonal().clamp_min(torch.finfo(COMPUTE_DTYPE).tiny)
    return 0.5 * weight_rows.to(COMPUTE_DTYPE).square().sum(dim=0) / diag
