"""`prunedlora train --config RECIPE [--section.key value ...]`: a YAML file or a shipped recipe's name."""

from __future__ import annotations

import argparse


def _parse_overrides(extra: list[str]) -> dict[str, str]:
    from prunedlora.rank.config import ConfigError

    overrides, i = {}, 0
    while i < len(extra):
        key = extra[i]
        if not key.startswith("--"):
            raise ConfigError(f"expected --key value, got {key!r}")
        key = key[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            value, i = extra[i + 1], i + 2
        else:
            raise ConfigError(f"--{key} needs a value")
        overrides[key.replace("-", "_")] = value
    return overrides


def run_train(args: argparse.Namespace) -> int:
    from prunedlora.train.recipe import load_recipe
    from prunedlora.train.runner import format_rank_table, train

    recipe = load_recipe(args.config, _parse_overrides(args.overrides))
    result = train(recipe, resume="auto" if not args.no_resume else False)
    print(format_rank_table(result.ranks))
    print(f"run directory: {result.run_dir} (adapter at r0, masks, rank_history.json, ranks.png)")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune with LoRA at r0 and prune to variable per-module ranks",
        description="Train with PrunedLoRA. Extra --section.key value pairs override the recipe, "
        "e.g. --training.max_steps 20 --method.target_rank 4.",
    )
    parser.add_argument(
        "--config", required=True, help="recipe YAML file, or a shipped recipe's name (e.g. smollm2-sst2, demo)"
    )
    parser.add_argument("--no-resume", action="store_true", help="start over even if the run has checkpoints")
    parser.set_defaults(handler=run_train, overrides=[])
    parser.set_defaults(_parse_known=True)
