"""A fix for a vLLM CPU bug that gives base-model requests an adapter's answer, loaded in vLLM's workers.

vLLM marks a token that uses no adapter with LoRA index -1. Its GPU kernels skip such tokens, but the
PyTorch ops the CPU platform uses (``vllm/lora/ops/torch_ops/lora_ops.py``, vLLM 0.32) gather
``weights[index]`` for every token, and ``weights[-1]`` is the last adapter slot. So in a batch that
mixes base-model requests with adapter requests, the base requests silently get that adapter
applied (upstream: vllm-project/vllm PRs #48421 and #49656, open at the time of writing).

``serve`` passes :data:`WORKER_EXTENSION` as vLLM's ``worker_extension_cls``, vLLM's own hook for code
that must run in its worker processes: the worker imports ``prunedlora.serve.vllm_worker`` before it
builds the model, and that import calls ``serve.lora_ops.install``, which calls :func:`apply`
(importing this module changes nothing). ``apply`` first runs the installed ops on a two-token example
and replaces them only if a -1 token comes out changed, so a vLLM that fixed the bug is left alone.

The rank-aware ops (``serve.lora_ops``, the default) never gather slot -1, so they do not need this;
it is what ``--lora-ops stock`` runs, what they fall back to, and what vLLM's wrapper still uses for
the one entry point they leave to it (``apply_lora_full_linear``).
"""

from __future__ import annotations

import logging

import torch

# A child of vLLM's logger, so the message lands in the server log beside vLLM's own.
logger = logging.getLogger("vllm.prunedlora")

WORKER_EXTENSION = "prunedlora.serve.vllm_worker.PrunedLoraWorkerExtension"

_applied = False


def _squeeze(weights: torch.Tensor) -> torch.Tensor:
    return weights.squeeze(dim=1) if weights.dim() == 4 else weights


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """vLLM's ``bgmv_shrink`` with rows of index -1 set to zero (their adapter input is nothing)."""
    valid = lora_indices_tensor >= 0
    selected = _squeeze(lora_a_weights[lora_indices_tensor.clamp(min=0)].to(dtype=output_tensor.dtype))
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    outputs = outputs.masked_fill(~valid[: outputs.shape[0], None], 0)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """vLLM's ``bgmv_expand`` that leaves rows of index -1 untouched, as the GPU kernels do."""
    valid = lora_indices_tensor >= 0
    selected = _squeeze(lora_b_weights[lora_indices_tensor.clamp(min=0)].to(dtype=output_tensor.dtype))
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    keep = ~valid[:limit, None]
    new = outputs[:limit, :common]
    if add_inputs:
        output_tensor[:, :common] += new.masked_fill(keep, 0)
    else:
        output_tensor[:, :common] = torch.where(keep, output_tensor[:, :common], new)


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    """vLLM's ``bgmv_expand_slice`` that leaves rows of index -1 untouched."""
    valid = lora_indices_tensor >= 0
    selected = _squeeze(lora_b_weights[lora_indices_tensor.clamp(min=0)].to(dtype=output_tensor.dtype))
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    keep = ~valid[: outputs.shape[0], None]
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs:
        target += outputs.masked_fill(keep, 0)
    else:
        target.copy_(torch.where(keep, target, outputs))


def ops_skip_no_lora_tokens(ops) -> bool:
    """Whether a module of vLLM's torch LoRA ops leaves a token of index -1 unchanged."""
    weights = torch.ones(1, 1, 2, 3)  # one slot: (slots, 1, out, in)
    inputs = torch.ones(2, 3)
    out = torch.zeros(2, 2)
    ops.bgmv_shrink(inputs, weights, out, torch.tensor([0, -1]), 1.0)
    shrink_ok = bool((out[1] == 0).all())
    out = torch.zeros(2, 2)
    ops.bgmv_expand(torch.ones(2, 3), weights, out, torch.tensor([0, -1]), True)
    expand_ok = bool((out[1] == 0).all())
    return shrink_ok and expand_ok


def apply() -> bool:
    """Replace vLLM's CPU LoRA ops with the fixed ones if the installed ones have the bug.

    Returns whether they were replaced. Safe to call more than once and where vLLM lacks the ops.
    """
    global _applied
    if _applied:
        return True
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:
        return False
    if ops_skip_no_lora_tokens(lora_ops):
        return False
    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    # sgmv_* call the bgmv_* names of lora_ops; punica_cpu imported the names into its own namespace.
    modules = [lora_ops, torch_ops]
    try:
        from vllm.lora.punica_wrapper import punica_cpu

        modules.append(punica_cpu)
    except ImportError:
        pass
    for module in modules:
        for name, function in fixed.items():
            if hasattr(module, name):
                setattr(module, name, function)
    _applied = True
    logger.info("prunedlora: patched vLLM's CPU LoRA ops so requests without an adapter get none (vLLM PR #48421)")
    return True
