"""The demo's quality check: the base model, a run's r0 training adapter and its compact export, scored on
the task's held-out split with the quality bench's own scorer (``bench.scoring``).

Why: a demo that prunes, exports and serves an adapter shows nothing if the adapter is worse than no
adapter. So the demo scores all three on data training never saw and says in plain words when the
export does not beat the base model. "Beats" is judged paired, on the same examples (a paired bootstrap
interval of the difference, ``bench.paired``), so that it is not read off the split's noise.

The r0 adapter (the run's ``adapter/`` folder, pruned components held at exactly zero) and the export
compute the same function, so their per-example scores must agree up to float rounding: on real data
this re-checks export parity, and a disagreement is an error rather than a row of the table.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

from prunedlora import metadata
from prunedlora.bench.paired import paired_bootstrap
from prunedlora.bench.scoring import TASK_METRICS, EvalSettings, ScoringError, load_model, load_tokenizer, score_task
from prunedlora.modelfacts import ADAPTER_WEIGHTS_FILE

# Per-example agreement the r0 adapter and its export must reach (log-prob units: a classification
# margin, or an example's summed answer log-likelihood). Both merge into fp32 weights, so they differ by
# rounding only (~1e-5); a pruned component that leaked into the export would differ by far more.
AGREEMENT_TOLERANCE = 1e-2


@dataclass(frozen=True)
class DemoEval:
    """How much of a task's held-out split the demo scores (the whole split unless said otherwise)."""

    task: str
    settings: EvalSettings
    data_path: str | None = None
    data_seed: int = 0  # the recipe's data seed, so a carved dev split is the one training left out

    @property
    def headline(self) -> tuple[str, str]:
        """(metric the beats-the-base verdict is read on, "higher" or "lower")."""
        metrics = dict(TASK_METRICS[self.task])
        metric = "answer_nll" if "answer_nll" in metrics else next(iter(metrics))
        return metric, metrics[metric]


def adapter_size(adapter_dir: str | os.PathLike) -> dict[str, float | int]:
    """Parameters, file bytes and ranks of a PEFT LoRA adapter folder, from its safetensors header."""
    from safetensors import safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    params, ranks = 0, []
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            count = 1
            for dim in shape:
                count *= dim
            params += count
            if ".lora_A" in key:
                ranks.append(shape[0])
    return {
        "params": params,
        "bytes": path.stat().st_size,
        "average_rank": sum(ranks) / max(len(ranks), 1),
        "max_rank": max(ranks, default=0),
        "modules": len(ranks),
    }


def _per_example(result: dict, metric: str) -> tuple[dict[int, float], dict[int, float]]:
    """(value, weight) by example index: accuracy = correct (weight 1); NLL = -log-likelihood (weight tokens)."""
    per = result["per_example"]
    if metric == "accuracy":
        return ({i: float(m > 0) for i, m in zip(per["index"], per["margin"])}, dict.fromkeys(per["index"], 1.0))
    return (
        {i: -s for i, s in zip(per["index"], per["logprob_sum"])},
        {i: float(n) for i, n in zip(per["index"], per["tokens"])},
    )


def _raw(result: dict) -> dict[int, float]:
    per = result["per_example"]
    return dict(zip(per["index"], per["margin"] if "margin" in per else per["logprob_sum"]))


def compare(base: dict, r0: dict, export: dict, metric: str, better: str) -> dict:
    """The export against the base model (paired), and the r0 adapter against the export (must agree)."""
    r0_raw, export_raw = _raw(r0), _raw(export)
    if r0_raw.keys() != export_raw.keys():
        raise ScoringError("the r0 adapter and its export were scored on different examples; rerun the demo")
    disagreement = max(abs(r0_raw[i] - export_raw[i]) for i in r0_raw)
    if disagreement > AGREEMENT_TOLERANCE:
        raise ScoringError(
            f"the r0 training adapter and its compact export disagree on held-out data by up to {disagreement:.3g} "
            f"(tolerance {AGREEMENT_TOLERANCE}); the export is not the trained adapter, re-export it"
        )
    values, weights = _per_example(export, metric)
    base_values, _ = _per_example(base, metric)
    shared = sorted(set(values) & set(base_values))
    interval = paired_bootstrap([values[i] - base_values[i] for i in shared], [weights[i] for i in shared])
    beats = interval.low > 0 if better == "higher" else interval.high < 0
    return {
        "metric": metric,
        "better": better,
        "export_minus_base": interval.mean,
        "low": interval.low,
        "high": interval.high,
        "beats_base": beats,
        "r0_export_max_diff": disagreement,
    }


def score_demo_task(
    evaluation: DemoEval, model_dir: str | os.PathLike, run_dir: str | os.PathLike, export_dir: str | os.PathLike
) -> dict:
    """Score the base model, the run's r0 adapter and the export; return the rows and the comparison."""
    tokenizer = load_tokenizer(model_dir)
    rows = []
    r0_dir = Path(run_dir) / metadata.RUN_ADAPTER_DIR
    for name, adapter in (("base model", None), ("r0 training adapter", r0_dir), ("pruned export", Path(export_dir))):
        model = load_model(model_dir, adapter)
        result = score_task(
            model, tokenizer, evaluation.task, evaluation.data_path, evaluation.settings, evaluation.data_seed
        )
        del model
        gc.collect()
        size = (
            adapter_size(adapter)
            if adapter is not None
            else {"params": 0, "bytes": 0, "average_rank": 0, "max_rank": 0, "modules": 0}
        )
        rows.append({"name": name, "adapter": str(adapter) if adapter else None, **size, **result})
    metric, better = evaluation.headline
    comparison = compare(*rows, metric=metric, better=better)
    return {"task": evaluation.task, "eval_examples": rows[0]["eval_examples"], "rows": rows, **comparison}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_table(payload: dict) -> str:
    """A small table (base, r0 adapter, pruned export) and the verdict, as the demo prints it."""
    metrics = [m for m, _ in TASK_METRICS[payload["task"]] if m in payload["rows"][0]]
    arrows = {m: "↑" if b == "higher" else "↓" for m, b in TASK_METRICS[payload["task"]]}
    header = f"{'':<20} {'rank avg/max':>12} {'params':>10} {'bytes':>9}" + "".join(
        f" {m + ' ' + arrows[m]:>14}" for m in metrics
    )
    lines = [f"{payload['task']}: {payload['eval_examples']} held-out examples", header]
    for row in payload["rows"]:
        rank = f"{row['average_rank']:.1f}/{row['max_rank']}" if row["modules"] else "-"
        lines.append(
            f"{row['name']:<20} {rank:>12} {row['params']:>10,} {_human_bytes(row['bytes']):>9}"
            + "".join(f" {row[m]:>14.4f}" for m in metrics)
        )
    delta = (
        f"{payload['metric']} export - base {payload['export_minus_base']:+.4f} "
        f"(paired 95% interval {payload['low']:+.4f} .. {payload['high']:+.4f})"
    )
    lines.append(delta + f"; r0 adapter vs export: max per-example difference {payload['r0_export_max_diff']:.2g}")
    if not payload["beats_base"]:
        lines.append(
            f"WARNING: the {payload['task']} adapter does not beat the base model on its held-out split "
            f"({delta}); it needs more training steps (training.max_steps in its recipe)."
        )
    return "\n".join(lines)
