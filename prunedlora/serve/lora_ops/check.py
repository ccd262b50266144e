"""The start-up check: the rank-aware wrapper against vLLM's own ``PunicaWrapperCPU`` on a small batch.

Both wrappers get the same mapping through vLLM's own ``update_metadata`` and the same padded slot
tensors, laid out as vLLM's ``set_lora`` leaves them; every entry point the rank-aware wrapper
overrides is called on both, in decode and in prefill, and the outputs must agree. The batch mixes
tokens without an adapter with three slots of different ranks per slice, one of them rank 1 and one
lacking a slice. vLLM's side runs with ``vllm_fixes`` applied, so its -1 rows are right too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HIDDEN, RANK, SLICES = 16, 4, (8, 6)
SLOT_IDS = [11, 22, 33]  # lora_index_to_id: the adapter id in each slot
SLICE_RANKS = [(4, 2), (1, 0), (3, 4)]  # per slot, per slice; slot 1 lacks the second slice
TOKENS = (0, 11, 11, 0, 22, 33, 33, 11, 0)  # adapter id per token (0: none)
REQUESTS = (0, 11, 22, 33)  # adapter id per sampled row


def padded_stack(
    ranks: Sequence[Sequence[int]], rows: int, cols: int, rank: int, side: str, generator: torch.Generator
) -> list[torch.Tensor]:
    """Per slice, a stacked A (slots, 1, rank, cols) or B (slots, 1, rows, rank) with each slot's
    weights in its first ``ranks[slot][slice]`` rows (A) or columns (B), zero beyond, as vLLM pads."""
    slices = len(ranks[0])
    out = []
    for i in range(slices):
        shape = (len(ranks), 1, rank, cols) if side == "a" else (len(ranks), 1, rows, rank)
        stacked = torch.zeros(shape)
        for s, per_slice in enumerate(ranks):
            r = per_slice[i]
            if side == "a":
                stacked[s, 0, :r] = torch.randn(r, cols, generator=generator)
            else:
                stacked[s, 0, :, :r] = torch.randn(rows, r, generator=generator)
        out.append(stacked)
    return out


def _mapping(tokens, requests, is_prefill: bool):
    from vllm.lora.layers import LoRAMapping

    return LoRAMapping(tokens, requests, is_prefill=is_prefill)


def _run(wrapper_cls, is_prefill: bool, generator_seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(generator_seed)
    wrapper = wrapper_cls(64, 16, "cpu")
    wrapper.update_metadata(_mapping(TOKENS, REQUESTS, is_prefill), list(SLOT_IDS), len(SLOT_IDS) + 1, 100)
    n = len(TOKENS)
    a = padded_stack(SLICE_RANKS, 0, HIDDEN, RANK, "a", g)
    b = [padded_stack(SLICE_RANKS, rows, 0, RANK, "b", g)[i] for i, rows in enumerate(SLICES)]
    x = torch.randn(n, HIDDEN, generator=g)
    base = torch.randn(n, sum(SLICES), generator=g)
    results = {}

    y = base.clone()
    wrapper.add_lora_linear(y, x, tuple(a), tuple(b), 0.5, SLICES)
    results["add_lora_linear"] = y

    buffer = torch.zeros(1, n, RANK)
    wrapper.add_shrink(buffer, x, (a[0],), 1.0)
    y = base[:, : SLICES[0]].clone()
    wrapper.add_expand(y, buffer, (b[0],), SLICES[:1], offset_start=0)
    results["add_shrink"], results["add_expand"] = buffer, y

    y = base.clone()
    wrapper.add_lora_embedding(y, torch.randn(n, RANK, generator=g), b[1], add_inputs=True)
    results["add_lora_embedding"] = y

    rows = len(REQUESTS)
    y = base[:rows, : SLICES[0]].clone()
    wrapper.add_lora_logits(y, x[:rows], a[0], b[0], 1.0)
    results["add_lora_logits"] = y
    return results


def compare_with_vllm() -> str | None:
    """None when the rank-aware wrapper equals vLLM's on the example, else the first difference."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from prunedlora.serve import vllm_fixes
    from prunedlora.serve.lora_ops.punica_cpu import RankAwarePunicaWrapperCPU

    vllm_fixes.apply()
    for is_prefill in (False, True):
        ours = _run(RankAwarePunicaWrapperCPU, is_prefill, 0)
        theirs = _run(PunicaWrapperCPU, is_prefill, 0)
        for name, got in ours.items():
            if not torch.allclose(got, theirs[name], rtol=1e-4, atol=1e-4):
                stage = "prefill" if is_prefill else "decode"
                return f"{name} ({stage}) differs by {(got - theirs[name]).abs().max().item():.3g}"
    return None
