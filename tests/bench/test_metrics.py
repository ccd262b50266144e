"""Per-request timings from vLLM's statistics and their summaries."""

from types import SimpleNamespace

import numpy as np
import pytest

from prunedlora.bench.metrics import SUMMARY_FIELDS, RequestTiming, percentile, summarize, timing_from_stats


@pytest.mark.parametrize("q", [0, 13, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [0.3, 5.0, 1.25, 7.5, 2.0, 2.0, 9.75]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_refuses_empty_and_out_of_range():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def _stats(ttft, first, last):
    return SimpleNamespace(first_token_latency=ttft, first_token_ts=first, last_token_ts=last)


def test_timing_from_vllm_stats():
    timing = timing_from_stats(_stats(0.5, 100.0, 103.0), output_tokens=7)
    assert timing.ttft_s == 0.5
    assert timing.tpot_s == pytest.approx(0.5)  # 3 s over 6 intervals
    assert timing.e2e_s == pytest.approx(3.5)
    assert timing_from_stats(_stats(0.5, 100.0, 100.0), output_tokens=1).tpot_s is None
    with pytest.raises(ValueError, match="inconsistent"):
        timing_from_stats(_stats(0.5, 103.0, 100.0), output_tokens=4)


def test_summary_has_every_field_and_throughput():
    timings = [RequestTiming(0.1 * i, 0.01 * i, 1.0 + i, 10) for i in range(1, 5)]
    summary = summarize(timings, wall_s=4.0)
    assert set(SUMMARY_FIELDS) <= set(summary)
    assert summary["output_tokens"] == 40 and summary["output_tokens_per_s"] == 10.0
    assert summary["ttft_p50_s"] == pytest.approx(0.25)
    assert summary["e2e_p99_s"] == pytest.approx(float(np.percentile([2, 3, 4, 5], 99)))
    with pytest.raises(ValueError):
        summarize([], 1.0)
    with pytest.raises(ValueError, match="positive"):
        summarize(timings, 0.0)
