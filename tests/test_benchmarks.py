"""The benchmark scripts still run against the current API (they rotted once, unnoticed: issue 15).

Each test runs a benchmark's quick mode end to end in a child process, on its smallest real
model, and checks the rows it writes; the measured numbers themselves are the benchmarks'
business (``benchmarks/results``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_prune_quick_runs_every_method(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")  # the digits data (scikit-learn's load_digits)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_prune.py"), "--quick", "--models", "digits", "--ks", "2",
           "--no-oracle", "--no-robustness", "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "prune.json").read_text())["models"]["digits"]["rows"]
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    methods = {r["method"] for r in rows}
    assert {"auto/lowest", "auto/lowest (all tokens)", "auto/lowest+heal", "auto/measured", "auto/measured+heal",
            "cosine/span+heal", "best span", "last", "random"} <= methods
    assert all(0.0 <= r["task"]["accuracy"] <= 1.0 for r in rows)
    assert "Share of the unpruned task metric kept" in (tmp_path / "prune.md").read_text()
