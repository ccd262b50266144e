"""A new criterion is one class in one module plus ``register``: defined here in a temporary file, it is
named by a recipe, collects its own statistics, decides what the pruner removes, checkpoints, and trains
through the runner, with no other file touched. Also the registry's refusals."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from prunedlora import metadata
from prunedlora.rank import criteria
from prunedlora.rank.config import ConfigError
from prunedlora.rank.pruner import STATE_TENSORS_FILE, RankPruner
from prunedlora.train.recipe import recipe_from_dict
from tests.test_pruner import batches, tiny_peft

# The worked example of docs/training.md, word for word (test_the_docs_show_this_example holds it).
PLUGIN = '''
import torch

from prunedlora.rank.criteria import Criterion, register


@register
class GradientEnergy(Criterion):
    """Squared gradient of each component summed since the last event, times its weight norm: a
    component that neither moves the loss nor holds weight goes first."""

    name = "grad-energy"
    gradient_kinds = ("energy",)  # per-module tensors, checkpointed as energy::<module>
    reset_kinds = ("energy",)  # restart after every event
    per_step_gradients = True  # accumulate() sees every optimizer step's gradients

    def setup(self):
        self.stats["energy"] = {n: torch.zeros(self.config.r0, dtype=torch.float64) for n in self.modules}

    def accumulate(self):
        for name, m in self.modules.items():
            step = m.lora_b.grad.double().square().sum(0) + m.lora_a.grad.double().square().sum(1)
            self.stats["energy"][name] += step.cpu()

    def score(self, name, module, active):
        b, a = module.lora_b.detach()[:, active].double(), module.lora_a.detach()[active].double()
        return self.stats["energy"][name][active] * b.norm(dim=0) * a.norm(dim=1)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The module above as a file of its own, imported the way a user's would be."""
    (tmp_path / "my_criterion.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("my_criterion")
    yield module
    criteria.unregister("grad-energy")
    sys.modules.pop("my_criterion", None)


def _raw(**method):
    return {
        "model": "default",
        "data": {"task": "sst2"},
        "method": {
            "r0": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "target_rank": 3,
            "allocation": "uniform",
            "prune_start_step": 2,
            "prune_end_step": 4,
            "prune_every": 2,
            **method,
        },
        "training": {"max_steps": 6},
    }


def test_an_unregistered_name_is_refused_with_the_names_there_are():
    with pytest.raises(ConfigError, match="criterion must be one of obs, obs-paper, .*magnitude; got 'grad-energy'"):
        recipe_from_dict(_raw(criterion="grad-energy"))


def test_a_registered_criterion_prunes_from_a_recipe_by_its_own_scores(plugin, tmp_path):
    method = recipe_from_dict(_raw(criterion="grad-energy")).method
    assert (method.criterion, method.recovery) == ("grad-energy", "none")
    assert "grad-energy" in criteria.names()
    model = tiny_peft(seed=4)
    pruner = RankPruner(model, method)
    assert type(pruner.criterion) is plugin.GradientEnergy
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    data = iter(batches(8, seed=5))
    for step in range(3):  # the event is at step 2
        ids = next(data)
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 2:  # what the criterion should score at the event, computed here independently
            expected = {}
            for name, m in pruner.modules.items():
                energy = pruner.criterion.stats["energy"][name].clone()
                energy += m.lora_b.grad.double().square().sum(0) + m.lora_a.grad.double().square().sum(1)
                expected[name] = (
                    energy * m.lora_b.detach().double().norm(dim=0) * m.lora_a.detach().double().norm(dim=1)
                )
        pruner.before_optimizer_step(step, optimizer)
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
    (event,) = pruner.history
    per_module = event["ranks"]["model.layers.0.self_attn.q_proj"]
    assert 3 < per_module < 8
    for name, removed in event["removed"].items():
        lowest = torch.argsort(expected[name])[: 8 - per_module].tolist()
        assert sorted(removed) == sorted(lowest), name
    assert all(s.abs().sum() == 0 for s in pruner.criterion.stats["energy"].values())  # reset at the event
    ids = next(data)
    model(input_ids=ids, labels=ids).loss.backward()
    pruner.before_optimizer_step(3, optimizer)  # statistics again, then a checkpoint holds them
    pruner.save(tmp_path)
    saved = load_file(str(tmp_path / STATE_TENSORS_FILE))
    assert {k.split("::")[0] for k in saved} == {"mask", "energy"}
    other = RankPruner(tiny_peft(seed=4), method)
    other.load(tmp_path)
    for name, stats in pruner.criterion.stats["energy"].items():
        assert stats.abs().sum() > 0 and torch.equal(other.criterion.stats["energy"][name], stats)


def test_a_registered_criterion_trains_through_the_runner(plugin, tiny_model_path, tmp_path):
    from prunedlora.train.runner import train

    raw = _raw(criterion="grad-energy")
    raw["model"] = str(tiny_model_path)
    raw["data"] = {"task": "sst2", "max_examples": 48, "max_length": 64}
    raw["training"] = {"output_dir": str(tmp_path / "run"), "max_steps": 6, "per_device_train_batch_size": 4}
    raw["training"].update(eval_examples=4, save_steps=100)
    result = train(recipe_from_dict(raw))
    assert set(result.ranks.values()) == {3}
    record = json.loads((tmp_path / "run" / metadata.RUN_RECORD_FILE).read_text())
    assert record["method"]["criterion"] == "grad-energy"


def test_the_registry_refuses_what_it_cannot_use(plugin):
    class Nameless(criteria.Criterion):
        pass

    class Taken(criteria.Criterion):
        name = "magnitude"

    class AliasTaken(criteria.Criterion):
        name = "fresh"
        aliases = ("obs",)

    class BadRecovery(criteria.Criterion):
        name = "bad-recovery"
        default_recovery = "sometimes"

    with pytest.raises(ValueError, match="has no name"):
        criteria.register(Nameless)
    with pytest.raises(ValueError, match="'magnitude' is taken by prunedlora.rank.criteria.magnitude.Magnitude"):
        criteria.register(Taken)
    with pytest.raises(ValueError, match="'obs' is taken"):
        criteria.register(AliasTaken)
    with pytest.raises(ValueError, match="default_recovery must be one of none, compensate, newton"):
        criteria.register(BadRecovery)
    with pytest.raises(TypeError, match="Criterion subclass"):
        criteria.register(object)
    assert criteria.register(plugin.GradientEnergy) is plugin.GradientEnergy  # again: a no-op
    assert "fresh" not in criteria.names() and criteria.find("obs").name == "obs-input"


def test_an_installed_package_offers_a_criterion_through_an_entry_point(plugin, monkeypatch):
    from importlib import metadata

    criteria.unregister("grad-energy")

    class Point:
        def load(self):
            return plugin.GradientEnergy

    def entry_points(group, name):
        return [Point()] if (group, name) == ("prunedlora.criteria", "grad-energy") else []

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    assert criteria.find("grad-energy") is plugin.GradientEnergy
    assert criteria.find("nothing-here") is None


def test_the_docs_show_this_example():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    assert PLUGIN.strip() in page


def test_no_code_branches_on_a_criterion_name():
    """Criteria are objects: a branch on a criterion's name outside its class would be a second place to
    edit when one is added (the registry's lookup is the one place a name becomes a class)."""
    import re
    from pathlib import Path

    branch = re.compile(r"criterion\w*\s*(==|!=|\bin\s*[(\[{]|\bnot in\b)")
    root = Path(__file__).parents[1] / "prunedlora"
    found = [
        f"{path.relative_to(root)}:{n}"
        for path in sorted(root.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line.split("#")[0])
    ]
    assert not found, found
