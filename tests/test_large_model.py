"""The large-model benchmark as a test (``pytest -m large``; not part of ``make test``).

Runs ``benchmarks/bench_large.py --size large`` (a generated 2.63 GiB, 14-block transformer
with external data) into ``tmp_path`` for the commands whose targets compress itself controls,
and asserts those targets from the script's JSON: every command exits 0; peak RSS of
``prune --scores-only``, ``prune --remove 4 -o`` and ``build --precision fp16`` at most 1.3x a
plain ONNX Runtime session + loop over the same batches; ``inspect`` under 2 s and 300 MB; the
pruned model's data file holds only referenced tensors with relative locations.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.large
def test_large_model_commands_meet_the_memory_targets(tmp_path):
    res = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_large.py"), "--size", "large", "--work", str(tmp_path / "work"),
         "--out-dir", str(res), "--reps", "1", "--commands", "inspect,scores-only,prune-remove,build-fp16"],
        capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((res / "large.json").read_text())
    assert result["model"]["model_bytes"] > 2.5e9
    rows = result["commands"]
    assert {k: r["exit_code"] for k, r in rows.items()} == dict.fromkeys(rows, 0)
    for k in ("scores-only", "prune-remove", "build-fp16"):
        assert rows[k]["rss_ratio"] <= 1.3, (k, rows[k]["peak_rss_mb"], result["plain"]["peak_rss_mb"])
    assert rows["inspect"]["wall_s"] < 2.0
    assert rows["inspect"]["peak_rss_mb"] < 300
    out = rows["prune-remove"]["output"]
    assert out["relative_only"]
    assert out["only_referenced"]
    assert out["unreferenced_bytes"] == 0
