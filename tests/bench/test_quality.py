"""The quality bench: cells are keyed by configuration, print as the command that reruns them, resume
from the cache, and the whole command runs end to end on a tiny model with the documented fields."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest

from prunedlora.bench import quality
from prunedlora.bench.quality import (
    METHODS,
    QualityBenchConfig,
    QualityBenchError,
    aggregate,
    cell_command,
    cell_recipe,
    check_schedule,
    make_cell,
    plan_cells,
    preset_config,
)
from prunedlora.cli import build_parser, main
from prunedlora.train.recipe import recipe_from_dict


def _config(model, tmp_path, **kwargs):
    values = dict(
        model=str(model),
        tasks=["sst2"],
        methods=["lora-target", "pruned-obs-paper-global", "adalora"],
        seeds=[0],
        max_steps=5,
        r0=8,
        target_rank=2,
        train_examples=24,
        max_length=64,
        batch_size=4,
        eval_examples=6,
        gen_tokens=4,
        data_dir="vendored",
        cells_dir=str(tmp_path / "cells"),
        out_dir=str(tmp_path / "out"),
        echo=False,
    )
    values.update(kwargs)
    return QualityBenchConfig(**values)


def _cli_args(tmp_path, model, *extra):
    return [
        "bench",
        "quality",
        "--model",
        str(model),
        "--tasks",
        "sst2",
        "--methods",
        "base,lora-target,pruned-obs-paper-global,adalora",
        "--seeds",
        "0",
        "--max-steps",
        "5",
        "--r0",
        "8",
        "--target-rank",
        "2",
        "--train-examples",
        "24",
        "--max-length",
        "64",
        "--batch-size",
        "4",
        "--eval-examples",
        "6",
        "--gen-tokens",
        "4",
        "--data-dir",
        "vendored",
        "--cells-dir",
        str(tmp_path / "cells"),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        *extra,
    ]


def test_methods_share_everything_but_the_method(tiny_model_path, tmp_path):
    config = _config(tiny_model_path, tmp_path, max_steps=None)  # the recipe's 150 steps
    recipes = {m: cell_recipe(config, "sst2", m, 1, Path(tiny_model_path), None, tmp_path) for m in METHODS}
    for method, raw in recipes.items():
        training = dict(raw["training"])
        if method == "adalora-lr5x":  # the one method with its own learning rate: five times everyone's
            assert training.pop("learning_rate") == 5 * recipes["lora-r0"]["training"]["learning_rate"]
            training["learning_rate"] = recipes["lora-r0"]["training"]["learning_rate"]
        assert training == recipes["lora-r0"]["training"], method
        assert raw["data"] == recipes["lora-r0"]["data"], method
        assert raw["training"]["seed"] == 1 and raw["data"]["seed"] == 0
    assert recipes["lora-r0"]["prune"] is False and recipes["lora-r0"]["method"]["r0"] == 8
    target = recipes["lora-target"]["method"]
    assert recipes["lora-target"]["prune"] is False and target["r0"] == 2
    assert target["lora_alpha"] / target["r0"] == recipes["lora-r0"]["method"]["lora_alpha"] / 8  # same scaling
    assert recipes["pruned-obs-paper-uniform"]["method"]["allocation"] == "uniform"
    assert {
        recipes[f"pruned-{c}-global"]["method"]["criterion"] for c in ("obs-paper", "taylor", "activation", "magnitude")
    } == {"obs-paper", "taylor", "activation", "magnitude"}
    compensated = recipes["pruned-obs-input-compensate-global"]["method"]
    assert (compensated["criterion"], compensated["recovery"]) == ("obs-input", "compensate")
    assert recipes["pruned-obs-input-global"]["method"].get("recovery", "none") == "none"
    wide = recipes["pruned-obs-input-compensate-global-r64"]["method"]
    assert {k: v for k, v in wide.items() if k not in ("r0", "lora_alpha")} == {
        k: v for k, v in compensated.items() if k not in ("r0", "lora_alpha")
    }  # the same target, max rank, schedule and score: only the starting rank differs
    assert wide["r0"] == 64 and wide["lora_alpha"] / 64 == compensated["lora_alpha"] / compensated["r0"]
    magnitude, magnitude_wide = (
        recipes[m]["method"] for m in ("pruned-magnitude-global", "pruned-magnitude-global-r64")
    )
    assert {k: v for k, v in magnitude_wide.items() if k not in ("r0", "lora_alpha")} == {
        k: v for k, v in magnitude.items() if k not in ("r0", "lora_alpha")
    }
    assert (magnitude_wide["r0"], magnitude_wide["lora_alpha"]) == (wide["r0"], wide["lora_alpha"])
    for raw in recipes.values():
        recipe_from_dict(copy.deepcopy(raw))  # every cell is a valid recipe


COMMITTED_CELLS = sorted((Path(__file__).parents[2] / "benchmarks/results/quality_protocol/cells").glob("*.json"))


@pytest.mark.parametrize("path", COMMITTED_CELLS, ids=lambda p: p.stem)
def test_the_protocol_recipes_still_give_the_committed_cells_keys(path, tmp_path):
    """The protocol's recipes are frozen copies: a committed cell must resolve to the same spec and key
    from them, or the table would silently retrain it (and compare cells trained differently)."""
    cell = json.loads(path.read_text())
    config = preset_config("full", cells_dir=str(tmp_path))
    again = make_cell(config, cell["task"], cell["method"], cell["seed"], tmp_path, quality.SHARED_DATA, tmp_path)
    spec = copy.deepcopy(again.spec)
    spec["recipe"]["training"]["output_dir"] = cell["spec"]["recipe"]["training"]["output_dir"]
    assert (again.key, spec) == (cell["key"], cell["spec"])


@pytest.mark.parametrize("task", quality.QUALITY_TASKS)
def test_every_protocol_recipe_prunes_on_the_protocols_schedule(task):
    """Issue 9's schedule for every task alike: the first event after warm-up (B has grown), the last by
    70% of training, so at least 30% of the steps train at the final ranks."""
    from prunedlora.rank.schedule import PruningSchedule
    from prunedlora.train.recipe import load_recipe

    recipe = load_recipe(quality.PROTOCOL_RECIPES_DIR / f"smollm2-{task}.yaml")
    events = PruningSchedule.build(recipe.method, num_modules=210).events  # SmolLM2: 30 layers x 7 projections
    assert events[0].step >= recipe.training.warmup_steps
    assert events[-1].step <= 0.7 * recipe.training.max_steps


def test_short_runs_scale_the_pruning_schedule(tiny_model_path, tmp_path):
    raw = cell_recipe(
        _config(tiny_model_path, tmp_path, max_steps=30),
        "sst2",
        "pruned-obs-paper-global",
        0,
        Path(tiny_model_path),
        None,
        tmp_path,
    )
    method = raw["method"]  # the recipe prunes from 20 to 100 every 10 of 150 steps
    assert (method["prune_start_step"], method["prune_end_step"], method["prune_every"]) == (4, 20, 2)
    check_schedule(recipe_from_dict(copy.deepcopy(raw)))
    raw["training"]["max_steps"] = 20
    with pytest.raises(QualityBenchError, match="give more --max-steps"):
        check_schedule(recipe_from_dict(copy.deepcopy(raw)))


def test_cell_keys_follow_the_configuration(tiny_model_path, tmp_path):
    def key(**kwargs):
        config = _config(tiny_model_path, tmp_path, **kwargs)
        return make_cell(config, "sst2", "pruned-obs-paper-global", 0, Path(tiny_model_path), None, tmp_path).key

    assert key() == key()
    assert key() == key(eval_batch_size=3, out_dir="elsewhere")  # cannot change the result
    assert len({key(), key(max_steps=6), key(learning_rate=1e-3), key(eval_examples=7), key(target_rank=3)}) == 5
    config = _config(tiny_model_path, tmp_path)
    cells = [
        make_cell(config, "sst2", m, s, Path(tiny_model_path), None, tmp_path)
        for m in ("lora-target", "adalora")
        for s in (0, 1)
    ]
    assert len({c.key for c in cells}) == 4


def test_cell_command_reruns_exactly_that_cell(tiny_model_path, tmp_path):
    config = _config(tiny_model_path, tmp_path, seeds=[0, 3], learning_rate=0.002)
    for cell in plan_cells(config):
        argv = shlex.split(cell_command(config, cell))
        assert argv[:3] == ["prunedlora", "bench", "quality"]
        args = build_parser().parse_args(argv[1:])
        from prunedlora.bench.cli import _QUALITY_KEYS

        again = quality.preset_config(
            args.preset, echo=False, **{k: getattr(args, k) for k in _QUALITY_KEYS if hasattr(args, k)}
        )
        [only] = plan_cells(again)
        assert (only.task, only.method, only.seed, only.key, only.dir) == (
            cell.task,
            cell.method,
            cell.seed,
            cell.key,
            cell.dir,
        )


def test_aggregate_gives_mean_and_spread_over_seeds():
    def cell(seed, accuracy, rank=2.0):
        return {
            "task": "sst2",
            "method": "lora-target",
            "seed": seed,
            "eval": {"accuracy": accuracy},
            "train": {"average_rank": rank, "max_rank": 2},
        }

    [row] = aggregate(
        [cell(0, 0.5), cell(1, 0.7), cell(2, 0.9), {"task": "sst2", "method": "x", "seed": 0, "error": "boom"}]
    )
    stat = row["accuracy"]
    assert stat["mean"] == pytest.approx(0.7) and stat["std"] == pytest.approx(0.2) and stat["n"] == 3
    assert (stat["min"], stat["max"], stat["better"]) == (0.5, 0.9, "higher") and row["seeds"] == [0, 1, 2]
    [single] = aggregate([cell(0, 0.5)])
    assert single["accuracy"]["std"] is None


def test_unknown_names_are_refused(tiny_model_path, tmp_path):
    with pytest.raises(QualityBenchError, match="unknown method"):
        _config(tiny_model_path, tmp_path, methods=["lora"])
    with pytest.raises(QualityBenchError, match="unknown task"):
        _config(tiny_model_path, tmp_path, tasks=["mnli"])


def test_quality_command_end_to_end_resumes_from_its_cache(tiny_model_path, tmp_path, monkeypatch, capsys):
    # First run: the adalora cell fails in scoring; the others finish and are cached.
    from prunedlora.bench import scoring
    from prunedlora.cpu import machine_line, machine_record

    real = scoring.score_adapter

    def flaky(model_dir, adapter_dir, task, *args, **kwargs):
        if "adalora" in str(adapter_dir):
            raise RuntimeError("simulated crash")
        return real(model_dir, adapter_dir, task, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_adapter", flaky)
    assert main(_cli_args(tmp_path, tiny_model_path)) == 1
    payload = json.loads((tmp_path / "out" / "quality.json").read_text())
    errors = [c for c in payload["cells"] if "error" in c]
    assert [c["method"] for c in errors] == ["adalora"] and "simulated crash" in errors[0]["error"]

    # Second run, nothing failing: only the failed cell runs again (the others come from the cache).
    monkeypatch.setattr(scoring, "score_adapter", real)
    finished = {c["method"]: c["finished"] for c in payload["cells"] if "error" not in c}
    assert main(_cli_args(tmp_path, tiny_model_path)) == 0
    payload = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert {c["method"]: c["finished"] for c in payload["cells"] if c["method"] != "adalora"} == finished
    for name in ("quality.json", "quality.md", "quality.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    for cell in payload["cells"]:
        assert {"task", "method", "seed", "key", "command", "train", "eval", "dir"} <= set(cell)
        assert {"average_rank", "max_rank", "seconds", "global_step"} <= set(cell["train"])
        trained = cell["method"] != "base"  # the untrained reference
        assert (cell["train"]["average_rank"], cell["train"]["global_step"]) == ((2, 5) if trained else (0, 0))
        margins = cell["eval"]["per_example"]["margin"]
        assert cell["eval"]["eval_examples"] == len(margins) == 6
        assert cell["eval"]["accuracy"] == sum(m > 0 for m in margins) / 6
        assert (Path(cell["dir"]) / "result.json").is_file() and (Path(cell["dir"]) / "cell.json").is_file()
        assert not list(Path(cell["dir"]).rglob("checkpoint-*"))  # checkpoints removed once finished
        assert cell["machine"] == machine_record(dtype="float32")  # where it ran, kept with the cell
    assert payload["cell_machines"] == {machine_line(machine_record(dtype="float32")): 4}
    # Each trained cell was scored with its own adapter: its margins are not the base model's (after 5
    # steps AdaLoRA moves some by less than 1e-6). Break: score the base model for every cell -> red.
    base_margins = next(c["eval"]["per_example"]["margin"] for c in payload["cells"] if c["method"] == "base")
    for cell in payload["cells"]:
        if cell["method"] != "base":
            margins = cell["eval"]["per_example"]["margin"]
            assert any(abs(m - b) > 1e-6 for m, b in zip(margins, base_margins)), cell["method"]
    # Parameters of the compact adapter: the plain-LoRA cell's saved tensors hold exactly that many.
    from safetensors.torch import load_file

    by_method = {c["method"]: c for c in payload["cells"]}
    saved = load_file(Path(by_method["lora-target"]["dir"]) / "run" / "adapter" / "adapter_model.safetensors")
    assert by_method["lora-target"]["train"]["adapter_parameters"] == sum(t.numel() for t in saved.values()) > 0
    assert by_method["base"]["train"]["adapter_parameters"] == 0
    assert "adapter parameters" in (tmp_path / "out" / "quality.md").read_text()
    assert {row["method"] for row in payload["summary"]} == {
        "base",
        "lora-target",
        "pruned-obs-paper-global",
        "adalora",
    }
    assert payload["summary"][0]["accuracy"]["n"] == 1
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "SST-2 dev accuracy" in table and table.count("`prunedlora bench quality") == 4

    capsys.readouterr()
    assert main([*_cli_args(tmp_path, tiny_model_path), "--list"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("[cached]") == 4 and "[to run]" not in listing

    # --report-only: the table from what has finished; a seed not run yet is listed, not trained.
    cells_before = sorted(p.name for p in (tmp_path / "cells").iterdir())
    assert main([*_cli_args(tmp_path, tiny_model_path), "--seeds", "0,1", "--report-only"]) == 0
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == cells_before
    payload = json.loads((tmp_path / "out" / "quality.json").read_text())
    pending = [(c["method"], c["seed"]) for c in payload["cells"] if c.get("pending")]
    assert pending == [("lora-target", 1), ("pruned-obs-paper-global", 1), ("adalora", 1)]
    assert all(row["accuracy"]["n"] == 1 for row in payload["summary"])  # the table holds the finished cells
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "3 cell(s) not run yet" in table and table.count("| not run yet |") == 3


def test_the_base_model_is_one_cell_whatever_the_seeds(tiny_model_path, tmp_path):
    cells = plan_cells(_config(tiny_model_path, tmp_path, methods=["base", "lora-target"], seeds=[0, 1, 2]))
    assert [(c.method, c.seed) for c in cells] == [
        ("base", 0),
        ("lora-target", 0),
        ("lora-target", 1),
        ("lora-target", 2),
    ]


def test_adapter_parameters_count_rank_times_in_plus_out_and_refuse_unknown_modules(tiny_model_path):
    from prunedlora.bench.quality import adapter_parameters
    from prunedlora.modelfacts import base_linear_shapes

    shapes = base_linear_shapes(tiny_model_path)
    (first, (out_f, in_f)), (second, (out_s, in_s)) = list(shapes.items())[:2]
    assert adapter_parameters({first: 3, second: 1}, tiny_model_path) == 3 * (out_f + in_f) + (out_s + in_s)
    assert adapter_parameters({}, tiny_model_path) == 0
    with pytest.raises(QualityBenchError, match="not in the base model"):
        adapter_parameters({"model.layers.99.mlp.nope": 2}, tiny_model_path)
