"""LorapruneConfig and the plan of counts: every bad setting refused with one line on construction."""

import pytest

from prunedlora.loraprune import LorapruneConfig, LorapruneError
from prunedlora.loraprune.groups import DecoderShape, check_gqa, plan, plan_counts

SMOLLM2 = DecoderShape(num_layers=30, hidden=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate=1536)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sparsity=1.0), "strictly between 0 and 1"),
        (dict(sparsity=0), "strictly between 0 and 1"),
        (dict(sparsity="half"), "sparsity must be"),
        (dict(criterion="fisher"), "criterion must be one of lora, lora-act, grad, magnitude, random"),
        (dict(prune_heads=False, prune_channels=False), "nothing could be pruned"),
        (dict(prune_heads="no"), "prune_heads must be true or false"),
        (dict(start=0.9, end=0.1), "start < end"),
        (dict(prune_every=0), "prune_every"),
        (dict(ema=1.0), "ema"),
        (dict(exempt_layers="first"), "exempt_layers"),
    ],
)
def test_bad_settings_are_refused_with_one_line(settings, message):
    with pytest.raises(LorapruneError, match=message) as info:
        LorapruneConfig(**settings)
    assert "\n" not in str(info.value)


def test_unknown_recipe_keys_are_named():
    with pytest.raises(LorapruneError, match="unknown loraprune setting"):
        LorapruneConfig.from_dict({"sparsity": 0.5, "sparsty": 0.2})
    assert LorapruneConfig.from_dict(LorapruneConfig(sparsity=0.2).to_dict()).sparsity == 0.2


def test_released_exemption_is_the_first_tenth_and_the_last_layer():
    assert LorapruneConfig(exempt_layers="released").exempt(30) == (0, 1, 2, 29)
    assert LorapruneConfig(exempt_layers="released").exempt(2) == (0, 1)
    assert LorapruneConfig().exempt(30) == ()


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_smollm2_plans_reach_the_target_within_one_channel(sparsity):
    p = plan(LorapruneConfig(sparsity=sparsity), SMOLLM2)
    assert 0 < p.groups_removed < 3 and 0 < p.channels_removed < 1536
    one_channel = SMOLLM2.channel_weights / SMOLLM2.layer_weights
    assert abs(p.achieved_sparsity - sparsity) <= one_channel
    # the achieved fraction counts whole groups: q and o of 3 query heads, K and V of one KV head
    removed = 30 * (p.groups_removed * 576 * 64 * 8 + p.channels_removed * 3 * 576)
    assert p.removed_weights == removed
    assert p.achieved_sparsity == removed / (30 * (3 * 576 * 64 * 8 + 1536 * 3 * 576))


def test_heads_only_plans_whole_kv_groups():
    # attention is a quarter of SmolLM2's prunable weights: 10% of them is 1.2 KV groups a layer -> 1
    p = plan(LorapruneConfig(sparsity=0.1, prune_channels=False), SMOLLM2)
    assert (p.groups_removed, p.channels_removed) == (1, 0)
    assert p.achieved_sparsity == pytest.approx(SMOLLM2.group_weights / SMOLLM2.layer_weights)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: plan_counts(SMOLLM2, 3, 0), "breaks grouped-query attention"),
        (lambda: plan(LorapruneConfig(sparsity=0.9, prune_channels=False), SMOLLM2), "breaks grouped-query"),
        (lambda: plan_counts(SMOLLM2, 0, 1536), "leaves no MLP"),
        (lambda: plan_counts(SMOLLM2, 0, 0), "removes nothing"),
        (lambda: check_gqa(9, 2), "not grouped-query attention"),
        # 3 of 4 KV groups kept -> 6 query heads, and 64 is not a multiple of 6: transformers refuses it
        (lambda: plan_counts(DecoderShape(2, 64, 8, 4, 8, 128), 1, 0), "not a multiple"),
        (lambda: check_gqa(6, 4), "not grouped-query attention"),
    ],
)
def test_plans_that_break_gqa_or_empty_a_layer_are_refused(call, message):
    with pytest.raises(LorapruneError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
