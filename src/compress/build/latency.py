"""The data blocks of ``latency.json``: the schema version, one model's measurement, the speedups.

Pure functions of :meth:`compress.bench.Timing.to_dict` dicts (times in milliseconds,
throughput in queries per second); they build plain dicts and never modify their inputs.
Rendering (Markdown, plots) lives in :mod:`compress.reports.latency`, the gates in
:mod:`compress.gates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compress.bench import UNSTABLE_COV_PCT

#: ``schema_version`` of ``latency.json``.
LATENCY_SCHEMA = 1


def measurement(timing: Mapping[str, Any], *, batch: int) -> dict[str, Any]:
    """One model's latency block: the Timing dict plus throughput and stability.

    Args:
        timing: a :meth:`~compress.bench.Timing.to_dict` (``mean_ms``, ``cov_pct``, ...).
        batch: samples per timed run; throughput is ``1000 * batch / mean_ms`` (None at 0 ms).

    Returns:
        ``{"latency", "throughput_qps", "batch", "unstable"}``; ``unstable`` is true above
        trtexec's CoV threshold (:data:`compress.bench.UNSTABLE_COV_PCT`).
    """
    return {"latency": dict(timing), "throughput_qps": 1000.0 * batch / timing["mean_ms"] if timing["mean_ms"] else None,
            "batch": batch, "unstable": timing["cov_pct"] > UNSTABLE_COV_PCT}


def compare(candidate: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """Speedups of ``candidate`` over ``baseline`` (two :func:`measurement` blocks): baseline / candidate time.

    Returns:
        ``{"speedup_median", "speedup_p99", "speedup_mean"}`` (above 1: the candidate is faster).
    """
    c, b = candidate["latency"], baseline["latency"]
    return {"speedup_median": b["median_ms"] / c["median_ms"], "speedup_p99": b["p99_ms"] / c["p99_ms"],
            "speedup_mean": b["mean_ms"] / c["mean_ms"]}
