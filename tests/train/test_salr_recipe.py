"""The ``salr:`` recipe section: read into a SalrSection, and refused in one line where it cannot work
(before any model is loaded). Training from it is tested in tests/salr/test_train_recipe.py."""

import json

import pytest

from prunedlora.rank.config import ConfigError
from prunedlora.train.recipe import load_recipe, recipe_from_dict


def raw(tmp_path, **change):
    return {
        "model": "default",
        "prune": False,
        "data": {"task": "gsm8k"},
        "salr": {"dir": str(tmp_path / "made"), "sparsify": {"residual_rank": 4, "task_rank": 4}},
        **change,
    }


def fake_folder(path, **config):
    """A folder that looks like sparsify's output to the recipe reader (only salr.json is read)."""
    from prunedlora.salr import SparsifyConfig

    path.mkdir(parents=True)
    (path / "salr.json").write_text(json.dumps({"config": SparsifyConfig(**config).to_dict()}))
    return path


def test_a_section_with_sparsify_options_is_read(tmp_path):
    recipe = recipe_from_dict(raw(tmp_path))
    assert recipe.sections["salr"].sparsify.residual_rank == 4 and recipe.sections["salr"].residual is None
    assert recipe.to_dict()["salr"]["sparsify"]["task_rank"] == 4


def test_an_existing_folder_alone_is_enough_and_overrides_reach_the_section(tmp_path):
    folder = fake_folder(tmp_path / "f")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"model: default\nprune: false\ndata: {{task: gsm8k}}\nsalr: {{dir: {folder}}}\n")
    recipe = load_recipe(recipe_file, {"salr.residual": "trainable"})
    assert (
        recipe.sections["salr"].dir == str(folder)
        and recipe.sections["salr"].residual == "trainable"
        and recipe.sections["salr"].sparsify is None
    )


def test_a_residual_learning_rate_scale_is_read(tmp_path):
    section = {**raw(tmp_path)["salr"], "residual": "trainable", "residual_lr_scale": 0.1}
    recipe = recipe_from_dict(raw(tmp_path, salr=section))
    assert recipe.sections["salr"].residual_lr_scale == 0.1 and recipe.to_dict()["salr"]["residual_lr_scale"] == 0.1
    assert recipe_from_dict(raw(tmp_path)).sections["salr"].residual_lr_scale is None
    # an existing folder trains with the mode it recorded, not the options' default (frozen): no refusal here
    folder = fake_folder(tmp_path / "f", residual_rank=4, task_rank=4, residual="trainable")
    section = {"dir": str(folder), "sparsify": {"residual_rank": 4, "task_rank": 4}, "residual_lr_scale": 0.1}
    assert recipe_from_dict(raw(tmp_path, salr=section)).sections["salr"].residual_lr_scale == 0.1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prune=True), "set prune: false"),
        (dict(salr={"dir": "x", "rank": 4}), "unknown salr setting"),
        (dict(salr={"residual": "frozen"}), "salr.dir is missing"),
        (dict(salr={"dir": "nowhere/at/all"}), "holds no sparsify output"),
        (dict(salr={"dir": "x", "residual": "thawed"}), "salr.residual must be one of frozen, trainable"),
        (dict(salr={"dir": "x", "residual_lr_scale": 0}), r"salr.residual_lr_scale must be a number in \(0, 1\]"),
        (dict(salr={"dir": "x", "residual_lr_scale": 1.5}), r"salr.residual_lr_scale must be a number in \(0, 1\]"),
        (dict(salr={"dir": "x", "residual_lr_scale": True}), r"salr.residual_lr_scale must be a number"),
        (dict(salr={"dir": "x", "residual_lr_scale": "0.1"}), r"salr.residual_lr_scale must be a number"),
        (
            dict(salr={"dir": "x", "residual": "frozen", "residual_lr_scale": 0.1}),
            "salr.residual_lr_scale applies to a trainable residual",
        ),
        (  # the folder these options make records sparsify's default, residual: frozen
            dict(salr={"dir": "x", "sparsify": {"residual_rank": 4}, "residual_lr_scale": 0.1}),
            "salr.residual_lr_scale applies to a trainable residual",
        ),
        (dict(salr={"dir": "x", "sparsify": {"sparsty": 0.5}}), "unknown salr.sparsify option"),
        (dict(salr={"dir": "x", "sparsify": {"sparsity": 1.5}}), "salr.sparsify: sparsity must lie strictly"),
        (dict(salr=[1]), "salr must be a mapping"),
        (dict(method={"r0": 16}), "method.r0 does not apply to a salr recipe"),
        (dict(loraprune={}), "not both"),
        (
            dict(salr={"dir": "x", "sparsify": {"residual_rank": 4}, "calibration": "text.txt"}),
            "salr.calibration is read only to make the folder with a wanda mask or the whitened fit",
        ),
        (dict(salr={"dir": "x", "calibration": "text.txt"}), "salr.calibration is read only to make"),
        (dict(salr={"dir": "x", "sparsify": {"mask": "wanda"}, "calibration": ""}), "must name a text file"),
        (dict(salr={"dir": "x", "sparsify": {"mask": "wanda"}, "calibration": "no/such.txt"}), "is not a file"),
    ],
)
def test_bad_salr_recipes_are_refused_with_one_line(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message) as info:
        recipe_from_dict(raw(tmp_path, **change))
    assert "\n" not in str(info.value)


def test_a_folder_made_with_other_options_is_refused(tmp_path):
    folder = fake_folder(tmp_path / "f", residual_rank=8, task_rank=4)
    section = {"dir": str(folder), "sparsify": {"residual_rank": 4, "task_rank": 4, "residual": "trainable"}}
    with pytest.raises(ConfigError, match=r"sparsified with other settings: residual_rank 8 \(recipe 4\)") as info:
        recipe_from_dict(raw(tmp_path, salr=section))
    assert "\n" not in str(info.value)
    section["sparsify"]["residual_rank"] = 8  # `residual` is only the training default: not a difference
    assert recipe_from_dict(raw(tmp_path, salr=section)).sections["salr"].sparsify.residual == "trainable"


def test_a_non_empty_folder_without_a_record_is_not_overwritten(tmp_path):
    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists but is no sparsify output"):
        recipe_from_dict(raw(tmp_path))


def test_a_record_written_before_an_option_existed_counts_as_its_default(tmp_path):
    """salr.json files from before `residual_fit` lack it: they were made with the plain SVD, so a
    recipe asking for svd reuses them and one asking for the whitened fit is refused."""
    folder = fake_folder(tmp_path / "f", residual_rank=4, task_rank=4)
    record = json.loads((folder / "salr.json").read_text())
    del record["config"]["residual_fit"]
    (folder / "salr.json").write_text(json.dumps(record))
    section = {"dir": str(folder), "sparsify": {"residual_rank": 4, "task_rank": 4, "residual_fit": "svd"}}
    assert recipe_from_dict(raw(tmp_path, salr=section)).sections["salr"].sparsify.residual_fit == "svd"
    section["sparsify"]["residual_fit"] = "whitened"
    with pytest.raises(ConfigError, match=r"residual_fit 'svd' \(recipe 'whitened'\)"):
        recipe_from_dict(raw(tmp_path, salr=section))


def test_a_reused_folder_must_come_from_the_recipes_calibration_text(tmp_path):
    """The mask and the whitened fit depend on the calibration text: a folder is reused only when its
    record holds the hash of the text salr.calibration names, and refused in one line otherwise."""
    import hashlib

    text = tmp_path / "task.txt"
    text.write_text("Natalia sold clips to 48 of her friends in April.\n")
    options = {"residual_rank": 4, "task_rank": 4, "residual_fit": "whitened"}
    folder = fake_folder(tmp_path / "f", **options)
    record = json.loads((folder / "salr.json").read_text())
    section = {"dir": str(folder), "sparsify": options, "calibration": str(text)}
    with pytest.raises(ConfigError, match="records no calibration text, not on salr.calibration") as info:
        recipe_from_dict(raw(tmp_path, salr=section))
    assert "\n" not in str(info.value)
    record["calibration"] = {"text": "task.txt", "sha256": hashlib.sha256(b"another text").hexdigest(), "tokens": 64}
    (folder / "salr.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="was calibrated on another text"):
        recipe_from_dict(raw(tmp_path, salr=section))
    record["calibration"]["sha256"] = hashlib.sha256(text.read_bytes()).hexdigest()
    (folder / "salr.json").write_text(json.dumps(record))
    assert recipe_from_dict(raw(tmp_path, salr=section)).sections["salr"].calibration == str(text)
