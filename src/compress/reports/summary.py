"""The index of a ``compress run`` output folder: ``summary.json`` and ``summary.md``.

Built from the stage reports only (nothing is re-measured); holds no host paths. The result
table (model, blocks before -> after, removed blocks, output cosine vs the original, median
latency before/after, speedup, precision, backend) ends both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress.gates import GateResult
from compress.reports import fmt, markdown_table

#: Version of the ``summary.json`` layout.
SUMMARY_SCHEMA = 1


def summarize(*, version: str, config: Mapping[str, Any], stages: Sequence[Any], reports: Mapping[str, Any], calib: Any,
              gates: Sequence[GateResult]) -> dict[str, Any]:
    """``summary.json``: the run's index (schema :data:`SUMMARY_SCHEMA`) from the stage reports.

    Args:
        version: compress's version.
        config: ``{"file", "name", "model", "sections"}``: the config file's name, the run's
            name, ``model.source`` as written, and the config as written.
        stages: what each stage did (objects with ``name``, ``status``, ``seconds``,
            ``outputs``, ``hash``; :class:`compress.pipeline.StageRun`).
        reports: ``latency`` (``build/latency.json``), ``prune`` and ``export`` (None when
            the stage did not run).
        calib: the calibration batches (their ``description`` and ``random``).
        gates: the evaluated gates.
    """
    latency, prune, export = reports["latency"], reports["prune"], reports["export"]
    cand, base = latency["candidate"], latency.get("baseline")
    comparison = latency.get("comparison") or {}
    fidelity = comparison.get("fidelity") or (prune or {}).get("fidelity")
    fidelity_source = ("build: final model vs the original, on the calibration data" if comparison.get("fidelity")
                       else "prune: pruned vs original, on held-out calibration data" if fidelity else None)
    if prune is not None:
        blocks = f"{prune['blocks_before']} -> {prune['blocks_after']}"
        removed = [b["name"] for b in prune["removed"]]
    else:
        count = (export or {}).get("blocks", {}).get("count")
        blocks, removed = ("-" if count is None else str(count)), []
    precision = cand["precision"] + (f" + {cand['sparsity']} sparsity" if cand.get("sparsity") else "")
    speedup = comparison.get("speedup_median")
    failed = [g for g in gates if not g.passed]
    table_row = [config["name"], blocks, ", ".join(removed) or "-", None if fidelity is None else fmt(fidelity["cosine"], 6),
                 base["latency"]["median_ms"] if base else None, cand["latency"]["median_ms"],
                 None if speedup is None else f"{fmt(speedup)}x", precision, f"{latency['backend']} ({latency['provider']})"]
    plots = [p for s in stages for p in s.outputs if p.endswith(".png")]
    return {
        "schema_version": SUMMARY_SCHEMA,
        "compress_version": version,
        "config": {"file": config["file"], "name": config["name"], "sections": _jsonable(config["sections"])},
        "model": config["model"],
        "calibration": {"description": calib.description, "random": bool(calib.random)},
        "stages": [{"name": s.name, "status": s.status, "seconds": None if s.seconds is None else round(s.seconds, 3),
                    "outputs": list(s.outputs), "hash": s.hash} for s in stages],
        "blocks": {"summary": blocks, "removed": removed},
        "fidelity": None if fidelity is None else {"cosine": fidelity["cosine"], "max_abs": fidelity.get("max_abs"),
                                                   "top1": fidelity.get("top1"), "measured": fidelity_source},
        "latency": {"backend": latency["backend"], "provider": latency["provider"], "unit": "ms (median)",
                    "before": base["latency"]["median_ms"] if base else None, "after": cand["latency"]["median_ms"],
                    "speedup": speedup, "random_inputs": cand.get("random_inputs")},
        "precision": cand["precision"], "sparsity": cand.get("sparsity"), "backend": latency["backend"],
        "gates": [{"name": g.name, "passed": g.passed, "value": g.value, "limit": g.limit, "message": g.message,
                   "exit_code": g.exit_code} for g in gates],
        "failed_gates": [g.name for g in failed],
        "exit_code": failed[0].exit_code if failed else 0,
        "plots": plots,
        "reports": [p for s in stages for p in s.outputs if Path(p).name in _REPORTS],
        "table": {"headers": list(RESULT_HEADERS), "rows": [table_row]},
    }


#: The stage reports the index links to.
_REPORTS = ("export.json", "calib.json", "prune.md", "prune.json", "latency.md", "latency.json", "benchmark.json")

#: Columns of the result table that ends summary.md and summary.json.
RESULT_HEADERS = ("model", "blocks", "removed", "output cosine vs original", "latency before (ms)",
                  "latency after (ms)", "speedup", "precision", "backend")


def _jsonable(obj: Any) -> Any:
    """The raw config as JSON data (YAML may hold dates and other non-JSON scalars)."""
    return json.loads(json.dumps(obj, default=str))


def _short_listing(outputs: Sequence[str]) -> str:
    names = [Path(o).name for o in outputs if not o.endswith("stage.json")]
    batches = [n for n in names if n.endswith(".npz")]
    short = [n for n in names if not n.endswith(".npz")] + ([f"{len(batches)} .npz batches"] if batches else [])
    return ", ".join(short) or "-"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: stages, calibration, gates, plots and reports, then the result table."""
    lines = [f"## compress run: {summary['config']['file']}", ""]
    cal = summary["calibration"]
    lines.append(f"Model `{summary['model']}`. Calibration: {cal['description']}"
                 + (" **(random data: a smoke test, not a measure of quality)**" if cal["random"] else "") + ".")
    lines += ["", markdown_table(["stage", "status", "time (s)", "outputs"],
                                 [[s["name"], s["status"], s["seconds"], _short_listing(s["outputs"])]
                                  for s in summary["stages"]])]
    if summary["gates"]:
        lines += ["", markdown_table(["gate", "result", "detail"],
                                     [[g["name"], "pass" if g["passed"] else f"**FAIL** (exit {g['exit_code']})",
                                       g["message"]] for g in summary["gates"]])]
        if summary["failed_gates"]:
            lines += ["", f"**Failed gates: {', '.join(summary['failed_gates'])}** (exit code {summary['exit_code']})."]
    if summary["plots"]:
        lines += ["", "Plots: " + ", ".join(f"[{Path(p).stem}]({p})" for p in summary["plots"])
                  + ". Reports: " + ", ".join(f"[{p}]({p})" for p in summary["reports"]) + "."]
    fid = summary["fidelity"]
    if fid:
        lines += ["", f"Fidelity measured by {fid['measured']}."]
    if summary["latency"].get("random_inputs"):
        lines += ["", "Latency was measured on random inputs."]
    table = summary["table"]
    lines += ["", markdown_table(table["headers"], table["rows"])]
    return "\n".join(lines) + "\n"
