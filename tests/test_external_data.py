"""Models whose weights live in external data files: every stage and command, and bad references.

The model is the residual MLP of the hostile-input tests at a width where every weight is
an external tensor (32 x 32 float32 = 4 KiB); it is saved with ``onnx.save_model(...,
save_as_external_data=True, size_threshold=0)`` under ``tmp_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import compress.errors
import compress.onnx_io
from compress import external
from compress.blocks import find_blocks
from compress.runtime import make_session, session_view
from compress.surgery import remove_blocks
from hostile import residual_mlp

DIM = 32


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=0)
    return path


@pytest.fixture
def ext_model(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    return save_external(residual_mlp(dim=DIM), d / "m.onnx")


def _feed(batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, DIM)).astype(np.float32)}


def _run_file(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _locations(path: Path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in external.model_tensors(m) for e in t.external_data if e.key == "location"}


def _referenced_bytes(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    spans = {(int(d.get("offset", 0)), int(d["length"])) for t in external.model_tensors(m)
             if (d := {e.key: e.value for e in t.external_data})}
    return sum(length for _, length in spans)


# ---------------------------------------------------------------------- the representation


def test_load_keeps_weights_in_the_file_as_absolute_references(ext_model):
    model = compress.onnx_io.load_model(ext_model)

    refs = [external.data_ref(t) for t in model.graph.initializer]
    assert all(r is not None for r in refs)
    assert {r.path for r in refs} == {(ext_model.parent / "m.onnx.data").resolve()}
    assert all(not t.raw_data for t in model.graph.initializer)
    assert model.ByteSize() < 2000  # the graph alone: 5 weights of 4 KiB / 512 B are not in it
    w = external.read_array(model.graph.initializer[1])
    np.testing.assert_array_equal(w, numpy_helper.to_array(residual_mlp(dim=DIM).graph.initializer[1]))


def test_session_from_graph_matches_the_file_and_serializes_no_weights(ext_model):
    model = compress.onnx_io.load_model(ext_model)
    view, folder, mapped = session_view(model)

    assert folder == ext_model.parent.resolve()
    assert mapped == []
    assert view.ByteSize() < 2000
    assert _locations_of(view) == {"m.onnx.data"}
    feed = _feed()
    np.testing.assert_array_equal(make_session(model).run(None, feed)[0], _run_file(ext_model, feed))


def _locations_of(model: onnx.ModelProto) -> set[str]:
    return {e.value for t in external.model_tensors(model) for e in t.external_data if e.key == "location"}


def test_spilled_tensors_beside_file_tensors_run_as_mapped_initializers(ext_model):
    model = compress.onnx_io.load_model(ext_model)
    w0 = external.read_array(model.graph.initializer[0])
    model.graph.initializer[0].CopyFrom(external.array_tensor(w0 * 0.0, "blocks.0.w"))  # block 0 becomes x + tanh(0)

    view, folder, mapped = session_view(model)
    assert folder == ext_model.parent.resolve()  # most bytes stay in the input's file
    assert [name for name, _ in mapped] == ["blocks.0.w"]
    assert isinstance(mapped[0][1], np.memmap)
    feed = _feed()
    ref = residual_mlp(dim=DIM)
    ref.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((DIM, DIM), np.float32), "blocks.0.w"))
    want = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(make_session(model).run(None, feed)[0], want, rtol=0, atol=1e-6)


def test_save_streams_only_referenced_tensors_with_relative_locations(ext_model, tmp_path):
    model = compress.onnx_io.load_model(ext_model)
    pruned = remove_blocks(model, [find_blocks(model).blocks[1]])
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()

    written = compress.onnx_io.save_model(pruned, out)

    assert written == [out, out.parent / "p.onnx.data"]
    assert _locations(out) == {"p.onnx.data"}
    # 3 block weights of 4 KiB and the 512-byte head, no padding below 64 KiB: exactly the referenced bytes
    assert (out.parent / "p.onnx.data").stat().st_size == _referenced_bytes(out) == 3 * DIM * DIM * 4 + DIM * 4 * 4
    feed = _feed()
    np.testing.assert_array_equal(_run_file(out, feed), make_session(pruned).run(None, feed)[0])
    embedded = remove_blocks(residual_mlp(dim=DIM), [find_blocks(residual_mlp(dim=DIM)).blocks[1]])
    np.testing.assert_allclose(_run_file(out, feed), make_session(embedded).run(None, feed)[0], rtol=0, atol=1e-6)


def test_small_models_without_external_data_are_written_embedded(tmp_path):
    src = tmp_path / "e.onnx"
    compress.onnx_io.save_model(residual_mlp(dim=DIM), src)
    model = compress.onnx_io.load_model(src)
    model.graph.initializer[0].CopyFrom(external.array_tensor(np.ones((DIM, DIM), np.float32), "blocks.0.w"))
    assert external.is_external(model.graph.initializer[0])  # a new weight goes to the spill file

    out = tmp_path / "o.onnx"
    assert compress.onnx_io.save_model(model, out) == [out]
    loaded = onnx.load(str(out))
    assert not any(external.is_external(t) for t in loaded.graph.initializer)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), np.ones((DIM, DIM), np.float32))


def test_large_embedded_file_is_read_without_parsing_its_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(compress.onnx_io, "LAZY_MIN_BYTES", 0)
    src = tmp_path / "e.onnx"
    compress.onnx_io.save_model(residual_mlp(dim=DIM), src)

    model = compress.onnx_io.load_model(src)

    big = [t for t in model.graph.initializer if t.name.startswith("blocks.")]
    assert [external.data_ref(t).path for t in big] == [src.resolve()] * 4  # the bytes stay in e.onnx
    assert all(external.is_embedded_ref(t) and not t.raw_data for t in big)
    assert not external.is_external(model.graph.initializer[-1])  # head.w (512 B) is parsed
    assert model.ByteSize() < DIM * DIM * 4  # less than one block's weight: the 4 weights are not in it
    assert not compress.onnx_io.has_external_data(model)
    np.testing.assert_array_equal(external.read_array(big[2]), numpy_helper.to_array(residual_mlp(dim=DIM).graph.initializer[2]))
    assert compress.onnx_io.model_digest(model) == compress.onnx_io.model_digest(residual_mlp(dim=DIM))
    feed = _feed()
    np.testing.assert_array_equal(make_session(model).run(None, feed)[0], _run_file(src, feed))
    out = tmp_path / "o.onnx"
    assert compress.onnx_io.save_model(model, out) == [out]  # written embedded, as the input was
    written = onnx.load(str(out))
    assert not any(external.is_external(t) for t in written.graph.initializer)
    assert compress.onnx_io.model_digest(written) == compress.onnx_io.model_digest(onnx.load(str(src)))


def test_embedded_file_the_lazy_reader_declines_goes_to_the_spill_file(tmp_path, monkeypatch):
    monkeypatch.setattr(compress.onnx_io, "LAZY_MIN_BYTES", 0)
    monkeypatch.setattr(external, "read_graph_lazily", lambda path: None)
    src = tmp_path / "e.onnx"
    compress.onnx_io.save_model(residual_mlp(dim=DIM), src)

    model = compress.onnx_io.load_model(src)

    big = [t for t in model.graph.initializer if t.name.startswith("blocks.")]
    assert all(external.in_temp_folder(external.data_ref(t).path) for t in big)
    feed = _feed()
    np.testing.assert_array_equal(make_session(model).run(None, feed)[0], _run_file(src, feed))
    out = tmp_path / "o.onnx"
    assert compress.onnx_io.save_model(model, out) == [out]


def test_digest_depends_on_values_not_on_where_bytes_are(ext_model, tmp_path):
    external_model = compress.onnx_io.load_model(ext_model)
    embedded = residual_mlp(dim=DIM)
    assert compress.onnx_io.model_digest(external_model) == compress.onnx_io.model_digest(embedded)

    changed = residual_mlp(dim=DIM)
    arr = numpy_helper.to_array(changed.graph.initializer[2]).copy()
    arr[0, 0] += 1e-3
    changed.graph.initializer[2].CopyFrom(numpy_helper.from_array(arr, "blocks.2.w"))
    assert compress.onnx_io.model_digest(changed) != compress.onnx_io.model_digest(embedded)


def test_check_model_on_references_reads_no_bytes(ext_model):
    model = compress.onnx_io.load_model(ext_model)
    compress.onnx_io.check_model(model, full_check=True)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[0].input[1] = "nope"
    with pytest.raises(onnx.checker.ValidationError, match="nope"):
        compress.onnx_io.check_model(bad, full_check=True)


# ---------------------------------------------------------------------- every command


def _assert_external_output(path: Path) -> None:
    assert path.is_file()
    assert (path.parent / (path.name + ".data")).is_file()
    assert _locations(path) == {path.name + ".data"}
    text = path.read_bytes()
    assert b"/tmp" not in text
    assert os.fsencode(str(path.parent)) not in text


def test_cli_inspect_prune_and_score_on_external_data(ext_model, tmp_path, run_cli):
    r = run_cli(["inspect", ext_model, "--json"])
    assert r.code == 0, r.err
    assert len(json.loads(r.out)["blocks"]) == 4

    r = run_cli(["prune", ext_model, "--random-calib", "3", "--batch-size", "2", "--scores-only",
                 "--report", tmp_path / "scores.json"])
    assert r.code == 0, r.err
    assert len(json.loads((tmp_path / "scores.json").read_text())["blocks"]) == 4

    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    r = run_cli(["prune", ext_model, "--random-calib", "3", "--batch-size", "2", "--remove", "1", "-o", out])
    assert r.code == 0, r.err
    _assert_external_output(out)
    assert (out.parent / "p.onnx.data").stat().st_size == _referenced_bytes(out) == 3 * DIM * DIM * 4 + DIM * 4 * 4
    assert len(find_blocks(compress.onnx_io.load_model(out)).blocks) == 3
    assert sorted(p.name for p in ext_model.parent.iterdir()) == ["m.onnx", "m.onnx.data"]  # input untouched


@pytest.mark.parametrize("flags", [["--precision", "fp16"], ["--precision", "int8"], ["--sparsity", "2:4"]],
                         ids=["fp16", "int8", "2:4"])
def test_cli_build_passes_on_external_data(ext_model, tmp_path, run_cli, flags):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        np.savez(calib / f"b{i}.npz", **_feed(2, seed=10 + i))
    outdir = tmp_path / "build"
    r = run_cli(["build", ext_model, "-o", outdir, *flags, "--backend", "ort", "--calib", calib,
                 "--target-fidelity", "none", "--iterations", "3", "--duration", "0", "--warmup-ms", "0"])
    assert r.code == 0, r.err
    model_file = next(p for p in outdir.iterdir() if p.suffix == ".onnx")
    _assert_external_output(model_file)
    feed = _feed()
    got, want = _run_file(model_file, feed), _run_file(ext_model, feed)
    cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos > 0.95, cos


def test_cli_run_pipeline_on_external_data(ext_model, tmp_path, run_cli):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"model:\n  source: {ext_model}\n"
        "calibration:\n  random: {batches: 4, batch_size: 2, seed: 0}\n  holdout: 0.25\n"
        "prune:\n  metric: cosine\n  select: lowest\n  remove: 1\n  latency_seconds: 0\n"
        "build:\n  precision: fp16\n  backend: ort\n  iterations: 3\n  duration: 0\n",
        encoding="utf-8")
    out = tmp_path / "run"
    r = run_cli(["run", cfg, "-o", out])
    assert r.code == 0, r.err
    models = sorted(out.rglob("*.onnx"))
    assert models, sorted(out.rglob("*"))
    for m in models:
        if any(external.is_external(t) for t in onnx.load(str(m), load_external_data=False).graph.initializer):
            assert _locations(m) == {m.name + ".data"}
    assert not any(b"/tmp" in p.read_bytes() for p in models)


# ---------------------------------------------------------------------- bad references


def _edit_location(path: Path, location: str) -> None:
    m = onnx.load(str(path), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
    onnx.save(m, str(path))


def _prune_fails(run_cli, model: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "o.onnx"
    r = run_cli(["prune", model, "--random-calib", "2", "--remove", "1", "-o", out])
    assert r.code == 1, (r.code, r.err)
    assert "Traceback" not in r.err
    for needle in needles:
        assert needle in r.err, r.err
    assert not out.exists()
    assert not (tmp_path / "o.onnx.data").exists()


def test_missing_data_file_names_tensor_and_location(ext_model, tmp_path, run_cli):
    (ext_model.parent / "m.onnx.data").unlink()
    _prune_fails(run_cli, ext_model, tmp_path, "tensor 'blocks.0.w'", "'m.onnx.data'", "does not exist")


def test_truncated_data_file_is_refused(ext_model, tmp_path, run_cli):
    data = ext_model.parent / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    _prune_fails(run_cli, ext_model, tmp_path, "tensor 'head.w'", "is truncated")


@pytest.mark.parametrize(("location", "why"), [
    ("/etc/passwd", "is an absolute path"),
    ("../outside.data", "leaves the model's folder"),
    ("sub/../../outside.data", "leaves the model's folder"),
])
def test_locations_outside_the_model_folder_are_refused(ext_model, tmp_path, run_cli, location, why):
    (tmp_path / "outside.data").write_bytes((ext_model.parent / "m.onnx.data").read_bytes())
    _edit_location(ext_model, location)
    _prune_fails(run_cli, ext_model, tmp_path, "tensor 'blocks.0.w'", repr(location), why)


def test_symlink_out_of_the_model_folder_is_refused(ext_model, tmp_path, run_cli):
    secret = tmp_path / "secret.data"
    secret.write_bytes((ext_model.parent / "m.onnx.data").read_bytes())
    (ext_model.parent / "link.data").symlink_to(secret)
    _edit_location(ext_model, "link.data")
    _prune_fails(run_cli, ext_model, tmp_path, "tensor 'blocks.0.w'", "'link.data'", "leaves the model's folder")


def test_length_that_does_not_match_the_tensor_type_is_refused(ext_model, tmp_path, run_cli):
    m = onnx.load(str(ext_model), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "length":
            e.value = "16"
    onnx.save(m, str(ext_model))
    _prune_fails(run_cli, ext_model, tmp_path, "tensor 'blocks.0.w'", "holds 16 bytes", "need 4096")


def test_force_over_an_external_output_removes_its_stale_data_file(ext_model, tmp_path, run_cli):
    out = tmp_path / "o.onnx"
    flags = ["--random-calib", "2", "--remove", "1", "-o", out]
    assert run_cli(["prune", ext_model, *flags]).code == 0
    assert (tmp_path / "o.onnx.data").is_file()
    embedded = tmp_path / "e.onnx"
    compress.onnx_io.save_model(residual_mlp(dim=DIM), embedded)

    r = run_cli(["prune", embedded, *flags, "--force"])

    assert r.code == 0, r.err
    assert not (tmp_path / "o.onnx.data").exists()
    assert not any(external.is_external(t) for t in onnx.load(str(out)).graph.initializer)


@pytest.mark.parametrize("cut", [7, 1000, -5])
def test_lazy_reader_on_a_truncated_file_gives_the_readable_model_error(tmp_path, monkeypatch, cut):
    monkeypatch.setattr(compress.onnx_io, "LAZY_MIN_BYTES", 0)
    src = tmp_path / "e.onnx"
    compress.onnx_io.save_model(residual_mlp(dim=DIM), src)
    data = src.read_bytes()
    src.write_bytes(data[:cut])

    assert external.read_graph_lazily(src) is None  # malformed wire data: declined, not guessed
    with pytest.raises(compress.errors.ModelError, match=r"is not a readable ONNX model"):
        compress.onnx_io.load_model(src)
