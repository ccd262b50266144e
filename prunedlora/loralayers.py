"""The PEFT LoRA layers of a model, seen as the methods need them: B (out x r) and A (r x in), keyed by
the base model's module names (what rank_pattern keys and the run directory's masks use)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
