"""What pruning costs during training: step time and peak memory of PrunedLoRA (obs, global) against
plain LoRA at r0 with the same model, data, batch and steps.

Each run is its own process (clean peak RSS); configurations alternate (A B A B ...) so that load
from anything else on the machine hits both alike. Writes benchmarks/results/train_overhead.json and
prints a markdown table that docs/results.md quotes.

    python benchmarks/train_overhead.py [--steps 40] [--repeats 2] [--model default]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train_overhead.json"


def one_run(model: str, prune: bool, steps: int, out: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from prunedlora.train.recipe import recipe_from_dict
    from prunedlora.train.runner import train

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)

    end = max(2, int(steps * 0.7))
    recipe = recipe_from_dict(
        {
            "model": model,
            "prune": prune,
            "data": {"task": "sst2", "max_examples": 1024, "max_length": 96},
            "method": {
                "r0": 32,
                "lora_alpha": 64,
                "target_rank": 8,
                "criterion": "obs-paper",
                "allocation": "global",
                "prune_start_step": max(1, steps // 8),
                "prune_end_step": end,
                "prune_every": max(1, steps // 8),
            },
            "training": {
                "output_dir": out,
                "max_steps": steps,
                "per_device_train_batch_size": 8,
                "logging_steps": 10,
                "save_steps": 10_000,
                "seed": 0,
            },
        }
    )
    timer = StepTimer()
    result = train(recipe, resume=False, callbacks=[timer])
    return {
        "prune": prune,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "step_times_s": timer.times,
        "mean_step_s": statistics.mean(timer.times[1:]),  # the first step includes warm-up
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "average_rank": result.average_rank,
        "train_loss": result.train_loss,
    }


def main() -> None:
    from prunedlora.cpu import machine_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="default")
    parser.add_argument("--worker", choices=["prune", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/prunedlora-bench-train")
    args = parser.parse_args()
    if args.worker:
        print(
            "RESULT " + json.dumps(one_run(args.model, args.worker == "prune", args.steps, f"{args.out}/{args.worker}"))
        )
        return
    runs = []
    for repeat in range(args.repeats):
        for kind in ("plain", "prune"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                kind,
                "--steps",
                str(args.steps),
                "--model",
                args.model,
                "--out",
                f"{args.out}/{repeat}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(lines[-1][7:]))
            print(
                f"repeat {repeat} {kind}: {runs[-1]['mean_step_s']:.3f} s/step, "
                f"peak {runs[-1]['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    summary = {}
    for kind, prune in (("plain", False), ("prune", True)):
        mine = [r for r in runs if r["prune"] == prune]
        summary[kind] = {
            "mean_step_s": statistics.mean(r["mean_step_s"] for r in mine),
            "spread_step_s": (max(r["mean_step_s"] for r in mine) - min(r["mean_step_s"] for r in mine)),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
            "final_average_rank": mine[0]["average_rank"],
        }
    overhead = summary["prune"]["mean_step_s"] / summary["plain"]["mean_step_s"] - 1
    payload = {
        "machine": machine_record(dtype="float32", threads=f"torch, {runs[0]['threads']} threads"),
        "model": args.model,
        "steps": args.steps,
        "repeats": args.repeats,
        "batch": 8,
        "summary": summary,
        "step_time_overhead": overhead,
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print("\n| run | mean step (s) | spread (s) | peak RSS (MiB) | final avg rank |\n|---|---|---|---|---|")
    for kind in ("plain", "prune"):
        s = summary[kind]
        label = "LoRA r0=32" if kind == "plain" else "PrunedLoRA 32->8 (obs, global)"
        print(
            f"| {label} | {s['mean_step_s']:.3f} | {s['spread_step_s']:.3f} | {s['peak_rss_mib']:.0f} | "
            f"{s['final_average_rank']:.2f} |"
        )
    print(f"\npruning adds {overhead * 100:+.1f}% to the mean step time; results in {RESULTS}")


if __name__ == "__main__":
    main()
