"""Your own data, measured: for each format, the base model, a PrunedLoRA adapter (r0 32 pruned to an
average rank of 8, at most 16) and plain LoRA at rank 8 trained the same steps on the same examples,
scored with ``prunedlora eval`` on held-out rows they never saw, paired with 95% intervals.

Files come from ``make_files.py --out runs/own_data --shared --held-out 100`` (the first N training
rows, the 100 held-out rows after them). Each finished stage is reused when the script runs again
(runs under ``runs/own_data/<format>/``); the results go to ``benchmarks/results/own_data/``.

    python benchmarks/own_data/make_files.py --out runs/own_data --shared --held-out 100
    python benchmarks/own_data/run.py --formats chat classification alpaca prompt-completion
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path("runs/own_data")
OUT = Path("benchmarks/results/own_data")
# format -> (training file, held-out file, data options, training rows, batch size, max_length)
CELLS = {
    "chat": ("chat.jsonl", "chat_dev.jsonl", {}, 500, 8, 512),
    "classification": (
        "classification.csv",
        "classification_dev.csv",
        {"columns": {"text": "request", "label": "language"}},
        320,
        8,
        256,
    ),
    "alpaca": ("alpaca.json", "alpaca_dev.json", {}, 320, 8, 384),
    "prompt-completion": ("prompt_completion.jsonl", "prompt_completion_dev.jsonl", {}, 320, 8, 384),
}
METHODS = {
    # PrunedLoRA: r0 32 -> average 8 (global allocation, at most 16: vLLM's 16-slot), schedule defaults
    "pruned": {"prune": True, "method": {"r0": 32, "lora_alpha": 64, "target_rank": 8, "max_rank": 16}},
    # plain LoRA at the pruned adapter's average rank, the same alpha / r
    "lora-r8": {"prune": False, "method": {"r0": 8, "lora_alpha": 16}},
}


def recipe_dict(fmt: str, method: str, run_dir: Path) -> dict:
    train_file, dev_file, options, rows, batch, max_length = CELLS[fmt]
    return {
        "model": "default",
        "prune": METHODS[method]["prune"],
        "data": {
            "path": str(DATA / train_file),
            "dev_path": str(DATA / dev_file),
            "format": fmt,
            "max_examples": rows,
            "max_length": max_length,
            **options,
        },
        "method": dict(METHODS[method]["method"]),
        "training": {
            "output_dir": str(run_dir),
            "epochs": 1,
            "per_device_train_batch_size": batch,
            "learning_rate": 2e-4,
            "warmup_steps": 5,
            "save_steps": 1000,
            "seed": 0,
        },
    }


def run_format(fmt: str) -> dict:
    from prunedlora import metadata
    from prunedlora.bench.evaluate import evaluate, format_table
    from prunedlora.bench.scoring import EvalSettings
    from prunedlora.cpu import machine_record
    from prunedlora.export.exporter import export_adapter
    from prunedlora.tasks import DataConfig
    from prunedlora.train.recipe import recipe_from_dict
    from prunedlora.train.runner import train

    work = DATA / fmt
    seconds = {}
    for method in METHODS:
        run_dir = work / method
        if not (run_dir / metadata.RUN_RECORD_FILE).is_file():
            start = time.time()
            train(recipe_from_dict(recipe_dict(fmt, method, run_dir)), resume="auto")
            seconds[f"train_{method}"] = round(time.time() - start, 1)
    export_dir = work / "pruned-export"
    if not (export_dir / "adapter_config.json").is_file():
        export_adapter(work / "pruned", export_dir, overwrite=True)
    _, dev_file, options, _, _, max_length = CELLS[fmt]
    if fmt == "classification":  # the label words of the training file, as training saw them
        options = {**options, "labels": ["javascript", "python", "sql"]}
    # relative paths: the committed results name no machine's folders
    data = DataConfig(path=DATA / dev_file, format=fmt, dev_size=0, max_length=max_length, **options)
    start = time.time()
    payload = evaluate(
        data,
        [export_dir, work / "lora-r8"],
        settings=EvalSettings(max_length=max_length, batch_size=8, exact_match_examples=0),
        names=["PrunedLoRA (avg rank 8) export", "LoRA r8"],
    )
    seconds["eval"] = round(time.time() - start, 1)
    record = json.loads((work / "pruned" / metadata.RUN_RECORD_FILE).read_text())
    ranks = list(record["ranks"].values())
    payload.update(
        format=fmt,
        recipes={m: recipe_dict(fmt, m, Path(f"runs/own_data/{fmt}/{m}")) for m in METHODS},
        pruned_ranks={"average": sum(ranks) / len(ranks), "max": max(ranks), "min": min(ranks)},
        global_step=record["global_step"],
        seconds=seconds,
        machine=machine_record(dtype="float32"),
        command=f"python benchmarks/own_data/run.py --formats {fmt}",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{fmt}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (OUT / f"{fmt}.md").write_text(
        f"# {fmt}: {payload['eval_examples']} held-out rows, {payload['global_step']} steps\n\n"
        f"{format_table(payload)}\n\nPruned ranks: average {payload['pruned_ranks']['average']:.2f}, "
        f"max {payload['pruned_ranks']['max']}. Machine: {payload['machine']['description']}.\n"
        f"Rerun: `{payload['command']}`\n"
    )
    print(format_table(payload), flush=True)
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(CELLS), choices=list(CELLS))
    args = parser.parse_args()
    for fmt in args.formats:
        run_format(fmt)


if __name__ == "__main__":
    main()
