"""``--select measured``: candidate removal sets evaluated on the held-out batches, the best one kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from compress.blocks import MappedModel, find_blocks
from compress.cli import main
from compress.errors import BlockError
from compress.fidelity import HeldOut, compare_models
from compress.prune import (
    SELECTIONS,
    Candidates,
    PruneConfig,
    mark_fronts,
    pareto_front,
    prune,
    split_batches,
)
from compress.prune.heal import _better
from compress.surgery import remove_blocks

NO_LATENCY = {"latency": None}


def _batches(n: int = 8, seed: int = 50) -> list[dict[str, np.ndarray]]:
    return [{"x": models.transformer_input(3, 8, seed=seed + i).numpy()} for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    module = models.tiny_transformer(depth=6, seed=4)
    path = models.export_onnx(module, models.transformer_input(), tmp_path_factory.mktemp("measured") / "t.onnx",
                              dynamic_batch=True)
    model = onnx.load(path)
    return path, model, find_blocks(model)


def _best(rows):
    best = rows[0]
    for r in rows[1:]:
        if _better(r, best):
            best = r
    return best


@pytest.mark.parametrize("remove", [1, 2, 3])
def test_measured_keeps_the_candidate_with_the_best_independently_measured_fidelity(tiny, remove) -> None:
    _, model, bm = tiny
    batches = _batches()
    pruned, report = prune(MappedModel(model, bm), PruneConfig(metric="cosine", remove=remove, select="measured", **NO_LATENCY), data=batches)
    table = report.measured["candidates"]
    sets = [tuple(r["blocks"]) for r in table]
    assert len(sets) == len(set(sets)) >= 2  # deduplicated, and more than the default alone
    assert all(len(s) == remove for s in sets)
    _, held = split_batches(batches, 0.25)
    measured = []
    for row in table:  # every candidate evaluated on its own, with a fresh reference session
        fid = compare_models(model, remove_blocks(model, [bm.blocks[i] for i in row["blocks"]]), held)
        assert fid["loss"] == pytest.approx(row["loss"], abs=1e-12)
        assert fid["cosine"] == pytest.approx(row["cosine"], abs=1e-9)
        measured.append({**row, "loss": fid["loss"], "cosine": fid["cosine"]})
    chosen = [r for r in table if r["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["blocks"] == _best(measured)["blocks"]
    assert [b["index"] for b in report.removed] == chosen[0]["blocks"]
    assert report.fidelity["loss"] == pytest.approx(compare_models(model, pruned.proto, held)["loss"], abs=1e-12)
    # The default rule is a candidate (the first), and the choice is never worse than it.
    default_model, default = prune(MappedModel(model, bm), PruneConfig(metric="cosine", remove=remove, select="lowest", **NO_LATENCY), data=batches)
    assert "lowest/cosine" in table[0]["rules"]
    assert table[0]["blocks"] == [b["index"] for b in default.removed]
    assert table[0]["loss"] == pytest.approx(default.fidelity["loss"], abs=1e-12)
    assert report.fidelity["loss"] <= default.fidelity["loss"]
    rules = {r.split("/")[0] for row in table for r in row["rules"]}
    assert {"lowest", "span", "segment"} <= rules


def test_measured_with_heal_tries_each_candidate_healed_and_is_never_worse_than_the_default(tiny) -> None:
    _, model, bm = tiny
    batches = _batches()
    cfg = PruneConfig(metric="cosine", remove=3, heal=True, select="lowest", **NO_LATENCY)
    pruned, report = prune(MappedModel(model, bm), PruneConfig(**{**cfg.__dict__, "select": "measured"}), data=batches)
    default_model, default = prune(MappedModel(model, bm), cfg, data=batches)
    table = report.measured["candidates"]
    assert {r["healed"] for r in table} == {False, True}
    for r in table:
        if r["healed"]:  # a healed row follows the plain row of the same set and is strictly better than it
            plain = next(p for p in table if p["blocks"] == r["blocks"] and not p["healed"])
            assert _better(r, plain)
    _, held = split_batches(batches, 0.25)
    independent = compare_models(model, pruned.proto, held)
    chosen = next(r for r in table if r["chosen"])
    assert independent["loss"] == pytest.approx(chosen["loss"], abs=1e-12)
    assert chosen is _best(table)
    assert report.fidelity["loss"] <= default.fidelity["loss"] + 1e-12
    assert report.heal["spans"]  # the chosen candidate's healing table
    assert report.measured["heal_fit_passes"] == 1


def test_held_out_reference_matches_compare_models(tiny) -> None:
    _, model, bm = tiny
    _, held = split_batches(_batches(), 0.25)
    pruned = remove_blocks(model, [bm.blocks[1], bm.blocks[4]])
    a, b = HeldOut(model, held).fidelity(pruned), compare_models(model, pruned, held)
    assert a == b


def test_the_registered_rule_needs_the_model() -> None:
    c = Candidates(scores=[0.1, 0.2, 0.3], removable=frozenset({0, 1, 2}), count=1)
    with pytest.raises(BlockError) as err:
        SELECTIONS.get("measured")(c)
    assert err.value.message == ("selection 'measured' evaluates pruned models on held-out batches: it needs the model")


def _calib_folder(tmp_path: Path) -> Path:
    """``tmp_path/calib`` holding the test batches as ``bNN.npz``."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(_batches()):
        np.savez(calib / f"b{i:02d}.npz", **b)
    return calib


def test_cli_measured_writes_the_candidate_table_to_json_and_markdown(tiny, tmp_path) -> None:
    path, _, _ = tiny
    calib = _calib_folder(tmp_path)
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    rc = main(["prune", str(path), "--calib", str(calib), "-o", str(out), "--remove", "2",
               "--measured", "--metric", "cosine", "--no-latency", "--report", str(rep)])
    assert rc == 0
    report = json.loads(rep.read_text())
    assert report["method"]["select"] == "measured"
    table = report["measured"]["candidates"]
    assert sum(r["chosen"] for r in table) == 1
    md = rep.with_suffix(".md").read_text()
    assert "Chosen by measured fidelity" in md
    assert "| rules | blocks | healed | held-out loss | cosine | chosen |" in md
    for r in table:
        assert f"| {', '.join(r['rules'])} | {', '.join(map(str, r['blocks']))} |" in md
    assert onnx.load(out).graph.node  # the chosen model was written


def test_pareto_front_is_exact_on_a_small_table() -> None:
    pts = [(3.0, 0.10),   # 0: on the front
           (1.0, 0.50),   # 1: on (cheapest)
           (2.0, 0.50),   # 2: dominated by 1 (same loss, costlier)
           (2.0, 0.20),   # 3: on
           (1.0, 0.60),   # 4: dominated by 1 (same cost, worse)
           (3.0, 0.10),   # 5: equal to 0: on as well
           (None, 0.0),   # 6: no latency: never on
           (4.0, 0.10),   # 7: dominated by 0
           (5.0, 0.05),   # 8: on
           (2.5, float("nan"))]  # 9: never on
    assert pareto_front(pts) == [1, 3, 0, 5, 8]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]


def test_mark_fronts_marks_rows_by_latency_and_candidates_by_params() -> None:
    def cand(params, loss):
        return {"rules": ["lowest/cosine"], "blocks": [], "healed": False, "loss": loss, "cosine": 1.0,
                "params": params, "chosen": False}

    rows = [{"removed": 0, "loss": 0.0, "params": 100, "median_ms": 1.0, "candidates": [cand(100, 0.0)]},
            {"removed": 1, "loss": 0.3, "params": 80, "median_ms": 1.2, "candidates": [cand(95, 0.3), cand(90, 0.1)]},
            {"removed": 2, "loss": 0.4, "params": 60, "median_ms": 0.5, "candidates": [cand(60, 0.4), cand(70, 0.5)]}]
    mark_fronts(rows)
    assert [r["front"] for r in rows] == [True, False, True]  # 1.2 ms, loss 0.3 is dominated by 1.0 ms, loss 0
    assert [r["params_front"] for r in rows] == [True, True, True]
    assert [[c["front"] for c in r["candidates"]] for r in rows] == [[True], [False, True], [True, False]]


def test_cli_sweep_lists_every_candidate_and_marks_the_fronts(tiny, tmp_path) -> None:
    path, _, _ = tiny
    calib = _calib_folder(tmp_path)
    rep = tmp_path / "s.json"
    assert main(["prune", str(path), "--calib", str(calib), "--sweep", "0:2", "--metric", "cosine", "--measured",
                 "--latency-seconds", "0.02", "--report", str(rep)]) == 0
    rows = json.loads(rep.read_text())["sweep"]
    assert [r["removed"] for r in rows] == [0, 1, 2]
    assert all(sum(c["chosen"] for c in r["candidates"]) == 1 for r in rows)
    assert len(rows[2]["candidates"]) >= 2
    assert [i for i, r in enumerate(rows) if r["front"]] == sorted(pareto_front([(r["median_ms"], r["loss"])
                                                                                   for r in rows]))
    every = [c for r in rows for c in r["candidates"]]
    assert [c["front"] for c in every] == [i in set(pareto_front([(c["params"], c["loss"]) for c in every]))
                                           for i in range(len(every))]
    assert rows[0]["front"]  # the unpruned model: no loss
    assert rows[0]["candidates"][0]["front"]
    md = rep.with_suffix(".md").read_text()
    assert "Pareto front of held-out loss against parameters" in md
    assert rep.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_a_candidate_metric_that_fails_leaves_the_default_rule_and_a_note(tiny, monkeypatch) -> None:
    import compress.prune.measured as measured_module

    _, model, bm = tiny
    real = measured_module.score

    def no_cka(model, config, **kw):
        if "cka" in config.metrics:
            raise BlockError("cka: not for this model", hint="-")
        return real(model, config, **kw)

    monkeypatch.setattr(measured_module, "score", no_cka)
    pruned, report = prune(MappedModel(model, bm), PruneConfig(metric="cosine", remove=2, select="measured", **NO_LATENCY), data=_batches())
    m = report.measured
    assert m["notes"][0] == "the candidate metrics cosine-signed, angular, cka were not scored: cka: not for this model"
    rules = {r for row in m["candidates"] for r in row["rules"]}
    assert rules == {"lowest/cosine", "span/cosine"}
    assert m["candidates"][0]["rules"][0] == "lowest/cosine"


def test_measured_adds_gradnorm_candidates_when_the_block_map_carries_gradnorm(tiny) -> None:
    _, model, bm = tiny
    batches = _batches()
    from compress.scoring.gradnorm import with_gradnorms

    plain_model, plain = prune(MappedModel(model, bm), PruneConfig(metric="cosine", remove=2, select="measured", **NO_LATENCY), data=batches)
    assert not any("gradnorm" in r for row in plain.measured["candidates"] for r in row["rules"])
    assert any(n.startswith("no gradnorm candidates") for n in plain.measured["notes"])
    # GradNorm that calls the first two blocks least important: a set no other rule needs to give
    names = [b.name for b in bm.blocks]
    graded = with_gradnorms(bm, {n: (0.01 * (i + 1) if i < 2 else 5.0 + i) for i, n in enumerate(names)}, "test loss")
    pruned, report = prune(MappedModel(model, graded), PruneConfig(metric="cosine", remove=2, select="measured", **NO_LATENCY), data=batches)
    table = report.measured["candidates"]
    by_rule = {r: row["blocks"] for row in table for r in row["rules"]}
    assert by_rule["lowest/gradnorm"] == [0, 1]
    assert by_rule["span/gradnorm"] == [0, 1]
    assert "lowest/cosine" in table[0]["rules"]  # the default stays the first candidate
    _, held = split_batches(batches, 0.25)
    row = next(r for r in table if "lowest/gradnorm" in r["rules"])
    fid = compare_models(model, remove_blocks(model, [bm.blocks[0], bm.blocks[1]]), held)
    assert fid["loss"] == pytest.approx(row["loss"], abs=1e-12)
    assert report.fidelity["loss"] <= min(r["loss"] for r in table if not r["healed"]) + 1e-12
