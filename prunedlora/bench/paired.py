"""Paired comparisons of two methods on the same held-out examples and the same seeds.

Two adapters scored on the same examples differ far less than their separate confidence intervals
suggest: most examples are easy or hard for both. So the quality bench compares a method with a
reference (LoRA at the target rank) *paired*:

- within a seed, the difference of the metric over the same examples, with a paired bootstrap
  interval (the examples resampled together for both methods);
- over seeds, the mean of the per-seed differences with a Student-t interval (each seed trains both
  methods with the same data order and initial seed).

A metric is a ratio ``sum(values) / sum(weights)`` over examples: accuracy has values = correct (0/1)
and weights 1; token-weighted NLL has values = -log-likelihood sum and weights = token counts. The
difference of two methods on the same examples is then ``sum(d_i) / sum(w_i)`` with
``d_i = value_method_i - value_reference_i``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided 95% quantiles of Student's t (df 1..30); beyond 30 the normal 1.96 is within 2%.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    """A mean difference and its 95% interval; ``excludes_zero`` is what the tables call a win or a loss."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    diffs: Sequence[float], weights: Sequence[float] | None = None, resamples: int = 2000, seed: int = 0
) -> Interval:
    """``sum(d) / sum(w)`` and its 95% percentile-bootstrap interval, examples resampled with replacement."""
    d = np.asarray(diffs, dtype=np.float64)
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=np.float64)
    if d.ndim != 1 or d.shape != w.shape or not len(d):
        raise ValueError(f"need as many weights as differences, and at least one (got {d.shape} and {w.shape})")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(d), size=(resamples, len(d)))
    stats = d[picks].sum(axis=1) / w[picks].sum(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Interval(float(d.sum() / w.sum()), float(low), float(high))


def gap_closed(
    reference: np.ndarray, cell: np.ndarray, target: np.ndarray, resamples: int = 2000, seed: int = 0
) -> Interval:
    """The share of ``reference``'s distance to ``target`` that ``cell`` removes, with a bootstrap 95% interval.

    Each argument holds per-example values (an accuracy's 0/1, an NLL's summed -log-likelihood) as rows of
    seeds by columns of the same examples; the share is ``sum(reference - cell) / sum(reference - target)``
    over all of them (an NLL's token weights cancel: the three score the same tokens). The examples are
    resampled together across every row, so an example easy in one seed stays paired with itself in
    the others. 0.5 is the midpoint: an interval above it says the cell is nearer ``target``.
    """
    ref, mine, goal = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (reference, cell, target))
    if not ref.shape == mine.shape == goal.shape or not ref.size:
        raise ValueError(f"need three equal (seeds, examples) arrays, got {ref.shape}, {mine.shape}, {goal.shape}")
    removed, gap = (ref - mine).sum(axis=0), (ref - goal).sum(axis=0)
    if gap.sum() == 0:
        raise ValueError("the reference and the target score the same: no gap to close")
    picks = np.random.default_rng(seed).integers(0, len(gap), size=(resamples, len(gap)))
    stats = removed[picks].sum(axis=1) / gap[picks].sum(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Interval(float(removed.sum() / gap.sum()), float(low), float(high))


def above_floor(per_round: dict[str, Sequence[float]], floor: str, reference: str) -> dict[str, dict[str, Interval]]:
    """What each configuration costs above a ``floor`` configuration measured in the same rounds.

    ``per_round``: a cost per round for each name (rounds aligned across names). For every name but the
    floor: ``above_floor``, its cost less the floor's of the same round (bootstrap over rounds), and,
    but for the ``reference`` itself, ``over_reference``, the ratio of that above-floor cost to the
    reference's. A rank-1 adapter as the floor makes this the part of a LoRA adapter's cost its rank buys.
    """
    base = per_round[floor]
    above = {name: [v - f for v, f in zip(values, base)] for name, values in per_round.items() if name != floor}
    out: dict[str, dict[str, Interval]] = {}
    for name, values in above.items():
        out[name] = {"above_floor": paired_bootstrap(values)}
        if name != reference:
            out[name]["over_reference"] = paired_bootstrap(values, above[reference])
    return out


def seed_interval(per_seed: Sequence[float]) -> Interval | None:
    """Mean of per-seed differences with a Student-t 95% interval (None with fewer than two seeds)."""
    if len(per_seed) < 2:
        return None
    mean = statistics.fmean(per_seed)
    half = t_quantile_975(len(per_seed) - 1) * statistics.stdev(per_seed) / math.sqrt(len(per_seed))
    return Interval(mean, mean - half, mean + half)


def example_values(result: dict, metric: str) -> tuple[dict[int, float], dict[int, float]]:
    """(values, weights) by example index from a cell's ``eval.per_example`` for ``metric``.

    accuracy: correct = margin > 0, weight 1; margin: the gold label's log-prob margin itself, weight 1;
    nll / answer_nll: -log-likelihood sum, weight = tokens.
    """
    per = result["eval"].get("per_example")
    if per is None:
        raise KeyError(f"cell {result.get('method')} seed {result.get('seed')} has no per-example results")
    if metric == "accuracy":
        return ({i: float(m > 0) for i, m in zip(per["index"], per["margin"])}, dict.fromkeys(per["index"], 1.0))
    if metric == "margin":
        return ({i: float(m) for i, m in zip(per["index"], per["margin"])}, dict.fromkeys(per["index"], 1.0))
    if metric in ("nll", "answer_nll"):
        return (
            {i: -s for i, s in zip(per["index"], per["logprob_sum"])},
            {i: float(n) for i, n in zip(per["index"], per["tokens"])},
        )
    raise KeyError(f"no per-example form for metric {metric!r}")


def compare(method_cells: list[dict], reference_cells: list[dict], metric: str) -> dict | None:
    """Paired difference (method - reference) of ``metric`` over the seeds both have.

    Returns per-seed differences with their bootstrap intervals, and the interval over seeds; None
    when no seed has both cells with per-example results.
    """
    reference = {c["seed"]: c for c in reference_cells}
    seeds = []
    for cell in sorted(method_cells, key=lambda c: c["seed"]):
        ref = reference.get(cell["seed"])
        if ref is None or "per_example" not in cell["eval"] or "per_example" not in ref["eval"]:
            continue
        values, weights = example_values(cell, metric)
        ref_values, _ = example_values(ref, metric)
        common = sorted(set(values) & set(ref_values))
        if not common:
            continue
        boot = paired_bootstrap(
            [values[i] - ref_values[i] for i in common], [weights[i] for i in common], seed=int(cell["seed"])
        )
        seeds.append(
            {"seed": cell["seed"], "examples": len(common), "diff": boot.mean, "low": boot.low, "high": boot.high}
        )
    if not seeds:
        return None
    over = seed_interval([s["diff"] for s in seeds])
    return {
        "metric": metric,
        "seeds": seeds,
        "mean": over.mean if over else seeds[0]["diff"],
        "low": over.low if over else None,
        "high": over.high if over else None,
    }


# Compared paired besides each task's metrics: the per-example quantity a 0/1 metric is read from.
# A classifier's accuracy moves only where a margin crosses zero; the margin (the gold label's
# log-prob minus the other's) moves on every example, so it separates methods with fewer seeds.
PAIRED_EXTRA: dict[str, tuple[tuple[str, str], ...]] = {"sst2": (("margin", "higher"),), "rte": (("margin", "higher"),)}


# The second question the quality table answers (issue 9): does the score choose better components,
# or does any pruning from r0 do as well? Every other pruned method is also compared with this one.
PRUNING_REFERENCE = "pruned-magnitude-global"

# The third: what does pruning r0 = 32 down to the target cost against keeping all of r0 (four times the
# parameters)? Every pruned method is also compared with plain LoRA trained at r0.
R0_REFERENCE = "lora-r0"

# The fourth: does PrunedLoRA beat AdaLoRA at the same budget? Every pruned method is also compared with
# PEFT's AdaLoRA at five times the shared learning rate, the one AdaLoRA trains at in the recipes' steps
# (at the shared rate its P·diag(E)·Q barely moves from zero; docs/results.md, "AdaLoRA").
ADALORA_REFERENCE = "adalora-lr5x"

# The fifth: how do the default's variants (uniform allocation, r0 = 64) compare with the default itself?
DEFAULT_REFERENCE = "pruned-obs-input-compensate-global"

# The references every pruned method is compared with, in the order the quality table prints them.
PRUNED_REFERENCES = (PRUNING_REFERENCE, R0_REFERENCE, ADALORA_REFERENCE, DEFAULT_REFERENCE)


def paired_comparisons(
    results: list[dict], reference: str = "lora-target", methods: Collection[str] | None = None
) -> list[dict]:
    """Every (task, metric, method) that can be compared paired with ``reference``: ``compare``'s
    result with ``task``, ``better`` and ``method`` added; the table and the plot both read these.
    ``methods`` keeps only those methods (default: every method but the reference and the base model)."""
    from prunedlora.bench.scoring import TASK_METRICS

    found_all = []
    ok = [r for r in results if "eval" in r]  # finished cells only (not failed, not pending)
    for task in sorted({r["task"] for r in ok}):
        refs = [r for r in ok if r["task"] == task and r["method"] == reference]
        for metric, better in TASK_METRICS[task] + PAIRED_EXTRA.get(task, ()):
            compared = {r["method"] for r in ok if r["task"] == task} - {reference, "base"}
            for method in sorted(compared if methods is None else compared & set(methods)):
                cells = [r for r in ok if r["task"] == task and r["method"] == method]
                try:
                    found = compare(cells, refs, metric)
                except KeyError:
                    continue
                if found is not None:
                    found_all.append({**found, "task": task, "better": better, "method": method})
    return found_all


def paired_markdown(results: list[dict], reference: str = "lora-target", methods: Collection[str] | None = None) -> str:
    """A markdown section: each method (of ``methods``, default all) against ``reference`` per task and
    metric (paired)."""
    lines = [
        f"### Paired differences against `{reference}` (method - {reference}; same examples, same seeds)",
        "",
        "| task | metric | method | seeds | mean diff | 95% interval over seeds | per seed (paired bootstrap 95%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for found in paired_comparisons(results, reference, methods):
        interval = "-" if found["low"] is None else f"[{found['low']:+.4f}, {found['high']:+.4f}]"
        per_seed = "; ".join(
            f"s{s['seed']}: {s['diff']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}]" for s in found["seeds"]
        )
        lines.append(
            f"| {found['task']} | {found['metric']} ({found['better']} is better) | {found['method']} | "
            f"{len(found['seeds'])} | {found['mean']:+.4f} | {interval} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"
