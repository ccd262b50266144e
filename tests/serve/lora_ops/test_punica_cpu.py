"""lora_ops.punica_cpu: every entry point vLLM's LoRA layers call equals vLLM's own CPU wrapper.

Both wrappers get the same mapping through vLLM's ``update_metadata`` and the same padded slots. vLLM's
side runs with ``vllm_fixes``' ops (patched for this module's tests only), so rows of tokens without an
adapter are right on both sides and the whole outputs must agree. The batch mixes those tokens with
four slots: full rank, mixed ranks per slice, rank 1, and one lacking a slice of the packed layer.
"""

from __future__ import annotations

import pytest
import torch

from prunedlora.serve import vllm_fixes

pytest.importorskip("vllm")
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.ops import torch_ops  # noqa: E402
from vllm.lora.ops.torch_ops import lora_ops  # noqa: E402
from vllm.lora.punica_wrapper import punica_cpu  # noqa: E402

from prunedlora.serve.lora_ops.punica_cpu import RankAwarePunicaWrapperCPU  # noqa: E402

HIDDEN, RANK = 32, 8
QKV = (16, 8, 8)  # a packed qkv layer's output slices
SLOT_IDS = [5, 6, 7, 8]
SLICE_RANKS = [(8, 8, 8), (4, 2, 6), (1, 1, 1), (3, 0, 0)]  # slot 3 lacks k and v
TOKENS = (0, 5, 5, 6, 0, 7, 8, 8, 6, 5, 0, 7)  # adapter id per token, 0: none
REQUESTS = (5, 0, 6, 7, 8)


@pytest.fixture(autouse=True)
def fixed_vllm_ops(monkeypatch):
    """vLLM's CPU ops with the -1 fix, where vLLM's wrapper looks them up; restored after each test."""
    for module in (lora_ops, torch_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            monkeypatch.setattr(module, name, getattr(vllm_fixes, name))


def _stacked(g, slot_ranks, out_sizes, dtype):
    a, b = [], []
    for i, out in enumerate(out_sizes):
        sa, sb = torch.zeros(len(slot_ranks), 1, RANK, HIDDEN), torch.zeros(len(slot_ranks), 1, out, RANK)
        for s, ranks in enumerate(slot_ranks):
            r = ranks[i]
            sa[s, 0, :r] = torch.randn(r, HIDDEN, generator=g)
            sb[s, 0, :, :r] = torch.randn(out, r, generator=g)
        a.append(sa.to(dtype))
        b.append(sb.to(dtype))
    return tuple(a), tuple(b)


def _wrappers(is_prefill, tokens=TOKENS):
    mapping = LoRAMapping(tokens, REQUESTS, is_prefill=is_prefill)
    pair = []
    for cls in (RankAwarePunicaWrapperCPU, punica_cpu.PunicaWrapperCPU):
        wrapper = cls(64, 16, "cpu")
        wrapper.update_metadata(mapping, list(SLOT_IDS), len(SLOT_IDS) + 1, 1000)
        pair.append(wrapper)
    return pair


def _close(got, expected, dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_prefill", [False, True])
def test_add_lora_linear_on_a_packed_layer(is_prefill, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = _stacked(g, SLICE_RANKS, QKV, dtype)
    x = torch.randn(len(TOKENS), HIDDEN, generator=g).to(dtype)
    base = torch.randn(len(TOKENS), sum(QKV), generator=g).to(dtype)
    outputs = []
    for wrapper in _wrappers(is_prefill):
        y = base.clone()
        wrapper.add_lora_linear(y, x, a, b, 1.0, QKV)
        outputs.append(y)
    _close(*outputs, dtype)
    no_adapter = torch.tensor(TOKENS) == 0
    assert torch.equal(outputs[0][no_adapter], base[no_adapter])  # untouched, bit for bit


@pytest.mark.parametrize("is_prefill", [False, True])
def test_row_parallel_shrink_then_expand(is_prefill):
    """o_proj/down_proj: add_shrink into a (slices, tokens, rank) buffer, then add_expand at an offset."""
    g = torch.Generator().manual_seed(1)
    a, b = _stacked(g, [r[:1] for r in SLICE_RANKS], (24,), torch.float32)
    x = torch.randn(len(TOKENS), HIDDEN, generator=g)
    base = torch.randn(len(TOKENS), 30, generator=g)
    buffers, outputs = [], []
    for wrapper in _wrappers(is_prefill):
        buffer = torch.zeros(1, len(TOKENS), RANK)
        wrapper.add_shrink(buffer, x, a, 1.0)
        y = base.clone()
        wrapper.add_expand(y, buffer, b, (24,), offset_start=6, add_input=True)
        buffers.append(buffer)
        outputs.append(y)
    _close(*buffers, torch.float32)
    _close(*outputs, torch.float32)


def test_logits_and_embedding():
    g = torch.Generator().manual_seed(2)
    a, b = _stacked(g, [r[:1] for r in SLICE_RANKS], (40,), torch.float32)
    x = torch.randn(len(REQUESTS), HIDDEN, generator=g)
    logits = torch.randn(len(REQUESTS), 36, generator=g)  # narrower than B: vLLM's padded vocab
    emb_in = torch.randn(len(TOKENS), RANK, generator=g)
    emb_base = torch.randn(len(TOKENS), 40, generator=g)
    got = []
    for wrapper in _wrappers(False):
        y = logits.clone()
        wrapper.add_lora_logits(y, x, a[0], b[0], 1.0)
        e = emb_base.clone()
        wrapper.add_lora_embedding(e, emb_in, b[0], add_inputs=True)
        got.append((y, e))
    for ours, theirs in zip(*got):
        _close(ours, theirs, torch.float32)


def test_a_new_adapter_in_a_slot_is_seen_without_a_mapping_change():
    """vLLM writes a slot in place (set_lora); the cached slices follow even when the mapping is the same."""
    g = torch.Generator().manual_seed(3)
    a, b = _stacked(g, SLICE_RANKS, QKV, torch.float32)
    x = torch.randn(len(TOKENS), HIDDEN, generator=g)
    ours, theirs = _wrappers(False)
    ours.add_lora_linear(torch.zeros(len(TOKENS), sum(QKV)), x, a, b, 1.0, QKV)  # fills the cache
    for t in (*a, *b):  # slot 2: rank 1 -> rank 6 (as set_lora after reset_lora would)
        t[2] = 0
    for t in a:
        t[2, 0, :6] = torch.randn(6, HIDDEN, generator=g)
    for t in b:
        t[2, 0, :, :6] = torch.randn(t.shape[2], 6, generator=g)
    y_ours, y_theirs = torch.zeros(len(TOKENS), sum(QKV)), torch.zeros(len(TOKENS), sum(QKV))
    ours.add_lora_linear(y_ours, x, a, b, 1.0, QKV)
    theirs.add_lora_linear(y_theirs, x, a, b, 1.0, QKV)
    _close(y_ours, y_theirs, torch.float32)


def test_a_batch_without_adapters_changes_nothing():
    g = torch.Generator().manual_seed(4)
    a, b = _stacked(g, SLICE_RANKS, QKV, torch.float32)
    (ours, _) = _wrappers(True, tokens=(0,) * 5)
    base = torch.randn(5, sum(QKV), generator=g)
    y = base.clone()
    ours.add_lora_linear(y, torch.randn(5, HIDDEN, generator=g), a, b, 1.0, QKV)
    assert torch.equal(y, base)
