"""The ``compress search`` report renderers: row order, texts, the plot, the files (synthetic report)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from compress.reports.search import (
    ordered_candidates,
    search_markdown,
    search_plot,
    search_text,
    write_search_files,
)


def _cand(name: str, status: str, *, remove: int = 1, precision: str = "fp32", reason: str | None = None,
          predicted: dict[str, Any] | None = None, measured: dict[str, Any] | None = None,
          meets: bool | None = None, front: bool = False, chosen: bool = False,
          where: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "status": status, "reason": reason,
            "settings": {"remove": remove, "select": "lowest", "heal": remove > 1, "precision": precision,
                         "sparsity": "none"},
            "predicted": predicted or {"fidelity": None, "median_ms": None, "size_bytes": None},
            "measured": measured, "meets_target": meets, "front": front, "chosen": chosen, "where": where,
            "stage": "ran" if status == "measured" else None, "seconds": 1.5 if status == "measured" else None}


def _report() -> dict[str, Any]:
    """Six candidates in a deliberately unsorted order.

    fast-bad: measured, fastest, below target; win: measured, meets, chosen; slow-ok: measured,
    meets, slowest; none-ms: measured with no latency (None fields); skip: skipped with a
    prediction; boom: failed with its error.
    """
    where = {"node": "8cbe107f", "host": "worker-1", "device": "CPU (ONNX Runtime CPUExecutionProvider)"}
    cands = [
        _cand("skip", "skipped", remove=3, reason="predicted fidelity 0.951 < target 0.99 - margin 0.005",
              predicted={"fidelity": 0.951, "median_ms": 2.0, "size_bytes": 500}),
        _cand("slow-ok", "measured", remove=0, measured={"fidelity": 0.9995, "median_ms": 9.0, "p99_ms": 9.5,
                                                          "size_bytes": 2_000_000, "speedup": 1.1}, meets=True,
              front=True, where=where),
        _cand("boom", "failed", precision="int8", reason="int8: calibration failed\n  ValueError: bad | shape"),
        _cand("win", "measured", remove=2, measured={"fidelity": 0.993, "median_ms": 4.5, "p99_ms": 5.0,
                                                      "size_bytes": 1_500_000, "speedup": 2.2}, meets=True,
              front=True, chosen=True, where=where),
        _cand("none-ms", "measured", measured={"fidelity": None, "median_ms": None, "p99_ms": None,
                                                "size_bytes": None, "speedup": None}),
        _cand("fast-bad", "measured", remove=3, precision="int8",
              measured={"fidelity": 0.97, "median_ms": 3.0, "p99_ms": 3.2, "size_bytes": 400_000, "speedup": 3.3},
              meets=False, front=True, where=where),
    ]
    return {"schema_version": 1, "goal": "median", "target_fidelity": 0.99,
            "space": {"remove": [0, 1, 2, 3], "select": ["lowest"], "heal": [False, True],
                      "precision": ["fp32", "int8"], "sparsity": ["none"], "size": 16},
            "executor": {"kind": "ray", "address": "local", "nodes": 1, "cpus": 2.0, "gpus": 0.0,
                         "note": "one node"},
            "counts": {"candidates": 6, "built": 4, "skipped": 1, "failed": 1, "resumed": 0},
            "baseline": {"median_ms": 10.0, "p99_ms": 11.0, "size_bytes": 3_000_000},
            "candidates": cands, "winner": "win", "seconds": 12.5}


def _no_winner(report: dict[str, Any]) -> dict[str, Any]:
    r = copy.deepcopy(report)
    r["winner"] = None
    for c in r["candidates"]:
        c["chosen"] = False
        if c["meets_target"]:
            c["meets_target"] = False
    return r


def _table_names(md: str) -> list[str]:
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]  # skip the header
    return [r.split(" | ")[0][2:] for r in rows]


def test_markdown_rows_order_marker_and_texts() -> None:
    report = _report()
    before = copy.deepcopy(report)
    md = search_markdown(report)
    assert _table_names(md) == ["fast-bad", "**win** (chosen)", "slow-ok", "none-ms", "skip", "boom"]
    assert "built 4 of 6 candidates (1 skipped by prediction, 1 failed, 0 found done)" in md
    assert "Winner: win (fidelity 0.993, median 4.5 ms, 2.2x speedup, 1.5 MB)." in md
    assert "executor: ray (local; 1 node, 2 CPUs, 0 GPUs; one node)" in md
    assert "| skipped: predicted fidelity 0.951 < target 0.99 - margin 0.005 |" in md
    assert "failed: int8: calibration failed ValueError: bad \\| shape" in md  # one line, pipe escaped
    assert "measured (below target)" in md
    assert "worker-1 (CPU (ONNX Runtime CPUExecutionProvider))" in md
    assert "plot:" not in md
    assert search_markdown(report, plot_name="search.png").rstrip().endswith("plot: search.png")
    win = next(line for line in md.splitlines() if line.startswith("| **win**"))
    assert win.split(" | ")[1:14] == ["2", "lowest", "yes", "fp32", "none", "-", "-", "0.993", "4.5", "2.2x",
                                      "1.5", "yes", "measured"]
    assert report == before


@pytest.mark.parametrize(("goal", "order"), [
    ("size", ["fast-bad", "win", "slow-ok", "none-ms", "skip", "boom"]),
    ("p99", ["fast-bad", "win", "slow-ok", "none-ms", "skip", "boom"]),
    ("pareto", ["fast-bad", "win", "slow-ok", "none-ms", "skip", "boom"]),
])
def test_order_follows_the_goal(goal: str, order: list[str]) -> None:
    report = _report()
    report["goal"] = goal
    assert [c["name"] for c in ordered_candidates(report)] == order


def test_size_goal_reorders_by_size() -> None:
    report = _report()
    report["goal"] = "size"
    report["candidates"][1]["measured"]["size_bytes"] = 100  # slow-ok is now the smallest
    assert [c["name"] for c in ordered_candidates(report)][:3] == ["slow-ok", "fast-bad", "win"]


def test_no_candidate_meets_the_target() -> None:
    report = _no_winner(_report())
    md = search_markdown(report)
    assert "No candidate meets the target (best measured fidelity 0.9995, slow-ok)." in md
    assert "(chosen)" not in md
    assert search_text(report).splitlines()[0] == (
        "search (median, target fidelity 0.99): no candidate meets the target (best measured fidelity 0.9995, slow-ok)")
    report["candidates"] = [c for c in report["candidates"] if c["status"] != "measured"]
    assert "no candidate meets the target (none was measured)" in search_text(report)


def test_pareto_goal_names_the_front() -> None:
    report = _report()
    report["goal"] = "pareto"
    report["winner"] = None
    report["candidates"][3]["chosen"] = False
    md = search_markdown(report)
    assert ("No single winner: the measured Pareto front is the answer. Pareto front: fast-bad, win, slow-ok."
            in md)
    assert "(chosen)" not in md


def test_text_summary_and_truncation() -> None:
    report = _report()
    text = search_text(report, limit=3)
    lines = text.splitlines()
    assert lines[0] == "search (median, target fidelity 0.99): winner: win (fidelity 0.993, median 4.5 ms, 2.2x speedup, 1.5 MB)"
    assert lines[1] == "Built 4 of 6 candidates (1 skipped by prediction, 1 failed, 0 found done)"
    assert lines[3].split() == ["candidate", "fidelity", "median", "ms", "speedup", "status"]
    assert [r.split()[0] for r in lines[5:8]] == ["fast-bad", "win", "slow-ok"]
    assert "win (chosen)" in lines[6]
    assert lines[-1] == "... 3 more in search.md"
    full = search_text(report)
    assert "more in search.md" not in full
    assert "failed: int8: calibration failed ValueError: bad | shape" in full


def test_plot_is_png_with_and_without_measured_candidates() -> None:
    report = _report()
    before = copy.deepcopy(report)
    assert search_plot(report)[:8] == b"\x89PNG\r\n\x1a\n"
    assert report == before
    bare = _no_winner(report)
    bare["candidates"] = [c for c in bare["candidates"] if c["status"] != "measured"]
    assert search_plot(bare)[:4] == b"\x89PNG"
    empty = {**bare, "candidates": [], "baseline": {}, "target_fidelity": None}
    assert search_plot(empty)[:4] == b"\x89PNG"


def test_write_search_files(tmp_path) -> None:
    report = _report()
    before = copy.deepcopy(report)
    assert write_search_files(tmp_path, report) == ["search.json", "search.md", "search.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.json", "search.md", "search.png"]
    assert json.loads((tmp_path / "search.json").read_text(encoding="utf-8")) == report
    assert (tmp_path / "search.md").read_text(encoding="utf-8") == search_markdown(report, plot_name="search.png")
    assert (tmp_path / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert report == before


def test_write_search_files_without_matplotlib(tmp_path, monkeypatch, caplog) -> None:
    import compress.reports.search as search
    from compress.errors import MissingDependencyError

    def no_matplotlib(purpose: str):
        raise MissingDependencyError("matplotlib", purpose=purpose, extra="plot")

    monkeypatch.setattr(search, "pyplot", no_matplotlib)
    from compress.log import logger

    report = _report()
    logger.addHandler(caplog.handler)  # the CLI's logging setup may stop propagation to the root logger
    try:
        with caplog.at_level("WARNING", logger="compress"):
            assert write_search_files(tmp_path, report) == ["search.json", "search.md"]
    finally:
        logger.removeHandler(caplog.handler)
    assert not (tmp_path / "search.png").exists()
    assert "plot:" not in (tmp_path / "search.md").read_text(encoding="utf-8")
    assert "note: search.png not written: matplotlib is required for the search plot" in caplog.text
