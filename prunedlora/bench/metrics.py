"""Per-request latency from vLLM's own request statistics, and their summaries.

vLLM's V1 engine keeps, per request, ``RequestOutput.metrics`` (``RequestStateStats``) when stats
logging is on (``LLM(disable_log_stats=False)``): ``first_token_latency`` (arrival to first token,
measured by the frontend, so queueing and prefill are in it), and the engine core's monotonic
``first_token_ts`` and ``last_token_ts``. These are the same quantities ``vllm bench serve`` reports
as TTFT, TPOT and E2EL, taken here without an HTTP server in between.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PERCENTILES = (50, 99)


@dataclass(frozen=True)
class RequestTiming:
    """One finished request: seconds to its first token, per later token, and in all."""

    ttft_s: float
    tpot_s: float | None  # None for a single-token output (no inter-token interval)
    e2e_s: float
    output_tokens: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default), without numpy."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timing_from_stats(stats, output_tokens: int) -> RequestTiming:
    """A RequestTiming from vLLM's ``RequestStateStats`` (or any object with the same fields).

    TPOT is (last token - first token) / (tokens - 1), as ``vllm bench serve`` computes it; E2E is
    TTFT plus that decode span.
    """
    ttft = float(stats.first_token_latency)
    decode = float(stats.last_token_ts) - float(stats.first_token_ts)
    if decode < 0 or ttft < 0:
        raise ValueError(f"inconsistent request statistics: ttft {ttft}, decode span {decode}")
    tpot = decode / (output_tokens - 1) if output_tokens > 1 else None
    return RequestTiming(ttft_s=ttft, tpot_s=tpot, e2e_s=ttft + decode, output_tokens=output_tokens)


def summarize(timings: Iterable[RequestTiming], wall_s: float) -> dict[str, float | int | None]:
    """p50/p99 of TTFT, TPOT and E2E latency, and output tokens per second over ``wall_s``."""
    timings = list(timings)
    if not timings:
        raise ValueError("no request timings to summarize")
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    summary: dict[str, float | int | None] = {"requests": len(timings)}
    series = {
        "ttft_s": [t.ttft_s for t in timings],
        "tpot_s": [t.tpot_s for t in timings if t.tpot_s is not None],
        "e2e_s": [t.e2e_s for t in timings],
    }
    for key, values in series.items():
        stem = key[: -len("_s")]
        for q in PERCENTILES:
            summary[f"{stem}_p{q}_s"] = percentile(values, q) if values else None
        summary[f"{stem}_mean_s"] = sum(values) / len(values) if values else None
    tokens = sum(t.output_tokens for t in timings)
    summary["output_tokens"] = tokens
    summary["wall_s"] = wall_s
    summary["output_tokens_per_s"] = tokens / wall_s
    return summary


# Fields every measured configuration has in the results JSON (the tests check them).
SUMMARY_FIELDS = tuple(
    [f"{stem}_p{q}_s" for stem in ("ttft", "tpot", "e2e") for q in PERCENTILES]
    + ["output_tokens_per_s", "requests", "output_tokens", "wall_s"]
)
