"""The learning curve that set the quality protocol's step count: SST-2 dev accuracy of plain LoRA r8
after 0, 50, 100 and 150 steps of the protocol's training (batch 16, lr 2e-4, SmolLM2-135M-Instruct).

The checkpoints are those of the protocol's own ``lora-target`` cell (the Trainer saves one every 50
steps; run the cell with ``--keep-checkpoints``, or copy them while it trains), so the curve is the
training the table compares, not a separate run. Step 0 is the base model. Each point is scored on the
same first ``--examples`` dev sentences (gold-label log-prob margin > 0), with a 95% Wilson interval.

    python benchmarks/learning_curve.py CHECKPOINT_DIR [CHECKPOINT_DIR ...] [--examples 400]

Writes benchmarks/results/learning_curve.{json,md,png}.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (better than the normal one near 0 and 1)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if not match:
        raise SystemExit(f"{path}: not a Trainer checkpoint folder (checkpoint-N)")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--model", default="default")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from prunedlora.bench.scoring import EvalSettings, score_adapter
    from prunedlora.cpu import machine_line, machine_record
    from prunedlora.figures import new_figure, save_figure
    from prunedlora.metadata import write_json_atomic
    from prunedlora.models import resolve_model
    from prunedlora.tasks import shared_data_path

    model_dir = resolve_model(args.model)
    train_file = shared_data_path("sst2")  # as the cells pass it; the dev split is its dev.tsv
    settings = EvalSettings(max_examples=args.examples, max_length=128, batch_size=args.batch_size)
    points = []
    for step, adapter in [(0, None)] + sorted((checkpoint_step(c), c) for c in args.checkpoints):
        start = time.perf_counter()
        metrics = score_adapter(model_dir, adapter, "sst2", train_file, settings)
        n = metrics["eval_examples"]
        hits = round(metrics["accuracy"] * n)
        low, high = wilson(hits, n)
        points.append({"step": step, "accuracy": metrics["accuracy"], "ci95": [low, high], "examples": n})
        print(
            f"step {step}: accuracy {metrics['accuracy']:.3f} [{low:.3f}, {high:.3f}] ({time.perf_counter() - start:.0f} s)"
        )

    record = {
        "what": "SST-2 dev accuracy of LoRA r8 (the protocol's lora-target cell, seed 0) against training steps",
        "model": "default (SmolLM2-135M-Instruct)",
        "data": f"../shared/data/sst2/dev.tsv (first {args.examples} sentences)",
        "training": "batch 16, lr 2e-4, 128 tokens, all seven projections, fp32",
        "points": points,
        "machine": machine_record(dtype="float32"),
        "command": f"python benchmarks/learning_curve.py <cell run>/checkpoint-{{50,100,150}} --examples {args.examples}",
    }
    write_json_atomic(args.out / "learning_curve.json", record)
    rows = [f"| {p['step']} | {p['accuracy']:.3f} | {p['ci95'][0]:.3f}-{p['ci95'][1]:.3f} |" for p in points]
    (args.out / "learning_curve.md").write_text(
        "\n".join(
            [
                "# Learning curve: LoRA r8 on SST-2 (the protocol's training)",
                "",
                f"{record['training']}; dev: {record['data']}. Machine: {machine_line(record['machine'])}.",
                "",
                "| step | accuracy | 95% interval |",
                "|---:|---:|---|",
                *rows,
                "",
                f"Rerun: `{record['command']}`",
                "",
            ]
        )
    )
    fig = new_figure(5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    steps = [p["step"] for p in points]
    acc = [p["accuracy"] for p in points]
    ax.plot(steps, acc, marker="o")
    ax.fill_between(steps, [p["ci95"][0] for p in points], [p["ci95"][1] for p in points], alpha=0.2)
    ax.set_xlabel("optimizer steps (batch 16)")
    ax.set_ylabel(f"SST-2 dev accuracy (first {args.examples})")
    ax.set_title("LoRA r8 learning curve")
    ax.grid(alpha=0.3)
    save_figure(fig, args.out / "learning_curve.png")


if __name__ == "__main__":
    main()
