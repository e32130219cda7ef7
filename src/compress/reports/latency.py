"""Rendering of ``latency.json`` (schema :data:`LATENCY_SCHEMA`): the Markdown summary, the plot, benchmark.json.

``latency.json`` holds, per measured model, trtexec-style statistics (``min_ms``,
``max_ms``, ``mean_ms``, ``median_ms``, ``p50_ms``..``p99_ms``, ``std_ms``, ``cov_pct``,
``count``; nearest-rank percentiles as trtexec computes them), throughput in queries per
second, the backend and execution provider actually used, and the environment. With a
baseline it adds the speedup on the median and on p99, and the fidelity of the candidate
against the baseline. The build stage makes those blocks (:mod:`compress.build.latency`);
the gates are in :mod:`compress.gates`.

Every function here reads a report dict and never modifies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compress.reports import fmt, markdown_table, png_bytes, pyplot


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


__all__ = ["benchmark_action_json", "latency_markdown", "plot_latency"]
