"""Training-free healing (--heal): a closed-form linear map per removed span, kept only where it helps."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import compress.onnx_io
import models
from compress.blocks import MappedModel, find_blocks
from compress.prune import PruneConfig, prune, removed_spans
from compress.runtime import make_session
from compress.scoring.heal import RIDGE_GRID, LinearFit, LinearMap
from compress.validate import FieldError

NO_LATENCY = {"latency": None}


class MaybeLinear(nn.Module):
    """A residual block; ``linear=True`` makes it exactly affine: ``x + fc2(fc1(x))``."""

    def __init__(self, dim: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return x + self.fc2(self.fc1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, linear: tuple[int, ...], depth: int = 4, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(MaybeLinear(dim, i in linear) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def _batches(n: int = 8, seed: int = 30) -> list[dict[str, np.ndarray]]:
    return [{"x": models.transformer_input(3, 8, seed=seed + i).numpy()} for i in range(n)]


@pytest.fixture(scope="module")
def linear_span(tmp_path_factory):
    torch.manual_seed(0)
    module = models._randomise(Net(linear=(1, 2)), 3)
    path = models.export_onnx(module, models.transformer_input(), tmp_path_factory.mktemp("heal") / "l.onnx",
                              dynamic_batch=True)
    return module, onnx.load(path)


def _heal_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.name.startswith("compress_heal_")]


def test_linear_fit_recovers_an_affine_map_and_reports_residuals() -> None:
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(6, 6)), rng.normal(size=6)
    fit = LinearFit(6, 6)
    for _ in range(3):
        x = rng.normal(size=(50, 6)).astype(np.float32)
        fit.update(x, x.astype(np.float64) @ w + b)
    m = fit.solve(1e-9)
    np.testing.assert_allclose(m.weight, w, atol=1e-6)
    np.testing.assert_allclose(m.bias, b, atol=1e-6)
    assert m.rows == 150
    assert m.residual < 1e-10
    assert m.skip_residual > 0.5
    # a huge ridge pulls the map to the identity: plain removal
    big = fit.solve(1e9)
    np.testing.assert_allclose(big.weight, np.eye(6), atol=1e-5)


def test_exactly_linear_span_is_healed_to_the_unpruned_model(linear_span) -> None:
    module, model = linear_span
    bm = find_blocks(model)
    assert len(bm.blocks) == 4
    config = PruneConfig(metric="cosine", remove=2, keep=(0, 3), heal=True, **NO_LATENCY)
    pruned, report = prune(MappedModel(model, bm), config, data=_batches())
    heal = report.heal
    assert [b["index"] for b in report.removed] == [1, 2]
    (span,) = heal["spans"]
    assert span["accepted"]
    assert span["blocks"] == ["blocks.1", "blocks.2"]
    (stream,) = span["streams"]
    assert stream["residual"] < 1e-6 < 0.01 < stream["skip_residual"]
    assert stream["tokens"] == 6 * 3 * 8  # 6 scoring batches of 3 x 8 tokens
    # no ridge given: each of the grid's strengths is measured on the held-out batches, the best is kept
    assert [r["ridge"] for r in span["ridges"]] == list(RIDGE_GRID)
    best = max(span["ridges"], key=lambda r: r["cosine"])
    assert span["ridge"] == best["ridge"] == stream["ridge"]
    assert span["cosine_with"] == best["cosine"]
    assert heal["fidelity_without"]["cosine"] < 0.99  # removal alone hurts ...
    assert heal["fidelity_with"]["cosine"] >= 0.9999  # ... the map repairs it
    assert report.fidelity == heal["fidelity_with"]
    assert _heal_nodes(pruned.proto) == ["MatMul", "Add"]
    compress.onnx_io.check_model(pruned.proto, full_check=True)
    # against torch, on data neither the fit nor the held-out check saw
    x = models.transformer_input(4, 8, seed=99)
    with torch.no_grad():
        expected = module(x).numpy()
    got = make_session(pruned.proto).run(
        None, {"x": x.numpy()})[0]
    cos = (got * expected).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_a_map_that_hurts_is_not_written(linear_span, monkeypatch) -> None:
    _, model = linear_span
    bm = find_blocks(model)
    base = PruneConfig(metric="cosine", remove=2, keep=(0, 3), **NO_LATENCY)
    plain_model, plain = prune(MappedModel(model, bm), base, data=_batches())

    def bad(self, ridge=0.0):  # a map far from anything the span does
        return LinearMap(weight=np.zeros((self.d_in, self.d_out)), bias=np.full(self.d_out, 50.0), rows=self.rows,
                         residual=1.0, skip_residual=None, ridge=ridge, lam=0.0)

    monkeypatch.setattr(LinearFit, "solve", bad)
    healed_model, healed = prune(MappedModel(model, bm), PruneConfig(metric="cosine", remove=2, keep=(0, 3), heal=True,
                                                            **NO_LATENCY), data=_batches())
    (span,) = healed.heal["spans"]
    assert not span["accepted"]
    assert "does not improve" in span["note"]
    assert span["loss_with"] > span["loss_without"]
    assert healed.heal["healed_spans"] == 0
    assert _heal_nodes(healed_model.proto) == []
    assert healed_model.proto.SerializeToString() == plain_model.proto.SerializeToString()
    assert healed.fidelity == plain.fidelity


def test_healing_is_never_worse_on_the_held_out_batches(tmp_path) -> None:
    module = models.tiny_transformer(depth=6, seed=4)
    path = models.export_onnx(module, models.transformer_input(), tmp_path / "t.onnx", dynamic_batch=True)
    model = onnx.load(path)
    bm = find_blocks(model)
    for remove in (2, 4):
        r = prune(MappedModel(model, bm), PruneConfig(metric="cosine", remove=remove, heal=True,
                                                                     **NO_LATENCY), data=_batches(8, seed=50))[1].to_dict()
        heal = r["heal"]
        assert len(heal["spans"]) == len(removed_spans([bm.blocks[b["index"]] for b in r["removed"]]))
        assert heal["fidelity_with"]["loss"] <= heal["fidelity_without"]["loss"]
        for span in heal["spans"]:
            if span["accepted"]:
                assert span["loss_with"] <= span["loss_without"]
                assert 0 <= span["streams"][0]["residual"] <= 1


def test_heal_config_is_validated() -> None:
    with pytest.raises(FieldError, match="heal_ridge"):
        PruneConfig(remove=1, heal=True, heal_ridge=-1.0)
    with pytest.raises(FieldError, match="heal"):
        PruneConfig(remove=1, heal="yes")  # type: ignore[arg-type]


def test_cli_heal_writes_the_healed_model_and_the_heal_table(linear_span, tmp_path) -> None:
    from compress.cli import main

    _, model = linear_span
    path = tmp_path / "l.onnx"
    compress.onnx_io.save_model(model, path)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(_batches()):
        np.savez(calib / f"b{i:02d}.npz", **b)
    out = tmp_path / "healed.onnx"
    assert main(["prune", str(path), "--calib", str(calib), "-o", str(out), "--remove", "2", "--keep", "0,3",
                 "--metric", "cosine", "--heal", "--heal-ridge", "1e-5", "--no-latency",
                 "--report", str(tmp_path / "prune.json")]) == 0
    assert _heal_nodes(onnx.load(out)) == ["MatMul", "Add"]
    md = (tmp_path / "prune.md").read_text()
    assert "Healing (ridge 1e-05, fitted on 6 scoring batches):" in md
    assert "| blocks.1, blocks.2 | x |" in md
    assert main(["prune", str(path), "--calib", str(calib), "-o", str(tmp_path / "x.onnx"), "--remove", "2",
                 "--heal", "--heal-ridge", "-1", "--no-latency"]) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_pipeline_prune_section_carries_heal_and_token_mask(tmp_path) -> None:
    from compress.pipeline import load_config

    (tmp_path / "m.onnx").write_bytes(b"")  # only its existence is checked when the config is read
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model:\n  source: m.onnx\ncalibration:\n  random: {batches: 2}\n"
                   "prune:\n  remove: 2\n  heal: true\n  heal_ridge: 0.01\n  token_mask: none\n")
    config = load_config(cfg).prune_config(remove=2)
    assert (config.heal, config.heal_ridge, config.options.token_mask) == (True, 0.01, "none")
    cfg.write_text("model:\n  source: m.onnx\ncalibration:\n  random: {batches: 2}\nprune:\n  remove: 2\n  heal: yes please\n")
    with pytest.raises(Exception, match="prune.heal: expected true or false"):
        load_config(cfg)


def test_multi_stream_span_gets_a_map_per_stream() -> None:
    pytest.importorskip("diffusers")
    import families
    from compress.prune import fit_spans
    from compress.surgery import remove_blocks

    fam = families.build("sd3", layers=3)
    model, _, _ = families.export(fam)
    bm = find_blocks(model)
    span = bm.blocks[:2]  # two joint blocks: image and text streams
    assert all(len(b.streams) == 2 for b in span)
    batches = [{k: v.numpy() for k, v in fam.make_inputs(s).items()} for s in range(4)]
    (fits,), mask = fit_spans(model, [span], batches)
    assert mask is None
    maps = [f.solve(1e-4) for f in fits]
    for st, m in zip(span[0].streams, maps, strict=True):
        assert m.residual < m.skip_residual, st.name
    # identity maps give exactly the plain removal; the fitted maps run and pass the checker
    d = {k: maps[k].weight.shape[0] for k in range(2)}
    identity = {(1, k): (span[0].streams[k].input, np.eye(d[k]), np.zeros(d[k]), 0) for k in range(2)}
    fitted = {(1, k): (span[0].streams[k].input, maps[k].weight, maps[k].bias, 0) for k in range(2)}
    plain = remove_blocks(model, span)
    same = remove_blocks(model, span, heal=identity)
    healed = remove_blocks(model, span, heal=fitted)
    assert sorted(_heal_nodes(healed)) == ["Add", "Add", "MatMul", "MatMul"]
    compress.onnx_io.check_model(healed, full_check=True)

    def run(m):
        return make_session(m).run(None, batches[0])[0]

    np.testing.assert_allclose(run(same), run(plain), rtol=1e-5, atol=1e-5)
    assert not np.allclose(run(healed), run(plain), atol=1e-3)
    with pytest.raises(Exception, match="not removed"):
        remove_blocks(model, span[:1], heal=fitted)


class MaybeLinearConv(nn.Module):
    """A residual conv block on ``[N, C, H, W]``; ``linear=True``: ``x + conv2(conv1(x))`` with 1x1 convs (exactly affine per pixel)."""

    def __init__(self, channels: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        k, pad = (1, 0) if linear else (3, 1)
        self.conv1 = nn.Conv2d(channels, channels, k, padding=pad)
        self.conv2 = nn.Conv2d(channels, channels, k, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return x + self.conv2(self.conv1(x))
        return x + self.conv2(torch.relu(self.conv1(x)))


class ConvNet(nn.Module):
    def __init__(self, linear: tuple[int, ...], depth: int = 4, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(MaybeLinearConv(channels, i in linear) for i in range(depth))
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean((2, 3)))


def test_a_linear_span_of_a_feature_map_is_healed_by_a_1x1_conv(tmp_path) -> None:
    """Issue 16: NCHW streams are healed too (channels first: one row of C features per pixel, a 1x1 Conv)."""
    torch.manual_seed(0)
    module = models._randomise(ConvNet(linear=(1, 2)), 4)
    path = models.export_onnx(module, models.image_input(2, 8), tmp_path / "c.onnx", dynamic_batch=True)
    model = onnx.load(path)
    bm = find_blocks(model)
    assert len(bm.blocks) == 4
    batches = [{"x": models.image_input(3, 8, seed=40 + i).numpy()} for i in range(8)]
    config = PruneConfig(metric="cosine", remove=2, keep=(0, 3), heal=True, heal_ridge=1e-9, **NO_LATENCY)
    pruned, report = prune(MappedModel(model, bm), config, data=batches)
    (span,) = report.heal["spans"]
    assert [b["index"] for b in report.removed] == [1, 2]
    assert span["accepted"]
    (stream,) = span["streams"]
    assert stream["residual"] < 1e-6 < 0.01 < stream["skip_residual"]
    assert stream["tokens"] == 6 * 3 * 8 * 8  # 6 scoring batches of 3 images of 8 x 8 positions
    assert _heal_nodes(pruned.proto) == ["Conv"]
    (conv,) = [n for n in pruned.proto.graph.node if n.name.startswith("compress_heal_")]
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"] == [[1, 1]]
    compress.onnx_io.check_model(pruned.proto, full_check=True)
    x = models.image_input(4, 8, seed=99)
    with torch.no_grad():
        expected = module(x).numpy()
    got = make_session(pruned.proto).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    fid = report.heal
    assert fid["fidelity_without"]["cosine"] < 0.999 < 0.9999 <= fid["fidelity_with"]["cosine"]


def test_later_spans_are_also_fitted_on_their_input_in_the_pruned_model(tmp_path) -> None:
    from compress.prune import fit_spans
    from compress.runtime import add_outputs
    from compress.surgery import remove_blocks

    torch.manual_seed(0)
    module = models._randomise(Net(linear=(), depth=5), 7)
    path = models.export_onnx(module, models.transformer_input(), tmp_path / "n.onnx", dynamic_batch=True)
    model = onnx.load(path)
    bm = find_blocks(model)
    batches = _batches(4)
    # The fit reads X from the model with block 1 removed and Y from the original (block 3's span).
    upstream = remove_blocks(model, [bm.blocks[1]])
    span = [bm.blocks[3]]
    (fits,), _ = fit_spans(model, [span], batches, inputs_from=upstream)
    (fit,) = fits
    x_name, y_name = span[0].streams[0].input, span[0].streams[0].output
    xs = make_session(add_outputs(upstream, [x_name]))
    ys = make_session(add_outputs(model, [y_name]))
    xtx, xty = np.zeros((33, 33)), np.zeros((33, 32))
    for feed in batches:
        x = xs.run([x_name], feed)[0].reshape(-1, 32).astype(np.float64)
        y = ys.run([y_name], feed)[0].reshape(-1, 32).astype(np.float64)
        xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        xtx += xa.T @ xa
        xty += xa.T @ y
    np.testing.assert_allclose(fit.xtx, xtx, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(fit.xty, xty, rtol=1e-9, atol=1e-6)
    (orig,), _ = fit_spans(model, [span], batches)
    assert np.abs(orig[0].xtx - fit.xtx).max() > 1e-3  # upstream removal changed the span's input
    # In heal_spans the second span tries both fits; the kept trial is the best held-out one.
    config = PruneConfig(metric="cosine", remove=2, keep=(0, 2, 4), heal=True, **NO_LATENCY)
    report = prune(MappedModel(model, bm), config, data=_batches(8))[1].heal
    first, second = report["spans"]
    assert {r["fit_inputs"] for r in first["ridges"]} == {"original"}
    assert [r["fit_inputs"] for r in second["ridges"]] == ["original"] * len(RIDGE_GRID) + ["pruned"] * len(RIDGE_GRID)
    if second.get("loss_with") is not None:
        best = min(second["ridges"], key=lambda r: (r["loss"], -r["cosine"]))
        assert second["loss_with"] == best["loss"]
        assert second["fit_inputs"] == best["fit_inputs"]
    off = prune(MappedModel(model, bm), PruneConfig(metric="cosine", remove=2, keep=(0, 2, 4), heal=True,
                                                           heal_refit=False, **NO_LATENCY), data=_batches(8))[1].heal
    assert {r["fit_inputs"] for r in off["spans"][1]["ridges"]} == {"original"}
