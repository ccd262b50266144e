"""lora_ops.weights: live ranks read from vLLM's padded slots, and slices cached until vLLM writes again."""

from __future__ import annotations

import torch

from prunedlora.serve.lora_ops.weights import SlotWeights, live_ranks_a, live_ranks_b


def _padded(ranks, rank=8, other=5, side="a"):
    shape = (len(ranks), 1, rank, other) if side == "a" else (len(ranks), 1, other, rank)
    t = torch.zeros(shape)
    for s, r in enumerate(ranks):
        if side == "a":
            t[s, 0, :r] = torch.randn(r, other)
        else:
            t[s, 0, :, :r] = torch.randn(other, r)
    return t


def test_live_rank_is_what_the_adapter_filled_before_padding():
    assert live_ranks_a(_padded([8, 3, 1, 0])) == [8, 3, 1, 0]
    assert live_ranks_b(_padded([8, 3, 1, 0], side="b")) == [8, 3, 1, 0]
    # vLLM's 3-D layout (embeddings) and a zero component inside the rank (kept: only trailing ones go)
    a = _padded([4, 2])
    a[0, 0, 1] = 0
    assert live_ranks_a(a.squeeze(1)) == [4, 2]


def test_slices_have_each_slots_own_rank():
    """Break: slice to the slot's padded width instead of its live rank -> shapes (8, in) everywhere."""
    a, b = _padded([8, 3, 1, 0]), _padded([8, 3, 1, 0], side="b")
    weights = SlotWeights()
    rows, cols = weights.rows(a, torch.float32), weights.cols(b, torch.float32)
    assert [None if t is None else tuple(t.shape) for t in rows] == [(8, 5), (3, 5), (1, 5), None]
    assert [None if t is None else tuple(t.shape) for t in cols] == [(5, 8), (5, 3), (5, 1), None]
    torch.testing.assert_close(rows[1], a[1, 0, :3])


def test_packed_slot_stacks_the_slices_at_the_rank_both_sides_share():
    a = [_padded([4, 2, 0]), _padded([1, 0, 0])]
    b = [_padded([4, 2, 0], side="b"), _padded([3, 0, 0], side="b")]  # slice 1: B wider than A
    slots = SlotWeights().packed(a, b, torch.float32, torch.float32)
    assert slots[2] is None
    assert slots[0].a.shape == (4 + 1, 5) and slots[0].bounds == ((0, 4), (4, 5))
    assert slots[1].bounds == ((0, 2), (2, 2)) and slots[1].b[1] is None  # slot 1 lacks slice 1


def test_cache_follows_vllms_writes_and_never_outlives_a_tensor():
    """set_lora/reset_lora write in place (version counter); a new tensor is never served stale slices."""
    a = _padded([2, 2])
    weights = SlotWeights()
    first = weights.rows(a, torch.float32)
    assert weights.rows(a, torch.float32) is first  # cached
    a[1, 0, :5] = torch.randn(5, 5)  # vLLM loads a rank-5 adapter into slot 1
    assert weights.rows(a, torch.float32)[1].shape == (5, 5)
    a[0] = 0  # reset_lora
    assert weights.rows(a, torch.float32)[0] is None
    other = _padded([1, 1])
    assert [t.shape[0] for t in weights.rows(other, torch.float32)] == [1, 1]


def test_inference_tensors_trust_the_generation_only_where_told():
    with torch.inference_mode():
        a = _padded([3])
    assert SlotWeights().rows(a, torch.float32) is not SlotWeights().rows(a, torch.float32)
    untrusting = SlotWeights()
    assert untrusting.rows(a, torch.float32) is not untrusting.rows(a, torch.float32)
    trusting = SlotWeights(trust_generation=True)
    first = trusting.rows(a, torch.float32)
    assert trusting.rows(a, torch.float32) is first
    trusting.generation += 1
    assert trusting.rows(a, torch.float32) is not first
