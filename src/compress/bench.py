"""Latency measurement and statistics with trtexec's definitions.

Percentiles are nearest-rank without interpolation, as trtexec computes them
(``samples/common/sampleReporting.cpp``, ``findPercentile``): for ``N`` sorted samples
the p-th percentile is the sample at index ``N - 1 - int((1 - p/100) * N)`` (evaluated in
float32, clamped at 0); the median is the mean of the two middle samples for even ``N``
(``findMedian``); the coefficient of variation is the population standard deviation over
the mean, in percent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: trtexec flags a measurement as unstable above this CoV (percent).
UNSTABLE_COV_PCT = 2.5


def nearest_rank(sorted_ms: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0 <= p <= 100) of ascending samples, exactly as trtexec computes it.

    trtexec evaluates ``exclude = int((1 - p / 100) * N)`` in single precision and returns
    sample ``max(N - 1 - exclude, 0)``. The float32 arithmetic is reproduced here, so the
    results match trtexec's to the sample (for N = 100: p90 is the 90th sample, p99 the
    100th, because ``1 - 0.99f`` rounds below 0.01).
    """
    n = len(sorted_ms)
    if n == 0:
        raise ValueError("no samples")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile {p} is not in [0, 100]")
    one, pct = np.float32(1.0), np.float32(p)
    exclude = int((one - pct / np.float32(100.0)) * np.float32(n))
    return float(sorted_ms[max(n - 1 - exclude, 0)])


def median(sorted_ms: Sequence[float]) -> float:
    """Median of ``sorted_ms`` (ascending): the middle sample, or the mean of the middle two.

    Raises:
        IndexError: ``sorted_ms`` is empty.
    """
    n = len(sorted_ms)
    mid = n // 2
    return float(sorted_ms[mid]) if n % 2 else (sorted_ms[mid - 1] + sorted_ms[mid]) / 2.0


@dataclass(frozen=True)
class Timing:
    """Summary of latency samples in milliseconds (field names follow trtexec's summary)."""

    count: int
    min_ms: float
    max_ms: float
    mean_ms: float
    median_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    std_ms: float
    cov_pct: float
    total_s: float

    @property
    def unstable(self) -> bool:
        """True when the coefficient of variation exceeds ``UNSTABLE_COV_PCT`` percent."""
        return self.cov_pct > UNSTABLE_COV_PCT

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, floats rounded to 6 decimals (JSON-ready)."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Statistics of latency samples (ms)."""
    s = sorted(float(x) for x in samples_ms)
    if not s:
        raise ValueError("no samples")
    n = len(s)
    mean = sum(s) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / n)
    return Timing(
        count=n, min_ms=s[0], max_ms=s[-1], mean_ms=mean, median_ms=median(s), p50_ms=nearest_rank(s, 50),
        p90_ms=nearest_rank(s, 90), p95_ms=nearest_rank(s, 95), p99_ms=nearest_rank(s, 99), std_ms=std,
        cov_pct=100.0 * std / mean if mean > 0 else 0.0, total_s=sum(s) / 1000.0,
    )


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """How long to measure: warm up for ``warmup_s``, then at least ``iterations`` runs and ``duration_s``.

    Every loop is bounded: ``warmup_s`` and ``duration_s`` are finite and at most
    :data:`~compress.validate.MAX_SECONDS`, at least one run is timed (``iterations >= 1``)
    and at most ``max_iterations`` are (``iterations <= max_iterations <= 10**7``).

    Raises:
        FieldError: a value is not finite or out of range (naming the field).
    """

    warmup_s: float = 0.2
    iterations: int = 10
    duration_s: float = 1.0
    max_iterations: int = 100_000

    def __post_init__(self) -> None:
        from compress.validate import MAX_SECONDS, Interval, check_int, check_number

        check_number("BenchConfig", "warmup_s", self.warmup_s, within=Interval(0, MAX_SECONDS), example="0.2")
        check_number("BenchConfig", "duration_s", self.duration_s, within=Interval(0, MAX_SECONDS), example="1")
        check_int("BenchConfig", "max_iterations", self.max_iterations, within=Interval(1, 10_000_000),
                  example="100000")
        check_int("BenchConfig", "iterations", self.iterations, within=Interval(1, self.max_iterations), example="10")


def measure(run: Callable[[], Any], config: BenchConfig | None = None) -> Timing:
    """Time ``run()`` (a closure doing one inference) and summarize the samples."""
    config = config or BenchConfig()
    end = time.perf_counter() + config.warmup_s
    run()
    while time.perf_counter() < end:
        run()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < config.max_iterations and (
        len(samples) < config.iterations or time.perf_counter() - start < config.duration_s
    ):
        t = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t) * 1000.0)
    return summarize(samples)
