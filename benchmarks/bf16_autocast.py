"""What bf16 autocast buys the quality protocol on this CPU, and what it moves (issue 9).

The protocol's cells train and score in float32. On a CPU with native bf16 (AVX512-bf16 or AMX),
``torch.autocast("cpu", dtype=torch.bfloat16)`` could make them cheaper; on one without it bf16 is
emulated and several times slower (``prunedlora.cpu.autocast_bf16`` says which this machine is). This
measures both halves on the protocol's own settings, float32 against autocast, nothing else changed:

- training: LoRA r8 on the seven projections, the task's protocol recipe (batch, max length, learning
  rate, shared data), the same initial adapter and batches in both modes; seconds per optimizer step
  (the first step, warm-up, left out) and the loss of every step;
- scoring: the base model on the task's whole held-out split with the quality bench's scorer, per
  example paired: the prediction agreement (SST-2), the metric in each mode and the paired bootstrap
  interval of the per-example difference (margin, or log-likelihood per token).

Writes benchmarks/results/bf16_autocast.{json,md}. Time it on a quiet machine: it reports seconds.

    python benchmarks/bf16_autocast.py [--task sst2] [--train-steps 8] [--eval-examples all]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).parent / "results"
MODES = ("float32", "bf16-autocast")


def autocast(mode: str):
    """The context a mode computes in: nothing for float32, CPU bf16 autocast otherwise."""
    if mode == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def protocol_recipe(task: str) -> dict:
    from prunedlora.bench.quality import PROTOCOL_RECIPES_DIR

    return yaml.safe_load((PROTOCOL_RECIPES_DIR / f"smollm2-{task}.yaml").read_text())


def time_training(model_dir: Path, task: str, mode: str, steps: int) -> dict:
    """``steps`` optimizer steps of LoRA r8 from the same seed and batches; seconds and losses per step."""
    from torch.utils.data import DataLoader

    from prunedlora.bench.scoring import load_tokenizer
    from prunedlora.rank.config import PrunedLoraConfig
    from prunedlora.tasks import DataConfig, shared_data_path
    from prunedlora.train.data import build_train_dataset, make_collator
    from prunedlora.train.runner import build_peft_model

    raw = protocol_recipe(task)
    data, training = raw["data"], raw["training"]
    accumulate = int(training.get("gradient_accumulation_steps", 1))
    batch = int(training["per_device_train_batch_size"])
    tokenizer = load_tokenizer(model_dir)
    config = DataConfig(
        task=task,
        path=shared_data_path(task).parent,
        max_examples=batch * accumulate * steps,
        max_length=int(data["max_length"]),
    )
    dataset = build_train_dataset(tokenizer, config, progress=False)
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=make_collator(tokenizer))
    torch.manual_seed(0)
    method = PrunedLoraConfig(r0=8, lora_alpha=16, target_rank=8, target_modules=raw["method"]["target_modules"])
    model = build_peft_model(model_dir, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(training["learning_rate"]))
    batches = iter(loader)
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        total = 0.0
        for _ in range(accumulate):
            inputs = next(batches)
            with autocast(mode):
                loss = model(**inputs).loss / accumulate
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(total)
    return {
        "steps": steps,
        "batch": batch,
        "gradient_accumulation_steps": accumulate,
        "max_length": int(data["max_length"]),
        "step_times_s": times,
        "mean_step_s": statistics.mean(times[1:]),
        "losses": losses,
    }


def time_scoring(model_dir: Path, task: str, mode: str, eval_examples: int | None) -> dict:
    """The base model on ``task``'s held-out split with the bench's scorer, in ``mode``."""
    from prunedlora.bench.quality import PRESETS
    from prunedlora.bench.scoring import EvalSettings, load_model, load_tokenizer, score_task
    from prunedlora.tasks import shared_data_path

    full = PRESETS["full"]
    settings = EvalSettings(
        max_examples=eval_examples,
        max_length=int(protocol_recipe(task)["data"]["max_length"]),
        exact_match_examples=0,  # greedy decoding is measured by the cells, not here
        dev_size=full.get("dev_size") if task not in ("sst2", "rte") else None,
    )
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(mode):
        result = score_task(model, tokenizer, task, shared_data_path(task).parent, settings)
    result["seconds"] = time.perf_counter() - start
    return result


def paired_scoring(results: dict[str, dict], task: str) -> dict:
    """bf16 - float32 per example, with its paired bootstrap interval."""
    from prunedlora.bench.paired import paired_bootstrap

    a, b = (results[m]["per_example"] for m in MODES)
    if a["index"] != b["index"]:
        raise SystemExit("the two modes scored different examples")
    if "margin" in a:
        diffs = [y - x for x, y in zip(a["margin"], b["margin"])]
        correct = [[float(m > 0) for m in per["margin"]] for per in (a, b)]  # the gold label wins
        flipped = sum(x != y for x, y in zip(*correct))
        accuracy = paired_bootstrap([y - x for x, y in zip(*correct)])
        margin = paired_bootstrap(diffs)
        return {
            "prediction_agreement": 1 - flipped / len(diffs),
            "predictions_flipped": flipped,
            "accuracy_difference": vars(accuracy) | {"excludes_zero": accuracy.excludes_zero},
            "margin_difference": vars(margin) | {"excludes_zero": margin.excludes_zero},
            "max_abs_margin_difference": max(abs(d) for d in diffs),
        }
    # NLL tasks, token-weighted as the metric is (-sum(logprob) / sum(tokens)): NLL(bf16) - NLL(fp32) per example
    diffs = [x - y for x, y in zip(a["logprob_sum"], b["logprob_sum"])]
    nll = paired_bootstrap(diffs, a["tokens"])
    return {"nll_difference": vars(nll) | {"excludes_zero": nll.excludes_zero}}


def markdown(payload: dict) -> str:
    from prunedlora.cpu import machine_line

    train, score, paired = payload["training"], payload["scoring"], payload["paired_scoring"]
    task = payload["task"]
    metric = "accuracy" if "accuracy" in score["float32"] else ("nll" if "nll" in score["float32"] else "answer_nll")
    lines = [
        f"# bf16 autocast against float32 on the quality protocol's {task} settings",
        "",
        f"Machine: {machine_line(payload['machine'])}",
        f"Command: `{payload['command']}`",
        "",
        "| | float32 | bf16 autocast | ratio (fp32 / bf16) |",
        "|---|---|---|---|",
    ]
    f, b = train["float32"], train["bf16-autocast"]
    lines.append(
        f"| training: s per optimizer step (batch {f['batch']} x {f['gradient_accumulation_steps']}, "
        f"{f['max_length']} tokens, LoRA r8) | {f['mean_step_s']:.2f} | {b['mean_step_s']:.2f} | "
        f"{f['mean_step_s'] / b['mean_step_s']:.2f}x |"
    )
    fs, bs = score["float32"], score["bf16-autocast"]
    lines.append(
        f"| scoring: s for {fs['eval_examples']} held-out examples (base model) | {fs['seconds']:.0f} | "
        f"{bs['seconds']:.0f} | {fs['seconds'] / bs['seconds']:.2f}x |"
    )
    lines.append(f"| {metric} (base model) | {fs[metric]:.4f} | {bs[metric]:.4f} | |")
    last = len(f["losses"]) - 1
    lines.append(f"| training loss at step {last + 1} | {f['losses'][last]:.4f} | {b['losses'][last]:.4f} | |")
    lines.append("")
    lines.append("Paired on the same examples (bf16 - float32, paired bootstrap 95%):")
    lines.append("")
    for name, value in paired.items():
        if isinstance(value, dict):
            lines.append(f"- {name}: {value['mean']:+.4f} [{value['low']:+.4f}, {value['high']:+.4f}]")
        else:
            lines.append(f"- {name}: {value:.4f}" if isinstance(value, float) else f"- {name}: {value}")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    from prunedlora.cpu import autocast_bf16, machine_record
    from prunedlora.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2", choices=["sst2", "gsm8k", "codealpaca"])
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--eval-examples", default="all", help="held-out examples to score, or 'all'")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    if args.train_steps < 2:
        parser.error("--train-steps must be at least 2 (the first step is warm-up and not timed)")
    eval_examples = None if args.eval_examples == "all" else int(args.eval_examples)
    model_dir = resolve_model(args.model)
    training, scoring = {}, {}
    for mode in MODES:
        training[mode] = time_training(model_dir, args.task, mode, args.train_steps)
        print(f"train {mode}: {training[mode]['mean_step_s']:.2f} s/step", flush=True)
    for mode in MODES:
        scoring[mode] = time_scoring(model_dir, args.task, mode, eval_examples)
        print(f"score {mode}: {scoring[mode]['seconds']:.0f} s", flush=True)
    payload = {
        "machine": machine_record(dtype="float32 and bf16 autocast"),
        "autocast_bf16_worth_it_here": autocast_bf16(),
        "command": "python benchmarks/bf16_autocast.py " + " ".join(sys.argv[1:]),
        "task": args.task,
        "model": args.model,
        "training": training,
        "scoring": scoring,
        "paired_scoring": paired_scoring(scoring, args.task),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"bf16_autocast_{args.task}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(payload)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
