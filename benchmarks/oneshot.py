"""The one-shot prune-then-train loop shared by recovery_modes.py and score_screening.py.

Both experiments train LoRA at r0 for a few steps, copy that state, prune it once per cell and compare
held-out loss right after pruning and after a few more steps; these are the pieces they share, so the
two measure with the same training step and the same dev loss.
"""

from __future__ import annotations

import torch


def batches_of(collate, dataset, size: int, order=None, drop_last: bool = True) -> list:
    """Collated batches of ``size`` in ``order`` (default: the dataset's); the last short batch kept if asked."""
    order = list(range(len(dataset))) if order is None else order
    stop = len(order) - size + 1 if drop_last else len(order)
    return [collate([dataset[i] for i in order[s : s + size]]) for s in range(0, stop, size)]


def dev_loss(model, dev_batches: list) -> float:
    """Mean token loss over the dev batches, weighted by examples; leaves the model in training mode."""
    model.eval()
    with torch.no_grad():
        total = sum(model(**b).loss.item() * len(b["input_ids"]) for b in dev_batches)
    model.train()
    return total / sum(len(b["input_ids"]) for b in dev_batches)


def train_steps(model, optimizer, batches: list, start: int, count: int, pruner=None) -> None:
    """``count`` optimizer steps from batch ``start`` (cycling), clipped at 1.0, masked as the trainer masks.

    With a pruner, gradients of pruned components are zeroed before the step and the components
    re-zeroed after it, as ``PrunedLoraCallback`` does in training.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for k in range(count):
        model(**batches[(start + k) % len(batches)]).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if pruner is not None:
            pruner.mask_gradients()
        optimizer.step()
        if pruner is not None:
            pruner.after_optimizer_step()
        optimizer.zero_grad()
