"""Screening of the pruning scores: which one loses least when LoRA r0=32 is cut to an average of 8.

The cheap first pass of the quality protocol (docs/results.md, "Screening"): for each warm-start seed,
train LoRA at r0=32 on SST-2 (SmolLM2-135M-Instruct, batch 16, lr 2e-4) for ``--warm-steps``, then,
from that same trained adapter for every cell, gather each score's statistics over ``--calib-steps``
batches (forward and backward, no optimizer step: obs-fisher's Fisher, obs-input's z z^T; the one-batch
scores use the last batch), prune once to an average rank of 8 with global allocation (max rank 16,
as the shipped recipes) and measure the held-out SST-2 loss right after pruning and after
``--after-steps`` steps of training at the pruned ranks. Cells are compared *paired* on the same warm
start: the table reports each score's mean over seeds and its mean difference against ``magnitude``
(the simplest score) with the spread over seeds.

    python benchmarks/score_screening.py [--seeds 0 1 2] [--warm-steps 40] [--after-steps 5]

Writes benchmarks/results/score_screening.json and .md (each seed's cells are written as they finish,
so an interrupted run keeps what it measured; rerunning runs only the cells a seed lacks, e.g. a score
added to CELLS later, and refuses when the file comes from another machine or the warm start does not
reproduce the recorded one, since the new cells would then not be paired with the old).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch
from oneshot import batches_of, dev_loss, train_steps

RESULTS = Path(__file__).parent / "results" / "score_screening.json"
# Recorded in the results: files without it come from the script whose cells shared Adam's moments.
OPTIMIZER_RESTORE = "a copy per cell"
# (criterion, recovery): recovery "compensate" where the score comes with a Hessian of the right scale.
CELLS = [
    ("magnitude", "none"),
    ("obs-paper", "none"),
    ("obs-fisher", "none"),
    ("obs-fisher", "compensate"),
    ("obs-input", "none"),
    ("obs-input", "compensate"),
    ("sensitivity", "none"),
    ("taylor", "none"),
    ("taylor-ema", "none"),
    ("activation", "none"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--warm-steps", type=int, default=40)
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--after-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dev-examples", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from prunedlora.cpu import machine_line, machine_record
    from prunedlora.models import resolve_model
    from prunedlora.rank.config import PrunedLoraConfig
    from prunedlora.rank.pruner import RankPruner
    from prunedlora.rank.schedule import PruningEvent
    from prunedlora.tasks import DataConfig, shared_data_dir
    from prunedlora.train.data import build_train_dataset, make_collator
    from prunedlora.train.runner import build_peft_model

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"seeds": {}}
    here = machine_record(dtype="float32")
    if results["seeds"] and results.get("optimizer_restore") != OPTIMIZER_RESTORE:
        parser.error(
            f"{out} was written before each cell restored its own copy of the optimizer state, so its "
            "after-steps losses are not comparable with new cells: pass another --out"
        )
    if results["seeds"] and machine_line(results.get("machine")) != machine_line(here):
        parser.error(
            f"{out} was measured on {machine_line(results.get('machine'))}; cells from this machine "
            f"({machine_line(here)}) cannot be paired with those: pass another --out"
        )
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = shared_data_dir() / "sst2"
    train_path = data / "train_full.tsv" if data.is_dir() else None
    dev_path = data / "dev.tsv" if data.is_dir() else None
    collate = make_collator(tokenizer)
    dev_set = build_train_dataset(
        tokenizer,
        DataConfig(
            task="sst2",
            path=str(dev_path) if dev_path else None,
            split="dev",
            max_examples=args.dev_examples,
            max_length=96,
        ),
    )
    dev_batches = batches_of(collate, dev_set, 32, drop_last=False)
    config_kwargs = {
        "r0": 32,
        "lora_alpha": 64,
        "target_rank": 8,
        "max_rank": 16,
        "prune_start_step": 0,
        "prune_end_step": 0,
    }

    for seed in args.seeds:
        done = results["seeds"].get(str(seed), {"cells": []})
        todo = [c for c in CELLS if not any((d["criterion"], d["recovery"]) == c for d in done["cells"])]
        if not todo:
            print(f"seed {seed}: already in {out}, skipped", flush=True)
            continue
        torch.manual_seed(seed)
        train_set = build_train_dataset(
            tokenizer,
            DataConfig(
                task="sst2", path=str(train_path) if train_path else None, max_examples=2048, max_length=96, seed=seed
            ),
        )
        order = list(range(len(train_set)))
        random.Random(seed).shuffle(order)  # each seed: its own LoRA init and its own data order
        batches = batches_of(collate, train_set, args.batch, order)
        model = build_peft_model(model_dir, PrunedLoraConfig(**config_kwargs))
        params = [p for p in model.parameters() if p.requires_grad]

        optimizer = torch.optim.AdamW(params, lr=2e-4)
        t0 = time.time()
        train_steps(model, optimizer, batches, 0, args.warm_steps)
        unpruned = dev_loss(model, dev_batches)
        print(
            f"seed {seed}: warm-up {args.warm_steps} steps in {time.time() - t0:.0f}s; dev loss {unpruned:.4f}",
            flush=True,
        )
        if "unpruned_r0" in done and unpruned != done["unpruned_r0"]:  # a cell added to a seed already run
            raise SystemExit(
                f"seed {seed}: the warm start's dev loss {unpruned!r} is not the recorded {done['unpruned_r0']!r}, "
                "so new cells would not be paired with the seed's others: pass another --out"
            )
        trained, trained_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
        cells = list(done["cells"])
        for criterion, recovery in todo:
            model.load_state_dict(trained)
            # a copy: load_state_dict keeps the given tensors, so Adam's in-place updates would carry one
            # cell's moments into the next (docs/results.md, "Screening again")
            optimizer.load_state_dict(copy.deepcopy(trained_opt))
            pruner = RankPruner(model, PrunedLoraConfig(**config_kwargs, criterion=criterion, recovery=recovery))
            for k in range(args.calib_steps):  # statistics since the "last event", as in training
                optimizer.zero_grad()
                model(**batches[(args.warm_steps + k) % len(batches)]).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                pruner.accumulate_gradient_statistics()
            final = pruner.schedule.events[-1]
            pruner.prune(PruningEvent(0, final.total, final.per_module, final.cap), optimizer)
            optimizer.zero_grad()
            right_after = dev_loss(model, dev_batches)
            train_steps(model, optimizer, batches, args.warm_steps + args.calib_steps, args.after_steps, pruner)
            cell = {
                "criterion": criterion,
                "recovery": recovery,
                "dev_loss_after_prune": right_after,
                "dev_loss_after_steps": dev_loss(model, dev_batches),
                "average_rank": pruner.average_rank,
                "max_rank": max(pruner.ranks().values()),
            }
            cells.append(cell)
            print(json.dumps(cell), flush=True)
            pruner.remove_hooks()
        results["seeds"][str(seed)] = {"unpruned_r0": done.get("unpruned_r0", unpruned), "cells": cells}
        results.update(
            model=args.model,
            data="sst2 (../shared/data when present, else the vendored slice)",
            settings={k: v for k, v in vars(args).items() if k not in ("out", "seeds")},
            machine=here,
            optimizer_restore=OPTIMIZER_RESTORE,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    """Mean dev loss per cell over seeds, and the paired difference against magnitude (same warm start)."""
    from prunedlora.cpu import machine_line

    seeds = sorted(results["seeds"], key=int)
    s = results.get("settings", {})
    lines = [
        f"Score screening (SST-2 dev loss, {len(seeds)} warm-start seed(s); r0 32 -> average 8, max 16, global; "
        f"{s.get('warm_steps')} warm steps, {s.get('calib_steps')} calibration batches, "
        f"{s.get('after_steps')} steps after). Machine: {machine_line(results.get('machine'))}",
        "",
        "| score | recovery | right after pruning | diff vs magnitude (mean ± sd) | after steps | diff vs magnitude |",
        "|---|---|---|---|---|---|",
    ]
    unpruned = [results["seeds"][k]["unpruned_r0"] for k in seeds]

    def cell_values(criterion, recovery, key):
        found = [
            [c[key] for c in results["seeds"][k]["cells"] if (c["criterion"], c["recovery"]) == (criterion, recovery)]
            for k in seeds
        ]
        return [v[0] for v in found] if all(found) else None  # a cell added later: not in every seed yet

    def fmt(values):
        return f"{statistics.fmean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    for criterion, recovery in CELLS:
        row = [criterion, recovery]
        for key in ("dev_loss_after_prune", "dev_loss_after_steps"):
            values, ref = cell_values(criterion, recovery, key), cell_values("magnitude", "none", key)
            row += ["-", "-"] if values is None else [fmt(values), fmt([v - r for v, r in zip(values, ref)])]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Unpruned r0=32: {fmt(unpruned)}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
