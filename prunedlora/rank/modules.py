"""The rank components of PEFT LoRA layers (``prunedlora.loralayers``) as the pruner and criteria read them."""

from __future__ import annotations

import torch

from prunedlora.errors import PrunedLoraError
from prunedlora.loralayers import LoraModule, find_lora_modules, unwrap

__all__ = ["LoraModule", "active_grads", "find_lora_modules", "has_grads", "unwrap"]


def active_grads(module: LoraModule, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B's and A's gradients on the ``active`` components; one line when backward has not run."""
    if module.lora_b.grad is None or module.lora_a.grad is None:
        raise PrunedLoraError(
            f"no gradient on {module.name} at a pruning event: call before_optimizer_step after "
            "backward() and before optimizer.zero_grad()"
        )
    return module.lora_b.grad.detach()[:, active], module.lora_a.grad.detach()[active, :]


def has_grads(modules: dict[str, LoraModule]) -> bool:
    """Whether every module has this step's gradients (a custom loop may call the pruner before backward)."""
    return all(m.lora_b.grad is not None and m.lora_a.grad is not None for m in modules.values())
