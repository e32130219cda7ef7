"""The build stage's reports (``passes.json``, ``latency.json``) and the data blocks of ``latency.json``.

:class:`PassesReport` and :class:`LatencyReport` are the reports :func:`compress.build.run_passes`
and :func:`compress.build.benchmark` return. :func:`measurement` and :func:`compare` are
pure functions of :meth:`compress.bench.Timing.to_dict` dicts (times in milliseconds,
throughput in queries per second); they build plain dicts and never modify their inputs.
Rendering (Markdown, plots) lives in :mod:`compress.reports.latency`, the gates in
:mod:`compress.gates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from compress.bench import UNSTABLE_COV_PCT
from compress.stage import set_fields

#: ``schema_version`` of ``latency.json``.
LATENCY_SCHEMA = 1
#: ``schema_version`` of ``passes.json``.
PASSES_SCHEMA = 1
#: How the percentiles are taken (written into ``latency.json``).
PERCENTILE_METHOD = "nearest rank, as trtexec (float32 index arithmetic)"


@dataclass(frozen=True)
class PassesReport:
    """What the passes did (``passes.json``): one JSON-ready entry per pass, in the order they ran.

    Attributes:
        passes: each pass's :meth:`compress.passes.PassReport.to_dict`, with the fidelity
            against its input (and ``exclude``: how many nodes each ``--exclude`` entry matched).
        input_sha256 / output_sha256: :func:`compress.onnx_io.model_digest` of the model
            before the first pass and after the last (equal when no pass ran).
    """

    passes: list[dict[str, Any]]
    input_sha256: str
    output_sha256: str
    schema_version: int = field(default=PASSES_SCHEMA, init=False)

    def to_dict(self) -> dict[str, Any]:
        """``passes.json``."""
        return {"schema_version": self.schema_version, "passes": self.passes, "input_sha256": self.input_sha256,
                "output_sha256": self.output_sha256}


@dataclass(frozen=True)
class LatencyReport:
    """The measurement of one built model (``latency.json`` without its gates; times in milliseconds).

    Attributes:
        backend: ``ort`` or ``trt``; provider: the ORT execution provider, or ``TensorRT``.
        bench: warm-up, minimum iterations, duration and the timed input shapes.
        candidate: the model's :func:`measurement` with its name, precision, sparsity and digest.
        environment: host and library versions (and the GPU on TensorRT).
        engine: the TensorRT engine's summary (None on ONNX Runtime).
        baseline / comparison: the FP32 baseline's measurement and the speedups over it (with
            the candidate's fidelity against it when calibration data was given); None without one.
    """

    backend: str
    provider: str
    bench: dict[str, Any]
    candidate: dict[str, Any]
    environment: dict[str, Any]
    engine: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None
    percentile_method: str = PERCENTILE_METHOD
    schema_version: int = field(default=LATENCY_SCHEMA, init=False)

    def to_dict(self) -> dict[str, Any]:
        """``latency.json`` without ``gates`` (the glue adds them: :mod:`compress.gates`)."""
        return {
            "schema_version": self.schema_version, "backend": self.backend, "provider": self.provider,
            "percentile_method": self.percentile_method, "bench": self.bench, "candidate": self.candidate,
            "environment": self.environment, **set_fields(self, ("engine", "baseline", "comparison")),
        }


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
