"""Depth pruning: selection rules, the budget loop, verification, bad input, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

import models
from compress.blocks import MappedModel, find_blocks
from compress.cli import main
from compress.errors import BlockError, ConfigError
from compress.prune import SELECTIONS, Candidates, PruneConfig, choose_metric, prune, split_batches
from compress.reports.prune import prune_markdown
from compress.runtime import make_session

NO_LATENCY = {"latency": None}


def _cands(scores, removable=None, count=1, segments=None, seed=0) -> Candidates:
    removable = frozenset(range(len(scores)) if removable is None else removable)
    return Candidates(scores=scores, removable=removable, count=count, segments=segments, seed=seed)


def test_lowest_picks_the_lowest_removable_scores() -> None:
    pick = SELECTIONS.get("lowest")
    assert pick(_cands([0.5, 0.1, 0.3, 0.2], count=2)) == [1, 3]
    assert pick(_cands([0.5, 0.1, 0.3, 0.2], removable={0, 2, 3}, count=2)) == [2, 3]
    assert pick(_cands([0.5, None, 0.3], count=1)) == [2]  # unscored blocks are never chosen


def test_span_picks_the_lowest_contiguous_run() -> None:
    # span scores: scores[i] = input of block i vs output of block i+1 (interval 2)
    pick = SELECTIONS.get("span")
    assert pick(_cands([0.4, 0.3, 0.05, 0.2, None], count=2)) == [2, 3]
    assert pick(_cands([0.4, 0.3, 0.05, 0.2, None], removable={0, 1, 2, 4}, count=2)) == [1, 2]
    with pytest.raises(BlockError, match="no run of 2 contiguous removable blocks"):
        pick(_cands([0.1, 0.2, 0.3], removable={0, 2}, count=2))


def test_per_segment_takes_one_block_of_each_segment_first() -> None:
    pick = SELECTIONS.get("segment")
    scores = [0.9, 0.1, 0.2, 0.8, 0.3, 0.7]
    segments = [(0, 3), (3, 6)]
    assert pick(_cands(scores, count=2, segments=segments)) == [1, 4]  # not [1, 2]
    assert pick(_cands(scores, count=3, segments=segments)) == [1, 2, 4]
    with pytest.raises(BlockError, match="per-segment selection needs CKA segments"):
        pick(_cands(scores, count=1))
    # each segment keeps its most important block while other segments have spare ones
    assert pick(_cands(scores, count=4, segments=segments)) == [1, 2, 4, 5]
    assert pick(_cands(scores, count=5, segments=segments)) == [1, 2, 3, 4, 5]  # then representatives


def test_per_segment_never_empties_a_one_block_segment_first() -> None:
    # Regression (digits benchmark): block 0 is a segment of its own; it used to be removed first.
    pick = SELECTIONS.get("segment")
    scores = [0.2124, 0.0698, 0.0273, 0.0067, 0.0064, 0.0058]
    segments = [(0, 1), (1, 6)]
    assert pick(_cands(scores, count=2, segments=segments)) == [4, 5]
    assert pick(_cands(scores, count=4, segments=segments)) == [2, 3, 4, 5]
    assert pick(_cands(scores, count=5, segments=segments)) == [1, 2, 3, 4, 5]
    assert pick(_cands(scores, count=6, segments=segments)) == [0, 1, 2, 3, 4, 5]
    # a segment with a block that cannot be removed is represented by it: all its blocks are spare
    assert pick(_cands(scores, removable={0, 1, 2, 4, 5}, count=2, segments=[(0, 1), (1, 3), (3, 6)])) == [2, 5]


def test_auto_cuts_at_the_largest_relative_gap() -> None:
    pick = SELECTIONS.get("auto")
    assert pick(_cands([1.0, 0.011, 0.9, 0.01, 0.8, 0.7])) == [1, 3]
    # with uniform scores the cut can be no deeper than half the blocks
    assert len(pick(_cands([1.0, 1.01, 1.02, 1.03, 1.04, 1.05]))) <= 3
    assert pick(_cands([1.0])) == []


def test_baselines() -> None:
    assert SELECTIONS.get("last")(_cands([0.1, 0.2, 0.3, 0.4], removable={0, 1, 2}, count=2)) == [1, 2]
    a = SELECTIONS.get("random")(_cands([0.1] * 8, count=3, seed=7))
    assert a == SELECTIONS.get("random")(_cands([0.1] * 8, count=3, seed=7))
    assert len(set(a)) == 3


def test_too_many_blocks_is_an_error() -> None:
    with pytest.raises(BlockError) as err:
        SELECTIONS.get("lowest")(_cands([0.1, 0.2], count=3))
    assert err.value.message == "cannot remove 3 blocks: only 2 can be removed"


def test_unknown_rule_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        SELECTIONS.get("best")
    assert err.value.message == "unknown selection rule 'best'; valid: auto, last, lowest, measured, random, segment, span"


def test_split_batches_is_deterministic_and_disjoint() -> None:
    batches = [{"i": np.array([i])} for i in range(8)]
    score, held = split_batches(batches, 0.25)
    assert [int(b["i"][0]) for b in held] == [2, 6]
    assert [int(b["i"][0]) for b in score] == [0, 1, 3, 4, 5, 7]
    one = batches[:1]
    assert split_batches(one, 0.25) == (one, one)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    module = models.tiny_transformer(depth=4)
    path = models.export_onnx(module, models.transformer_input(), tmp_path_factory.mktemp("prune") / "t.onnx",
                              dynamic_batch=True)
    batches = [{"x": models.transformer_input(3, 8, seed=20 + i).numpy()} for i in range(8)]
    return module, onnx.load(path), path, batches


def _torch_without(module, removed):
    ref = copy.deepcopy(module)
    kept = [b for i, b in enumerate(ref.blocks) if i not in removed]
    ref.blocks = torch.nn.Sequential(*kept) if isinstance(ref.blocks, torch.nn.Sequential) else torch.nn.ModuleList(kept)
    return ref


def test_prune_model_matches_torch_and_reports(tiny) -> None:
    module, model, _, batches = tiny
    bm = find_blocks(model)
    pruned, report = prune(MappedModel(model, bm), PruneConfig(remove=2, **NO_LATENCY), data=batches)
    removed = [b["index"] for b in report.removed]
    assert len(removed) == 2
    x = models.transformer_input(3, 8, seed=99)
    with torch.no_grad():
        expected = _torch_without(module, removed)(x).numpy()
    sess = make_session(pruned.proto)
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)
    r = report.to_dict()
    assert (r["blocks_before"], r["blocks_after"]) == (4, 2)
    assert [b.name for b in pruned.block_map.blocks] == [f"blocks.{i}" for i in range(4) if i not in removed]
    assert r["params"]["before"] - r["params"]["after"] == sum(b["params"] for b in r["removed"])
    assert r["calibration"]["holdout_batches"] == 2
    assert 0 <= r["fidelity"]["loss"] <= 1
    # the removed blocks are the two lowest cosine scores
    scores = r["scores"]["cosine"]["scores"]
    assert sorted(removed) == sorted(sorted(range(4), key=lambda i: scores[i])[:2])


def test_default_metric_is_cosine_for_tokens_and_ablation_for_conv_blocks(tiny, tmp_path) -> None:
    _, model, _, batches = tiny
    assert choose_metric(find_blocks(model)) == (
        "cosine", "4 of 4 removable blocks take token/vector activations: cosine")
    module = models.tiny_resnet(depth=4)
    path = models.export_onnx(module, models.image_input(2, 8), tmp_path / "r.onnx", dynamic_batch=True)
    cnn = onnx.load(path)
    bm = find_blocks(cnn)
    assert choose_metric(bm) == (
        "ablation", "4 of 4 removable blocks take rank-4+ feature maps (convolutional): ablation")
    images = [{"x": models.image_input(4, 8, seed=30 + i).numpy()} for i in range(8)]
    pruned, report = prune(MappedModel(cnn, bm), PruneConfig(remove=1, **NO_LATENCY), data=images)
    r = report.to_dict()
    assert (r["method"]["metric"], r["method"]["metric_requested"]) == ("ablation", "auto")
    assert r["method"]["metric_choice"].endswith(": ablation")
    assert "Method: metric `ablation` (4 of 4 removable blocks take rank-4+ feature maps" in prune_markdown(r)
    scores = r["scores"]["ablation"]["scores"]
    removed = [b["index"] for b in r["removed"]]
    assert removed == [min(range(4), key=lambda i: scores[i])]
    x = models.image_input(3, 8, seed=99)
    with torch.no_grad():
        expected = _torch_without(module, removed)(x).numpy()
    sess = make_session(pruned.proto)
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)


def test_budget_stops_before_exceeding_and_keeps_the_original_if_nothing_fits(tiny) -> None:
    _, model, _, batches = tiny
    bm = find_blocks(model)
    loose_model, loose = prune(MappedModel(model, bm), PruneConfig(max_drop=1.0, **NO_LATENCY), data=batches)
    assert len(loose.removed) == 4  # every removal is within a budget of 1
    tight_model, tight = prune(MappedModel(model, bm), PruneConfig(max_drop=0.0, **NO_LATENCY), data=batches)
    assert tight.removed == []
    assert tight.steps[0]["accepted"] is False
    assert tight_model.proto == model
    mid_budget = sorted(s["loss"] for s in loose.steps)[1]
    mid_model, mid = prune(MappedModel(model, bm), PruneConfig(max_drop=mid_budget, **NO_LATENCY), data=batches)
    assert all(s["loss"] <= mid_budget for s in mid.steps if s["accepted"])
    assert mid.fidelity["loss"] <= mid_budget


def test_keep_and_bad_options(tiny) -> None:
    _, model, _, batches = tiny
    bm = find_blocks(model)
    kept_model, kept = prune(MappedModel(model, bm), PruneConfig(remove=3, keep=(0,), **NO_LATENCY), data=batches)
    assert sorted(b["index"] for b in kept.removed) == [1, 2, 3]
    # checked before any scoring, naming the config field
    with pytest.raises(ConfigError, match=r"^PruneConfig\.remove = 4: asks for 4 blocks, but only 3 of the 4 blocks can "
                                          r"be removed \(1 kept\) \(hint"):
        prune(MappedModel(model, bm), PruneConfig(remove=4, keep=(0,), **NO_LATENCY), data=batches)
    with pytest.raises(ConfigError, match=r"^PruneConfig\.keep = 7: block 7 does not exist: the model has blocks 0\.\.3"):
        prune(MappedModel(model, bm), PruneConfig(remove=1, keep=(7,), **NO_LATENCY), data=batches)
    with pytest.raises(ConfigError, match=r"^PruneConfig\.keep = 7: block 7 does not exist"):  # the budget path too
        prune(MappedModel(model, bm), PruneConfig(max_drop=0.5, keep=(7,), **NO_LATENCY), data=batches)
    with pytest.raises(ConfigError, match="say how much to prune"):
        prune(MappedModel(model, bm), PruneConfig(**NO_LATENCY), data=batches)


def test_latency_report_has_ideal_and_efficiency(tiny) -> None:
    from compress.bench import BenchConfig

    _, model, _, batches = tiny
    r = prune(MappedModel(model, find_blocks(model)), PruneConfig(remove=2, latency=BenchConfig(warmup_s=0.01, duration_s=0.05)), data=batches)[1].to_dict()
    lat = r["latency"]
    assert set(lat["block_ms"]) == {"0", "1", "2", "3"}
    assert lat["ideal_speedup"] > 1
    assert lat["efficiency_ratio"] == pytest.approx(lat["speedup_median"] / lat["ideal_speedup"])


def test_ideal_speedup_is_undefined_when_the_blocks_alone_take_the_whole_model(tiny, monkeypatch) -> None:
    import compress.prune.cost as pr
    from compress.bench import summarize

    _, model, _, batches = tiny
    bm = find_blocks(model)
    # tiny models: each block timed alone costs about as much as the whole model (per-call overhead)
    monkeypatch.setattr(pr, "time_model", lambda m, feed, config: summarize([1.0, 1.0, 1.0]))
    monkeypatch.setattr(pr, "block_times", lambda m, b, feed, config: {0: 0.6, 1: 0.6, 2: 0.6, 3: 0.6})
    lat = pr._latency(model, model, bm, bm.blocks[:2], batches[0], pr.BenchConfig())
    assert (lat["ideal_speedup"], lat["efficiency"], lat["efficiency_ratio"]) == (None, None, None)
    lat = pr._latency(model, model, bm, bm.blocks[:1], batches[0], pr.BenchConfig())
    assert lat["ideal_speedup"] == pytest.approx(1 / 0.4)
    assert lat["efficiency_ratio"] == pytest.approx(0.4)


def _calib_dir(tmp_path, batches):
    d = tmp_path / "calib"
    d.mkdir()
    for i, b in enumerate(batches):
        np.savez(d / f"b{i:02d}.npz", **b)
    return str(d)


def test_cli_prune_writes_model_block_map_and_report(tiny, tmp_path, capsys) -> None:
    _, model, path, batches = tiny
    calib = _calib_dir(tmp_path, batches)
    out = tmp_path / "pruned.onnx"
    rc = main(["prune", str(path), "--calib", calib, "-o", str(out), "--remove", "1", "--no-latency",
               "--report", str(tmp_path / "prune.json")])
    assert rc == 0
    assert len(onnx.load(str(out)).graph.node) < len(model.graph.node)
    bm = json.loads((tmp_path / "pruned.blocks.json").read_text())
    assert len(bm["blocks"]) == 3
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["output"] == "pruned.onnx"
    assert (tmp_path / "prune.md").read_text().startswith("## Pruned t.onnx: 4 -> 3 blocks")
    assert str(tmp_path) not in (tmp_path / "prune.json").read_text()
    # the pruned model is self-describing for the next round
    assert main(["inspect", str(out)]) == 0
    assert "3 blocks in blocks" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["-o", "{model}", "--remove", "1"], "error: output {model} is the input file\n"
                                         "hint: choose another -o; inputs are never overwritten\n"),
    (["-o", "{tmp}/p.onnx"], "error: say how much to prune\n"
                             "hint: pass one of --remove N, --ratio R, --auto or --max-drop X\n"),
    (["-o", "{tmp}/p.onnx", "--remove", "9"],
     "error: --remove 9: asks for 9 blocks, but only 4 of the 4 blocks can be removed\n"
     "hint: ask for fewer blocks (see 'compress inspect'), or keep fewer\n"),
    (["-o", "{tmp}/p.onnx", "--remove", "1", "--keep", "9"],
     "error: --keep 9: block 9 does not exist: the model has blocks 0..3 (see 'compress inspect')\n"
     "hint: e.g. --keep 0\n"),
    (["-o", "{tmp}/p.onnx", "--ratio", "1.5"], "error: --ratio 1.5 must be between 0 and 1\nhint: e.g. --ratio 0.25\n"),
    (["-o", "{tmp}/p.onnx", "--remove", "1", "--metric", "cosine,cka"],
     "error: --metric cosine,cka: pruning ranks blocks by one metric\nhint: pass a single metric, e.g. --metric cosine (or leave --metric out: auto)\n"),
])
def test_cli_bad_input(tiny, tmp_path, capsys, extra, message) -> None:
    _, _, path, batches = tiny
    calib = _calib_dir(tmp_path, batches)
    args = ["prune", str(path), "--calib", calib, "--no-latency"]
    args += [a.replace("{model}", str(path)).replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(args) == 1
    assert capsys.readouterr().err == message.replace("{model}", str(path))
    assert not (tmp_path / "p.onnx").exists()


def test_cli_sweep(tiny, tmp_path, capsys) -> None:
    _, _, path, batches = tiny
    report = tmp_path / "sweep.json"
    assert main(["prune", str(path), "--calib", _calib_dir(tmp_path, batches), "--sweep", "0:2",
                 "--latency-seconds", "0.05", "--report", str(report)]) == 0
    rows = json.loads(report.read_text())["sweep"]
    assert [r["removed"] for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["blocks"] == []
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
