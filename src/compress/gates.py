"""The CI gates of ``compress build`` and ``compress run``: thresholds checked on a latency report.

Gates are evaluated once, by the glue (the CLI, the pipeline's report stage), on the
``latency.json`` dict a build returns (:func:`compress.build.build`); each failed gate has
its own exit code (:data:`GATE_EXIT_CODES`):

- ``--max-latency-ms X``: candidate median latency <= X (milliseconds);
- ``--min-speedup S``: baseline median / candidate median >= S;
- ``--max-regression PCT``: candidate median <= previous report's median * (1 + PCT/100);
- ``--min-fidelity F``: candidate output cosine against the baseline (worst output) >= F
  (exact agreement when every output is an integer).

Nothing here modifies a report; :func:`gate_entries` gives the form stored under its
``"gates"`` key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from compress.build.latency import LATENCY_SCHEMA
from compress.config import StageConfig, option
from compress.errors import ConfigError
from compress.reports import fmt

#: Exit code of each failed gate (1 is a user error, 2 a usage error).
GATE_EXIT_CODES = {"max-latency": 3, "min-speedup": 4, "max-regression": 5, "min-fidelity": 6}


@dataclass(frozen=True, kw_only=True)
class Gates(StageConfig):
    """Thresholds; None = gate off. Flags and pipeline keys come from the fields (:mod:`compress.config`).

    Raises:
        FieldError: a threshold is not finite, a latency or speedup is not positive, a
            regression is below -100 %, or a fidelity (a cosine) is outside [-1, 1].
    """

    max_latency_ms: float | None = option(None, minimum=0, metavar="X", help=f"fail (exit code {GATE_EXIT_CODES['max-latency']}) if the median latency exceeds X ms")
    min_speedup: float | None = option(None, minimum=0, metavar="S", help=f"fail (exit code {GATE_EXIT_CODES['min-speedup']}) if the speedup over --baseline is below S")
    max_regression_pct: float | None = option(None, flag="--max-regression", metavar="PCT",
                                              help=f"fail (exit code {GATE_EXIT_CODES['max-regression']}) if the median is more than PCT%% slower "
                                                   "than --previous")
    min_fidelity: float | None = option(None, metavar="F",
                                        help=f"fail (exit code {GATE_EXIT_CODES['min-fidelity']}) if the output cosine against "
                                             "--baseline is below F (needs --calib)")

    def __post_init__(self) -> None:
        """Check every threshold that is on (see the class's Raises)."""
        from compress.validate import Interval, check_number

        positive = Interval(low=0, low_open=True)
        check_number("Gates", "max_latency_ms", self.max_latency_ms, within=positive, example="5", optional=True)
        check_number("Gates", "min_speedup", self.min_speedup, within=positive, example="1.2", optional=True)
        check_number("Gates", "max_regression_pct", self.max_regression_pct, within=Interval(low=-100), example="5",
                     optional=True)
        check_number("Gates", "min_fidelity", self.min_fidelity, within=Interval(-1, 1), example="0.99", optional=True)


@dataclass(frozen=True)
class GateResult:
    """One evaluated gate: its name (a key of :data:`GATE_EXIT_CODES`), the measured value, the limit, a message."""

    name: str
    passed: bool
    value: float | None
    limit: float
    message: str

    @property
    def exit_code(self) -> int:
        """0 when the gate passed, else its code in :data:`GATE_EXIT_CODES`."""
        return 0 if self.passed else GATE_EXIT_CODES[self.name]


def check_previous(report: Any, *, source: str) -> Mapping[str, Any]:
    """Validate a previous latency report (``--previous``); returns it unchanged.

    Raises:
        ConfigError: it is not a latency report of schema :data:`LATENCY_SCHEMA` with a
            candidate, naming ``source``.
    """
    if not isinstance(report, Mapping) or report.get("schema_version") != LATENCY_SCHEMA or "candidate" not in report:
        raise ConfigError(f"{source} is not a compress latency report (schema_version {LATENCY_SCHEMA} with a candidate)",
                          hint="pass the latency.json written by an earlier 'compress build'")
    return report


def evaluate_gates(report: Mapping[str, Any], gates: Gates, *, previous: Mapping[str, Any] | None) -> list[GateResult]:
    """Check every gate that is on, in the order of :class:`Gates`' fields; one result per gate.

    Raises:
        ConfigError: a gate lacks what it compares with: ``min-speedup`` a baseline,
            ``max-regression`` a ``previous`` report, ``min-fidelity`` a baseline and
            calibration data.
    """
    results = []
    median = report["candidate"]["latency"]["median_ms"]
    if gates.max_latency_ms is not None:
        ok = median <= gates.max_latency_ms
        results.append(GateResult("max-latency", ok, median, gates.max_latency_ms,
                                  f"median latency {fmt(median)} ms {'<=' if ok else '>'} {fmt(gates.max_latency_ms)} ms"))
    if gates.min_speedup is not None:
        speedup = (report.get("comparison") or {}).get("speedup_median")
        if speedup is None:
            raise ConfigError("--min-speedup needs a baseline", hint="pass --baseline ORIGINAL.onnx")
        ok = speedup >= gates.min_speedup
        results.append(GateResult("min-speedup", ok, speedup, gates.min_speedup,
                                  f"speedup {fmt(speedup)}x {'>=' if ok else '<'} {fmt(gates.min_speedup)}x"))
    if gates.max_regression_pct is not None:
        if previous is None:
            raise ConfigError("--max-regression needs a previous report", hint="pass --previous latency.json")
        before = previous["candidate"]["latency"]["median_ms"]
        change = 100.0 * (median - before) / before
        ok = change <= gates.max_regression_pct
        results.append(GateResult("max-regression", ok, change, gates.max_regression_pct,
                                  f"median {fmt(before)} -> {fmt(median)} ms ({change:+.1f}%, limit +{fmt(gates.max_regression_pct)}%)"))
    if gates.min_fidelity is not None:
        fid = (report.get("comparison") or {}).get("fidelity") or {}
        cos, what = fid.get("cosine"), "output cosine"
        if cos is None and fid.get("agreement") is not None:  # integer outputs only: exact agreement
            cos, what = fid["agreement"], "exact agreement"
        if cos is None:
            raise ConfigError("--min-fidelity needs a baseline and calibration data",
                              hint="pass --baseline ORIGINAL.onnx and --calib DIR")
        ok = cos >= gates.min_fidelity
        results.append(GateResult("min-fidelity", ok, cos, gates.min_fidelity,
                                  f"{what} vs baseline {fmt(cos, 6)} {'>=' if ok else '<'} {fmt(gates.min_fidelity, 6)}"))
    return results


def gate_entries(results: Sequence[GateResult]) -> list[dict[str, Any]]:
    """The ``"gates"`` list of ``latency.json``: one ``{name, passed, value, limit, message}`` per result."""
    return [{"name": g.name, "passed": g.passed, "value": g.value, "limit": g.limit, "message": g.message}
            for g in results]


__all__ = ["GATE_EXIT_CODES", "GateResult", "Gates", "check_previous", "evaluate_gates", "gate_entries"]
