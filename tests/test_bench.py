"""Latency statistics: trtexec's nearest-rank percentiles, median and CoV."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compress.bench import BenchConfig, measure, nearest_rank, summarize


def _trtexec_reference(samples: list[float], p: float) -> float:
    """findPercentile of trtexec's sampleReporting.cpp, evaluated in float32 as there."""
    n = len(samples)
    exclude = int(np.float32(np.float32(1) - np.float32(p) / np.float32(100)) * np.float32(n))
    return sorted(samples)[max(n - 1 - exclude, 0)]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 99, 100, 101, 1000, 1234])
@pytest.mark.parametrize("p", [50, 90, 95, 99, 99.9])
def test_percentiles_match_trtexec(n: int, p: float) -> None:
    samples = list(np.random.default_rng(n).gamma(2.0, 1.0, size=n))
    assert nearest_rank(sorted(samples), p) == _trtexec_reference(samples, p)


def test_known_values_of_1_to_100() -> None:
    t = summarize([float(i) for i in range(100, 0, -1)])
    assert (t.min_ms, t.max_ms, t.count) == (1.0, 100.0, 100)
    assert t.median_ms == 50.5  # mean of the middle pair
    assert (t.p50_ms, t.p90_ms, t.p95_ms) == (50.0, 90.0, 95.0)
    assert t.p99_ms == 100.0  # trtexec: int((1 - 0.99f) * 100) == 0 in float32
    assert t.mean_ms == 50.5
    assert t.std_ms == pytest.approx(math.sqrt((100**2 - 1) / 12))  # population std
    assert t.cov_pct == pytest.approx(100 * t.std_ms / 50.5)
    assert t.unstable


def test_odd_median_and_stability() -> None:
    t = summarize([2.0, 2.0, 2.02])
    assert t.median_ms == 2.0
    assert t.cov_pct < 2.5
    assert not t.unstable


def test_errors() -> None:
    with pytest.raises(ValueError, match="no samples"):
        summarize([])
    with pytest.raises(ValueError, match="percentile 101 is not in"):
        nearest_rank([1.0], 101)


def test_measure_runs_at_least_the_requested_iterations() -> None:
    calls = []
    timing = measure(lambda: calls.append(1), BenchConfig(warmup_s=0.0, iterations=25, duration_s=0.0))
    assert timing.count == 25
    assert len(calls) == 26  # one warm-up call
