"""Which components go at an event, given their scores and the schedule's budget."""

from __future__ import annotations

import torch


def allocate_uniform(
    scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], keep: int
) -> dict[str, list[int]]:
    """Every module keeps its ``keep`` best-scored active components; all end at the same rank."""
    removal: dict[str, list[int]] = {}
    for name, mask in masks.items():
        active = mask.nonzero().flatten().tolist()
        excess = len(active) - keep
        if excess > 0:
            order = sorted(active, key=lambda j: (float(scores[name][j]), j))
            removal[name] = order[:excess]
    return removal


def allocate_global(
    scores: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    total_keep: int,
    min_rank: int,
    cap: int,
    max_rank: int | None = None,
    final_total: int | None = None,
) -> dict[str, list[int]]:
    """Rank all modules' active components together and remove the lowest scores.

    Scores must be comparable across modules (estimated loss increases with a common scale, as
    obs-input's and obs-fisher's are). Each module keeps at least ``min_rank`` and at most ``cap``
    components: modules above the cap lose their worst components first, then the cheapest components
    anywhere go until ``total_keep`` remain.
    Ties break on module order then index, so every process takes the same decision.

    With ``max_rank`` and ``final_total`` given, no removal is taken that would leave too few
    components below the final cap to reach ``final_total`` at the last event, so the final average
    stays exactly reachable whatever earlier events chose.
    """
    removal: dict[str, list[int]] = {name: [] for name in masks}
    remaining = {name: int(mask.sum()) for name, mask in masks.items()}
    candidates: list[tuple[float, int, int, str]] = []
    for order, (name, mask) in enumerate(masks.items()):
        active = sorted(mask.nonzero().flatten().tolist(), key=lambda j: (float(scores[name][j]), j))
        forced = max(0, len(active) - cap)
        removal[name].extend(active[:forced])
        remaining[name] -= forced
        protected = min(min_rank, remaining[name])
        for j in active[forced : len(active) - protected]:
            candidates.append((float(scores[name][j]), order, j, name))
    to_remove = sum(remaining.values()) - total_keep
    final_cap = max_rank if max_rank is not None else cap
    reachable = sum(min(r, final_cap) for r in remaining.values())
    candidates.sort()
    for _, _, j, name in candidates:
        if to_remove <= 0:
            break
        if final_total is not None and remaining[name] <= final_cap and reachable - 1 < final_total:
            continue
        if remaining[name] <= final_cap:
            reachable -= 1
        removal[name].append(j)
        remaining[name] -= 1
        to_remove -= 1
    return {name: idx for name, idx in removal.items() if idx}
