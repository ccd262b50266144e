"""How LoRAPrune scores the base model's KV groups and MLP channels: one ``GroupCriterion`` class per
criterion, in a registry (``prunedlora.registry``), as PrunedLoRA's rank criteria are.

A criterion says what the pruner must collect for it (the LoRA factors' gradients, the frozen weights'
true gradients, the inputs' feature norms) and scores each projection's elements from that; the
pruner turns element scores into one score per group (``importance.summed_layer_scores``). Adding one
is a subclass and ``register``; a recipe names it as ``loraprune.criterion``.

- ``lora``: ``|Ĝ ⊙ (W0 + s·B·A)|`` with Ĝ estimated from the LoRA factors' gradients (the paper's
  method, no extra memory);
- ``lora-act``: ``lora``'s score times the norm of each input feature over the step's tokens (this
  project's variant, Wanda-style: channels that carry massive activations are kept);
- ``grad``: the true gradient of the frozen weight instead of Ĝ (LLM-Pruner's first-order criterion;
  costs a gradient buffer per base weight, the cost the comparison with ``lora`` measures);
- ``magnitude``: the merged weight's size;
- ``random``: a seeded score, the floor every criterion should beat.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prunedlora.loraprune.groups import DecoderShape
from prunedlora.loraprune.importance import estimated_weight_grad, lora_parts, merged_weight, summed_layer_scores
from prunedlora.registry import Registry


class GroupCriterion:
    """Scores a projection's elements; lower means cheaper to remove."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    from_lora: ClassVar[bool] = False  # scores from LoRA factors: the pruned kinds must carry a LoRA
    base_gradients: ClassVar[bool] = False  # needs W0's true gradient (``base_grad``)
    input_norms: ClassVar[bool] = False  # needs each input feature's norm over the step's tokens

    def element_scores(
        self, module, base_grad: torch.Tensor | None = None, input_norm: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """One score per element of ``module``'s weight (out x in), or None when this step gives the
        criterion nothing to score it with."""
        raise NotImplementedError(f"loraprune criterion {self.name!r} does not define element_scores()")

    def layer_scores(
        self,
        projections: dict[str, object],
        shape: DecoderShape,
        base_grads: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        input_norms: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(KV-group scores, channel scores) of one layer (see ``importance.summed_layer_scores``)."""
        grads, norms = base_grads or {}, input_norms or {}
        return summed_layer_scores(
            projections, shape, lambda name, module: self.element_scores(module, grads.get(name), norms.get(name))
        )


CRITERIA: Registry[type[GroupCriterion]] = Registry(
    "loraprune criterion", GroupCriterion, "prunedlora.loraprune_criteria"
)
register = CRITERIA.register


@register
class Lora(GroupCriterion):
    name = "lora"
    from_lora = True

    def element_scores(self, module, base_grad=None, input_norm=None):
        weight = merged_weight(module)
        _, a, b, _ = lora_parts(module)
        if a is None or a.grad is None or b.grad is None:
            return None  # no LoRA on it, or before its first backward
        grad = estimated_weight_grad(a.detach().float(), b.detach().float(), a.grad.float(), b.grad.float())
        return (grad * weight).abs()


@register
class LoraAct(Lora):
    name = "lora-act"
    input_norms = True

    def element_scores(self, module, base_grad=None, input_norm=None):
        if input_norm is None:
            return None
        scores = super().element_scores(module)
        return None if scores is None else scores * input_norm.to(scores.device, torch.float32)


@register
class Grad(GroupCriterion):
    name = "grad"
    base_gradients = True

    def element_scores(self, module, base_grad=None, input_norm=None):
        return None if base_grad is None else (base_grad.float() * merged_weight(module)).abs()


@register
class Magnitude(GroupCriterion):
    name = "magnitude"

    def element_scores(self, module, base_grad=None, input_norm=None):
        return merged_weight(module).abs()


@register
class Random(GroupCriterion):
    name = "random"

    def layer_scores(self, projections, shape, base_grads=None, generator=None, input_norms=None):
        heads = torch.rand(shape.num_kv_heads, generator=generator)
        return heads, torch.rand(shape.intermediate, generator=generator)


def criterion(name: str) -> GroupCriterion:
    """The registered criterion ``name``, ready to score (LorapruneConfig has checked the name)."""
    return CRITERIA.find(name)()


def element_scores(
    module, name: str, base_grad: torch.Tensor | None = None, input_norm: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``|G ⊙ (W0 + s·B·A)|`` of one projection under criterion ``name`` (None: nothing to score with)."""
    return criterion(name).element_scores(module, base_grad, input_norm)


def layer_scores(
    projections: dict[str, object],
    name: str,
    shape: DecoderShape,
    base_grads: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    input_norms: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(KV-group scores, channel scores) of one layer under criterion ``name``."""
    return criterion(name).layer_scores(projections, shape, base_grads, generator, input_norms)
