"""Sixteen distinct adapters in one batch, with tokens of the base model among them: the rank-aware
wrapper's batched path (every slot in a fixed number of calls) and its per-slot loop both equal a
float64 reference, and leave the base model's rows untouched bit for bit.

Each slot has its own rank per slice (0 to 8, some slots lacking a slice, one lacking the whole layer).
float32: equal to the reference within float32 rounding (1e-5). bfloat16 (slots, activations and
output in bf16, as vLLM holds them): the products accumulate in float32 and are rounded into the bf16
output once, so each entry is within one bf16 rounding of the exact result (relative 2^-8, plus an
absolute 1e-6 for entries near zero); vLLM's own bf16 ops round per product, so they are compared at
the looser tolerance the other bf16 tests use (3e-2).
"""

from __future__ import annotations

import pytest
import torch

from prunedlora.serve import vllm_fixes
from prunedlora.serve.lora_ops.kernels import batch_layout, group_by_slot

pytest.importorskip("vllm")
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.ops import torch_ops  # noqa: E402
from vllm.lora.ops.torch_ops import lora_ops  # noqa: E402
from vllm.lora.punica_wrapper import punica_cpu  # noqa: E402

from prunedlora.serve.lora_ops.punica_cpu import RankAwarePunicaWrapperCPU  # noqa: E402

SLOTS, SLOT_RANK, HIDDEN = 16, 8, 48
QKV = (32, 16, 16)
IDS = list(range(1, SLOTS + 1))  # adapter id per slot


def _slice_ranks(seed: int = 0) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    ranks = [tuple(int(r) for r in torch.randint(0, SLOT_RANK + 1, (len(QKV),), generator=g)) for _ in range(SLOTS)]
    ranks[0] = (SLOT_RANK,) * len(QKV)  # full
    ranks[1] = (1, 1, 1)
    ranks[2] = (0, 0, 0)  # lacks the layer: its tokens get nothing
    ranks[3] = (5, 0, 2)
    return ranks


RANKS = _slice_ranks()
# decode: every adapter once or twice, interleaved, and base-model tokens (0) between them
DECODE = tuple(i for pair in zip(IDS + IDS[:5], [0] * 21) for i in pair)[:-3]
# prefill: one long sequence beside short ones (too uneven to batch: the per-slot loop runs)
PREFILL = (0,) * 3 + (4,) * 20 + (7,) * 2 + (0,) * 2 + (9,) * 3


@pytest.fixture(autouse=True)
def fixed_vllm_ops(monkeypatch):
    for module in (lora_ops, torch_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            monkeypatch.setattr(module, name, getattr(vllm_fixes, name))


def _stacked(out_sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for i, out in enumerate(out_sizes):
        sa, sb = torch.zeros(SLOTS, 1, SLOT_RANK, HIDDEN), torch.zeros(SLOTS, 1, out, SLOT_RANK)
        for s, ranks in enumerate(RANKS):
            r = ranks[i]
            sa[s, 0, :r] = torch.randn(r, HIDDEN, generator=g) / HIDDEN**0.5
            sb[s, 0, :, :r] = torch.randn(out, r, generator=g)
        a.append(sa.to(dtype))
        b.append(sb.to(dtype))
    return tuple(a), tuple(b)


def _reference(base, x, a, b, scale, tokens, out_sizes):
    """float64: y + B_i (scale A_i x) per token's slot and slice, nothing for id 0."""
    y = base.double().clone()
    offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
    for t, adapter in enumerate(tokens):
        if adapter == 0:
            continue
        s = adapter - 1
        for i, size in enumerate(out_sizes):
            z = scale * (a[i][s, 0].double() @ x[t].double())
            y[t, offsets[i] : offsets[i] + size] += b[i][s, 0, :size].double() @ z
    return y


def _wrapper(tokens, is_prefill, batching=True):
    wrapper = RankAwarePunicaWrapperCPU(256, 64, "cpu")
    requests = tuple(dict.fromkeys(tokens))
    wrapper.update_metadata(LoRAMapping(tokens, requests, is_prefill=is_prefill), IDS, SLOTS + 1, 1000)
    if not batching:
        wrapper._token_batch = None
    return wrapper


def _check(got, reference, base, tokens, dtype):
    no_adapter = torch.tensor(tokens) == 0
    assert torch.equal(got[no_adapter], base[no_adapter])  # untouched, bit for bit
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
    else:  # one rounding into bf16 of the exact result
        torch.testing.assert_close(got.double(), reference.to(dtype).double(), rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batching", [True, False])
def test_sixteen_adapters_on_a_packed_layer(dtype, batching):
    g = torch.Generator().manual_seed(1)
    a, b = _stacked(QKV, dtype, seed=2)
    x = torch.randn(len(DECODE), HIDDEN, generator=g).to(dtype)
    base = torch.randn(len(DECODE), sum(QKV), generator=g).to(dtype)
    wrapper = _wrapper(DECODE, False, batching)
    assert (wrapper._token_batch is not None) == batching
    y = base.clone()
    wrapper.add_lora_linear(y, x, a, b, 0.5, QKV)
    _check(y, _reference(base, x, a, b, 0.5, DECODE, QKV), base, DECODE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batching", [True, False])
def test_sixteen_adapters_row_parallel_shrink_then_expand(dtype, batching):
    """o_proj/down_proj: add_shrink into vLLM's float32 buffer, add_expand into the output at an offset."""
    g = torch.Generator().manual_seed(3)
    a, b = _stacked((40,), dtype, seed=4)
    x = torch.randn(len(DECODE), HIDDEN, generator=g).to(dtype)
    base = torch.randn(len(DECODE), 46, generator=g).to(dtype)
    wrapper = _wrapper(DECODE, False, batching)
    buffer = torch.full((1, len(DECODE), SLOT_RANK), 9.0)  # stale values: the shrink must overwrite them
    wrapper.add_shrink(buffer, x, a, 0.5)
    y = base.clone()
    wrapper.add_expand(y, buffer, b, (40,), offset_start=6, add_inputs=True)
    reference = base.double().clone()
    reference[:, 6:] = _reference(base[:, 6:], x, a, b, 0.5, DECODE, (40,))
    no_adapter = torch.tensor(DECODE) == 0
    assert torch.equal(buffer[0][no_adapter], torch.zeros_like(buffer[0][no_adapter]))
    _check(y, reference, base, DECODE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sixteen_adapters_equal_vllms_own_ops(dtype):
    g = torch.Generator().manual_seed(5)
    a, b = _stacked(QKV, dtype, seed=6)
    x = torch.randn(len(DECODE), HIDDEN, generator=g).to(dtype)
    base = torch.randn(len(DECODE), sum(QKV), generator=g).to(dtype)
    ours, theirs = base.clone(), base.clone()
    _wrapper(DECODE, False).add_lora_linear(ours, x, a, b, 1.0, QKV)
    stock = punica_cpu.PunicaWrapperCPU(256, 64, "cpu")
    stock.update_metadata(LoRAMapping(DECODE, tuple(dict.fromkeys(DECODE)), is_prefill=False), IDS, SLOTS + 1, 1000)
    stock.add_lora_linear(theirs, x, a, b, 1.0, QKV)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_uneven_prefill_takes_the_per_slot_loop_and_is_right(dtype):
    g = torch.Generator().manual_seed(7)
    a, b = _stacked(QKV, dtype, seed=8)
    x = torch.randn(len(PREFILL), HIDDEN, generator=g).to(dtype)
    base = torch.randn(len(PREFILL), sum(QKV), generator=g).to(dtype)
    wrapper = _wrapper(PREFILL, True)
    assert wrapper._token_batch is None  # 3 slots, one with 20 tokens: a padded grid would be 60 for 25
    y = base.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, QKV)
    _check(y, _reference(base, x, a, b, 1.0, PREFILL, QKV), base, PREFILL, dtype)


def test_a_new_batch_composition_is_computed_with_its_own_slots():
    """The stacked weights are cached per set of slots: a batch of other adapters gets its own."""
    g = torch.Generator().manual_seed(9)
    a, b = _stacked(QKV, torch.float32, seed=10)
    wrapper = _wrapper(DECODE, False)
    for tokens in (DECODE, (5, 6, 0, 5, 6), (1, 16, 2, 15), DECODE):
        wrapper.update_metadata(
            LoRAMapping(tokens, tuple(dict.fromkeys(tokens)), is_prefill=False), IDS, SLOTS + 1, 1000
        )
        x = torch.randn(len(tokens), HIDDEN, generator=g)
        base = torch.randn(len(tokens), sum(QKV), generator=g)
        y = base.clone()
        wrapper.add_lora_linear(y, x, a, b, 1.0, QKV)
        _check(y, _reference(base, x, a, b, 1.0, tokens, QKV), base, tokens, torch.float32)


def test_batch_layout_grid():
    groups = group_by_slot(torch.tensor([0, 1, -1, 2, 1, 0, 2]))
    layout = batch_layout(groups)
    assert layout.slots == (0, 1, 2) and layout.per_group == 2 and layout.keep is None
    assert layout.index.tolist() == [0, 5, 1, 4, 3, 6]
    uneven = batch_layout(group_by_slot(torch.tensor([0, 1, 1, 2])))
    assert uneven.per_group == 2 and uneven.keep.tolist() == [True, False, True, True, True, False]
    assert uneven.rows.tolist() == [0, 1, 2, 3]
    assert batch_layout(group_by_slot(torch.tensor([3, 3, -1]))) is None  # one adapter: the plain path
    assert batch_layout(group_by_slot(torch.tensor([0] * 20 + [1, 2]))) is None  # too uneven
