"""Which base weights a module keeps: magnitude or Wanda scores, unstructured or 2:4.

Every mask here is the same operation on a different grouping of the score matrix: split the scores
into groups, and in each group drop the ``k`` lowest. Unstructured magnitude ranks the whole module
at once (layer-wise, as SALR does); Wanda ranks each output row on its own (its paper found
per-output comparison groups better for language models); 2:4 makes every four consecutive input
weights of a row a group and drops two, the pattern sparse tensor cores accelerate.

Ties are broken by position: a stable sort keeps equal scores in index order, so among equal scores
the earlier weight is dropped first, on every machine and every run.
"""

from __future__ import annotations

import torch

from prunedlora.salr.errors import SalrError


def drop_lowest(scores: torch.Tensor, drop_per_group: int) -> torch.Tensor:
    """A keep-mask for ``scores`` of shape [groups, n]: False at the ``drop_per_group`` lowest of each
    row, ties going to the lower index (stable sort)."""
    groups, n = scores.shape
    if not 0 <= drop_per_group <= n:
        raise SalrError(f"cannot drop {drop_per_group} of {n} weights per group")
    order = torch.argsort(scores, dim=1, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :drop_per_group], False)
    return keep


def dropped_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a sparsity removes: the nearest whole number (half rounds to even)."""
    return int(round(sparsity * n))


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask dropping ``round(sparsity * n)`` of the lowest scores: over the whole module (n = all
    weights) or, with ``per_row``, in each output row (n = in_features)."""
    out_features, in_features = scores.shape
    if per_row:
        return drop_lowest(scores.float(), dropped_count(in_features, sparsity))
    flat = scores.float().reshape(1, -1)
    return drop_lowest(flat, dropped_count(flat.shape[1], sparsity)).reshape(out_features, in_features)


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """Keep-mask with exactly two of every four consecutive input weights of each row (2:4 along the
    input dimension, the layout of NVIDIA's semi-structured sparsity)."""
    out_features, in_features = scores.shape
    if in_features % 4:
        raise SalrError(f"2:4 sparsity needs in_features divisible by 4, got a {out_features}x{in_features} weight")
    groups = scores.float().reshape(-1, 4)
    return drop_lowest(groups, 2).reshape(out_features, in_features)


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| * ||X_j||_2: a weight matters as much as the inputs it multiplies
    (``input_norm`` is the L2 norm of each input feature over the calibration tokens)."""
    if input_norm.shape != (weight.shape[1],):
        raise SalrError(f"input norms of shape {tuple(input_norm.shape)} do not fit a weight of {tuple(weight.shape)}")
    return weight.abs().float() * input_norm.float().unsqueeze(0)


def keep_mask(
    weight: torch.Tensor, sparsity: float, pattern: str = "unstructured", input_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """The keep-mask M of one [out, in] weight: magnitude when ``input_norm`` is None, else Wanda
    (compared within output rows for the unstructured pattern)."""
    if weight.ndim != 2:
        raise SalrError(f"masks are for 2-D linear weights, got shape {tuple(weight.shape)}")
    scores = weight.abs().float() if input_norm is None else wanda_scores(weight, input_norm)
    if pattern == "2:4":
        return two_four_mask(scores)
    if pattern == "unstructured":
        return unstructured_mask(scores, sparsity, per_row=input_norm is not None)
    raise SalrError(f"unknown sparsity pattern {pattern!r}")
