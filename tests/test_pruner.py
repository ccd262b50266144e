"""RankPruner on a tiny PEFT model driven by a plain training loop (no Trainer)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from prunedlora.rank.config import ConfigError, PrunedLoraConfig
from prunedlora.rank.pruner import RankPruner, find_lora_modules
from tests.conftest import tiny_llama_config

VOCAB = 64


def tiny_peft(r0=8, seed=0, targets=("q_proj", "v_proj", "down_proj")):
    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=r0, lora_alpha=2 * r0, target_modules=list(targets)))
    # make lora_B non-zero so components differ from the start
    for module in find_lora_modules(model).values():
        torch.nn.init.normal_(module.lora_b, std=0.05)
    return model


def batches(n, seed=0, batch=4, length=12):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=gen) for _ in range(n)]


def run_loop(model, pruner, steps, accumulation=2, seed=0, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    data = batches(steps * accumulation, seed=seed)
    for step in range(steps):
        for micro in range(accumulation):
            ids = data[step * accumulation + micro]
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if pruner is not None:
            pruner.before_optimizer_step(step, optimizer)
        optimizer.step()
        if pruner is not None:
            pruner.after_optimizer_step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize(
    "criterion",
    ["obs", "obs-paper", "obs-fisher", "obs-input", "sensitivity", "taylor", "taylor-ema", "activation", "magnitude"],
)
def test_pruned_components_stay_exactly_zero_with_zero_optimizer_state(criterion):
    model = tiny_peft()
    config = PrunedLoraConfig(
        r0=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        target_rank=3,
        min_rank=1,
        prune_start_step=2,
        prune_end_step=6,
        prune_every=2,
        criterion=criterion,
    )
    pruner = RankPruner(model, config)
    optimizer = run_loop(model, pruner, steps=7 + 50)
    ranks = pruner.ranks()
    assert sum(ranks.values()) == 3 * len(ranks)
    assert any(not m.all() for m in pruner.masks.values())
    for name, module in pruner.modules.items():
        dead = ~pruner.masks[name]
        assert torch.all(module.lora_b[:, dead] == 0) and torch.all(module.lora_a[dead, :] == 0)
        assert torch.any(module.lora_b[:, ~dead] != 0)
        for param, sl in ((module.lora_b, (slice(None), dead)), (module.lora_a, (dead, slice(None)))):
            state = optimizer.state[param]
            assert torch.all(state["exp_avg"][sl] == 0) and torch.all(state["exp_avg_sq"][sl] == 0)


def run_inspected_loop(model, pruner, steps, accumulation=2, lr=1e-2):
    """``run_loop`` that measures, for components already pruned, the largest |value| of their gradients
    after ``before_optimizer_step`` (what Adam sees), of Adam's exp_avg/exp_avg_sq before and after the
    step, and of their weights after it. Returns those maxima and how many module-steps were inspected."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    data = batches(steps * accumulation, seed=0)
    leaks = {"grads": 0.0, "state": 0.0, "weights": 0.0}
    inspected = 0

    def dead_parts(module, dead):
        return ((module.lora_b, (slice(None), dead)), (module.lora_a, (dead, slice(None))))

    def state_leak(dead_by_module):
        worst = 0.0
        for module, dead in dead_by_module:
            for param, sl in dead_parts(module, dead):
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in optimizer.state[param]:
                        worst = max(worst, float(optimizer.state[param][key][sl].abs().max()))
        return worst

    for step in range(steps):
        for micro in range(accumulation):
            ids = data[step * accumulation + micro]
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        pruner.before_optimizer_step(step, optimizer)
        dead_by_module = [(pruner.modules[n], ~m) for n, m in pruner.masks.items() if not m.all()]
        for module, dead in dead_by_module:
            inspected += 1
            for param, sl in dead_parts(module, dead):
                leaks["grads"] = max(leaks["grads"], float(param.grad[sl].abs().max()))
        leaks["state"] = max(leaks["state"], state_leak(dead_by_module))
        optimizer.step()
        pruner.after_optimizer_step()
        leaks["state"] = max(leaks["state"], state_leak(dead_by_module))
        for module, dead in dead_by_module:
            for param, sl in dead_parts(module, dead):
                leaks["weights"] = max(leaks["weights"], float(param.detach()[sl].abs().max()))
        optimizer.zero_grad()
    return leaks, inspected


def _reactivation_setup(criterion="obs"):
    model = tiny_peft(seed=8)
    config = PrunedLoraConfig(
        r0=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        target_rank=3,
        min_rank=1,
        prune_start_step=1,
        prune_end_step=5,
        prune_every=2,
        criterion=criterion,
    )
    return model, RankPruner(model, config)


@pytest.mark.parametrize("criterion", ["obs", "activation"])
def test_pruned_components_stay_zero_without_re_zeroing_the_weights(criterion):
    """With gradient accumulation 2 and ``after_optimizer_step``'s re-zeroing turned off, pruned weights
    stay exactly zero by the gradient mask and the optimizer-state zeroing alone, and what Adam sees for
    them (masked gradients, exp_avg, exp_avg_sq) is exactly zero at every step.

    Breaks (see test_the_reactivation_check_catches_each_break): skipping the gradient mask or the
    optimizer-state zeroing turns this red, even where the weights are still re-zeroed after each step.
    """
    model, pruner = _reactivation_setup(criterion)
    pruner.mask_weights = lambda: None  # only the event itself zeroes weights
    leaks, inspected = run_inspected_loop(model, pruner, steps=12)
    assert inspected >= 20 and sum(pruner.ranks().values()) == 3 * len(pruner.modules)
    assert leaks == {"grads": 0.0, "state": 0.0, "weights": 0.0}


@pytest.mark.parametrize(
    ("broken", "rezero_weights"),
    [("mask_gradients", True), ("zero_optimizer_state", True), ("zero_optimizer_state", False)],
)
def test_the_reactivation_check_catches_each_break(broken, rezero_weights):
    """Mutation test of the check above: with the gradient mask or the optimizer-state zeroing skipped,
    Adam's moments for pruned entries become non-zero (and, without re-zeroing, so do the weights),
    whether or not the weights are re-zeroed after each step.

    Between events a dead component's gradients are exactly zero anyway (its row of A and column of B
    are both zero), so the gradient mask matters at the event step, whose gradient was computed with the
    component alive: the "mask_gradients" break skips it there too (the event zeroes weights only).
    """
    model, pruner = _reactivation_setup()
    setattr(pruner, broken, lambda *args: None)
    if broken == "mask_gradients":

        def zero_weights_only(module, mask):
            with torch.no_grad():
                module.lora_b.mul_(mask.to(module.lora_b.dtype)[None, :])
                module.lora_a.mul_(mask.to(module.lora_a.dtype)[:, None])

        pruner._apply_mask = zero_weights_only
    if not rezero_weights:
        pruner.mask_weights = lambda: None
    leaks, _ = run_inspected_loop(model, pruner, steps=8)
    assert leaks["state"] > 0
    if broken == "mask_gradients":
        assert leaks["grads"] > 0
    if not rezero_weights:
        assert leaks["weights"] > 0


def test_pruner_without_events_does_not_change_training():
    reference, pruned = tiny_peft(seed=1), tiny_peft(seed=1)
    config = PrunedLoraConfig(
        r0=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        target_rank=4,
        prune_start_step=100,
        prune_end_step=120,
        prune_every=10,
    )
    run_loop(reference, None, steps=5)
    run_loop(pruned, RankPruner(pruned, config), steps=5)
    for (name, a), (_, b) in zip(reference.named_parameters(), pruned.named_parameters()):
        assert torch.equal(a, b), name


def test_uniform_allocation_through_the_pruner_and_history():
    model = tiny_peft(seed=2)
    config = PrunedLoraConfig(
        r0=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        target_rank=2,
        allocation="uniform",
        schedule="constant",
        components_per_event=3,
        prune_start_step=0,
        prune_every=1,
    )
    pruner = RankPruner(model, config)
    run_loop(model, pruner, steps=4)
    assert set(pruner.ranks().values()) == {2}
    assert [e["average_rank"] for e in pruner.history] == [5.0, 2.0]
    assert pruner.finished
    removed = pruner.history[0]["removed"]
    assert all(len(idx) == 3 for idx in removed.values())


def test_state_round_trip(tmp_path):
    model = tiny_peft(seed=3)
    config = PrunedLoraConfig(
        r0=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        target_rank=4,
        criterion="activation",
        prune_start_step=1,
        prune_end_step=3,
        prune_every=2,
    )
    pruner = RankPruner(model, config)
    run_loop(model, pruner, steps=3)
    pruner.save(tmp_path)
    fresh_model = tiny_peft(seed=3)
    other = RankPruner(fresh_model, config)
    other.load(tmp_path)
    assert other.history == pruner.history
    assert all(torch.equal(other.masks[n], pruner.masks[n]) for n in pruner.masks)
    assert all(
        torch.equal(other.criterion.stats["activation_sq"][n], pruner.criterion.stats["activation_sq"][n])
        for n in pruner.masks
    )
    # loading applies the masks to the fresh weights
    for name, module in other.modules.items():
        assert torch.all(module.lora_b[:, ~other.masks[name]] == 0)


def _events_at_3_6_9(criterion: str) -> PrunedLoraConfig:
    """r0 8 -> 4 on three modules of the tiny model, pruning events at steps 3, 6 and 9."""
    return PrunedLoraConfig(
        r0=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        target_rank=4,
        criterion=criterion,
        prune_start_step=3,
        prune_end_step=9,
        prune_every=3,
    )


@pytest.mark.parametrize("criterion", ["obs-fisher", "obs-input"])
def test_statistics_between_events_round_trip_and_reset_at_events(tmp_path, criterion):
    """obs-fisher's Fisher sums and obs-input's z z^T sums survive a checkpoint and restart at each event."""
    config = _events_at_3_6_9(criterion)
    model = tiny_peft(seed=6)
    pruner = RankPruner(model, config)
    run_loop(model, pruner, steps=2)  # before the first event: statistics only
    stats = pruner.criterion.stats["fisher_b" if criterion == "obs-fisher" else "input_cov"]
    assert stats and all(s.abs().sum() > 0 for s in stats.values())
    assert pruner.criterion.counters() == ({"fisher_steps": 2} if criterion == "obs-fisher" else {})
    pruner.save(tmp_path)
    other = RankPruner(tiny_peft(seed=6), config)
    other.load(tmp_path)
    other_stats = other.criterion.stats["fisher_b" if criterion == "obs-fisher" else "input_cov"]
    assert all(torch.equal(other_stats[n], stats[n]) for n in stats)
    assert other.criterion.counters() == pruner.criterion.counters()
    if criterion == "obs-fisher":
        other_a, fisher_a = other.criterion.stats["fisher_a"], pruner.criterion.stats["fisher_a"]
        assert all(torch.equal(other_a[n], fisher_a[n]) for n in stats)
    ids = batches(1, seed=9)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert pruner.before_optimizer_step(3) is not None  # the event
    assert all(s.abs().sum() == 0 for s in stats.values())
    assert all(v == 0 for v in pruner.criterion.counters().values())


def test_obs_fisher_is_the_mean_of_per_step_fishers():
    config = PrunedLoraConfig(
        r0=8,
        lora_alpha=16,
        target_modules=["q_proj"],
        target_rank=4,
        criterion="obs-fisher",
        prune_start_step=50,
        prune_end_step=60,
        prune_every=5,
    )
    model = tiny_peft(seed=7, targets=("q_proj",))
    pruner = RankPruner(model, config)
    expected = {n: torch.zeros(8, 8, dtype=torch.float64) for n in pruner.modules}
    for ids in batches(3, seed=2):
        model(input_ids=ids, labels=ids).loss.backward()
        for name, module in pruner.modules.items():
            g = module.lora_b.grad.double()
            expected[name] += g.T @ g / g.shape[0]
        pruner.before_optimizer_step(0)
        model.zero_grad()
    for name in pruner.modules:
        torch.testing.assert_close(pruner.criterion.mean_fisher(name, torch.arange(8))[0], expected[name] / 3)


def test_module_names_are_the_base_models_and_r0_must_match():
    model = tiny_peft(r0=4)
    names = list(find_lora_modules(model))
    assert names[0] == "model.layers.0.self_attn.q_proj"
    with pytest.raises(ConfigError, match="must have rank r0=8"):
        RankPruner(model, PrunedLoraConfig(r0=8, target_rank=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="no PEFT LoRA layers"):
        RankPruner(
            copy.deepcopy(model).get_base_model().model.layers[0].mlp,
            PrunedLoraConfig(r0=4, target_rank=2),
            adapter_name="other",
        )


@pytest.mark.parametrize("recovery", ["compensate", "newton"])
def test_recovery_changes_surviving_components_only_at_events(recovery):
    model = tiny_peft(seed=4)
    config = PrunedLoraConfig(
        r0=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        target_rank=4,
        allocation="uniform",
        schedule="constant",
        components_per_event=4,
        prune_start_step=0,
        prune_every=1,
        recovery=recovery,
    )
    pruner = RankPruner(model, config)
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: m.lora_b.detach().clone() for n, m in pruner.modules.items()}
    pruner.before_optimizer_step(0)
    for name, module in pruner.modules.items():
        alive = pruner.masks[name]
        assert torch.all(module.lora_b[:, ~alive] == 0)
        assert not torch.equal(module.lora_b[:, alive], before[name][:, alive])


@pytest.mark.parametrize("criterion", ["obs-paper", "taylor"])  # the scores built from this step's gradient
def test_missing_gradients_give_a_clear_error(criterion):
    model = tiny_peft(seed=5)
    config = PrunedLoraConfig(
        r0=8,
        target_modules=["q_proj"],
        target_rank=4,
        prune_start_step=0,
        prune_end_step=0,
        prune_every=1,
        criterion=criterion,
    )
    pruner = RankPruner(model, config)
    with pytest.raises(Exception, match="no gradient on model.layers.0.self_attn.q_proj"):
        pruner.before_optimizer_step(0)


@pytest.mark.parametrize(
    "criterion, kinds",
    [
        ("sensitivity", ("importance_b", "uncertainty_b", "importance_a", "uncertainty_a")),
        ("taylor-ema", ("taylor_ema",)),
    ],
)
def test_moving_averages_survive_a_checkpoint_and_are_not_reset_at_events(tmp_path, criterion, kinds):
    """AdaLoRA's and LoRAPrune's moving averages are running, not sums since the last event: an event keeps them."""
    config = _events_at_3_6_9(criterion)
    model = tiny_peft(seed=6)
    pruner = RankPruner(model, config)
    run_loop(model, pruner, steps=2)
    for kind in kinds:
        stats = pruner.criterion.stats[kind]
        assert set(stats) == set(pruner.modules) and all(s.abs().sum() > 0 for s in stats.values())
    pruner.save(tmp_path)
    other = RankPruner(tiny_peft(seed=6), config)
    other.load(tmp_path)
    for kind in kinds:
        assert all(torch.equal(other.criterion.stats[kind][n], pruner.criterion.stats[kind][n]) for n in pruner.modules)
    first = pruner.criterion.stats[kinds[0]]
    before = {n: t.clone() for n, t in first.items()}
    ids = batches(1, seed=9)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert pruner.before_optimizer_step(3) is not None  # the event: one more update, no reset
    for name, stats in first.items():
        assert stats.abs().sum() > 0 and not torch.equal(stats, before[name])


def test_taylor_ema_folds_each_steps_taylor_score_of_every_module():
    """After one backward the average is 0.1 x that step's taylor score, per module and component."""
    from prunedlora.rank.criteria.taylor import taylor_scores

    model = tiny_peft(seed=7)
    pruner = RankPruner(model, _events_at_3_6_9("taylor-ema"))
    ids = batches(1, seed=3)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    pruner.accumulate_gradient_statistics()
    for name, module in pruner.modules.items():
        expected = 0.1 * taylor_scores(module.lora_b, module.lora_a, module.lora_b.grad, module.lora_a.grad)
        torch.testing.assert_close(pruner.criterion.stats["taylor_ema"][name], expected.detach(), rtol=1e-12, atol=0)
        assert pruner.criterion.stats["taylor_ema"][name].abs().sum() > 0
    scores = pruner.score()
    assert all(
        torch.equal(scores[n], pruner.criterion.stats["taylor_ema"][n]) for n in pruner.modules
    )  # nothing pruned yet
