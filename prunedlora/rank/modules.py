"""The PEFT LoRA layers the rank method works on, seen as it needs them: B (out x r0) and A (r0 x in)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunedlora.errors import PrunedLoraError


@dataclass
class LoraModule:
    """One PEFT LoRA layer seen as the pruner needs it: B (out x r0) and A (r0 x in)."""

    name: str
    layer: nn.Module
    lora_a: nn.Parameter
    lora_b: nn.Parameter


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose module names are the base model's own (what rank_pattern keys match)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP and friends
        model = model.module
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, LoraModel):
        model = model.model
    return model


def find_lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraModule]:
    """PEFT LoRA layers of ``model`` keyed by the base model's module name, in model order."""
    from peft.tuners.lora import LoraLayer

    found: dict[str, LoraModule] = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
            found[name] = LoraModule(
                name=name,
                layer=module,
                lora_a=module.lora_A[adapter_name].weight,
                lora_b=module.lora_B[adapter_name].weight,
            )
    return found


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
