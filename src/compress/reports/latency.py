"""Latency reports for deployment CI and the gates that fail a job on a regression.

``latency.json`` (schema :data:`LATENCY_SCHEMA`) holds, per measured model, trtexec-style
statistics (``min_ms``, ``max_ms``, ``mean_ms``, ``median_ms``, ``p50_ms``..``p99_ms``,
``std_ms``, ``cov_pct``, ``count``; nearest-rank percentiles as trtexec computes them),
throughput in queries per second, the backend and execution provider actually used, and
the environment. With a baseline it adds the speedup on the median and on p99, and the
fidelity of the candidate against the baseline.

Gates (each fails with its own exit code, :data:`GATE_EXIT_CODES`):

- ``--max-latency-ms X``: candidate median latency <= X;
- ``--min-speedup S``: baseline median / candidate median >= S;
- ``--max-regression PCT``: candidate median <= previous report's median * (1 + PCT/100);
- ``--min-fidelity F``: candidate output cosine against the baseline (worst output) >= F.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from compress.bench import UNSTABLE_COV_PCT
from compress.errors import ConfigError
from compress.reports import fmt, markdown_table, png_bytes, pyplot

LATENCY_SCHEMA = 1

#: Exit code of each failed gate (1 is a user error, 2 a usage error).
GATE_EXIT_CODES = {"max-latency": 3, "min-speedup": 4, "max-regression": 5, "min-fidelity": 6}


@dataclass(frozen=True, kw_only=True)
class Gates:
    """Thresholds; None = gate off.

    Raises:
        FieldError: a threshold is not finite, a latency or speedup is not positive, a
            regression is below -100 %, or a fidelity (a cosine) is outside [-1, 1].
    """

    max_latency_ms: float | None = None
    min_speedup: float | None = None
    max_regression_pct: float | None = None
    min_fidelity: float | None = None

    def __post_init__(self) -> None:
        from compress.validate import check_number

        check_number("Gates", "max_latency_ms", self.max_latency_ms, low=0, low_open=True, example="5", optional=True)
        check_number("Gates", "min_speedup", self.min_speedup, low=0, low_open=True, example="1.2", optional=True)
        check_number("Gates", "max_regression_pct", self.max_regression_pct, low=-100, example="5", optional=True)
        check_number("Gates", "min_fidelity", self.min_fidelity, low=-1, high=1, example="0.99", optional=True)


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    value: float | None
    limit: float
    message: str

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else GATE_EXIT_CODES[self.name]


def check_previous(report: Any, *, source: str) -> Mapping[str, Any]:
    """Validate a previous latency report (``--previous``); ConfigError naming the file otherwise."""
    if not isinstance(report, Mapping) or report.get("schema_version") != LATENCY_SCHEMA or "candidate" not in report:
        raise ConfigError(f"{source} is not a compress latency report (schema_version {LATENCY_SCHEMA} with a candidate)",
                          hint="pass the latency.json written by an earlier 'compress build'")
    return report


def evaluate_gates(report: Mapping[str, Any], gates: Gates, *, previous: Mapping[str, Any] | None) -> list[GateResult]:
    """Check every gate that is on; returns one result per gate."""
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


def measurement(timing: Mapping[str, Any], *, batch: int) -> dict[str, Any]:
    """One model's latency block: the Timing dict plus throughput and stability."""
    return {"latency": dict(timing), "throughput_qps": 1000.0 * batch / timing["mean_ms"] if timing["mean_ms"] else None,
            "batch": batch, "unstable": timing["cov_pct"] > UNSTABLE_COV_PCT}


def compare(candidate: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    c, b = candidate["latency"], baseline["latency"]
    return {"speedup_median": b["median_ms"] / c["median_ms"], "speedup_p99": b["p99_ms"] / c["p99_ms"],
            "speedup_mean": b["mean_ms"] / c["mean_ms"]}


def latency_markdown(report: Mapping[str, Any]) -> str:
    """A job-summary table: candidate (and baseline) statistics, speedups, fidelity, gates."""
    rows = []
    for role in ("baseline", "candidate"):
        m = report.get(role)
        if not m:
            continue
        t = m["latency"]
        rows.append([role, m["model"], m["precision"], t["median_ms"], t["p90_ms"], t["p95_ms"], t["p99_ms"],
                     t["mean_ms"], f"{t['cov_pct']:.1f}%" + (" (unstable)" if m["unstable"] else ""), m["throughput_qps"]])
    lines = [f"## Latency: {report['candidate']['model']} ({report['backend']}, {report['provider']})", "",
             markdown_table(["", "model", "precision", "median ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "CoV",
                             "qps"], rows)]
    comp = report.get("comparison")
    if comp:
        lines += ["", f"Speedup vs baseline: **{fmt(comp['speedup_median'])}x** on the median, "
                      f"{fmt(comp['speedup_p99'])}x on p99."]
        fid = comp.get("fidelity")
        if fid:
            lines.append(f"Fidelity vs baseline: output cosine {fmt(fid['cosine'], 6)}, max abs error {fmt(fid['max_abs'])}"
                         + (f", top-1 agreement {fmt(fid['top1'])}" if fid.get("top1") is not None else "") + ".")
    if report.get("gates"):
        lines += ["", markdown_table(["gate", "result", "detail"],
                                     [[g["name"], "pass" if g["passed"] else "**FAIL**", g["message"]]
                                      for g in report["gates"]])]
    if report["candidate"].get("random_inputs"):
        lines += ["", "Inputs were random (no calibration data given): latency only, no fidelity."]
    lines += ["", f"Percentiles: {report['percentile_method']}. {report['environment']['host']['cpu']}, "
                  f"{report['environment']['host']['cores']} cores."]
    return "\n".join(lines) + "\n"


def benchmark_action_json(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """github-action-benchmark ``customSmallerIsBetter`` entries: median and p99 of the candidate."""
    c = report["candidate"]
    t = c["latency"]
    base = f"{c['model']} {report['backend']} {c['precision']}"
    return [{"name": f"{base} median", "unit": "ms", "value": round(t["median_ms"], 6),
             "range": f"± {t['std_ms']:.4f}", "extra": f"p90 {t['p90_ms']:.4f} ms, CoV {t['cov_pct']:.2f}%"},
            {"name": f"{base} p99", "unit": "ms", "value": round(t["p99_ms"], 6),
             "range": f"± {t['std_ms']:.4f}", "extra": f"{t['count']} iterations"}]


def plot_latency(report: Mapping[str, Any]) -> bytes:
    """PNG: median/p90/p95/p99 bars of baseline and candidate."""
    plt = pyplot("the latency plot")
    keys = ["median_ms", "p90_ms", "p95_ms", "p99_ms"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    roles = [r for r in ("baseline", "candidate") if report.get(r)]
    width = 0.8 / len(roles)
    for j, role in enumerate(roles):
        t = report[role]["latency"]
        ax.bar([i + j * width for i in range(len(keys))], [t[k] for k in keys], width,
               label=f"{role} ({report[role]['precision']})")
    ax.set_xticks([i + width * (len(roles) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels(["median", "p90", "p95", "p99"])
    ax.set_ylabel("ms")
    ax.set_title(f"{report['candidate']['model']} on {report['backend']}")
    ax.legend()
    fig.tight_layout()
    return png_bytes(fig)
