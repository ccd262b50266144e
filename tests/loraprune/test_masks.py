"""Masks act at the o_proj and down_proj inputs, only ever lose entries, and survive a state_dict."""

import pytest
import torch

from prunedlora.loraprune import GroupMasks, LorapruneError
from prunedlora.loraprune.groups import decoder_shape, find_projections
from tests.loraprune.helpers import batch, tiny_peft


def captured_inputs(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    return seen, handle


def test_a_masked_kv_group_zeroes_its_query_heads_at_the_o_proj_input():
    model = tiny_peft()
    masks = GroupMasks(decoder_shape(model.config))
    projections = find_projections(model)
    masks.attach(projections)
    masks.remove(1, groups=[0], channels=[3, 5])
    seen_o, h1 = captured_inputs(projections[1]["o_proj"])  # registered after the mask: sees its output
    seen_d, h2 = captured_inputs(projections[1]["down_proj"])
    model(input_ids=batch(0))
    h1.remove(), h2.remove()
    o_in, d_in = seen_o[0], seen_d[0]
    assert o_in[..., :32].abs().max() == 0  # query heads 0 and 1 read KV head 0
    assert o_in[..., 32:].abs().max() > 0
    assert d_in[..., [3, 5]].abs().max() == 0 and d_in[..., 4].abs().max() > 0


def test_masks_only_lose_entries_and_report_uniform_widths():
    model = tiny_peft()
    masks = GroupMasks(decoder_shape(model.config))
    masks.remove(0, groups=[1], channels=[0])
    masks.remove(0, groups=[], channels=[1])
    assert masks.kept_groups(0) == [0] and masks.kept_channels(0)[:2] == [2, 3]
    assert masks.uniform_widths() is None
    for layer in (1, 2):
        masks.remove(layer, groups=[0], channels=[5, 6])
    assert masks.uniform_widths() == (1, 126)


def test_masks_survive_a_state_dict_round_trip_with_the_same_outputs():
    model = tiny_peft()
    shape = decoder_shape(model.config)
    masks = GroupMasks(shape)
    masks.attach(find_projections(model))
    masks.remove(2, groups=[1], channels=list(range(0, 128, 3)))
    expected = model(input_ids=batch(1)).logits
    saved = masks.state_dict()
    masks.detach()
    restored = GroupMasks(shape)
    restored.load_state_dict(saved)
    restored.attach(find_projections(model))
    assert torch.equal(restored.heads, masks.heads) and torch.equal(restored.channels, masks.channels)
    torch.testing.assert_close(model(input_ids=batch(1)).logits, expected)


def test_masks_of_another_model_or_emptied_layers_are_refused():
    shape = decoder_shape(tiny_peft().config)
    masks = GroupMasks(shape)
    with pytest.raises(LorapruneError, match="belong to another model"):
        masks.load_state_dict({"heads": torch.ones(3, 3, dtype=torch.bool), "channels": masks.channels})
    empty = masks.state_dict()
    empty["heads"][1] = False
    with pytest.raises(LorapruneError, match="without any KV group"):
        masks.load_state_dict(empty)


def test_a_change_reaches_hooks_that_already_ran():
    model = tiny_peft()
    masks = GroupMasks(decoder_shape(model.config))
    projections = find_projections(model)
    masks.attach(projections)
    full = model(input_ids=batch(2)).logits.detach()
    masks.remove(0, channels=[1])
    assert not torch.equal(model(input_ids=batch(2)).logits, full)
    seen, handle = captured_inputs(projections[0]["down_proj"])
    model(input_ids=batch(2))
    handle.remove()
    assert seen[0][..., 1].abs().max() == 0
