"""vLLM's CPU punica wrapper with the grouped, rank-aware kernels (``kernels``) in place of its ops.

vLLM's LoRA layers never call the ops directly: every layer calls its punica wrapper
(``add_lora_linear`` for qkv/gate_up and other column layers, ``add_shrink`` + ``add_expand`` for
row-parallel o_proj/down_proj, ``add_lora_embedding``, ``add_lora_logits``). This subclass of
``PunicaWrapperCPU`` keeps vLLM's metadata handling and overrides those entry points, so prefill and
decode, plain and packed layers all take the grouped path; the one it leaves to vLLM
(``apply_lora_full_linear``, classification heads) uses vLLM's ops with ``vllm_fixes``.

The batch's tokens are grouped by slot once per mapping, in ``update_metadata`` (vLLM calls it only
when the token-to-slot mapping changes), instead of on every layer.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from prunedlora.serve.lora_ops.kernels import (
    batch_layout,
    batched_expand,
    batched_shrink,
    expand,
    group_by_slot,
    linear,
    shrink,
)
from prunedlora.serve.lora_ops.weights import SlotWeights


class RankAwarePunicaWrapperCPU(PunicaWrapperCPU):
    """``PunicaWrapperCPU`` whose LoRA compute is one matmul per adapter slot at the slot's live rank,
    or, for several adapters in a decode batch, batched matmuls over all of them (``kernels.batched_*``);
    products in float32, added once per layer into a bf16 output (``kernels._accumulator``)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self.slot_weights = SlotWeights(trust_generation=True)
        self._slot_ids: tuple | None = None
        self._token_groups: tuple = ()
        self._token_batch = None
        self._sampler_groups: tuple | None = None

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        ids = tuple(lora_index_to_id)
        if ids != self._slot_ids:  # a slot got another adapter: what no version counter saw is stale
            self._slot_ids = ids
            self.slot_weights.generation += 1
        self._token_groups = group_by_slot(self.token_lora_indices)
        self._token_batch = batch_layout(self._token_groups)
        self._sampler_groups = None

    @property
    def sampler_groups(self) -> tuple:
        if self._sampler_groups is None:
            self._sampler_groups = group_by_slot(self.sampler_indices)
        return self._sampler_groups

    def add_shrink(self, y, x, lora_a_stacked, scale: float, **kwargs: Any):
        x = x.view(-1, x.shape[-1])
        batch = self._token_batch
        for out, lora_a in zip(y, lora_a_stacked):
            out = out.view(-1, out.shape[-1])
            if batch is not None:
                a_t = self.slot_weights.stacked_a(lora_a, out.dtype, batch.slots)
                if a_t is None:
                    out.narrow(1, 0, lora_a.shape[-2]).zero_()
                else:
                    batched_shrink(out, x, a_t, lora_a.shape[-2], scale, batch)
                continue
            slot_a = self.slot_weights.rows(lora_a, out.dtype)
            shrink(out, x, slot_a, lora_a.shape[-2], scale, self._token_groups)

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start: int = 0, add_inputs=True, **kwargs: Any):
        y = y.view(-1, y.shape[-1])
        offset = offset_start
        batch = self._token_batch if add_inputs else None
        for z, lora_b, size in zip(x, lora_b_stacked, output_slices):
            if batch is not None:
                b_t = self.slot_weights.stacked_b(lora_b, torch.float32, batch.slots, size)
                if b_t is not None:
                    batched_expand(y, z, b_t, offset, batch)
            else:
                slot_b = self.slot_weights.cols(lora_b, torch.float32)
                expand(y, z, slot_b, self._token_groups, offset, size, add_inputs)
            offset += size

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs: bool = True, **kwargs: Any):
        size = min(lora_b_stacked.shape[-2], y.shape[1])
        slot_b = self.slot_weights.cols(lora_b_stacked, torch.float32)
        expand(y, x, slot_b, self._token_groups, 0, size, add_inputs)

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        """vLLM's semantics; ``buffer`` (scratch space for vLLM's two-pass ops) is not needed here."""
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        slots = self.slot_weights.packed(lora_a_stacked, lora_b_stacked, torch.float32, torch.float32)
        batch, stacked = self._token_batch, None
        if batch is not None:
            stacked = self.slot_weights.stacked(
                lora_a_stacked, lora_b_stacked, torch.float32, batch.slots, output_slices
            )
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        linear(y2, x2, slots, scale, output_slices, self._token_groups, batch=batch, stacked=stacked)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        y2 = y.view(-1, y.shape[-1])
        size = min(lora_b_stacked.shape[-2], y2.shape[1])
        slots = self.slot_weights.packed((lora_a_stacked,), (lora_b_stacked,), torch.float32, torch.float32)
        linear(y2, x.view(-1, x.shape[-1]), slots, scale, (size,), self.sampler_groups)
