import pytest

from prunedlora.rank.config import ConfigError, PrunedLoraConfig


def test_defaults_are_valid_and_scaling_follows_rslora():
    config = PrunedLoraConfig()
    assert config.max_rank == config.r0
    assert config.scaling == config.lora_alpha / config.r0
    assert PrunedLoraConfig(r0=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("criterion", "recovery", "resolved"),
    [
        ("obs", None, ("obs-input", "compensate")),  # "obs" is the protocol's best second-order score
        ("obs", "none", ("obs-input", "none")),  # an explicit recovery is kept
        ("obs-input", None, ("obs-input", "compensate")),
        ("obs-paper", None, ("obs-paper", "none")),  # gradient-built updates overshoot: none by default
        ("magnitude", None, ("magnitude", "none")),
        ("obs-fisher", "newton", ("obs-fisher", "newton")),
    ],
)
def test_criterion_alias_and_recovery_default_resolve_on_construction(criterion, recovery, resolved):
    config = PrunedLoraConfig(criterion=criterion, recovery=recovery)
    assert (config.criterion, config.recovery) == resolved
    again = PrunedLoraConfig.from_dict(config.to_dict())  # what a run records reads back the same
    assert (again.criterion, again.recovery) == resolved


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r0=8, target_rank=16), "target_rank (16) must be in (0, r0=8]"),
        (dict(min_rank=6, max_rank=4, target_rank=5), "min_rank (6) is above max_rank (4)"),
        (dict(r0=8, max_rank=12), "max_rank (12) is above r0 (8)"),
        (
            dict(criterion="fisher"),
            "criterion must be one of obs, obs-paper, obs-fisher, obs-input, sensitivity, taylor, taylor-ema, activation, magnitude",
        ),
        (dict(schedule="linear"), "schedule must be one of cubic, constant"),
        (dict(target_rank=None), "give exactly one of target_rank"),
        (dict(allocation="uniform", target_rank=7.5), "target_rank must be an integer"),
        (dict(prune_start_step=50, prune_end_step=10), "prune_end_step (10) is before prune_start_step (50)"),
        (dict(target_rank=2, min_rank=4), "must lie between min_rank (4)"),
        (dict(target_modules=[]), "target_modules is empty"),
    ],
)
def test_bad_configs_fail_at_once_with_a_clear_message(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PrunedLoraConfig(**kwargs)


def test_target_module_that_matches_nothing_lists_existing_names():
    config = PrunedLoraConfig(target_modules=["q_proj", "query_key_value"])
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    with pytest.raises(ConfigError, match=r"'query_key_value' matches no module.*q_proj, up_proj"):
        config.check_modules(names, names)
    PrunedLoraConfig(target_modules=["q_proj"]).check_modules(names, names)


def test_final_total_must_be_reachable_exactly():
    assert PrunedLoraConfig(r0=8, target_rank=2.5).final_total_rank(4) == 10
    with pytest.raises(ConfigError, match="not a whole number"):
        PrunedLoraConfig(r0=8, target_rank=2.5).final_total_rank(3)
    assert PrunedLoraConfig(r0=8, target_rank=None, total_rank_budget=7).final_total_rank(3) == 7


def test_round_trip_and_unknown_keys():
    config = PrunedLoraConfig(r0=16, target_rank=4, criterion="taylor")
    assert PrunedLoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"unknown PrunedLoRA option\(s\) \['rank'\]"):
        PrunedLoraConfig.from_dict({"rank": 4})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_modules": 5}, "target_modules must be a list of names"),
        ({"target_modules": "q_proj"}, "target_modules must be a list of names"),  # not split into letters
        ({"r0": "32"}, "r0 must be an integer"),
    ],
)
def test_direct_construction_checks_types_like_from_dict(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PrunedLoraConfig(**kwargs)
    with pytest.raises(ConfigError, match=message):
        PrunedLoraConfig.from_dict(kwargs)
