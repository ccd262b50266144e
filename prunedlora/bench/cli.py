"""`prunedlora bench latency` and `prunedlora bench quality`: parsing only.

Each handler builds a config for a public function (``run_latency_bench``, ``run_quality_bench``) and
imports it lazily, so ``prunedlora --help`` stays fast.
"""

from __future__ import annotations

import argparse

from prunedlora.serve.lora_ops import LORA_OPS_MODES

# bench latency's --lora-ops (latency.BENCH_LORA_OPS, kept here so --help imports nothing heavy)
LATENCY_LORA_OPS = (*LORA_OPS_MODES, "both")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _int_list_or_none(text: str) -> list[int]:
    return [] if text.strip().lower() in ("", "none") else _int_list(text)


def _str_list(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def _int_or(word: str):
    def parse(text: str):
        if text == word:
            return None
        try:
            return int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected an integer or '{word}', got {text!r}") from err

    return parse


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmark serving latency (vLLM) and adapter quality",
        description="Rerunnable benchmarks: `latency` measures what pruned ranks buy when vLLM serves the "
        "adapters, `quality` what they cost against plain LoRA and AdaLoRA.",
    )
    kinds = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    _register_latency(kinds)
    _register_quality(kinds)
    _register_eval(subparsers)


def _key_values(pairs: list[str], option: str) -> dict[str, str]:
    from prunedlora.bench.scoring import ScoringError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ScoringError(f"{option} takes NAME=COLUMN, got {pair!r}")
        out[key] = value
    return out


def eval_data(args):
    """The DataConfig ``prunedlora eval`` scores: a file as a whole, a recipe's dev split, or a task's."""
    from prunedlora.bench.scoring import ScoringError
    from prunedlora.tasks import DataConfig

    chosen = [name for name in ("data", "config", "task") if getattr(args, name)]
    if len(chosen) != 1:
        raise ScoringError("give exactly one of --data FILE, --config RECIPE (its dev split), --task TASK")
    common = {"max_examples": args.max_examples, "loss_on": args.loss_on}
    if args.max_length is not None:
        common["max_length"] = args.max_length
    if args.config:
        from dataclasses import replace

        from prunedlora.train.recipe import load_recipe

        recipe = load_recipe(args.config)
        return replace(recipe.data, split="dev", mix=None, **common), recipe.model
    if args.task:
        return DataConfig(task=args.task, split="dev", **common), None
    own = {
        "format": args.format,
        "columns": _key_values(args.column, "--column") or None,
        "labels": args.labels.split(",") if args.labels else None,
        "template": args.template,
    }
    # the whole file is scored: it is held out already
    return DataConfig(path=args.data, dev_size=0, **own, **common), None


def run_eval(args) -> int:
    from prunedlora.bench.evaluate import evaluate, format_table, write_results
    from prunedlora.bench.scoring import EvalSettings, check_answer_pattern

    data, recipe_model = eval_data(args)
    if args.answer_regex:
        check_answer_pattern(args.answer_regex)
    settings = EvalSettings(
        max_examples=args.max_examples,
        max_length=data.max_length,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        exact_match_examples=args.exact_match,
    )
    payload = evaluate(
        data,
        args.adapters,
        model=args.model or recipe_model,
        settings=settings,
        answer_pattern=args.answer_regex,
        include_base=not args.no_base,
        names=args.name or None,
    )
    print(format_table(payload))
    out = args.out or f"runs/eval/{data.name.rsplit('.', 1)[0]}"
    json_path, _ = write_results(payload, out)
    print(f"per-example results: {json_path}")
    return 0


def _register_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score the base model and adapters on your data or a recipe's dev split, paired, with intervals",
        description="Score the base model and each ADAPTER (PEFT folder, run directory or export) on the same "
        "examples: label accuracy (classification), the replies' NLL per token (chat: every assistant turn; "
        "--loss-on last for the final one) and greedy exact match with --answer-regex, perplexity (text). Each "
        "row is compared paired with the first (the base model) with a 95%% bootstrap interval. Writes eval.json "
        "(per example) and eval.md to --out.",
    )
    p.add_argument("adapters", nargs="*", metavar="ADAPTER", help="adapter folders, run directories or exports")
    p.add_argument("--data", help="a data file or folder scored whole (JSON/JSONL, CSV/TSV, Parquet, save_to_disk)")
    p.add_argument("--config", help="a recipe: its data's dev split (and its model)")
    p.add_argument("--task", help="a built-in task's held-out split (gsm8k, codealpaca, sst2, rte)")
    p.add_argument("--format", help="the data's format (default: detected from its columns)")
    p.add_argument(
        "--column", action="append", default=[], metavar="NAME=COLUMN", help="map a format's column to yours"
    )
    p.add_argument("--labels", help="classification label words, comma-separated (default: every label in the file)")
    p.add_argument("--template", help="classification prompt template with {text}")
    p.add_argument("--model", help="base model folder or 'default' (default: what the first adapter records)")
    p.add_argument("--no-base", action="store_true", help="do not score the base model; compare with the first adapter")
    p.add_argument("--name", action="append", default=[], help="a name per adapter for the table, in order")
    p.add_argument("--max-examples", type=int, help="score the first N examples only")
    p.add_argument("--max-length", type=int, help="tokens per example (default: the data's, 512)")
    p.add_argument("--loss-on", default="response", choices=("response", "last"), help="which replies NLL scores")
    p.add_argument(
        "--answer-regex",
        help="greedy exact match on the answer this regex finds (group 1 if any); "
        "'final_number' compares the last number",
    )
    p.add_argument("--exact-match", type=int, help="greedy answers on the first N examples only (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="folder for eval.json and eval.md (default: runs/eval/<data name>)")
    p.set_defaults(handler=run_eval)


def _register_latency(kinds) -> None:
    p = kinds.add_parser(
        "latency",
        help="vLLM latency and throughput: base model, r0 adapters, pruned adapters in tight and padded slots, mixes, "
        "a mixed-rank batch; vLLM's stock LoRA ops against the rank-aware ones",
        description="Measure, in one run on the same prompts, the base model alone, adapters at r0 in the r0 slot, "
        "pruned adapters in the smallest slot that holds them and in the r0 slot, a slot-rank sweep, mixes of "
        "distinct adapters per batch, and adapters of different ranks (--mixed-ranks) batched together in one slot, "
        "each adapter configuration with vLLM's stock LoRA ops and with the rank-aware ones (--lora-ops both). Each "
        "slot setting and LoRA ops mode is its own vLLM engine in its own process (the default: 13 engines). Writes "
        "latency.json, latency.md and latency.png to --out. Default: roughly 15 minutes on a 2-core CPU.",
    )
    p.add_argument("--model", default="default", help="base model folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="benchmarks/results", help="where the JSON, table and plot go")
    p.add_argument("--work-dir", help="bench adapters and per-engine logs (default: ~/.cache/prunedlora/bench/latency)")
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="a finished `prunedlora train` run to serve (repeatable); default: synthetic adapters with "
        "the ranks of real runs",
    )
    p.add_argument("--r0", type=int, default=32, help="rank of the unpruned adapters (synthetic; default 32)")
    p.add_argument(
        "--target-rank", type=int, default=8, help="average rank of the pruned adapters (synthetic; default 8)"
    )
    p.add_argument("--prompts", type=int, default=16, dest="num_prompts", help="requests per batch (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--output-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--repeats", type=int, default=1, help="measured batches per configuration (default 1)")
    p.add_argument(
        "--slots",
        type=_int_list,
        default=[8, 32, 64],
        dest="sweep_slots",
        help="slot ranks of the sweep (default 8,32,64)",
    )
    p.add_argument("--mixes", type=_int_list, default=[1, 4, 16], help="distinct adapters per batch (default 1,4,16)")
    p.add_argument(
        "--mixed-ranks",
        type=_int_list_or_none,
        default=[4, 8, 16],
        help="ranks of the mixed-rank batch: one synthetic adapter per rank, batched together in the slot of the "
        "largest, each adapter's share reported, and each alone in the same engine (default 4,8,16; 'none': skip)",
    )
    p.add_argument(
        "--mix-family",
        default="pruned-global",
        choices=("r0", "pruned-global", "pruned-uniform"),
        help="adapters mixed in a batch (default pruned-global)",
    )
    p.add_argument(
        "--adapters-per-family",
        type=int,
        default=3,
        help="synthetic adapters of the mixed family, one per real run pattern (default 3)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="vLLM dtype (default auto: on the CPU bfloat16 where it is native, else float32)",
    )
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-gib", type=float, help="KV cache per engine (default 1 GiB, or VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument(
        "--engine-timeout",
        type=float,
        default=900.0,
        dest="engine_timeout_s",
        help="seconds one engine may take before it is stopped (default 900)",
    )
    p.add_argument(
        "--lora-ops",
        choices=LATENCY_LORA_OPS,
        default="both",
        help="LoRA compute in vLLM's CPU workers: both (default: every adapter configuration with vLLM's own "
        "ops, then with the rank-aware ones, each in its own engine, ratios side by side), stock or rank-aware",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a first look in a few minutes: base, r0 and each pruned family in its smallest and the r0 slot, "
        "8 prompts -> 16 tokens, no sweep, mixes or mixed-rank batch (the demo's latency stage); options set "
        "otherwise win",
    )
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.set_defaults(handler=_latency)


def _latency(args) -> int:
    from prunedlora.bench.latency import (
        QUICK_SETTINGS,
        LatencyBenchConfig,
        format_comparison,
        format_headline,
        run_latency_bench,
    )

    if args.quick:  # the quick settings where an option is at its default (the CLI's are the config's)
        defaults = LatencyBenchConfig()
        for key, value in QUICK_SETTINGS.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    config = LatencyBenchConfig(
        model=args.model,
        out_dir=args.out,
        work_dir=args.work_dir,
        runs=args.run,
        r0=args.r0,
        target_rank=args.target_rank,
        num_prompts=args.num_prompts,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        repeats=args.repeats,
        sweep_slots=args.sweep_slots,
        mixes=args.mixes,
        mix_family=args.mix_family,
        adapters_per_family=args.adapters_per_family,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        engine_timeout_s=args.engine_timeout_s,
        echo=not args.quiet,
        lora_ops=args.lora_ops,
        mixed_ranks=args.mixed_ranks,
    )
    payload = run_latency_bench(config)
    print(open(payload["files"]["markdown"]).read())
    print(format_headline(payload))
    comparison = format_comparison(payload)
    if comparison:
        print(comparison)
    for key, path in payload["files"].items():
        print(f"{key:>8}: {path}")
    print(f"elapsed: {payload['elapsed_s']:.0f} s")
    return 1 if any("error" in row for row in payload["rows"]) else 0


def _register_quality(kinds) -> None:
    from_preset = argparse.SUPPRESS  # only options given on the command line override the preset
    p = kinds.add_parser(
        "quality",
        help="train and score LoRA, PrunedLoRA and AdaLoRA cells over tasks and seeds (cached, resumable)",
        description="Fill the table tasks x methods x seeds. Every cell trains from the protocol's frozen copy of "
        "recipes/smollm2-<task>.yaml (prunedlora/bench/protocol_recipes) with "
        "the same data, steps, learning rate and seed, and is scored on the task's held-out split. Cells are cached "
        "by configuration (run the same command again to resume). The default preset 'small' is a short SST-2 "
        "comparison; '--preset full' is the whole table (hours on a 2-core CPU).",
    )
    p.add_argument("--preset", choices=("small", "full"), default="small", help="starting point (default small)")
    p.add_argument("--model", default=from_preset, help="base model folder, or 'default'")
    p.add_argument("--tasks", type=_str_list, default=from_preset, help="comma-separated: gsm8k, codealpaca, sst2")
    p.add_argument(
        "--methods",
        type=_str_list,
        default=from_preset,
        help="comma-separated: base, lora-target, lora-r0, pruned-obs-paper-global, pruned-obs-paper-uniform, "
        "pruned-obs-fisher-global, pruned-obs-fisher-uniform, pruned-obs-input-global, "
        "pruned-obs-input-compensate-global, pruned-obs-input-compensate-uniform, "
        "pruned-obs-input-compensate-global-r64, "
        "pruned-sensitivity-global, pruned-taylor-global, pruned-taylor-ema-global, pruned-activation-global, "
        "pruned-magnitude-global, pruned-magnitude-global-r64, adalora, adalora-lr5x",
    )
    p.add_argument("--seeds", type=_int_list, default=from_preset, help="comma-separated training seeds")
    p.add_argument(
        "--max-steps",
        type=_int_or("recipe"),
        default=from_preset,
        help="optimizer steps per run, or 'recipe' (pruning schedules are scaled to it)",
    )
    p.add_argument("--learning-rate", type=float, default=from_preset, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, default=from_preset, help="per-device batch size (default: the recipe's)")
    p.add_argument(
        "--train-examples", type=int, default=from_preset, help="cap on training examples (default: recipe's)"
    )
    p.add_argument("--max-length", type=int, default=from_preset, help="tokens per example (default: the recipe's)")
    p.add_argument("--r0", type=int, default=from_preset, help="initial rank (default: the recipe's)")
    p.add_argument("--target-rank", type=float, default=from_preset, help="final average rank (default: the recipe's)")
    p.add_argument("--max-rank", type=int, default=from_preset, help="per-module rank cap (default: the recipe's)")
    p.add_argument(
        "--dev-size",
        type=int,
        default=from_preset,
        help="held-out carve of GSM8K/CodeAlpaca, kept out of training (default: 100)",
    )
    p.add_argument(
        "--exact-match-examples",
        type=int,
        default=from_preset,
        help="GSM8K greedy exact match on the first N held-out examples (default: all; 0: none)",
    )
    p.add_argument(
        "--eval-examples", type=_int_or("all"), default=from_preset, help="held-out examples scored per task, or 'all'"
    )
    p.add_argument("--gen-tokens", type=int, default=from_preset, help="GSM8K answer length limit (default 256)")
    p.add_argument("--eval-batch-size", type=int, default=from_preset, help="scoring batch size (default 16)")
    p.add_argument(
        "--data-dir",
        default=from_preset,
        help="folder with gsm8k/, codealpaca/, sst2/ (default ../shared/data; 'vendored' for the package slices)",
    )
    p.add_argument(
        "--recipes-dir",
        default=from_preset,
        help="folder with smollm2-<task>.yaml (default: the protocol's frozen copies)",
    )
    p.add_argument(
        "--cells-dir", default=from_preset, help="cell cache (default ~/.cache/prunedlora/bench/quality/cells)"
    )
    p.add_argument(
        "--out", dest="out_dir", default=from_preset, help="where quality.json/.md/.png go (default benchmarks/results)"
    )
    p.add_argument("--force", action="store_true", default=from_preset, help="recompute cells even if cached")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        default=from_preset,
        help="keep each run's Trainer checkpoints after it finished",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        default=from_preset,
        help="write the table from the cells already finished (cached or committed); train nothing, and list the "
        "others as not run yet",
    )
    p.add_argument(
        "--list", action="store_true", help="print every cell, whether it is cached and its command; run nothing"
    )
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.set_defaults(handler=_quality)


_QUALITY_KEYS = (
    "model",
    "tasks",
    "methods",
    "seeds",
    "max_steps",
    "learning_rate",
    "batch_size",
    "train_examples",
    "max_length",
    "r0",
    "target_rank",
    "max_rank",
    "dev_size",
    "exact_match_examples",
    "eval_examples",
    "gen_tokens",
    "eval_batch_size",
    "data_dir",
    "recipes_dir",
    "cells_dir",
    "out_dir",
    "force",
    "keep_checkpoints",
    "report_only",
)


def _quality(args) -> int:
    from prunedlora.bench.quality import (
        cell_command,
        is_cached,
        plan_cells,
        preset_config,
        run_quality_bench,
    )

    overrides = {key: getattr(args, key) for key in _QUALITY_KEYS if hasattr(args, key)}
    config = preset_config(args.preset, echo=not args.quiet, **overrides)
    if args.list:
        for cell in plan_cells(config):
            state = "cached" if is_cached(config, cell) else "to run"
            print(f"{cell.label} [{state}] {cell.dir}\n  {cell_command(config, cell)}")
        return 0
    payload = run_quality_bench(config)
    print(open(payload["files"]["markdown"]).read().split("\n\nCells")[0])
    for key, path in payload["files"].items():
        print(f"{key:>8}: {path}")
    print(f"elapsed: {payload['elapsed_s']:.0f} s")
    return 1 if any("error" in cell for cell in payload["cells"]) else 0
