"""``prunedlora eval``: the base model and any number of adapters scored on the same examples, each
compared *paired* with the first (the base model unless left out), with 95% intervals.

The examples are a data file (your own, in any format of ``prunedlora.formats``), a recipe's dev
split, or a built-in task's; the metrics are the data's (``scoring.metrics_of``): label accuracy for
classification, the replies' NLL per token (every assistant turn of a chat, or the last with
``loss_on: last``) and, with an answer pattern, greedy exact match; perplexity for text. The demo's
scorer and ``bench quality`` score through the same ``scoring.score_data``.

Adapters may be PEFT folders, run directories (their ``adapter/`` at r0) or exports; the base model is
``model`` or, when not given, the one the first adapter records.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from prunedlora import metadata
from prunedlora.bench.paired import example_values, paired_bootstrap
from prunedlora.bench.scoring import EvalSettings, ScoringError, load_model, load_tokenizer, metrics_of, score_data
from prunedlora.tasks import DataConfig

logger = logging.getLogger(__name__)
PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Candidate:
    """One model to score: a name for the table and its adapter folder (None: the base model)."""

    name: str
    adapter: Path | None


def resolve_adapter(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(the PEFT folder to load, the base model it records or None) of a PEFT folder, run dir or export."""
    path = Path(path).expanduser()
    if (path / metadata.RUN_RECORD_FILE).is_file() and (path / metadata.RUN_ADAPTER_DIR / PEFT_CONFIG).is_file():
        return path / metadata.RUN_ADAPTER_DIR, metadata.read_run_record(path).base_model
    if (path / PEFT_CONFIG).is_file():
        try:
            base = json.loads((path / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
        except json.JSONDecodeError as err:
            raise ScoringError(f"{path / PEFT_CONFIG} is not valid JSON ({err})") from None
        record = metadata.read_adapter_record(path)
        return path, (getattr(record, "base_model", None) or base) or None
    raise ScoringError(
        f"{path} is neither a PEFT adapter folder ({PEFT_CONFIG}) nor a run directory (adapter/ and "
        f"{metadata.RUN_RECORD_FILE}); give the folder `train` or `export` wrote"
    )


def _paired_values(result: dict, metric: str) -> tuple[dict[int, float], dict[int, float]]:
    """(value, weight) per example: the quality cells' forms (``paired.example_values``: accuracy =
    correct, NLL = -log-likelihood weighted by tokens), perplexity as its NLL, exact match = hit (1)."""
    if metric == "exact_match":
        hits = result.get("exact_match_per_example", [])
        return {i: float(h) for i, h in enumerate(hits)}, dict.fromkeys(range(len(hits)), 1.0)
    return example_values({"eval": result}, "nll" if metric == "perplexity" else metric)


def compare_rows(rows: list[dict], metrics: tuple[tuple[str, str], ...]) -> list[dict]:
    """Each row after the first against the first, per metric: the mean paired difference (per token
    for NLL and perplexity, where it is the difference in NLL) and its 95% bootstrap interval."""
    out = []
    reference = rows[0]
    for row in rows[1:]:
        for metric, better in metrics:
            if metric not in row["result"] or metric not in reference["result"]:
                continue
            mine, weights = _paired_values(row["result"], metric)
            ref, _ = _paired_values(reference["result"], metric)
            shared = sorted(set(mine) & set(ref))
            if not shared:
                continue
            interval = paired_bootstrap([mine[i] - ref[i] for i in shared], [weights[i] for i in shared])
            lower_is_better = better == "lower"
            out.append(
                {
                    "name": row["name"],
                    "against": reference["name"],
                    "metric": "nll" if metric == "perplexity" else metric,
                    "better": better,
                    "difference": interval.mean,
                    "low": interval.low,
                    "high": interval.high,
                    "examples": len(shared),
                    "verdict": (
                        "better"
                        if (interval.high < 0 if lower_is_better else interval.low > 0)
                        else "worse"
                        if (interval.low > 0 if lower_is_better else interval.high < 0)
                        else "tie"
                    ),
                }
            )
    return out


def evaluate(
    data: DataConfig,
    adapters: list[str | os.PathLike],
    model: str | None = None,
    settings: EvalSettings | None = None,
    answer_pattern: str | None = None,
    include_base: bool = True,
    names: list[str] | None = None,
) -> dict:
    """Score the base model (unless ``include_base`` is False) and each adapter on ``data``; the payload
    holds every row's metrics and per-example values and the paired comparisons with the first row."""
    from prunedlora.models import resolve_model

    settings = settings or EvalSettings()
    if not adapters and not include_base:
        raise ScoringError("nothing to score: give adapters, or keep the base model")
    if names is not None and len(names) != len(adapters):
        raise ScoringError(f"{len(names)} names for {len(adapters)} adapters; give one name per adapter")
    resolved = [resolve_adapter(a) for a in adapters]  # every path checked before any model loads
    kind, metrics = metrics_of(data, answer_pattern)
    base = model or next((b for _, b in resolved if b), None) or "default"
    model_dir = resolve_model(base)
    for (adapter, recorded), given in zip(resolved, adapters):
        if recorded and model is not None and Path(recorded).resolve() != Path(model_dir).resolve():
            logger.warning("%s records base model %s; scoring it on %s as asked", given, recorded, model_dir)
    candidates = [Candidate("base model", None)] if include_base else []
    for i, ((adapter, _), given) in enumerate(zip(resolved, adapters)):
        candidates.append(Candidate(names[i] if names else str(given), adapter))
    tokenizer = load_tokenizer(model_dir)
    rows = []
    for candidate in candidates:
        logger.info("scoring %s", candidate.name)
        loaded = load_model(model_dir, candidate.adapter)
        result = score_data(loaded, tokenizer, data, settings, answer_pattern)
        del loaded
        gc.collect()
        rows.append(
            {"name": candidate.name, "adapter": str(candidate.adapter) if candidate.adapter else None, "result": result}
        )
    return {
        "data": data.to_dict(),
        "scorer": kind,
        "metrics": [list(m) for m in metrics],
        "answer_pattern": answer_pattern,
        "base_model": _model_name(model_dir, base),
        "eval_examples": rows[0]["result"]["eval_examples"],
        "rows": rows,
        "comparisons": compare_rows(rows, metrics),
    }


def _model_name(model_dir: Path, given: str) -> str:
    """How results name the base model: ``default`` for the bundled one (not this machine's cache path)."""
    from prunedlora.models import default_model_dir

    try:
        if Path(model_dir).resolve() == default_model_dir(progress=False).resolve():
            return "default"
    except Exception:  # the default model not installed: the name as given
        pass
    return str(given)


def format_table(payload: dict) -> str:
    """The rows' metrics, then each paired comparison with its interval, as Markdown."""
    metrics = [(m, b) for m, b in payload["metrics"] if any(m in r["result"] for r in payload["rows"])]
    arrows = {m: "↑" if b == "higher" else "↓" for m, b in metrics}
    lines = [
        f"{payload['eval_examples']} examples ({payload['scorer']})",
        "",
        "| model | " + " | ".join(f"{m} {arrows[m]}" for m, _ in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for row in payload["rows"]:
        values = [row["result"].get(m) for m, _ in metrics]
        lines.append(f"| {row['name']} | " + " | ".join("" if v is None else f"{v:.4f}" for v in values) + " |")
    if payload["comparisons"]:
        lines += ["", "| model | against | metric | paired difference [95% interval] | |", "|---|---|---|---|---|"]
        for c in payload["comparisons"]:
            unit = " per token" if c["metric"] == "nll" else ""
            lines.append(
                f"| {c['name']} | {c['against']} | {c['metric']}{unit} | "
                f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] | {c['verdict']} |"
            )
    return "\n".join(lines)


def write_results(payload: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``eval.json`` (every row's per-example values) and ``eval.md`` (the table), written together."""
    from prunedlora.staging import staged_files

    out = Path(out_dir)
    json_path, md_path = out / "eval.json", out / "eval.md"
    with staged_files(json_path, md_path) as (json_tmp, md_tmp):
        json_tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        md_tmp.write_text(format_table(payload) + "\n")
    return json_path, md_path
