"""Property tests: any mapping (any YAML text) either builds a valid config or raises the project's
own error with a message, never another exception type (which the CLI would print as a traceback).

Keys are drawn mostly from the real field names so that the values, not the names, are what is
tested; values cover every YAML type, including the ones a typo gives (strings for numbers, lists,
NaN). Derandomized and bounded so the file runs in seconds and fails the same way on every machine.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import fields
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunedlora.errors import PrunedLoraError
from prunedlora.rank.config import ConfigError, PrunedLoraConfig
from prunedlora.tasks import DataConfig
from prunedlora.train.recipe import TrainingOptions, load_recipe, recipe_from_dict

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=70),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=64),
    st.sampled_from(
        [
            "",
            "abc",
            "8",
            "1e-4",
            "obs",
            "cubic",
            "global",
            "uniform",
            "none",
            "sst2",
            "gsm8k",
            "train",
            "dev",
            "q_proj",
            "float32",
            "linear",
            "runs/x",
            "yes",
            "no",
        ]
    ),
    st.text(max_size=8),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
# Plausible values, so that a fair share of the mappings builds and the properties of a built config are tested too.
SANE = st.one_of(
    st.integers(min_value=0, max_value=40),
    st.sampled_from([0.5, 2.0, 1e-3, 0.1, None, True, False, "sst2", "obs", "uniform", "constant", "compensate"]),
    st.sampled_from([["q_proj"], ["q_proj", "v_proj"]]),
)


def names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def mapping_for(cls, extra_keys: bool = True):
    keys = st.sampled_from(names(cls))
    if extra_keys:
        keys = st.one_of(keys, keys, keys, st.text(max_size=6), st.integers(0, 3))
    return st.dictionaries(keys, st.one_of(SANE, SANE, VALUES), max_size=6)


def refused_properly(err: Exception) -> None:
    assert isinstance(err, PrunedLoraError), f"{type(err).__name__}: {err}"
    assert str(err).strip(), "an error without a message"


@PROPERTY
@given(mapping_for(PrunedLoraConfig))
def test_method_config_from_any_mapping(values):
    try:
        config = PrunedLoraConfig.from_dict(values)
    except ConfigError as err:
        refused_properly(err)
        return
    # what was built is valid, and says so again when rebuilt from its own dict
    assert PrunedLoraConfig.from_dict(config.to_dict()) == config
    assert 1 <= config.r0 and config.min_rank <= config.max_rank <= config.r0
    assert config.target_rank is None or 0 < config.target_rank <= config.r0
    assert math.isfinite(config.scaling)


@PROPERTY
@given(mapping_for(DataConfig, extra_keys=False), st.one_of(st.sampled_from(["sst2", "rte", "gsm8k"]), SCALARS))
def test_data_config_from_any_values(values, task):
    values["task"] = task
    try:
        config = DataConfig(**values)
    except PrunedLoraError as err:
        refused_properly(err)
        return
    assert config.task in ("sst2", "rte", "gsm8k") and config.max_length >= 2


@PROPERTY
@given(mapping_for(TrainingOptions, extra_keys=False))
def test_training_options_from_any_values(values):
    try:
        options = TrainingOptions(**values)
    except PrunedLoraError as err:
        refused_properly(err)
        return
    assert (options.max_steps is None or options.max_steps >= 1) and options.learning_rate > 0


SECTIONS = {"data": DataConfig, "method": PrunedLoraConfig, "training": TrainingOptions}
RECIPES = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just("default"), SCALARS),
        "prune": st.one_of(st.booleans(), SCALARS),
        **{name: st.one_of(mapping_for(cls), mapping_for(cls), VALUES) for name, cls in SECTIONS.items()},
    },
).flatmap(
    lambda raw: st.one_of(
        st.just(raw), st.dictionaries(st.text(max_size=6), VALUES, max_size=2).map(lambda extra: {**extra, **raw})
    )
)


PLAUSIBLE_RECIPES = st.fixed_dictionaries(
    {
        "model": st.just("default"),
        "data": mapping_for(DataConfig, extra_keys=False).map(lambda d: {**d, "task": "rte"}),
    },
    optional={"method": mapping_for(PrunedLoraConfig), "training": mapping_for(TrainingOptions)},
)


@PROPERTY
@given(st.one_of(RECIPES, PLAUSIBLE_RECIPES))
def test_recipe_from_any_mapping(raw):
    try:
        recipe = recipe_from_dict(raw)
    except PrunedLoraError as err:
        refused_properly(err)
        return
    assert recipe_from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()


@PROPERTY
@given(
    st.one_of(RECIPES.map(yaml.safe_dump), st.text(max_size=60)),
    st.dictionaries(
        st.sampled_from(
            [
                "training.max_steps",
                "method.r0",
                "max_steps",
                "r0",
                "data.task",
                "model",
                "prune",
                "bogus",
                "method.r0.x",
                "model.x",
                "",
            ]
        ),
        st.one_of(st.text(max_size=6), st.sampled_from(["[", "{a", "1e-4", "- 1", "null"])),
        max_size=2,
    ),
)
def test_recipe_file_from_any_text_and_overrides(text, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(text)
        try:
            load_recipe(path, overrides)
        except PrunedLoraError as err:
            refused_properly(err)
