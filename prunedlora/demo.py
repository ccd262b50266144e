"""`prunedlora demo`: the README's main job on the bundled default model, end to end.

Train two small pruned adapters on two tasks with different pruning settings, export them as compact
PEFT adapters, score the base model, each r0 training adapter and its export on the task's held-out
split (with a warning if an adapter does not beat the base model), serve both with the base model from
one vLLM server, ask each one question, and end with a short latency comparison (base model, r0
adapter and pruned export, each adapter with vLLM's stock LoRA ops and with the rank-aware ones, their
ratios to the base model side by side). Each stage reads the previous stage's files, as a user would
run them by hand; a finished stage is reused when the demo runs again (delete runs/demo to start over).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prunedlora.modelfacts import ADAPTER_WEIGHTS_FILE


@dataclass(frozen=True)
class DemoTask:
    """One adapter of the demo: its recipe, what it is, and the question the server is asked."""

    name: str
    recipe: str  # a shipped recipe (prunedlora/recipes/NAME.yaml)
    title: str
    question: str
    eval_settings: dict = field(default_factory=dict)  # EvalSettings fields: how much of the held-out split to score


DEMO_TASKS = (
    DemoTask(
        "sst2",
        "demo",
        "SST-2 sentiment, r0=32 -> average 8, obs-paper criterion, global allocation (variable ranks, max 16)",
        "Sentence: a gorgeous, witty, seductive movie.\n\n"
        "Is the sentiment of this sentence positive or negative? Answer with one word.",
    ),
    DemoTask(
        "gsm8k",
        "demo-gsm8k",
        "GSM8K math, r0=32 -> rank 4 everywhere, obs-paper criterion, uniform allocation",
        "Tom has 3 boxes with 12 pencils each. He gives away 10 pencils. How many pencils does he have left?",
        # answer NLL on the whole carve; greedy answers (the slow part) for exact match on a few only
        {"exact_match_examples": 4},
    ),
)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _train_or_reuse(task: DemoTask, run_dir: Path) -> Path:
    from prunedlora import metadata
    from prunedlora.train.recipe import load_recipe
    from prunedlora.train.runner import format_rank_table, train

    if (run_dir / metadata.RUN_RECORD_FILE).is_file():
        print(f"reusing the finished run in {run_dir}")
        ranks = metadata.read_run_record(run_dir).ranks
    else:
        ranks = train(load_recipe(task.recipe, {"training.output_dir": str(run_dir)})).ranks
    print(format_rank_table(ranks))
    return run_dir


def _export_or_reuse(run_dir: Path, out_dir: Path) -> Path:
    from prunedlora import metadata
    from prunedlora.export import export_adapter, inspect_adapter

    adapter_file = run_dir / metadata.RUN_ADAPTER_DIR / ADAPTER_WEIGHTS_FILE
    exported = out_dir / ADAPTER_WEIGHTS_FILE
    if exported.is_file() and exported.stat().st_mtime_ns >= adapter_file.stat().st_mtime_ns:
        print(f"reusing the export in {out_dir}")
    else:
        # verify=True (the default): PEFT reloads the written adapter and must match the training
        # model's logits, or nothing is written.
        print(export_adapter(run_dir, out_dir, overwrite=True).summary())
    print(inspect_adapter(out_dir))
    return out_dir


def _score_or_reuse(task: DemoTask, model_dir: Path, run_dir: Path, adapter_dir: Path, out_file: Path) -> dict:
    """Base model, r0 adapter and export on the task's held-out split (``bench.demo_quality``), printed
    as a table and kept as JSON; reused while it is newer than both adapters."""
    import json

    from prunedlora import metadata
    from prunedlora.bench.demo_quality import DemoEval, format_table, score_demo_task
    from prunedlora.bench.scoring import EvalSettings
    from prunedlora.train.recipe import load_recipe

    sources = [
        run_dir / metadata.RUN_ADAPTER_DIR / ADAPTER_WEIGHTS_FILE,
        adapter_dir / ADAPTER_WEIGHTS_FILE,
    ]
    if out_file.is_file() and all(out_file.stat().st_mtime_ns >= s.stat().st_mtime_ns for s in sources):
        print(f"reusing the scores in {out_file}")
        payload = json.loads(out_file.read_text())
    else:
        data = load_recipe(task.recipe).data
        settings = EvalSettings(**task.eval_settings, dev_size=data.dev_size)  # the carve training left out
        evaluation = DemoEval(task.name, settings, str(data.path) if data.path else None, data.seed)
        payload = score_demo_task(evaluation, model_dir, run_dir, adapter_dir)
        metadata.write_json_atomic(out_file, payload)
    print(format_table(payload))
    return payload


def run_demo(root: str | Path = "runs/demo") -> dict[str, Path]:
    """Train, export, serve and benchmark on the default model; return where the outputs are."""
    from prunedlora.bench import demo_latency
    from prunedlora.models import default_model_dir
    from prunedlora.serve import ServeConfig, serve_and_ask

    root = Path(root)
    outputs: dict[str, Path] = {}
    _banner("1/6 model")
    model_dir = default_model_dir()
    print(f"default model: {model_dir}")

    runs: dict[str, Path] = {}
    for task in DEMO_TASKS:
        _banner(f"2/6 train {task.name}: {task.title}")
        runs[task.name] = _train_or_reuse(task, root / task.name)
        outputs[f"run {task.name}"] = runs[task.name]

    adapters: dict[str, Path] = {}
    for task in DEMO_TASKS:
        _banner(f"3/6 export {task.name}: drop pruned components, fold the scaling into B")
        adapters[task.name] = _export_or_reuse(runs[task.name], root / "adapters" / task.name)
        outputs[f"adapter {task.name}"] = adapters[task.name]

    warnings = []
    for task in DEMO_TASKS:
        _banner(f"4/6 score {task.name}: base model, r0 training adapter and pruned export on held-out data")
        scores = _score_or_reuse(
            task, model_dir, runs[task.name], adapters[task.name], root / "quality" / f"{task.name}.json"
        )
        outputs[f"scores {task.name}"] = root / "quality" / f"{task.name}.json"
        if not scores["beats_base"]:
            warnings.append(
                f"WARNING: the {task.name} adapter does not beat the base model on held-out data "
                f"(see {outputs[f'scores {task.name}']})"
            )

    _banner("5/6 serve: one vLLM server, the base model and both adapters")
    log_file = root / "serve.log"
    questions = {"base": DEMO_TASKS[0].question}
    questions.update({task.name: task.question for task in DEMO_TASKS})
    config = ServeConfig(
        model=str(model_dir),
        adapters={k: str(v) for k, v in adapters.items()},
        port=0,
        log_file=str(log_file),
        echo=False,
    )
    serve_and_ask(config, questions)
    outputs["server log"] = log_file

    _banner("6/6 latency: base model vs the SST-2 adapter at r0 vs its pruned export, stock vs rank-aware LoRA ops")
    payload = demo_latency(runs[DEMO_TASKS[0].name], root / "latency")
    outputs["latency table"] = Path(payload["files"]["markdown"])
    outputs["latency plot"] = Path(payload["files"]["plot"])

    _banner("outputs")
    for key, path in outputs.items():
        print(f"{key:>16}: {path}")
    for line in warnings:
        print(line)
    return outputs


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on the bundled default model")
    parser.add_argument("--root", default="runs/demo", help="where the demo writes (default: runs/demo)")
    parser.set_defaults(handler=lambda args: run_demo(args.root) and 0)
