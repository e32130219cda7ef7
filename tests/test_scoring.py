"""score: one ORT pass over calibration batches, checked against torch hooks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import models
from compress.blocks import MappedModel, find_blocks
from compress.cli import main
from compress.errors import BlockError, CalibrationError, ConfigError
from compress.runtime import make_session
from compress.scoring import MetricConfig
from compress.scoring.collect import ScoreConfig, score
from compress.surgery import remove_blocks

ALL = ("cosine", "cosine-signed", "angular", "cka", "ablation")


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    module = models.tiny_transformer(depth=4)
    path = models.export_onnx(module, models.transformer_input(), tmp_path_factory.mktemp("score") / "t.onnx",
                              exporter="dynamo", dynamic_batch=True)
    return module, onnx.load(path), path


def _batches(n: int, size: int = 3, tokens: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": models.transformer_input(size, tokens, seed=10 + i).numpy()} for i in range(n)]


def _reference_cosine(module, batches, *, signed: bool) -> np.ndarray:
    sums = np.zeros(len(module.blocks))
    count = 0
    for feed in batches:
        hooks = models.block_hooks(module, module.blocks, torch.from_numpy(feed["x"]))
        for i, (h_in, h_out) in enumerate(hooks):
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1).numpy().ravel()
            sums[i] += (1 - (cos if signed else np.abs(cos))).sum()
        count += feed["x"].shape[0] * feed["x"].shape[1]
    return sums / count


def test_cosine_scores_match_torch_hooks(transformer) -> None:
    module, model, _ = transformer
    batches = _batches(3)
    report = score(MappedModel(model, find_blocks(model)), ScoreConfig(metrics=("cosine", "cosine-signed")), data=batches)[1]
    np.testing.assert_allclose(report.scores("cosine"), _reference_cosine(module, batches, signed=False), rtol=1e-4)
    np.testing.assert_allclose(report.scores("cosine-signed"), _reference_cosine(module, batches, signed=True), rtol=1e-4)
    assert report.batches == 3
    assert report.samples == 9


def test_streaming_equals_one_shot(transformer) -> None:
    _, model, _ = transformer
    bm = find_blocks(model)
    batches = _batches(4)
    one = [{"x": np.concatenate([b["x"] for b in batches])}]
    config = ScoreConfig(metrics=("cosine", "angular"), options=MetricConfig(interval=2))
    a = score(MappedModel(model, bm), config, data=batches)[1]
    b = score(MappedModel(model, bm), config, data=one)[1]
    for metric in ("cosine", "angular"):
        np.testing.assert_allclose(np.array(a.scores(metric)[:3], dtype=float),
                                   np.array(b.scores(metric)[:3], dtype=float), rtol=1e-9)
        assert a.scores(metric)[3] is None  # the span 3..4 runs past the last block


def test_ablation_matches_direct_removal(transformer) -> None:
    _, model, _ = transformer
    bm = find_blocks(model)
    batches = _batches(2)
    report = score(MappedModel(model, bm), ScoreConfig(metrics=("ablation",)), data=batches)[1]
    full = make_session(model)
    for block in bm.blocks:
        pruned = make_session(remove_blocks(model, [block]))
        ref = np.concatenate([full.run(None, b)[0] for b in batches])
        out = np.concatenate([pruned.run(None, b)[0] for b in batches])
        # outputs are logits over 8 classes: the score is the mean KL(softmax(ref) || softmax(out))
        lr = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
        lo = out - np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1, keepdims=True)) - out.max(-1, keepdims=True)
        kl = (np.exp(lr) * (lr - lo)).sum(-1).mean()
        assert report.scores("ablation")[block.index] == pytest.approx(kl, rel=1e-4)


def test_cka_matrix_and_segments(transformer) -> None:
    _, model, _ = transformer
    report = score(MappedModel(model, find_blocks(model)), ScoreConfig(metrics=("cka",)), data=_batches(3))[1]
    cka = report.metrics["cka"]
    m = np.array(cka["matrix"])
    assert m.shape == (5, 5)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    segs = cka["segments"]
    assert segs[0][0] == 0
    assert segs[-1][1] == 4
    assert all(a[1] == b[0] for a, b in zip(segs, segs[1:], strict=False))


def test_errors(transformer) -> None:
    _, model, _ = transformer
    bm = find_blocks(model)
    with pytest.raises(ConfigError) as err:
        score(MappedModel(model, bm), ScoreConfig(metrics=("cosin",)), data=_batches(1))[1]
    assert err.value.message == "unknown metric 'cosin'; valid: ablation, angular, cka, cosine, cosine-signed, gradnorm"
    with pytest.raises(CalibrationError, match="the calibration data has no batches"):
        score(MappedModel(model, bm), ScoreConfig(), data=[])[1]
    with pytest.raises(CalibrationError, match="calibration batch 0 does not fit the model"):
        score(MappedModel(model, bm), ScoreConfig(), data=[{"x": np.zeros((2, 8, 5), np.float32)}])[1]
    nan = _batches(1)
    nan[0]["x"][0, 0, 0] = np.nan
    with pytest.raises(BlockError, match=r"block 0 \(blocks.0\) input contains NaN or Inf"):
        score(MappedModel(model, bm), ScoreConfig(), data=nan)[1]


def test_cli_scores_only_writes_json_markdown_and_plot(transformer, tmp_path, capsys) -> None:
    _, _, path = transformer
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(_batches(2)):
        np.savez(calib / f"b{i}.npz", **b)
    report = tmp_path / "scores.json"
    rc = main(["prune", str(path), "--calib", str(calib), "--scores-only", "--metric", "cosine,cka",
               "--report", str(report)])
    assert rc == 0
    data = json.loads(report.read_text())
    assert data["schema_version"] == 1
    assert set(data) == {"schema_version", "model", "model_sha256", "calibration", "blocks", "metrics", "config",
                         "timings_s", "providers"}
    assert data["calibration"]["random"] is False
    assert data["calibration"]["samples"] == 6
    assert [b["name"] for b in data["blocks"]] == [f"blocks.{i}" for i in range(4)]
    assert (tmp_path / "scores.md").read_text().startswith("## Block scores")
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path) not in report.read_text()
    assert "blocks.3" in capsys.readouterr().out
    # refuses to overwrite the report
    assert main(["prune", str(path), "--calib", str(calib), "--scores-only", "--report", str(report)]) == 1
    assert capsys.readouterr().err == f"error: output {report} already exists\nhint: pass --force to overwrite it\n"


def test_cli_random_calibration_is_labelled(transformer, tmp_path, capsys) -> None:
    _, _, path = transformer
    report = tmp_path / "r.json"
    assert main(["prune", str(path), "--random-calib", "2", "--random-dims", "batch=2", "--scores-only",
                 "--report", str(report)]) == 0
    assert json.loads(report.read_text())["calibration"]["random"] is True
    assert "**(random data, not real calibration)**" in (tmp_path / "r.md").read_text()


def test_cli_requires_calibration(transformer, capsys) -> None:
    _, _, path = transformer
    assert main(["prune", str(path), "--scores-only"]) == 1
    assert capsys.readouterr().err == ("error: calibration data is required\n"
                                       "hint: pass --calib DIR (or --random-calib N for a smoke test)\n")


def test_ablation_ort_failure_names_the_ablated_model(transformer, monkeypatch) -> None:
    """Issue 10: an ONNX Runtime failure of the model without a block is reported as that, not as
    "the calibration batch does not fit" (the full model ran the same batch)."""
    import compress.scoring.collect as collect

    _, model, _ = transformer
    bm = find_blocks(model)
    batches = _batches(1)
    real = collect.load_session
    sessions = []

    class Failing:
        def __init__(self, inner):
            self.inner = inner

        def run(self, names, feed):
            raise RuntimeError("Non-zero status code returned while running Add node")

        def get_providers(self):
            return self.inner.get_providers()

    def fake(m, **kw):
        sessions.append(m)
        s = real(m, **kw)
        return s if len(sessions) == 1 else Failing(s)  # the first session is the full model

    monkeypatch.setattr(collect, "load_session", fake)
    with pytest.raises(BlockError) as err:
        score(MappedModel(model, bm), ScoreConfig(metrics=("ablation",)), data=batches)[1]
    assert err.value.message == ("ablation: ONNX Runtime fails on the model without block 0 (blocks.0) on calibration "
                                 "batch 0 (the full model runs it): Non-zero status code returned while running Add node")
