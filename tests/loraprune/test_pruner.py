"""LoraPruner: the cubic events, per-layer masking of the lowest scores, the grad criterion's buffer
that never reaches the optimizer, and resuming from its state_dict."""

import copy

import pytest
import torch

from prunedlora.loraprune import LorapruneConfig, LorapruneError, LoraPruner
from prunedlora.loraprune.schedule import cubic_fraction, prune_events
from tests.loraprune.helpers import ALL, batch, tiny_peft, train_steps


def test_events_follow_the_cubic_ramp_and_end_at_the_plan():
    config = LorapruneConfig(prune_every=10)
    events = prune_events(config, total_steps=100, groups=2, channels=600)
    assert events[0].step > 10 and events[-1].step == 89
    assert (events[-1].groups_removed, events[-1].channels_removed) == (2, 600)
    removed = [e.channels_removed for e in events]
    assert removed == sorted(removed) and len(set(removed)) == len(removed)
    assert events[0].channels_removed == int(600 * cubic_fraction(events[0].step, 10, 89))
    # the ramp removes most early: the first third of the span does more than half
    assert cubic_fraction(10 + (89 - 10) // 3, 10, 89) > 0.5
    assert prune_events(config, total_steps=3, groups=1, channels=5)[-1].step == 2


def test_each_pruned_layer_loses_its_lowest_scored_groups_and_they_never_return():
    model = tiny_peft()
    pruner = LoraPruner(model, LorapruneConfig(sparsity=0.5, prune_every=2), total_steps=10)
    history = []
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(10):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        before = pruner.channel_importance.clone()
        if pruner.before_optimizer_step(step):
            event = next(e for e in pruner.events if e.step == step)
            for layer in range(3):
                assert int((~pruner.masks.channels[layer]).sum()) == event.channels_removed
        history.append(pruner.masks.channels.clone())
        assert not torch.equal(before, pruner.channel_importance) or step > pruner.events[-1].step
        optimizer.step()
        optimizer.zero_grad()
    for earlier, later in zip(history, history[1:]):
        assert not (later & ~earlier).any()  # nothing comes back
    assert pruner.masks.uniform_widths() == (2 - pruner.plan.groups_removed, 128 - pruner.plan.channels_removed)


def test_the_lowest_importance_goes_first():
    model = tiny_peft()
    pruner = LoraPruner(model, LorapruneConfig(sparsity=0.3, prune_heads=False, prune_every=1), total_steps=2)
    pruner.channel_importance[:] = torch.arange(128, dtype=torch.float32).flip(0)  # channel 127 is least important
    pruner._mask_lowest(0, 0, 3)
    assert pruner.masks.kept_channels(0)[-1] == 124


def test_grad_criterion_keeps_base_gradients_away_from_the_optimizer():
    model = tiny_peft()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = q.base_layer.weight.detach().clone()
    pruner = LoraPruner(model, LorapruneConfig(criterion="grad", prune_every=2), total_steps=6)
    assert q.base_layer.weight.requires_grad
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert q.base_layer.weight.grad is None  # moved into the pruner's buffer
    assert pruner._base_grads[0]["q_proj"].abs().sum() > 0
    pruner.before_optimizer_step(0)
    assert pruner.head_importance.abs().sum() > 0 and not pruner._base_grads
    train_steps(model, pruner, 6)
    assert torch.equal(q.base_layer.weight, before)
    # after the last event the base weights are frozen again: no gradient cost for the rest of training
    assert pruner.events[-1].step == 5 and not q.base_layer.weight.requires_grad and not pruner._grad_handles


def test_lora_criterion_needs_lora_on_the_pruned_kind():
    with pytest.raises(LorapruneError, match="add them to target_modules") as info:
        LoraPruner(tiny_peft(targets=["q_proj", "v_proj"]), LorapruneConfig(), total_steps=10)
    assert "\n" not in str(info.value)
    LoraPruner(
        tiny_peft(targets=["q_proj", "v_proj"]), LorapruneConfig(sparsity=0.2, prune_channels=False), total_steps=10
    )


def test_resuming_from_a_state_dict_makes_the_same_decisions():
    config = LorapruneConfig(sparsity=0.4, prune_every=2)
    model = tiny_peft(targets=ALL)
    pruner = LoraPruner(model, config, total_steps=12)
    train_steps(model, pruner, 5)
    saved = copy.deepcopy(pruner.state_dict())
    twin = copy.deepcopy(model)
    pruner.close()
    resumed = LoraPruner(twin, config, total_steps=12)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.masks.heads, pruner.masks.heads)
    assert torch.equal(resumed.channel_importance, pruner.channel_importance)
    pruner.masks.attach(pruner.projections)
    for step in range(5, 12):
        for m, p in ((model, pruner), (twin, resumed)):
            ids = batch(step)
            m.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            p.before_optimizer_step(step)
    assert torch.equal(resumed.masks.channels, pruner.masks.channels)
    assert torch.equal(resumed.masks.heads, pruner.masks.heads)


def test_state_files_round_trip_and_refuse_another_recipe_or_damage(tmp_path):
    from prunedlora.loraprune.pruner import STATE_FILE

    model = tiny_peft()
    pruner = LoraPruner(model, LorapruneConfig(sparsity=0.4, prune_every=2), total_steps=6)
    train_steps(model, pruner, 6)
    pruner.save(tmp_path)
    pruner.close()
    again = LoraPruner(tiny_peft(), LorapruneConfig(sparsity=0.4, prune_every=2), total_steps=6)
    again.load(tmp_path)
    assert torch.equal(again.masks.channels, pruner.masks.channels)
    other = LoraPruner(tiny_peft(), LorapruneConfig(sparsity=0.2, prune_every=2), total_steps=6)
    with pytest.raises(LorapruneError, match="resume with the same recipe"):
        other.load(tmp_path)
    (tmp_path / STATE_FILE).write_bytes(b"not a state")
    with pytest.raises(LorapruneError, match="not a readable LoRAPrune state") as info:
        again.load(tmp_path)
    assert "\n" not in str(info.value)


def test_a_step_with_non_finite_scores_leaves_the_average_alone():
    model = tiny_peft()
    pruner = LoraPruner(model, LorapruneConfig(sparsity=0.4, prune_every=2), total_steps=10)
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    pruner.before_optimizer_step(0)
    before = (pruner.head_importance.clone(), pruner.channel_importance.clone(), pruner.steps_scored)
    model.base_model.model.model.layers[1].mlp.up_proj.lora_A["default"].weight.grad[0, 0] = float("inf")
    pruner.before_optimizer_step(1)
    assert torch.equal(pruner.head_importance, before[0]) and torch.equal(pruner.channel_importance, before[1])
    assert pruner.steps_scored == before[2]


def test_grad_criterion_holds_a_gradient_per_base_weight_at_the_pruners_call_lora_none():
    """The memory the comparison is about: after backward, ``grad`` holds one buffer the size of every
    pruned base weight (until the pruner's call), ``lora`` only the LoRA factors' gradients."""
    from prunedlora.bench.tensor_memory import LiveTensorBytes
    from prunedlora.loraprune.importance import lora_parts

    held, base = {}, 0
    for criterion in ("lora", "grad"):
        model = tiny_peft()
        pruner = LoraPruner(model, LorapruneConfig(criterion=criterion, prune_every=2), total_steps=6)
        base = sum(lora_parts(m)[0].nbytes for mods in pruner.projections.values() for m in mods.values())
        ids = batch(0)
        with LiveTensorBytes() as mem:
            model(input_ids=ids, labels=ids).loss.backward()
            held[criterion] = mem.mark("after backward") - mem.baseline
            pruner.before_optimizer_step(0)
            after_call = mem.current - mem.baseline
        pruner.close()
        if criterion == "grad":
            assert after_call < held["lora"] + base / 4  # the buffers are gone once scored
    assert held["grad"] - held["lora"] >= base
    assert held["lora"] < base / 4


def test_lora_act_keeps_the_channel_that_carries_a_massive_activation():
    """Channel 5 of every layer reads x1000 from up_proj and writes x1/1000 through down_proj: the same
    function, tiny down_proj weights, a massive activation. lora-act keeps it; its input norms are the
    step's, and its hooks go with the last event."""
    model = tiny_peft()
    for layer in model.base_model.model.model.layers:
        with torch.no_grad():
            layer.mlp.up_proj.base_layer.weight[5] *= 1000.0
            layer.mlp.down_proj.base_layer.weight[:, 5] /= 1000.0
    pruner = LoraPruner(model, LorapruneConfig(criterion="lora-act", sparsity=0.6, prune_every=1), total_steps=6)
    ids = batch(0)
    seen = {}
    hook = model.base_model.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: seen.setdefault("x", args[0].detach().clone())
    )
    model(input_ids=ids, labels=ids).loss.backward()
    hook.remove()
    expected = torch.linalg.vector_norm(seen["x"].reshape(-1, 128), dim=0)
    torch.testing.assert_close(pruner._input_sq[0]["down_proj"].sqrt(), expected)
    pruner.before_optimizer_step(0)
    assert not pruner._input_sq
    assert (pruner.channel_importance.argmax(dim=1) == 5).all()
    model.zero_grad()
    train_steps(model, pruner, 6)
    assert pruner.masks.channels[:, 5].all() and (~pruner.masks.channels).sum(1).min() > 0
    assert not pruner._input_handles
