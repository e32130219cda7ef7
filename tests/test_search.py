"""``compress search``: the space, the predictions, and whole searches on a tiny transformer (serial and local Ray).

The model is the seeded 4-block TinyTransformer exported to ONNX with npz calibration data
(random arrays saved as files: real data as far as the passes are concerned). Its output
fidelity is top-1 agreement, so the fidelities are multiples of 1/32 and the target 0.6
splits the space: one block removed meets it, two do not.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from compress.errors import CompressError, ConfigError
from compress.search import load_search_config, run_search
from compress.search.execute import SerialExecutor
from compress.search.predict import Depth, Numbers, best_measured, predict, skip_reason
from compress.search.space import Candidate, SearchSection, candidates

CONFIG = """\
model:
  source: net.onnx
calibration:
  npz: calib
prune:
  metric: cosine
build:
  warmup_ms: 5
  iterations: 5
  duration: 0.05
search:
  remove: [0, 1, 2]
  precision: [fp32, int8]
  goal: size
  target_fidelity: 0.6
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``net.onnx`` (4 blocks), ``calib/`` (8 npz batches of 2) and ``s.yaml`` in one folder."""
    import models

    d = tmp_path_factory.mktemp("search")
    models.export_onnx(models.tiny_transformer(depth=4), models.transformer_input(), d / "net.onnx")
    (d / "calib").mkdir()
    for i in range(8):
        np.savez(d / "calib" / f"b{i}.npz", x=models.transformer_input(seed=10 + i).numpy())
    (d / "s.yaml").write_text(CONFIG)
    return d


def _config(project: Path, tmp_path: Path, extra: str = "", search: str = "") -> Path:
    text = CONFIG.replace("search:\n", "search:\n" + search) + extra
    path = tmp_path / "s.yaml"
    path.write_text(text.replace("source: net.onnx", f"source: {project / 'net.onnx'}")
                    .replace("npz: calib", f"npz: {project / 'calib'}"))
    return path


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["candidates"]}


@pytest.fixture(scope="module")
def exhaustive(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: every candidate built and measured, serially, in this process."""
    out = tmp_path_factory.mktemp("exhaustive")
    config = load_search_config(project / "s.yaml")
    config = replace(config, search=replace(config.search, exhaustive=True))
    result = run_search(config, out / "o", executor=SerialExecutor())
    return result.report


# --------------------------------------------------------------------------- the space and the predictions


def test_space_names_and_size() -> None:
    section = SearchSection(remove=(2, 1), select=("lowest", "span"), heal=(False, True), precision=("fp32", "int8"),
                            sparsity=("none", "wanda"))
    names = [c.name for c in candidates(section)]
    assert len(names) == len(set(names)) == 4 + 2 * 2 * 2 * 4  # r0 once per pass setting; 2 depths x 2 rules x 2 heal
    assert names[:4] == ["r0-fp32", "r0-fp32-24wanda", "r0-int8", "r0-int8-24wanda"]
    assert "r2-span-heal-int8-24wanda" in names
    assert section.space()["size"] == 36
    assert section.space()["remove"] == [0, 1, 2]
    assert Candidate(0, "lowest", False, "fp32", "none").settings() == {
        "remove": 0, "select": None, "heal": None, "precision": "fp32", "sparsity": "none"}


def test_prediction_formula() -> None:
    c = Candidate(2, "lowest", False, "int8", "none")
    got = predict(c, depth=Depth(loss=0.004, size_bytes=600.0, removed_share=0.25),
                  reference=Numbers(fidelity=0.995, median_ms=4.0, p99_ms=5.0, size_bytes=300.0),
                  original=Numbers(fidelity=1.0, median_ms=10.0, p99_ms=12.0, size_bytes=1000.0))
    assert got.fidelity == pytest.approx(1 - (0.004 + 0.005), abs=1e-12)
    assert got.median_ms == pytest.approx(3.0)
    assert got.p99_ms == pytest.approx(3.75)
    assert got.size_bytes == pytest.approx(180.0)
    # a removed share above 95 % still leaves 5 % of the time
    assert predict(c, depth=Depth(0.0, 600.0, 0.99), reference=Numbers(1.0, 4.0, 5.0, 300.0),
                   original=Numbers(1.0, 10.0, 12.0, 1000.0)).median_ms == pytest.approx(0.2)


def test_skip_rules() -> None:
    median = SearchSection(goal="median", target_fidelity=0.99, margin=0.005, latency_margin=0.1)
    pareto = SearchSection(goal="pareto", target_fidelity=0.99, margin=0.005, latency_margin=0.1)
    low = Numbers(fidelity=0.97, median_ms=1.0)
    assert skip_reason(low, median, best=None) == "predicted fidelity 0.97000 < target 0.99 - margin 0.005"
    assert skip_reason(Numbers(0.987, 1.0), median, best=None) is None  # within the margin: built
    slow = Numbers(fidelity=0.999, median_ms=2.3)
    assert skip_reason(slow, median, best=("a", 2.0)) == "predicted median_ms 2.3 ms > best measured 2 ms (a) + 10%"
    assert skip_reason(Numbers(0.999, 2.1), median, best=("a", 2.0)) is None
    measured = [("m", Numbers(0.999, 1.0))]
    assert skip_reason(Numbers(0.98, 2.0), pareto, best=None, measured=measured).startswith("dominated by m")
    assert skip_reason(Numbers(0.9999, 2.0), pareto, best=None, measured=measured) is None  # more faithful: on the front
    assert best_measured({"b": Numbers(0.99, 1.0), "a": Numbers(0.995, 1.0), "c": Numbers(0.98, 0.5)},
                         goal="median", target=0.99) == ("a", 1.0)  # c misses the target; a tie goes to the name


# --------------------------------------------------------------------------- config errors


def test_config_errors(project: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_search_config(_config(project, tmp_path, search="  remvoe: [1]\n"))
    assert "unknown key 'remvoe' in section 'search'" in e.value.message
    path = _config(project, tmp_path)
    path.write_text(path.read_text().replace("prune:\n", "prune:\n  remove: 2\n"))
    with pytest.raises(ConfigError) as e:
        load_search_config(path)
    assert e.value.message == (f"{path}: prune.remove: the search sets it per candidate (search.remove, "
                               "search.select, search.heal)")
    with pytest.raises(ConfigError) as e:
        load_search_config(_config(project, tmp_path, search="  select: [auto]\n"))
    assert "'auto' is not one of last, lowest, measured, random, segment, span" in e.value.message
    path = _config(project, tmp_path).with_name("t.yaml")
    path.write_text(CONFIG.split("search:")[0].replace("net.onnx", str(project / "net.onnx"))
                    .replace("npz: calib", f"npz: {project / 'calib'}"))
    with pytest.raises(ConfigError, match="no 'search' section: nothing to search"):
        load_search_config(path)
    from compress.pipeline import load_config

    with pytest.raises(ConfigError, match="section 'search' is read by 'compress search'"):
        load_config(_config(project, tmp_path))


def test_too_many_blocks(project: Path, tmp_path: Path) -> None:
    config = load_search_config(_config(project, tmp_path).with_name("s.yaml"))
    config = replace(config, search=replace(config.search, remove=(0, 9)))
    with pytest.raises(ConfigError, match="search.remove: 9 blocks asked for, but only 4 of the 4 blocks can be removed"):
        run_search(config, tmp_path / "o", executor=SerialExecutor())


# --------------------------------------------------------------------------- whole searches


def test_exhaustive_reference(exhaustive: dict) -> None:
    rows = _by_name(exhaustive)
    assert exhaustive["counts"] == {"candidates": 6, "built": 5, "skipped": 1, "failed": 0, "resumed": 0}
    # even an exhaustive search does not quantize a pruned model that alone misses the target
    assert rows["r2-lowest-int8"]["status"] == "skipped"
    assert rows["r2-lowest-int8"]["reason"].startswith("its pruned model r2-lowest alone has fidelity 0.")
    assert rows["r2-lowest-int8"]["reason"].endswith("< target 0.6: no pass brings it back")
    rows.pop("r2-lowest-int8")
    fid = {n: r["measured"]["fidelity"] for n, r in rows.items()}
    assert fid["r0-fp32"] == 1.0
    assert fid["r1-lowest-fp32"] >= 0.6 > fid["r2-lowest-fp32"], fid  # the target splits the space
    # the pruned model's fidelity is the prune stage's own held-out measurement
    assert rows["r1-lowest-fp32"]["measured"]["size_bytes"] < rows["r0-fp32"]["measured"]["size_bytes"]
    assert exhaustive["winner"] in rows
    assert rows[exhaustive["winner"]]["meets_target"] is True
    chosen = [n for n, r in rows.items() if r["chosen"]]
    assert chosen == [exhaustive["winner"]]
    feasible = {n: r["measured"]["size_bytes"] for n, r in rows.items() if r["measured"]["fidelity"] >= 0.6}
    assert exhaustive["winner"] == min(sorted(feasible), key=feasible.get)
    for r in rows.values():  # infeasible candidates are not timed
        assert (r["measured"].get("median_ms") is None) == (r["measured"]["fidelity"] < 0.6), r


def test_ray_search_matches_exhaustive(project: Path, exhaustive: dict, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from compress.search.execute import make_executor

    config = load_search_config(project / "s.yaml")
    executor = make_executor("ray", workers=2)
    try:
        report = run_search(config, tmp_path / "o", executor=executor).report
    finally:
        executor.close()
    assert report["executor"]["kind"] == "ray"
    assert report["executor"]["cpus"] == 2.0
    assert report["winner"] == exhaustive["winner"]
    rows = _by_name(report)
    assert report["counts"]["built"] < exhaustive["counts"]["built"]  # the prediction saved builds
    assert report["winner"] != "r0-fp32"  # a pruned model wins: it is timed back to back with the original
    assert report["confirmation"]["candidate"] == report["winner"]
    assert report["confirmation"]["speedup_median"] > 0
    assert report["counts"]["skipped"] >= 1
    for r in rows.values():
        if r["status"] == "skipped":
            assert r["reason"], r
            assert r["predicted"]["fidelity"] is not None, r
    skipped = rows["r2-lowest-int8"]
    assert skipped["status"] == "skipped"
    assert skipped["reason"].startswith("its pruned model r2-lowest alone")
    # measured numbers agree with the exhaustive run (fidelity is deterministic)
    ref = _by_name(exhaustive)
    for n, r in rows.items():
        if r["status"] == "measured":
            assert r["measured"]["fidelity"] == ref[n]["measured"]["fidelity"]
            if r["measured"].get("median_ms") is not None:
                assert r["where"]["device"] == "CPU (ONNX Runtime CPUExecutionProvider)"
            else:  # below the target: not timed
                assert r["meets_target"] is False
    best = tmp_path / "o" / "best"
    latency = json.loads((best / "latency.json").read_text())
    assert latency["comparison"]["speedup_median"] == pytest.approx(report["confirmation"]["speedup_median"])
    assert latency["baseline"]["model"].endswith("(original)")
    assert "fidelity" in latency["comparison"]
    assert {p.name for p in best.iterdir()} >= {"model.onnx", "latency.json", "trtexec.sh", "candidate.json"}
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"search.json", "search.md", "calib", "search"}
    assert str(tmp_path) not in (tmp_path / "o" / "search.md").read_text()


def test_failed_candidate_is_recorded_and_resume_redoes_nothing(project: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.build

    real = compress.build.run_passes

    def broken(model, config, *, data=None):  # noqa: ANN001, ANN202
        if config.precision == "int8":
            raise CompressError("int8: planted failure", hint="none")
        return real(model, config, data=data)

    config = load_search_config(project / "s.yaml")
    monkeypatch.setattr(compress.build, "run_passes", broken)
    first = run_search(config, tmp_path / "o", executor=SerialExecutor()).report
    rows = _by_name(first)
    assert rows["r0-int8"]["status"] == "failed"
    assert rows["r0-int8"]["reason"] == "build: int8: planted failure"
    assert first["winner"] is not None
    assert first["counts"]["failed"] >= 1
    monkeypatch.setattr(compress.build, "run_passes", real)

    calls: list[str] = []
    import compress.pipeline.cache as cache

    real_stage = cache.run_stage

    def counting(run, name, inputs, work):  # noqa: ANN001, ANN202
        record = real_stage(run, name, inputs, work)
        calls.append(f"{name}: {record.status}")
        return record

    monkeypatch.setattr(cache, "run_stage", counting)
    import compress.pipeline.stages as stages
    import compress.search.tasks as tasks

    monkeypatch.setattr(tasks, "run_stage", counting)
    monkeypatch.setattr(stages, "run_stage", counting)
    second = run_search(config, tmp_path / "o", executor=SerialExecutor()).report
    ran = [c for c in calls if c.endswith(": ran")]
    assert all("int8" in c for c in ran), ran  # only the candidates that failed before are redone
    assert _by_name(second)["r0-int8"]["status"] == "measured"
    done_before = [n for n, r in rows.items() if r["status"] == "measured"]
    for n in done_before:
        assert _by_name(second)[n]["stage"] == "skipped (unchanged)", n
    assert second["counts"]["resumed"] >= len(done_before)


def test_interrupted_search_resumes(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.build

    real = compress.build.benchmark
    seen: list[int] = []

    def interrupting(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    config = load_search_config(project / "s.yaml")
    monkeypatch.setattr(compress.build, "benchmark", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, tmp_path / "o", executor=SerialExecutor())
    finished = sorted(p.name for p in (tmp_path / "o" / "search" / "bench").iterdir() if (p / "stage.json").is_file())
    assert len(finished) == 2
    monkeypatch.setattr(compress.build, "benchmark", real)
    report = run_search(config, tmp_path / "o", executor=SerialExecutor()).report
    rows = _by_name(report)
    for n in finished:
        assert rows[n]["stage"] == "skipped (unchanged)", n


def test_cli_gate_on_the_winner(project: Path, tmp_path: Path, run_cli) -> None:  # noqa: ANN001
    path = _config(project, tmp_path, extra="gates:\n  max_latency_ms: 0.000001\n")
    r = run_cli(["search", path, "-o", tmp_path / "o", "--executor", "serial"])
    assert r.code == 3, r.err
    assert "gate failed: max-latency" in r.err
    report = json.loads((tmp_path / "o" / "search.json").read_text())
    assert [g["name"] for g in report["gates"]] == ["max-latency"]
    assert report["gates"][0]["passed"] is False
    r = run_cli(["search", path, "-o", tmp_path / "o2", "--executor", "serial", "--json"])
    assert json.loads(r.out)["winner"] == report["winner"]


def test_near_ties_are_retimed_side_by_side(project: Path, tmp_path: Path) -> None:
    """With goal median and a wide latency margin every feasible candidate is a contender of the runoff."""
    path = _config(project, tmp_path, search="  latency_margin: 100\n")
    path.write_text(path.read_text().replace("goal: size", "goal: median"))
    report = run_search(load_search_config(path), tmp_path / "o", executor=SerialExecutor()).report
    runoff = report["runoff"]
    rows = _by_name(report)
    feasible = sorted(n for n, r in rows.items() if r["status"] == "measured" and r["meets_target"])
    assert len(feasible) >= 2
    assert set(runoff["contenders"]) <= set(feasible)
    assert len(runoff["contenders"]) == min(4, len(feasible))
    for n in runoff["contenders"]:
        t = runoff["times"][n]
        assert len(t["round_medians_ms"]) == runoff["rounds"] == 3
        assert t["median_ms"] == pytest.approx(sorted(t["round_medians_ms"])[1])
    assert report["winner"] == runoff["winner"] in runoff["contenders"]
    assert [n for n, r in rows.items() if r["chosen"]] == [report["winner"]]
    if not runoff["tie_broken_by_fidelity"]:
        assert runoff["winner"] == runoff["fastest"]
    assert "re-timed side by side (3 rounds, alternating)" in (tmp_path / "o" / "search.md").read_text()
