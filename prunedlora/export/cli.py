"""`prunedlora export` and `prunedlora inspect`: argument parsing only, the work is in export_adapter
and inspect_adapter."""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="compact a pruned run (or a PEFT LoRA/AdaLoRA adapter) into a dense PEFT adapter",
        description="Keep each module's live components, fold the LoRA scaling into B, write a PEFT adapter "
        "folder that PEFT and vLLM load exactly, and check it with PEFT against the source model.",
    )
    export.add_argument("source", metavar="TRAIN_OUTPUT", help="a training run directory or a PEFT adapter folder")
    export.add_argument(
        "out_dir", metavar="OUT_DIR", help="where to write the adapter (refused if non-empty without --overwrite)"
    )
    export.add_argument("--base-model", default=None, help="base model folder (default: the one the source records)")
    export.add_argument(
        "--pad-to",
        type=_positive_int,
        default=None,
        metavar="K",
        help="pad each module's rank up to a multiple of K with zero components",
    )
    export.add_argument(
        "--max-rank",
        type=_positive_int,
        default=None,
        metavar="R",
        help="refuse modules above rank R (see --svd-truncate)",
    )
    export.add_argument(
        "--svd-truncate",
        action="store_true",
        help="with --max-rank: truncate modules above R by SVD and report the error",
    )
    export.add_argument("--from-adalora", action="store_true", help="the source is a PEFT AdaLoRA adapter")
    export.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip loading the result with PEFT and comparing logits",
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    export.add_argument(
        "--merge", action="store_true", help="also write OUT_DIR/merged: the base with the adapter merged"
    )
    export.add_argument(
        "--onnx",
        action="store_true",
        help="also export the merged model to OUT_DIR/onnx with optimum and check it with onnxruntime",
    )
    export.set_defaults(handler=_export)

    inspect = subparsers.add_parser(
        "inspect",
        help="print per-module ranks and sizes of an adapter or a run",
        description="Print a table of per-module ranks, parameters and bytes (before and after compaction) "
        "for an exported adapter, a plain PEFT adapter folder or a training run directory.",
    )
    inspect.add_argument("path", metavar="ADAPTER", help="an adapter folder or a run directory")
    inspect.set_defaults(handler=_inspect)


def _export(args: argparse.Namespace) -> int:
    from prunedlora.export.exporter import export_adapter
    from prunedlora.export.inspection import inspect_adapter

    result = export_adapter(
        args.source,
        args.out_dir,
        base_model=args.base_model,
        pad_to=args.pad_to,
        max_rank=args.max_rank,
        svd_truncate=args.svd_truncate,
        from_adalora=args.from_adalora,
        verify=args.verify,
        overwrite=args.overwrite,
        merge=args.merge,
        onnx=args.onnx,
    )
    print(result.summary())
    print()
    print(inspect_adapter(result.out_dir))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from prunedlora.export.inspection import inspect_adapter

    print(inspect_adapter(args.path))
    return 0
