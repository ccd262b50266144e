"""lora_ops.kernels: vLLM's six CPU LoRA ops, grouped by slot and at each slot's live rank, equal vLLM's.

The reference is a pristine copy of vLLM's own ops (loaded from vLLM's file, so no patch in this
process can hide them). They gather slot -1 for tokens without an adapter (the bug ``vllm_fixes``
exists for), so those rows are checked against what they should be instead: zero after a shrink,
untouched by an expand. Every case mixes slots of different ranks with a slot at rank 1, a slot
lacking the module (all zero) and tokens without an adapter.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from prunedlora.serve.lora_ops import kernels
from prunedlora.serve.lora_ops.kernels import group_by_slot

pytest.importorskip("vllm")
from vllm.lora.ops.torch_ops import lora_ops  # noqa: E402

RANK, HIDDEN, OUT = 8, 32, 24
RANKS = (8, 3, 1, 0)  # per slot: full, mid, rank 1, the module missing
DECODE = torch.tensor([0, -1, 2, 1, 3, 0, -1, 2, 1, 1])  # interleaved: gathers, not slices
# prefill: sequences (slot, length); the second and last lack an adapter
SEQUENCES = [(1, 3), (-1, 2), (0, 4), (2, 1), (3, 2), (-1, 1)]


def _pristine():
    spec = importlib.util.spec_from_file_location("_pristine_lora_ops_for_kernels", lora_ops.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STOCK = _pristine()


def _stack(side: str, ranks=RANKS, rows=OUT, cols=HIDDEN, seed=0, dtype=torch.float32) -> torch.Tensor:
    """A (slots, 1, RANK, cols) or B (slots, 1, rows, RANK) padded as vLLM's set_lora leaves it."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(ranks), 1, RANK, cols) if side == "a" else (len(ranks), 1, rows, RANK)
    stacked = torch.zeros(shape)
    for s, r in enumerate(ranks):
        if side == "a":
            stacked[s, 0, :r] = torch.randn(r, cols, generator=g)
        else:
            stacked[s, 0, :, :r] = torch.randn(rows, r, generator=g)
    return stacked.to(dtype)


def _prefill_meta():
    slots = torch.tensor([s for s, _ in SEQUENCES])
    lens = torch.tensor([n for _, n in SEQUENCES])
    starts = torch.cumsum(lens, 0) - lens
    return (starts, lens, slots, len(SEQUENCES), int(lens.max()), int(lens.sum())), torch.repeat_interleave(slots, lens)


def _check_shrink(got, stock, indices, initial):
    valid = indices >= 0
    torch.testing.assert_close(got[valid], stock[valid])
    assert torch.all(got[~valid][:, :RANK] == 0)
    torch.testing.assert_close(got[:, RANK:], initial[:, RANK:])  # beyond the rank: untouched, as vLLM


def _check_expand(got, stock, indices, initial):
    valid = indices >= 0
    torch.testing.assert_close(got[valid], stock[valid])
    torch.testing.assert_close(got[~valid], initial[~valid])  # no adapter: untouched


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_bgmv_shrink_equals_vllm(scale):
    a = _stack("a")
    x = torch.randn(len(DECODE), HIDDEN, generator=torch.Generator().manual_seed(1))
    initial = torch.randn(len(DECODE), RANK + 3)
    got, stock = initial.clone(), initial.clone()
    kernels.bgmv_shrink(x, a, got, DECODE, scale)
    STOCK.bgmv_shrink(x, a, stock, DECODE, scale)
    _check_shrink(got, stock, DECODE, initial)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_bgmv_expand_and_slice_equal_vllm(add_inputs):
    b = _stack("b", seed=2)
    z = torch.randn(len(DECODE), RANK, generator=torch.Generator().manual_seed(3))
    initial = torch.randn(len(DECODE), OUT)
    got, stock = initial.clone(), initial.clone()
    kernels.bgmv_expand(z, b, got, DECODE, add_inputs)
    STOCK.bgmv_expand(z, b, stock, DECODE, add_inputs)
    _check_expand(got, stock, DECODE, initial)

    initial = torch.randn(len(DECODE), OUT + 10)  # a packed layer's output: this slice at offset 6
    got, stock = initial.clone(), initial.clone()
    kernels.bgmv_expand_slice(z, b, got, DECODE, 6, OUT, add_inputs)
    STOCK.bgmv_expand_slice(z, b, stock, DECODE, 6, OUT, add_inputs)
    _check_expand(got, stock, DECODE, initial)


def test_bgmv_expand_where_the_output_is_narrower_than_b():
    """vLLM writes min(B rows, output columns) (padded vocab or embeddings); so do the kernels."""
    b = _stack("b", rows=OUT + 5, seed=4)
    z = torch.randn(len(DECODE), RANK)
    initial = torch.randn(len(DECODE), OUT)
    got, stock = initial.clone(), initial.clone()
    kernels.bgmv_expand(z, b, got, DECODE, True)
    STOCK.bgmv_expand(z, b, stock, DECODE, True)
    _check_expand(got, stock, DECODE, initial)


def test_sgmv_ops_equal_vllm_on_a_prefill_batch():
    meta, per_token = _prefill_meta()
    n = len(per_token)
    g = torch.Generator().manual_seed(5)
    a, b = _stack("a", seed=6), _stack("b", seed=7)
    x, z = torch.randn(n, HIDDEN, generator=g), torch.randn(n, RANK, generator=g)

    initial = torch.zeros(n, RANK)
    got, stock = initial.clone(), initial.clone()
    kernels.sgmv_shrink(x, a, got, *meta, 0.25)
    STOCK.sgmv_shrink(x, a, stock, *meta, 0.25)
    _check_shrink(got, stock, per_token, initial)

    initial = torch.randn(n, OUT, generator=g)
    got, stock = initial.clone(), initial.clone()
    kernels.sgmv_expand(z, b, got, *meta, True)
    STOCK.sgmv_expand(z, b, stock, *meta, True)
    _check_expand(got, stock, per_token, initial)

    initial = torch.randn(n, 2 * OUT, generator=g)
    got, stock = initial.clone(), initial.clone()
    kernels.sgmv_expand_slice(z, b, got, *meta, OUT, OUT, True)
    STOCK.sgmv_expand_slice(z, b, stock, *meta, OUT, OUT, True)
    _check_expand(got, stock, per_token, initial)


def test_bfloat16_weights_compute_in_the_outputs_dtype_as_vllm():
    """bf16 slots and activations, a float32 shrink buffer, a bf16 expand output: vLLM's dtypes."""
    a, b = _stack("a", dtype=torch.bfloat16, seed=8), _stack("b", dtype=torch.bfloat16, seed=9)
    x = torch.randn(len(DECODE), HIDDEN).to(torch.bfloat16)
    got, stock = torch.zeros(len(DECODE), RANK), torch.zeros(len(DECODE), RANK)
    kernels.bgmv_shrink(x, a, got, DECODE, 1.0)
    STOCK.bgmv_shrink(x, a, stock, DECODE, 1.0)
    _check_shrink(got, stock, DECODE, torch.zeros(len(DECODE), RANK))
    initial = torch.randn(len(DECODE), OUT).to(torch.bfloat16)
    y, y_stock = initial.clone(), initial.clone()
    kernels.bgmv_expand(got, b, y, DECODE, True)
    STOCK.bgmv_expand(stock, b, y_stock, DECODE, True)
    assert y.dtype == torch.bfloat16
    valid = DECODE >= 0
    torch.testing.assert_close(y[valid], y_stock[valid], rtol=2e-2, atol=2e-2)
    assert torch.equal(y[~valid], initial[~valid])


def test_a_slot_lacking_the_module_and_tokens_without_adapter_change_nothing():
    """Slot 3 holds no weights for this module: its tokens' outputs are as if they had no adapter."""
    b = _stack("b", seed=10)
    indices = torch.tensor([3, -1, 3])
    initial = torch.randn(3, OUT)
    y = initial.clone()
    kernels.bgmv_expand(torch.randn(3, RANK), b, y, indices, True)
    assert torch.equal(y, initial)
    out = torch.full((3, RANK), 7.0)
    kernels.bgmv_shrink(torch.randn(3, HIDDEN), _stack("a"), out, indices, 1.0)
    assert torch.equal(out, torch.zeros(3, RANK))


def test_tokens_are_grouped_once_per_slot_and_contiguous_runs_are_slices():
    """Python work per slot, never per token: one group per slot, a slice where its tokens are one run."""
    groups = group_by_slot(DECODE)
    assert [g.slot for g in groups] == [0, 1, 2, 3]
    assert all(isinstance(g.rows, torch.Tensor) for g in groups if g.slot != 3)
    assert groups[3].rows == slice(4, 5)
    _, per_token = _prefill_meta()
    prefill = group_by_slot(per_token)
    assert [(g.slot, g.rows) for g in prefill] == [
        (0, slice(5, 9)),
        (1, slice(0, 3)),
        (2, slice(9, 10)),
        (3, slice(10, 12)),
    ]
    assert group_by_slot(torch.tensor([-1, -1])) == () and group_by_slot(torch.tensor([], dtype=torch.long)) == ()


@pytest.mark.parametrize("add_inputs", [True, False])
def test_one_adapter_for_the_whole_batch_equals_vllm_and_leaves_rows_past_the_batch_alone(add_inputs):
    """The common decode case takes a shortcut (no row view when one slot holds every token); the result
    must not change, and an output with more rows than the batch has tokens keeps the extra rows."""
    indices = torch.full((6,), 1)
    g = torch.Generator().manual_seed(11)
    a, b = _stack("a", seed=12), _stack("b", seed=13)
    x = torch.randn(6, HIDDEN, generator=g)
    got, stock = torch.randn(6, RANK, generator=g), torch.zeros(6, RANK)
    kernels.bgmv_shrink(x, a, got, indices, 0.5)
    STOCK.bgmv_shrink(x, a, stock, indices, 0.5)
    torch.testing.assert_close(got, stock)

    initial = torch.randn(8, OUT + 4, generator=g)  # two rows past the batch; this slice at offset 4
    y, y_stock = initial.clone(), initial.clone()
    kernels.bgmv_expand_slice(got, b, y, indices, 4, OUT, add_inputs)
    STOCK.bgmv_expand_slice(stock, b, y_stock[:6], indices, 4, OUT, add_inputs)
    torch.testing.assert_close(y, y_stock)
    assert torch.equal(y[6:], initial[6:]) and torch.equal(y[:, :4], initial[:, :4])
