"""`prunedlora demo`'s mechanics on a tiny random model: every stage runs in order and writes what the
next one reads, serving gets the exported adapters, and a second run reuses every finished stage.

vLLM's server and the latency bench are replaced by recorders (they have their own slow tests:
tests/serve/test_cli.py::test_serve_and_ask_answers_each_model_then_stops, tests/bench/test_latency.py);
the tasks are the demo's own two tasks with tiny recipes. Breaks, made once: a stage that reads the
wrong folder (e.g. serving the r0 run instead of the export) -> the adapters check is red; a stage
that does not reuse its files -> the second run trains (the recorder raises) -> red.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

import prunedlora.bench
import prunedlora.models
import prunedlora.serve
from prunedlora import demo, metadata


def _tiny_recipe(path: Path, model: Path, task: str) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "data": {"task": task, "max_examples": 8, "max_length": 256},
                "method": {
                    "r0": 4,
                    "lora_alpha": 8,
                    "target_rank": 2,
                    "target_modules": ["q_proj", "v_proj"],
                    "prune_start_step": 1,
                    "prune_end_step": 2,
                    "prune_every": 1,
                },
                "training": {
                    "output_dir": "unused",
                    "max_steps": 3,
                    "per_device_train_batch_size": 2,
                    "save_steps": 100,
                },
            }
        )
    )
    return str(path)


def test_demo_runs_each_stage_on_the_previous_ones_files_then_reuses_them(
    tiny_model_path, tmp_path, monkeypatch, capsys
):
    tasks = tuple(
        demo.DemoTask(
            task.name,
            _tiny_recipe(tmp_path / f"{task.name}.yaml", tiny_model_path, task.name),
            task.title,
            task.question,
            {"max_examples": 4, "batch_size": 4, "exact_match_examples": 1, "max_new_tokens": 2},
        )
        for task in demo.DEMO_TASKS
    )
    assert [t.name for t in tasks] == ["sst2", "gsm8k"]
    monkeypatch.setattr(demo, "DEMO_TASKS", tasks)
    monkeypatch.setattr(prunedlora.models, "default_model_dir", lambda *a, **k: tiny_model_path)
    served, measured = [], []

    def fake_serve_and_ask(config, questions, **kwargs):
        served.append((config, dict(questions)))
        return dict.fromkeys(questions, "ok")

    def fake_demo_latency(run_dir, out_dir, **kwargs):
        measured.append((Path(run_dir), Path(out_dir)))
        return {"files": {"markdown": str(Path(out_dir) / "latency.md"), "plot": str(Path(out_dir) / "latency.png")}}

    monkeypatch.setattr(prunedlora.serve, "serve_and_ask", fake_serve_and_ask)
    monkeypatch.setattr(prunedlora.bench, "demo_latency", fake_demo_latency)
    root = tmp_path / "demo"

    outputs = demo.run_demo(root)
    first = capsys.readouterr().out
    for name in ("sst2", "gsm8k"):
        run, adapter, scores = root / name, root / "adapters" / name, root / "quality" / f"{name}.json"
        assert outputs[f"run {name}"] == run and outputs[f"adapter {name}"] == adapter
        assert metadata.read_run_record(run).average_rank == 2
        assert metadata.read_adapter_record(adapter).ranks == {
            n: r for n, r in metadata.read_run_record(run).ranks.items() if r
        }
        payload = json.loads(scores.read_text())
        assert payload["eval_examples"] == 4
        assert (f"WARNING: the {name} adapter does not beat the base model" in first) == (not payload["beats_base"])
    # serving: the base model and both exports (not the r0 runs), each asked its task's question
    ((config, questions),) = served
    assert Path(config.model) == tiny_model_path
    assert {k: Path(v) for k, v in config.adapters.items()} == {
        "sst2": root / "adapters" / "sst2",
        "gsm8k": root / "adapters" / "gsm8k",
    }
    assert questions == {"base": tasks[0].question, "sst2": tasks[0].question, "gsm8k": tasks[1].question}
    assert measured == [(root / "sst2", root / "latency")]
    banners = [line for line in first.splitlines() if line.startswith("=== ")]
    assert [b.split()[1] for b in banners] == ["1/6", "2/6", "2/6", "3/6", "3/6", "4/6", "4/6", "5/6", "6/6", "outputs"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("prunedlora.train.runner.train", no_training)
    demo.run_demo(root)
    second = capsys.readouterr().out
    for name in ("sst2", "gsm8k"):
        assert f"reusing the finished run in {root / name}" in second
        assert f"reusing the export in {root / 'adapters' / name}" in second
        assert f"reusing the scores in {root / 'quality' / f'{name}.json'}" in second
    assert len(served) == 2 and len(measured) == 2
