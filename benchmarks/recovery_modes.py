"""Which recovery update (and which criterion) loses the least when components are removed.

One-shot experiment on SmolLM2-135M-Instruct: train LoRA at r0=32 on SST-2 for a few steps, then
prune in a single event to an average rank of 8 (global allocation) from the gradient of one
calibration batch, and measure the held-out loss right after pruning (no further training) and after
a few recovery steps. Every cell starts from the same trained adapter. Writes
benchmarks/results/recovery_modes.json; docs/results.md quotes it.

    python benchmarks/recovery_modes.py [--warm-steps 30] [--after-steps 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from oneshot import batches_of, dev_loss, train_steps

RESULTS = Path(__file__).parent / "results" / "recovery_modes.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--warm-steps", type=int, default=30)
    parser.add_argument("--after-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from prunedlora.bench.report import portable_path
    from prunedlora.models import resolve_model
    from prunedlora.rank.config import PrunedLoraConfig
    from prunedlora.rank.pruner import RankPruner
    from prunedlora.rank.schedule import PruningEvent
    from prunedlora.tasks import DataConfig
    from prunedlora.train.data import build_train_dataset, make_collator
    from prunedlora.train.runner import build_peft_model

    torch.manual_seed(0)
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set = build_train_dataset(tokenizer, DataConfig(task="sst2", max_examples=1024, max_length=96))
    dev_set = build_train_dataset(tokenizer, DataConfig(task="sst2", split="dev", max_examples=128, max_length=96))
    collate = make_collator(tokenizer)
    batches = batches_of(collate, train_set, args.batch)
    dev_batches = batches_of(collate, dev_set, 32, drop_last=False)

    base_config = PrunedLoraConfig(r0=32, lora_alpha=64, target_rank=8, prune_start_step=0, prune_end_step=0)
    model = build_peft_model(model_dir, base_config)
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer = torch.optim.AdamW(params, lr=2e-4)
    t0 = time.time()
    train_steps(model, optimizer, batches, 0, args.warm_steps)
    print(
        f"warm-up {args.warm_steps} steps in {time.time() - t0:.0f}s; dev loss {dev_loss(model, dev_batches):.4f}",
        flush=True,
    )
    trained = copy.deepcopy(model.state_dict())
    trained_opt = copy.deepcopy(optimizer.state_dict())
    results = {"unpruned_r0": dev_loss(model, dev_batches), "cells": []}

    # (criterion, recovery, hessian_damping): the damping only matters where a recovery update is applied
    # or the score is "obs-paper"; larger damping pulls the compensation towards plain zeroing.
    cells = (
        [("obs-paper", r, 0.01) for r in ("none", "compensate", "newton")]
        + [("obs-paper", "compensate", d) for d in (0.1, 1.0)]
        + [(c, r, 0.01) for c in ("taylor", "magnitude", "activation") for r in ("none", "compensate")]
    )
    for criterion, recovery, damping in cells:
        model.load_state_dict(trained)
        optimizer.load_state_dict(copy.deepcopy(trained_opt))  # a copy: Adam updates the state in place
        config = PrunedLoraConfig(
            r0=32,
            lora_alpha=64,
            target_rank=8,
            prune_start_step=0,
            prune_end_step=0,
            criterion=criterion,
            recovery=recovery,
            hessian_damping=damping,
        )
        pruner = RankPruner(model, config)
        calib = batches[args.warm_steps % len(batches)]
        if criterion == "activation":  # statistics from a forward pass over the calibration batch
            model(**calib)
        model(**calib).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        final = pruner.schedule.events[-1]
        pruner.prune(PruningEvent(0, final.total, final.per_module, final.cap), optimizer)
        optimizer.zero_grad()
        right_after = dev_loss(model, dev_batches)
        train_steps(model, optimizer, batches, args.warm_steps + 1, args.after_steps, pruner)
        after = dev_loss(model, dev_batches)
        cell = {
            "criterion": criterion,
            "recovery": recovery,
            "hessian_damping": damping,
            "dev_loss_after_prune": right_after,
            f"dev_loss_after_{args.after_steps}_steps": after,
            "average_rank": pruner.average_rank,
        }
        results["cells"].append(cell)
        print(json.dumps(cell), flush=True)
        pruner.remove_hooks()
    results.update(
        model=portable_path(model_dir), warm_steps=args.warm_steps, after_steps=args.after_steps, batch=args.batch
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nunpruned r0=32: {results['unpruned_r0']:.4f}")
    print(
        f"| criterion | recovery | damping | dev loss right after pruning 32->8 | after {args.after_steps} steps |"
        "\n|---|---|---|---|---|"
    )
    for c in results["cells"]:
        print(
            f"| {c['criterion']} | {c['recovery']} | {c['hessian_damping']} | {c['dev_loss_after_prune']:.4f} | "
            f"{c[f'dev_loss_after_{args.after_steps}_steps']:.4f} |"
        )


if __name__ == "__main__":
    main()
