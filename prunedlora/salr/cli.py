"""`prunedlora sparsify`: argument parsing only, the work is in ``prunedlora.salr.sparsify``."""

from __future__ import annotations

import argparse

from prunedlora.salr.config import MASKS, PATTERNS, RESIDUAL_FITS, RESIDUAL_MODES, SparsifyConfig


def register(subparsers) -> None:
    defaults = SparsifyConfig()
    parser = subparsers.add_parser(
        "sparsify",
        help="prune a base model's projections (SALR): compressed store, dense base and residual adapter",
        description="Zero a fraction of each linear projection's weights (magnitude or Wanda; unstructured "
        "or 2:4), store the sparse model as values + bitmap, write it back dense for PEFT and vLLM, and "
        "start a PEFT LoRA whose first components are the truncated SVD of what pruning removed. "
        "vLLM runs the dense base with dense GEMMs: the zeros save disk, not time.",
    )
    parser.add_argument("model", metavar="MODEL", help="a Hugging Face model folder, or 'default'")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write compressed/, base/, adapter/, salr.json")
    parser.add_argument("--sparsity", type=float, default=defaults.sparsity, help="fraction of zeros, in (0, 1)")
    parser.add_argument("--pattern", choices=PATTERNS, default=defaults.pattern, help="2:4 needs sparsity 0.5")
    parser.add_argument("--mask", choices=MASKS, default=defaults.mask, help="which weights to keep")
    parser.add_argument("--residual-rank", type=int, default=defaults.residual_rank, help="SVD components of E")
    parser.add_argument("--task-rank", type=int, default=defaults.task_rank, help="PEFT-initialised components")
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    parser.add_argument("--residual", choices=RESIDUAL_MODES, default=defaults.residual, help="recorded for training")
    parser.add_argument(
        "--residual-fit",
        choices=RESIDUAL_FITS,
        default=defaults.residual_fit,
        help="svd: E's truncated SVD (the paper's); whitened: the truncation best for the layer's output on "
        "the calibration text (one calibration pass)",
    )
    parser.add_argument(
        "--target-modules", nargs="+", default=defaults.target_modules, metavar="NAME", help="projections to prune"
    )
    parser.add_argument("--use-rslora", action="store_true", help="PEFT's rsLoRA scaling (alpha / sqrt(rank))")
    parser.add_argument("--calibration", default=None, metavar="TEXT_FILE", help="wanda, whitened: calibration text")
    parser.add_argument("--calibration-samples", type=int, default=defaults.calibration_samples, metavar="N")
    parser.add_argument("--calibration-length", type=int, default=defaults.calibration_length, metavar="TOKENS")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the task components' init")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.set_defaults(handler=_sparsify)

    dense = subparsers.add_parser(
        "materialise",
        help="write a compressed sparse store (from sparsify) out as a dense Hugging Face folder",
        description="Check a compressed store (manifest, size, SHA-256) and write its model densely, zeros "
        "included, with save_pretrained: a plain folder that PEFT, vLLM and `prunedlora serve` load.",
    )
    dense.add_argument("store", metavar="STORE_DIR", help="a compressed store (OUT_DIR/compressed of sparsify)")
    dense.add_argument("out_dir", metavar="OUT_DIR", help="where to write the dense model")
    dense.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    dense.set_defaults(handler=_materialise)


def _sparsify(args: argparse.Namespace) -> int:
    from prunedlora.salr.pipeline import sparsify

    config = SparsifyConfig(
        sparsity=args.sparsity,
        pattern=args.pattern,
        mask=args.mask,
        residual_rank=args.residual_rank,
        task_rank=args.task_rank,
        lora_alpha=args.lora_alpha,
        residual=args.residual,
        residual_fit=args.residual_fit,
        target_modules=args.target_modules,
        use_rslora=args.use_rslora,
        calibration_samples=args.calibration_samples,
        calibration_length=args.calibration_length,
        seed=args.seed,
    )
    result = sparsify(args.model, args.out_dir, config, calibration=args.calibration, overwrite=args.overwrite)
    print(result.summary())
    return 0


def _materialise(args: argparse.Namespace) -> int:
    from prunedlora.salr.materialise import materialise_store

    out = materialise_store(args.store, args.out_dir, overwrite=args.overwrite)
    print(f"materialised {args.store} densely into {out}")
    return 0
