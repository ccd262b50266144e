"""`prunedlora prune-export`: argument parsing only, the work is in ``prunedlora.loraprune.export_pruned``."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune-export",
        help="slice a LoRAPrune run into a smaller standard base model and its adapter",
        description="Remove the KV groups and MLP channels a LoRAPrune run masked from the base weights and "
        "the LoRA factors, write OUT_DIR/base (a Hugging Face folder with one head count and MLP width for "
        "every layer, as vLLM needs) and OUT_DIR/adapter, verified against the masked model in float64.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run of a recipe with a loraprune section")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write base/, adapter/, loraprune.json")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.set_defaults(handler=_prune_export)


def _prune_export(args: argparse.Namespace) -> int:
    from prunedlora.loraprune.export import export_pruned

    result = export_pruned(args.run_dir, args.out_dir, overwrite=args.overwrite)
    print(
        f"wrote {result.base} ({result.num_attention_heads} query heads over {result.num_key_value_heads} KV heads, "
        f"MLP width {result.intermediate_size}) and {result.adapter}; max |logit diff| {result.max_abs_logit_diff:.2e}"
    )
    return 0
