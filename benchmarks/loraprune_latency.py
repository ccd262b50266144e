"""vLLM latency of a LoRAPrune-pruned base against the dense base, in one run on the same prompts.

`prunedlora bench latency` serves one base model (``--model``) with adapters; this script reuses its
machinery (:func:`prunedlora.bench.latency.bench_prompts`, the engine worker ``_run_worker`` with the
CPU thread binding and dtype that ``bench latency`` chooses) to measure the base alone for each model,
each in its own vLLM engine and process, on the same token prompts, and writes the ratios
pruned / dense (p50 TTFT, TPOT, end-to-end; output tokens per second).

    python benchmarks/loraprune_latency.py --pruned runs/loraprune_eval/lora-50-pruned \
        [--prompts 16 --prompt-tokens 32 --output-tokens 64 --repeats 3]

``--pruned`` is a ``prunedlora prune-export`` folder (its ``base/`` is served) or a model folder.
Writes benchmarks/results/loraprune/latency.json (``--out``). Run it on a quiet machine: the two
engines run one after the other, so anything else on the CPU skews the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "loraprune" / "latency.json"
KEYS = ("ttft_p50_s", "tpot_p50_s", "e2e_p50_s", "output_tokens_per_s")


def served_folder(path: str) -> Path:
    folder = Path(path)
    if (folder / "base" / "config.json").is_file():
        return folder / "base"
    if (folder / "config.json").is_file():
        return folder
    raise SystemExit(f"{folder} holds neither base/config.json (a prune-export folder) nor config.json")


def _portable(model: Path, given: str | None = None) -> str:
    """How a results file names a model: as the user gave it (``default``) or relative to the repository."""
    if given == "default":
        return "default"
    try:
        return str(Path(model).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="default", help="dense base model folder or 'default'")
    parser.add_argument("--pruned", required=True, help="prune-export folder (or its base/)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--engine-timeout", type=float, default=900.0)
    parser.add_argument("--work-dir", default=None, help="engine specs and logs (default: the prunedlora cache)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from prunedlora.bench.latency import _run_worker, bench_prompts
    from prunedlora.cpu import machine_line, machine_record
    from prunedlora.models import cache_dir, resolve_model
    from prunedlora.serve.config import cpu_choice, resolve_device

    dense = Path(resolve_model(args.dense))
    pruned = served_folder(args.pruned)
    work = Path(args.work_dir) if args.work_dir else cache_dir() / "bench" / "loraprune-latency"
    choice = cpu_choice(resolve_device("auto"), args.dtype)
    if choice is not None:
        print(choice.line(), flush=True)
    prompts = bench_prompts(dense, args.prompts, args.prompt_tokens)  # same tokenizer in the pruned folder

    results = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        spec = {
            "model": str(model),
            "engine": {
                "lora": False,
                "dtype": choice.dtype if choice else args.dtype,
                "max_model_len": args.max_model_len,
                "enforce_eager": True,
                "seed": 0,
                "kv_cache_bytes": int(args.kv_cache_gib * 2**30),
                "max_num_seqs": args.prompts,
            },
            "adapters": {},
            "prompts": prompts,
            "output_tokens": args.output_tokens,
            "warmup_tokens": 4,
            "repeats": args.repeats,
            "measurements": [{"name": "base", "adapters": []}],
        }
        t0 = time.perf_counter()
        result = _run_worker(spec, work / name, args.engine_timeout, True, choice)
        if "error" in result:
            raise SystemExit(f"{name}: {result['error']}")
        results[name] = {
            "model": _portable(model, args.dense if name == "dense" else None),
            **result["results"]["base"],
            "engine_wall_s": time.perf_counter() - t0,
        }
        row = results[name]
        print(
            f"{name}: TTFT p50 {row['ttft_p50_s'] * 1e3:.1f} ms, TPOT p50 {row['tpot_p50_s'] * 1e3:.1f} ms, "
            f"E2E p50 {row['e2e_p50_s'] * 1e3:.1f} ms, {row['output_tokens_per_s']:.1f} tok/s",
            flush=True,
        )
    ratios = {key: results["pruned"][key] / results["dense"][key] for key in KEYS}
    machine = machine_record(choice) if choice else machine_record(dtype=args.dtype, threads="vLLM (GPU)")
    payload = {
        "bench": "loraprune-latency",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine,
        "results": results,
        "ratios_pruned_over_dense": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(
        "pruned / dense: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) + f"  ({machine_line(machine)})",
        flush=True,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
