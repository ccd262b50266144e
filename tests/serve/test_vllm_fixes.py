"""vllm_fixes: the CPU LoRA ops leave tokens without an adapter untouched, and equal vLLM's otherwise."""

from __future__ import annotations

import types

import pytest
import torch

from prunedlora.serve import vllm_fixes

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


def _fixed_namespace():
    return types.SimpleNamespace(
        bgmv_shrink=vllm_fixes.bgmv_shrink,
        bgmv_expand=vllm_fixes.bgmv_expand,
        bgmv_expand_slice=vllm_fixes.bgmv_expand_slice,
    )


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    slots, rank, hidden, out = 3, 4, 8, 6
    a = torch.randn(slots, 1, rank, hidden, generator=g)
    b = torch.randn(slots, 1, out, rank, generator=g)
    x = torch.randn(5, hidden, generator=g)
    indices = torch.tensor([0, -1, 2, -1, 1])
    return a, b, x, indices


def test_detects_the_bug_in_this_vllm_and_the_fix_passes():
    assert vllm_fixes.ops_skip_no_lora_tokens(_fixed_namespace())
    if not vllm_fixes._applied:
        # If this fails, vLLM fixed its ops: apply() will leave them alone and this module can go.
        assert not vllm_fixes.ops_skip_no_lora_tokens(lora_ops)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_fixed_ops_skip_minus_one_and_match_vllm_elsewhere(add_inputs):
    a, b, x, indices = _case()
    base = torch.randn(5, 6)

    buffer = torch.zeros(5, 4)
    vllm_fixes.bgmv_shrink(x, a, buffer, indices, 0.5)
    y = base.clone()
    vllm_fixes.bgmv_expand(buffer, b, y, indices, add_inputs)

    # Reference: each token with its own slot, none for -1.
    for t, slot in enumerate(indices.tolist()):
        if slot < 0:
            assert torch.equal(buffer[t], torch.zeros(4))
            assert torch.equal(y[t], base[t])
        else:
            delta = b[slot, 0] @ (0.5 * a[slot, 0] @ x[t])
            expected = base[t] + delta if add_inputs else delta
            torch.testing.assert_close(y[t], expected)

    if not vllm_fixes._applied:
        valid = indices >= 0
        ref_buffer = torch.zeros(5, 4)
        lora_ops.bgmv_shrink(x, a, ref_buffer, indices, 0.5)
        assert torch.equal(ref_buffer[valid], buffer[valid])
        assert not torch.equal(ref_buffer[~valid], torch.zeros(2, 4))  # vLLM's own op applies slot -1 (the bug)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_fixed_expand_slice(add_inputs):
    _, b, _, indices = _case(1)
    buffer = torch.randn(5, 4)
    base = torch.randn(5, 10)
    y = base.clone()
    vllm_fixes.bgmv_expand_slice(buffer, b, y, indices, 3, 6, add_inputs)
    for t, slot in enumerate(indices.tolist()):
        assert torch.equal(y[t, :3], base[t, :3]) and torch.equal(y[t, 9:], base[t, 9:])
        if slot < 0:
            assert torch.equal(y[t], base[t])
        else:
            delta = b[slot, 0] @ buffer[t]
            torch.testing.assert_close(y[t, 3:9], base[t, 3:9] + delta if add_inputs else delta)


def test_sgmv_prefill_path_uses_the_fixed_ops():
    """vLLM's prefill ops call the bgmv names of their module, so replacing those fixes prefill too."""
    a, _, _, _ = _case()
    x = torch.randn(6, 8)
    out = torch.zeros(6, 4)
    saved = lora_ops.bgmv_shrink
    try:
        lora_ops.bgmv_shrink = vllm_fixes.bgmv_shrink
        # two sequences: 4 tokens without an adapter, then 2 with slot 1
        lora_ops.sgmv_shrink(
            x, a, out, torch.tensor([0, 4]), torch.tensor([4, 2]), torch.tensor([-1, 1]), 2, 4, 6, 1.0
        )
    finally:
        lora_ops.bgmv_shrink = saved
    assert torch.equal(out[:4], torch.zeros(4, 4))
    torch.testing.assert_close(out[4:], x[4:] @ a[1, 0].T)
