"""`prunedlora demo`: the README's main job on the bundled default model, end to end.

Each stage reads the previous stage's files, as a user would run them by hand; a finished stage is
reused when the demo is run again (delete runs/demo to start over).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(root: str | Path = "runs/demo", recipe_path: str | Path | None = None) -> dict[str, Path]:
    """Materialise the default model, train a pruned adapter, and report where everything is."""
    from prunedlora import metadata
    from prunedlora.models import default_model_dir
    from prunedlora.train.recipe import load_recipe
    from prunedlora.train.runner import format_rank_table, train

    root = Path(root)
    outputs: dict[str, Path] = {}
    _banner("1/1 model")
    model_dir = default_model_dir()
    print(f"default model: {model_dir}")

    _banner("train: PrunedLoRA r0=32 -> average rank 8 (obs criterion, global allocation)")
    recipe = load_recipe(recipe_path or DEMO_RECIPE, {"training.output_dir": str(root / "sst2")})
    run_dir = Path(recipe.training.output_dir)
    if (run_dir / metadata.RUN_RECORD_FILE).is_file():
        print(f"reusing the finished run in {run_dir}")
        ranks = metadata.read_run_record(run_dir).ranks
    else:
        ranks = train(recipe).ranks
    print(format_rank_table(ranks))
    outputs["run"] = run_dir
    outputs["ranks_plot"] = run_dir / metadata.RANKS_PLOT_FILE
    _banner("outputs")
    for key, path in outputs.items():
        print(f"{key:>12}: {path}")
    return outputs


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on the bundled default model")
    parser.add_argument("--root", default="runs/demo", help="where the demo writes (default: runs/demo)")
    parser.set_defaults(handler=lambda args: run_demo(args.root) and 0)
