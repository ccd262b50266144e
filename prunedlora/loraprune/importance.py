"""Importance of KV groups and MLP channels, from a PEFT LoRA's factors and their gradients.

LoRAPrune's point: the gradient of a frozen weight W0 is never formed (no buffer the size of the base
model), yet it is what a first-order criterion needs. LoRA's factors change by ``-lr * (G_B, G_A)``, so
``B A`` changes by ``-lr * (G_B A + B G_A) + lr^2 * G_B G_A``; with the step size folded in, the
released code takes ``Ĝ = G_B A + B G_A - G_B G_A`` as the estimate of W's gradient and scores each
weight ``|Ĝ ⊙ (W0 + s B A)|`` (the merged weight: what removing the weight would take away; the scaling
``s`` enters only there, as in the released code). Element scores are summed over each group's rows
(q/k/v/gate/up) or input columns (o/down), each module's group vector is L2-normalised so that no
module's scale dominates, and the vectors of a group's modules are summed.
The criteria themselves (``lora``, ``lora-act``, ``grad``, ``magnitude``, ``random``) are registered
classes in ``criteria``; this module holds the arithmetic they share.

``lora-act`` (this project's variant, not the paper's) multiplies each element score by the norm of
the projection's input feature it reads, Wanda-style: ``|Ĝ ⊙ W|_ij · ‖X_j‖`` with ``‖X_j‖`` the L2 norm of
input feature ``j`` over the step's tokens. For o_proj and down_proj the input features are the groups
themselves (attention outputs, MLP channels), so a channel that carries a massive activation keeps its
place however small its weights and gradient estimate are; q/k/v/gate/up rows are reweighted by the
hidden state's feature norms.
"""

from __future__ import annotations

import torch

from prunedlora.loraprune.groups import ATTENTION, MLP, ROW_MODULES, DecoderShape

_EPS = 1e-8


def estimated_weight_grad(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """``Ĝ = G_B·A + B·G_A − G_B·G_A`` for A (r x in), B (out x r): an (out x in) estimate of ∂L/∂W."""
    return grad_b @ a + b @ grad_a - grad_b @ grad_a


def lora_parts(module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """(W0, A, B, scaling) of a projection: a PEFT LoRA Linear's active adapter, or a plain Linear's
    weight with no factors."""
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A"):
        return module.weight, None, None, 0.0
    adapter = module.active_adapters[0]
    if adapter not in module.lora_A:
        return base.weight, None, None, 0.0
    return base.weight, module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])


def merged_weight(module) -> torch.Tensor:
    """W0 + s·B·A (W0 alone without a LoRA), detached, in float32 at least."""
    w0, a, b, s = lora_parts(module)
    w = w0.detach().float()
    if a is not None:
        w = w + s * (b.detach().float() @ a.detach().float())
    return w


def reduce_to_groups(name: str, scores: torch.Tensor, shape: DecoderShape) -> torch.Tensor:
    """One score per KV group (attention projections) or per channel (MLP projections) from the
    element scores of projection ``name``: rows for q/k/v/gate/up, input columns for o/down."""
    per_unit = scores.sum(dim=1) if name in ROW_MODULES else scores.sum(dim=0)
    if name in ("q_proj", "o_proj"):
        return per_unit.reshape(shape.num_kv_heads, -1).sum(dim=1)
    if name in ("k_proj", "v_proj"):
        return per_unit.reshape(shape.num_kv_heads, shape.head_dim).sum(dim=1)
    return per_unit


def normalised(vector: torch.Tensor) -> torch.Tensor:
    return vector / (torch.linalg.vector_norm(vector) + _EPS)


def summed_layer_scores(
    projections: dict[str, object], shape: DecoderShape, scores_of
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(KV-group scores, channel scores) of one layer from ``scores_of(name, module)``, each projection's
    element scores (or None: it cannot score this step): reduced to groups, L2-normalised per module
    so that no module's scale dominates, summed over the kind's projections; None for a kind that no
    projection could score."""
    out = []
    for kind in (ATTENTION, MLP):
        total = None
        for name in kind:
            scores = scores_of(name, projections[name])
            if scores is None:
                continue
            part = normalised(reduce_to_groups(name, scores, shape))
            total = part if total is None else total + part
        out.append(None if total is None else total.cpu())
    return out[0], out[1]
