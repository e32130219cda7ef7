"""The one shape of a stage: ``stage(model, config, *, data=None) -> (model, report)`` (compress.stage).

Each stage is run end to end on a tiny seeded model: its signature, the model it returns
(never the input object, the input unchanged), and its report (a dataclass satisfying
``compress.stage.Report``: ``schema_version`` and a JSON-ready ``to_dict()`` that carries it).
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import onnx
import pytest
import torch

import models
from compress.blocks import MappedModel, find_blocks
from compress.build import BuildConfig, BuiltModel, benchmark, run_passes
from compress.export import ExportConfig, export
from compress.onnx_io import model_digest
from compress.passes import Fp16Config, get_pass
from compress.passes.base import describe_batches
from compress.prune import PruneConfig, prune
from compress.scoring.collect import ScoreConfig, score
from compress.stage import Report

STAGES = [export, score, prune, run_passes, benchmark]


@pytest.mark.parametrize("stage", STAGES, ids=lambda f: f.__name__)
def test_every_stage_takes_model_config_and_keyword_data(stage) -> None:
    params = list(inspect.signature(stage).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "config"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:2])
    data = inspect.signature(stage).parameters["data"]
    assert data.kind is inspect.Parameter.KEYWORD_ONLY
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])


def _check_report(report: object, schema: int = 1) -> dict:
    assert isinstance(report, Report)
    assert dataclasses.is_dataclass(report)
    d = report.to_dict()
    assert d["schema_version"] == report.schema_version == schema
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    with pytest.raises(TypeError):  # fixed by the stage: not a constructor argument
        type(report)(**{f.name: None for f in dataclasses.fields(report)})
    return d


@pytest.fixture(scope="module")
def chain():
    """export -> score -> prune on a 4-block transformer, and the calibration batches."""
    module = models.tiny_transformer(seed=3)
    x = models.transformer_input(2, 8, seed=4)
    exported, export_report = export(module, ExportConfig(), data=(x,))
    batches = [{"x": models.transformer_input(2, 8, seed=10 + i).numpy()} for i in range(4)]
    return module, exported, export_report, batches


def test_export_returns_the_model_with_its_block_map(chain) -> None:
    module, exported, export_report, _ = chain
    assert isinstance(exported, MappedModel)
    assert [b.name for b in exported.block_map.blocks] == [f"blocks.{i}" for i in range(4)]
    d = _check_report(export_report)
    assert d["parity"]["ok"] is True
    assert [b.name for b in find_blocks(exported.proto).blocks] == [b.name for b in exported.block_map.blocks]


def test_score_returns_the_same_model_and_a_scores_report(chain) -> None:
    _, exported, _, batches = chain
    digest = model_digest(exported.proto)
    same, report = score(exported, ScoreConfig(metrics=("cosine",)), data=batches)
    assert same is exported
    assert model_digest(exported.proto) == digest  # not modified
    d = _check_report(report)
    assert len(d["metrics"]["cosine"]["scores"]) == 4
    assert d["calibration"]["batches"] == 4


def test_prune_returns_the_pruned_model_with_its_remaining_blocks(chain) -> None:
    module, exported, _, batches = chain
    digest = model_digest(exported.proto)
    pruned, report = prune(exported, PruneConfig(remove=2, metric="cosine", latency=None), data=batches)
    assert model_digest(exported.proto) == digest  # not modified
    removed = {b["index"] for b in report.removed}
    assert [b.name for b in pruned.block_map.blocks] == [f"blocks.{i}" for i in range(4) if i not in removed]
    assert [b.name for b in find_blocks(pruned.proto).blocks] == [b.name for b in pruned.block_map.blocks]
    d = _check_report(report)
    assert (d["blocks_before"], d["blocks_after"]) == (4, 2)
    assert "heal" not in d
    assert "measured" not in d
    assert "latency" not in d
    # the pruned graph is the torch module without those blocks
    kept = torch.nn.ModuleList([blk for i, blk in enumerate(module.blocks) if i not in removed])
    full_blocks, module.blocks = module.blocks, kept
    try:
        x = models.transformer_input(2, 8, seed=99)
        with torch.no_grad():
            expected = module(x).numpy()
    finally:
        module.blocks = full_blocks
    from compress.runtime import make_session

    got = make_session(pruned.proto).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_passes_and_benchmark_return_models_and_reports(chain) -> None:
    _, exported, _, batches = chain
    config = BuildConfig(precision="fp16", warmup_ms=0.0, iterations=3, duration=0.0)
    final, passes = run_passes(exported.proto, config, data=batches)
    assert isinstance(final, onnx.ModelProto)
    assert final is not exported.proto
    d = _check_report(passes)
    assert [p["name"] for p in d["passes"]] == ["fp16"]
    assert d["input_sha256"] == model_digest(exported.proto) != d["output_sha256"] == model_digest(final)
    built, latency = benchmark(final, config, data=batches, baseline=exported.proto)
    assert isinstance(built, BuiltModel)
    assert built.proto is final
    assert built.engine is None
    assert built.trtexec.startswith("trtexec ")
    d = _check_report(latency)
    assert d["backend"] == "ort"
    assert d["candidate"]["model"] == "model.onnx"
    assert d["baseline"]["model"] == "baseline.onnx"
    assert d["comparison"]["fidelity"]["cosine"] > 0.99
    assert "engine" not in d  # ONNX Runtime: no engine summary
    # fp32, no sparsity: no pass runs and the model itself comes back
    same, nothing = run_passes(exported.proto, BuildConfig(), data=batches)
    assert same is exported.proto
    assert nothing.to_dict()["passes"] == []


@pytest.mark.parametrize("name", ["fp16", "int8", "smoothquant", "sparsity-2:4"])
def test_a_pass_takes_its_calibration_as_data_never_in_its_config(name: str, chain) -> None:
    _, exported, _, batches = chain
    registered = get_pass(name)
    assert "calibration" not in {f.name for f in dataclasses.fields(registered.config_type)}
    assert list(inspect.signature(registered.run).parameters) == ["model", "config", "data"]
    assert inspect.signature(registered.run).parameters["data"].kind is inspect.Parameter.KEYWORD_ONLY
    if name == "fp16":  # optional data: rule 7 reads it, and the report describes it
        _, without = registered(exported.proto, Fp16Config())
        _, with_data = registered(exported.proto, Fp16Config(), data=batches)
        assert (without.changes["calibration_batches"], without.config["calibration"]) == (0, None)
        assert with_data.changes["calibration_batches"] == len(batches)
        assert with_data.config["calibration"] == describe_batches(batches)
