"""Hostile inputs, part B: validated configs, bounded parsing, exact fidelity of integer outputs.

Every CLI case is judged on its exit code, the exact ``error:``/``hint:`` text, no
traceback, no output or temporary file left behind, and the inputs' bytes unchanged; the
bombs (a lying .npz header, a 1 x 20000 image, nested YAML anchors) run in a subprocess
under ``RLIMIT_AS`` and a timeout, so an allocation or a hang fails the test instead of the
machine. The models are 4-block residual MLPs built with ``onnx.helper`` (no torch).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import compress.onnx_io
from compress.errors import ConfigError
from compress.runtime import make_session
from hostile import assert_no_leftovers, assert_user_error, residual_mlp, run_cli, run_cli_inprocess, tree_digest

#: Address-space limit of the bomb subprocesses: numpy + onnx + onnxruntime fit well inside it;
#: each bomb would need 4-24 GiB.
LIMIT_GIB = 3.0
DIM = 8


# --------------------------------------------------------------------------- tiny inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with m.onnx, am.onnx (with an ArgMax output) and cal/ (4 batches of 4 samples)."""
    d = tmp_path_factory.mktemp("hostile_in")
    compress.onnx_io.save_model(residual_mlp(), d / "m.onnx")
    compress.onnx_io.save_model(residual_mlp(argmax=True), d / "am.onnx")
    (d / "cal").mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        np.savez(d / "cal" / f"b{i}.npz", x=rng.standard_normal((4, DIM)).astype(np.float32))
    return d


@pytest.fixture
def work(inputs: Path, tmp_path: Path) -> Path:
    """A fresh folder with a copy of the inputs (cases may add hostile files to it)."""
    import shutil

    for p in inputs.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, tmp_path / p.name)
    return tmp_path


def judge(result, folder: Path, before: dict[str, str], *, error: str, hint: str, absent=()) -> None:
    """A clean user error with exactly this text; nothing written, no temp file, inputs unchanged."""
    assert_user_error(result, code=1)
    assert result.error_lines == [f"error: {error}"], result.stderr
    assert result.hint_lines == [f"hint: {hint}"], result.stderr
    assert_no_leftovers(folder, absent=[folder / a for a in absent])
    assert tree_digest(folder) == before


# --------------------------------------------------------------------------- 1. configs via the CLI

PRUNE_CASES = [
    (["--max-drop", "-0.1"], "--max-drop -0.1: must be >= 0 and <= 1", "e.g. --max-drop 0.02"),
    (["--max-drop", "nan"], "--max-drop nan: must be a finite number (not nan or inf)", "e.g. --max-drop 0.02"),
    (["--max-drop", "1.5"], "--max-drop 1.5: must be >= 0 and <= 1", "e.g. --max-drop 0.02"),
    (["--max-drop", "0.5", "--keep", "7"],
     "--keep 7: block 7 does not exist: the model has blocks 0..3 (see 'compress inspect')", "e.g. --keep 0"),
    (["--remove", "1", "--keep", "0,7"],
     "--keep 0,7: block 7 does not exist: the model has blocks 0..3 (see 'compress inspect')", "e.g. --keep 0"),
    (["--remove", "9"], "--remove 9: asks for 9 blocks, but only 4 of the 4 blocks can be removed",
     "ask for fewer blocks (see 'compress inspect'), or keep fewer"),
    (["--ratio", "0.5", "--keep", "0,1,2"],
     "--ratio 0.5: asks for 2 blocks, but only 1 of the 4 blocks can be removed (3 kept)",
     "ask for fewer blocks (see 'compress inspect'), or keep fewer"),
    (["--ratio", "nan"], "--ratio nan must be between 0 and 1", "e.g. --ratio 0.25"),
    (["--remove", "1", "--latency-seconds", "nan"], "--latency-seconds nan: must be a finite number (not nan or inf)",
     "e.g. --latency-seconds 1"),
    (["--remove", "1", "--latency-seconds", "inf"], "--latency-seconds inf: must be a finite number (not nan or inf)",
     "e.g. --latency-seconds 1"),
    (["--remove", "1", "--latency-seconds", "1e9"], "--latency-seconds 1000000000.0: must be >= 0 and <= 3600",
     "e.g. --latency-seconds 1"),
    (["--remove", "1", "--holdout", "nan"], "--holdout nan: must be a finite number (not nan or inf)",
     "e.g. --holdout 0.25"),
    (["--remove", "1", "--holdout", "1"], "--holdout 1.0: must be >= 0 and < 1", "e.g. --holdout 0.25"),
]


@pytest.mark.parametrize(("extra", "error", "hint"), PRUNE_CASES, ids=[" ".join(c[0]) for c in PRUNE_CASES])
def test_prune_numbers_are_checked_before_any_work(work, capsys, extra, error, hint) -> None:
    before = tree_digest(work)
    r = run_cli_inprocess(["prune", work / "m.onnx", "--calib", work / "cal", "-o", work / "p.onnx", *extra], capsys)
    judge(r, work, before, error=error, hint=hint, absent=["p.onnx", "p.blocks.json"])
    assert "scoring" not in r.stderr  # refused before the blocks were scored


def test_sweep_beyond_the_blocks_is_refused_before_the_first_count(work, capsys) -> None:
    before = tree_digest(work)
    r = run_cli_inprocess(["prune", work / "m.onnx", "--calib", work / "cal", "--sweep", "0:9", "--no-latency",
                           "--report", work / "s.json"], capsys)
    judge(r, work, before, error="--sweep 0:9: asks for 5 blocks, but only 4 of the 4 blocks can be removed",
          hint="ask for fewer blocks (see 'compress inspect'), or keep fewer", absent=["s.json", "s.md", "s.png"])
    assert r.stdout == ""


BUILD_CASES = [
    (["--iterations", "0", "--duration", "0"], "--iterations 0: must be >= 1 and <= 100000", "e.g. --iterations 10"),
    (["--warmup-ms", "inf"], "--warmup-ms inf: must be a finite number (not nan or inf)", "e.g. --warmup-ms 200"),
    (["--warmup-ms", "nan"], "--warmup-ms nan: must be a finite number (not nan or inf)", "e.g. --warmup-ms 200"),
    (["--duration", "1e9"], "--duration 1000000000.0: must be >= 0 and <= 3600", "e.g. --duration 1"),
    (["--duration", "-1"], "--duration -1.0: must be >= 0 and <= 3600", "e.g. --duration 1"),
    (["--min-fidelity", "nan"], "--min-fidelity nan: must be a finite number (not nan or inf)",
     "e.g. --min-fidelity 0.99"),
    (["--min-fidelity", "1.5"], "--min-fidelity 1.5: must be >= -1 and <= 1", "e.g. --min-fidelity 0.99"),
    (["--max-latency-ms", "0"], "--max-latency-ms 0.0: must be > 0", "e.g. --max-latency-ms 5"),
    (["--min-speedup=-inf"], "--min-speedup -inf: must be a finite number (not nan or inf)", "e.g. --min-speedup 1.2"),
    (["--shapes", "nosuch:1x8/2x8/4x8"], "--shapes nosuch:1x8/2x8/4x8: the model has no input 'nosuch'; its inputs: x",
     "e.g. --shapes x:1x16/8x128/16x128"),
    (["--shapes", "x:1x8x3/2x8x3/4x8x3"],
     "--shapes x:1x8x3/2x8x3/4x8x3: input 'x' has rank 2 (batchx8), the profile rank 3", "e.g. --shapes x:1x8"),
    (["--shapes", "x:1x9/2x9/4x9"], "--shapes x:1x9/2x9/4x9: input 'x' has a static size 8 on axis 1 (batchx8)",
     "e.g. --shapes x:1x8"),
    (["--shapes", "x:0x8/2x8/4x8"], "--shapes 'x:0x8/2x8/4x8': every dim must be at least 1",
     "e.g. --shapes x:1x3x224x224/8x3x224x224/16x3x224x224"),
    (["--random-calib", "1000000000"], "random calibration: 1000000000 batches; at most 100000 are made",
     "random inputs are for smoke tests: e.g. --random-calib 4"),
    (["--random-calib", "2", "--random-dims", "batch=100000000000"],
     "random calibration: one batch would hold 800000000000 values (x 100000000000x8); at most 268435456 are made",
     "use a smaller batch size or smaller dims (e.g. --random-dims batch=2,seq=128)"),
]


@pytest.mark.parametrize(("extra", "error", "hint"), BUILD_CASES, ids=[" ".join(c[0]) for c in BUILD_CASES])
def test_build_numbers_and_shapes_are_checked_before_any_work(work, capsys, extra, error, hint) -> None:
    before = tree_digest(work)
    r = run_cli_inprocess(["build", work / "m.onnx", "-o", work / "b", "--baseline", work / "m.onnx", *extra], capsys)
    judge(r, work, before, error=error, hint=hint, absent=["b"])


@pytest.mark.parametrize(("extra", "error"), [
    (["--atol", "nan"], "--atol nan: must be a finite number (not nan or inf)"),
    (["--rtol", "inf"], "--rtol inf: must be a finite number (not nan or inf)"),
    (["--min-cosine", "nan"], "--min-cosine nan: must be a finite number (not nan or inf)"),
])
def test_export_tolerances_must_be_finite(work, capsys, extra, error) -> None:
    (work / "net.py").write_text("def build():\n    raise AssertionError('never loaded')\n")
    before = tree_digest(work)
    r = run_cli_inprocess(["export", f"{work / 'net.py'}:build", "-o", work / "e.onnx", "--input", "x:1x2", *extra],
                          capsys)
    judge(r, work, before, error=error, hint="e.g. --atol 1e-4 --rtol 1e-3 --min-cosine 0.9999 (the defaults)",
          absent=["e.onnx", "e.blocks.json", "e.export.json"])


# --------------------------------------------------------------------------- 2. the same rules in compress run

RUN_BASE = "model:\n  source: m.onnx\ncalibration:\n  npz: cal\n"
RUN_CASES = [
    ("build:\n  warmup_ms: .inf\n", "build.warmup_ms: must be a finite number, got inf", "e.g. warmup_ms: 1"),
    ("prune:\n  max_drop: .nan\n", "prune.max_drop: must be a finite number, got nan", "e.g. max_drop: 1"),
    ("prune:\n  max_drop: 1.5\n", "prune.max_drop = 1.5: must be >= 0 and <= 1", "e.g. max_drop: 0.02"),
    ("build:\n  iterations: 1000000000\n", "build.iterations = 1000000000: must be >= 1 and <= 100000",
     "e.g. iterations: 10"),
    ("build:\n  warmup_ms: 1.0e+9\n", "build.warmup_ms = 1000000000.0: must be >= 0 and <= 3600",
     "e.g. warmup_ms: 200"),
    ("gates:\n  min_fidelity: 2\n", "gates.min_fidelity = 2.0: must be >= -1 and <= 1", "e.g. min_fidelity: 0.99"),
    ("prune:\n  remove: 1\n  keep: [9]\n", "prune.keep = 9: block 9 does not exist: the model has blocks 0..3 "
     "(see 'compress inspect')", "e.g. keep: 0"),
]


@pytest.mark.parametrize(("extra", "error", "hint"), RUN_CASES, ids=[c[0].replace("\n", " ") for c in RUN_CASES])
def test_pipeline_shares_the_config_rules(work, capsys, extra, error, hint) -> None:
    (work / "p.yaml").write_text(RUN_BASE + extra)
    before = tree_digest(work)
    r = run_cli_inprocess(["run", work / "p.yaml", "-o", work / "out"], capsys)
    assert_user_error(r, code=1)
    assert r.error_lines == [f"error: {work / 'p.yaml'}: {error}"], r.stderr
    assert r.hint_lines == [f"hint: {hint}"], r.stderr
    assert {k: v for k, v in tree_digest(work).items() if not k.startswith("out/")} == before
    assert_no_leftovers(work)
    if error.startswith("prune.keep"):  # checked against the blocks when the prune stage starts: it wrote nothing
        assert not (work / "out" / "prune").exists()
    else:
        assert not (work / "out").exists()  # refused before any stage ran


# --------------------------------------------------------------------------- 3. bounded parsing: YAML / JSON


def _laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel:\n  source: *a{levels - 1}\ncalibration: {{npz: cal}}\n"


YAML_CASES = [
    ("laughs.yaml", _laughs(), "more than 200000 values (nested aliases expand to too many)",
     "write the config out plainly; anchors and aliases may not multiply it"),
    ("deep.yaml", "model: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply to parse",
     "a pipeline config is a few levels deep"),
    ("deep.json", '{"model": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply to parse",
     "a pipeline config is a few levels deep"),
    ("deep50.json", '{"model": ' + "[" * 70 + "]" * 70 + "}", "nested deeper than 64 levels at model" + "[0]" * 63,
     "a compress config or report is a few levels deep; check the file"),
    ("listkey.yaml", "model:\n  ? [a, b]\n  : 1\n", "line 2: key a list is not a string",
     "keys are names: write them as plain words"),
    ("intkey.yaml", "model:\n  source: m.onnx\n  3: x\ncalibration: {npz: cal}\n", "line 3: key 3 is not a string",
     "keys are names: write them as plain words"),
    ("big.yaml", "# " + "x" * (1 << 20) + "\n", f"{(1 << 20) + 3} bytes; a pipeline config is at most {1 << 20}",
     "pass the pipeline config itself (deploy/README.md has the format)"),
]


@pytest.mark.parametrize(("name", "text", "error", "hint"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_config_files_are_parsed_within_bounds(work, capsys, monkeypatch, name, text, error, hint) -> None:
    (work / name).write_text(text)
    before = tree_digest(work)
    if name == "laughs.yaml":  # the bomb: a subprocess with bounded memory
        r = run_cli(["run", name, "-o", "out"], cwd=work, rlimit_as_gib=LIMIT_GIB, timeout=60)
    else:
        monkeypatch.chdir(work)
        r = run_cli_inprocess(["run", name, "-o", "out"], capsys)
    assert_user_error(r, code=1)
    assert r.error_lines == [f"error: {name}: {error}"], r.stderr[-2000:]
    assert r.hint_lines == [f"hint: {hint}"], r.stderr[-2000:]
    assert len(r.stderr) < 2000  # no 39 MB error line
    assert tree_digest(work) == before
    assert not (work / "out").exists()


@pytest.mark.parametrize("name", ["deep.json", "deep.yaml"])
def test_deep_nesting_is_refused_whatever_the_recursion_limit(work, capsys, monkeypatch, name) -> None:
    """The parsers recurse; the refusal comes before them, so another module raising the limit changes nothing."""
    import sys

    case = next(c for c in YAML_CASES if c[0] == name)
    (work / name).write_text(case[1])
    monkeypatch.chdir(work)
    before = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(100_000)
        r = run_cli_inprocess(["run", name, "-o", "out"], capsys)
    finally:
        sys.setrecursionlimit(before)
    assert_user_error(r, code=1)
    assert r.error_lines == [f"error: {name}: nested too deeply to parse"]


def test_json_depth_skips_brackets_in_strings() -> None:
    from compress.validate import json_depth

    assert json_depth('{"a": [1, {"b": "[[[[{"}], "c": "\\"]"}') == 3
    assert json_depth("[]") == 1
    assert json_depth('"x"') == 0


def test_a_huge_value_is_shown_short_in_the_error(work, capsys) -> None:
    (work / "p.yaml").write_text(RUN_BASE + "build:\n  precision: [" + ", ".join(["fp16"] * 5000) + "]\n")
    r = run_cli_inprocess(["run", work / "p.yaml", "-o", work / "out"], capsys)
    assert_user_error(r, code=1)
    assert r.error_lines == [f"error: {work / 'p.yaml'}: build.precision: expected a string, got a list of 5000 items"]


# --------------------------------------------------------------------------- 4. bounded parsing: .npz


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
    return b.getvalue()


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _claim_size(path: Path, file_size: int) -> None:
    """Rewrite the (only) member's uncompressed size in both zip headers: a lying archive."""
    data = bytearray(path.read_bytes())
    local = data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, file_size)
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, file_size)
    path.write_bytes(bytes(data))


def _bad_npz(kind: str, path: Path) -> str:
    """Write a hostile .npz; return the expected reason after 'is not a readable .npz file: ' (or the full error)."""
    if kind == "header-bomb":  # 236 bytes claiming 10^8 samples of 30 float64 (24 GB)
        _zip(path, {"x.npy": _npy_header((10**8, 30), "<f8")})
        return "array 'x': its header claims shape 100000000x30 of float64 (24000000000 bytes), but the file holds 0 bytes of data"
    if kind == "header-bomb-deflated":
        _zip(path, {"x.npy": _npy_header((10**8, 30), "<f8")}, zipfile.ZIP_DEFLATED)
        return "array 'x': its header claims shape 100000000x30 of float64 (24000000000 bytes), but the file holds 0 bytes of data"
    if kind == "lying-deflate-size":  # the header matches a claimed 24 GB member that deflate cannot produce
        header = _npy_header((10**8, 30), "<f8")
        _zip(path, {"x.npy": header + b"\0" * 4096}, zipfile.ZIP_DEFLATED)
        _claim_size(path, (len(header) + 24 * 10**9) % (1 << 32))
        info = zipfile.ZipFile(path).infolist()[0]
        return (f"member 'x.npy' claims {info.file_size} bytes from {info.compress_size} compressed bytes, more than "
                "deflate can produce (a zip bomb?)")
    if kind == "lying-stored-size":
        _zip(path, {"x.npy": _npy_header((4, DIM)) + b"\0" * 128})
        _claim_size(path, 1 << 31)
        info = zipfile.ZipFile(path).infolist()[0]
        return f"member 'x.npy' is stored uncompressed but claims {info.file_size} bytes in {info.compress_size}"
    if kind == "bzip2":
        _zip(path, {"x.npy": _npy_header((4, DIM)) + b"\0" * 128}, zipfile.ZIP_BZIP2)
        return ("member 'x.npy' uses zip compression method 12; only stored and deflated members (np.savez, "
                "np.savez_compressed) are read")
    raise AssertionError(kind)


NPZ_BOMBS = ["header-bomb", "header-bomb-deflated", "lying-deflate-size", "lying-stored-size", "bzip2"]


@pytest.mark.parametrize("kind", NPZ_BOMBS)
def test_npz_headers_are_checked_against_the_member_before_allocating(work, kind) -> None:
    reason = _bad_npz(kind, work / "cal" / "b9.npz")
    before = tree_digest(work)
    r = run_cli(["calib", "check", "cal", "--model", "m.onnx"], cwd=work, rlimit_as_gib=LIMIT_GIB, timeout=60)
    judge(r, work, before, error=f"{Path('cal') / 'b9.npz'} is not a readable .npz file: {reason}",
          hint="re-save it with np.savez(path, **{input_name: array}); see calib/README.md")


def test_a_bomb_limit_subprocess_passes_on_good_data(work) -> None:
    """The RLIMIT_AS of the bomb cases leaves room for real work: the same check passes on the good data."""
    r = run_cli(["calib", "check", "cal", "--model", "m.onnx"], cwd=work, rlimit_as_gib=LIMIT_GIB, timeout=60)
    assert r.rc == 0, r.stderr[-2000:]


@pytest.mark.parametrize(("array", "shown"), [
    (np.array([["ab", "cd"]] * 4), "<U2"),
    (np.zeros((4, 3), dtype=[("a", "<f4"), ("b", "<i8")]), "[('a', '<f4'), ('b', '<i8')]"),
    (np.array([[1, "a"]] * 4, dtype=object), "object"),
    (np.zeros((4, 3), dtype=np.complex64), "complex64"),
    (np.zeros((4, 3), dtype="datetime64[s]"), "datetime64[s]"),
])
def test_npz_arrays_of_non_numeric_dtypes_are_refused(work, capsys, array, shown) -> None:
    np.savez(work / "cal" / "b9.npz", x=array)
    before = tree_digest(work)
    for cmd in (["calib", "check", work / "cal", "--model", work / "m.onnx"],
                ["prune", work / "m.onnx", "--calib", work / "cal", "-o", work / "p.onnx", "--remove", "1"]):
        r = run_cli_inprocess(cmd, capsys)
        judge(r, work, before, error=f"{work / 'cal' / 'b9.npz'}: array 'x' has dtype {shown}; calibration arrays must "
                                     "be numeric or bool",
              hint="save plain numeric arrays (no objects, strings or structured dtypes)", absent=["p.onnx"])


# --------------------------------------------------------------------------- 5. bounded parsing: images


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose IHDR claims w x h (8-bit gray) and whose pixel data is a few bytes: never decodable in full."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_thin_strip_image_is_refused_before_decoding(work) -> None:
    pytest.importorskip("PIL")
    from PIL import Image

    (work / "img").mkdir()
    Image.new("L", (1, 20000)).save(work / "img" / "strip.png", optimize=True)  # ~120 bytes
    before = tree_digest(work)
    r = run_cli(["calib", "images", "img", "-o", "c"], cwd=work, rlimit_as_gib=LIMIT_GIB, timeout=60)
    judge(r, work, before, error=f"{Path('img') / 'strip.png'}: a 1 x 20000 image is more than 20 times longer than "
                                 "wide; resizing its shorter side would make it huge",
          hint="crop it to the part that matters, or remove it", absent=["c"])


@pytest.mark.parametrize(("w", "h", "error"), [
    (10000, 10000, "{p}: a 10000 x 10000 image; at most 67108864 pixels are decoded"),
    (60000, 60000, "{p} is too large to decode safely: Image size (3600000000 pixels) exceeds limit of 178956970 "
                   "pixels, could be decompression bomb DOS attack."),
])
def test_huge_declared_images_are_refused_before_decoding(work, w, h, error) -> None:
    pytest.importorskip("PIL")
    (work / "img").mkdir()
    _png_header_only(work / "img" / "big.png", w, h)
    before = tree_digest(work)
    r = run_cli(["calib", "images", "img", "-o", "c"], cwd=work, rlimit_as_gib=LIMIT_GIB, timeout=60)
    hint = "downscale it first, or remove it" if w == 10000 else "remove or replace the file"
    judge(r, work, before, error=error.format(p=Path("img") / "big.png"), hint=hint, absent=["c"])


def test_image_options_refuse_non_finite_and_unbounded_values(work, capsys) -> None:
    pytest.importorskip("PIL")
    (work / "img").mkdir()
    before = tree_digest(work)
    for extra, error, hint in [
        (["--scale", "nan"], "--scale nan: must be finite numbers (not nan or inf)", "e.g. --scale 255"),
        (["--mean", "0.5,inf,0.5"], "--mean 0.5,inf,0.5: must be finite numbers (not nan or inf)", "e.g. --mean 0.5"),
        (["--size", "100000"], "--size must be between 1 and 4096 pixels, got 100000", "e.g. --size 224"),
    ]:
        r = run_cli_inprocess(["calib", "images", work / "img", "-o", work / "c", *extra], capsys)
        judge(r, work, before, error=error, hint=hint, absent=["c"])


def test_text_calibration_length_is_bounded(work, capsys) -> None:
    (work / "s.txt").write_text("a sentence\n")
    before = tree_digest(work)
    r = run_cli_inprocess(["calib", "text", work / "s.txt", "--tokenizer", work / "nope", "-o", work / "c",
                           "--max-length", "1000000000", "--pad-to-max"], capsys)
    judge(r, work, before, error="--max-length must be between 2 and 65536 tokens, got 1000000000",
          hint="e.g. --max-length 128 (special tokens included)", absent=["c"])


# --------------------------------------------------------------------------- 6. block maps


def _good_map(work: Path) -> dict:
    from compress.blocks import find_blocks

    return find_blocks(onnx.load(work / "m.onnx")).to_dict()


def _broken(kind: str, good: dict):
    if kind == "list":
        return [good], "the top level: must be a mapping with 'schema_version' and 'blocks', got a list"
    bad = json.loads(json.dumps(good))
    if kind == "index":
        bad["blocks"][2]["index"] = 99
        return bad, "blocks[2].index: is 99; block 2 of 4 must have index 2 (blocks are listed in order, indices 0..3)"
    if kind == "nodes":
        bad["blocks"][1]["nodes"] = "abc"
        return bad, "blocks[1].nodes: must be a list of node names, got 'abc'"
    if kind == "removable":
        bad["blocks"][0]["removable"] = "yes"
        return bad, "blocks[0].removable: must be true or false, got 'yes'"
    if kind == "missing":
        del bad["blocks"][3]["name"]
        return bad, "blocks[3].name: is missing"
    if kind == "blocks":
        bad["blocks"] = {"0": 1}
        return bad, "blocks: must be a list of blocks, got a mapping"
    if kind == "schema":
        bad["schema_version"] = 7
        return bad, "schema_version: is 7, expected 1 or 2 (not a compress block map?)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["list", "index", "nodes", "removable", "missing", "blocks", "schema"])
def test_a_broken_block_map_names_the_file_and_the_field(work, capsys, kind) -> None:
    data, problem = _broken(kind, _good_map(work))
    (work / "m.blocks.json").write_text(json.dumps(data))
    before = tree_digest(work)
    for cmd in (["inspect", work / "m.onnx"],
                ["prune", work / "m.onnx", "--calib", work / "cal", "-o", work / "p.onnx", "--remove", "1"]):
        r = run_cli_inprocess(cmd, capsys)
        judge(r, work, before, error=f"{work / 'm.blocks.json'} is not a valid block map: {problem}",
              hint="re-create it with 'compress export' or 'compress inspect --write-blocks', or delete it",
              absent=["p.onnx"])


def test_block_map_from_dict_refuses_a_list_without_a_traceback() -> None:
    from compress.blocks import BlockMap
    from compress.errors import ModelError

    with pytest.raises(ModelError, match=r"^the block map is not a valid block map: the top level: must be a mapping"):
        BlockMap.from_dict([])  # type: ignore[arg-type]


def test_a_deep_json_report_is_refused(work, capsys) -> None:
    (work / "prev.json").write_text("[" * 100000 + "]" * 100000)
    before = tree_digest(work)
    r = run_cli_inprocess(["build", work / "m.onnx", "-o", work / "b", "--previous", work / "prev.json"], capsys)
    judge(r, work, before, error=f"{work / 'prev.json'} is not a valid latency report: nested too deeply",
          hint="fix or remove the file (a latency report is UTF-8 JSON written by compress)", absent=["b"])


# --------------------------------------------------------------------------- 7. what is wrong with a model


def _model_case(kind: str, work: Path) -> tuple[Path, str, str]:
    path = work / f"{kind}.onnx"
    if kind == "empty":
        path.write_bytes(b"")
        return path, f"{path} is empty (0 bytes): not an ONNX model", "pass an .onnx file; re-export it if it was cut short"
    model = onnx.load(work / "m.onnx")
    node = next(n for n in model.graph.node if n.name == "/blocks/blocks.2/MatMul")
    if kind == "unknown-op":
        node.op_type = "Frobnicate"
        compress.onnx_io.save_model(model, path)
        return (path, f"{path}: node '/blocks/blocks.2/MatMul' uses op 'Frobnicate' in domain 'ai.onnx', which no ONNX "
                      "opset defines (ONNX Runtime cannot run it)", "re-export the model with standard ops, or fix the op type")
    if kind == "cycle":
        node.input[0] = "/blocks/blocks.2/out"  # the block's MatMul reads the block's own output
        compress.onnx_io.save_model(model, path)
        return (path, f"{path}: the graph has a cycle at node '/blocks/blocks.2/MatMul' (MatMul)",
                "an ONNX graph must be acyclic; re-export the model or fix the edges")
    if kind == "no-graph":
        path.write_bytes(onnx.ModelProto(ir_version=9).SerializeToString())
        return (path, f"{path} holds no graph: not an ONNX model (or an empty one)",
                "pass an ONNX model file (e.g. written by 'compress export' or torch.onnx.export)")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty", "unknown-op", "cycle", "no-graph"])
def test_a_broken_model_is_reported_as_such_by_every_command(work, capsys, kind) -> None:
    path, error, hint = _model_case(kind, work)
    before = tree_digest(work)
    for cmd in (["inspect", path], ["build", path, "-o", work / "b"],
                ["prune", path, "--calib", work / "cal", "--scores-only"],
                ["prune", path, "--calib", work / "cal", "-o", work / "p.onnx", "--remove", "1"],
                ["calib", "check", work / "cal", "--model", path]):
        r = run_cli_inprocess(cmd, capsys)
        judge(r, work, before, error=error, hint=hint, absent=["b", "p.onnx"])
        assert "no block can be scored" not in r.stderr


# --------------------------------------------------------------------------- 8. integer outputs: exact agreement


def test_integer_outputs_are_compared_by_exact_agreement(work) -> None:

    from compress.blocks import find_blocks
    from compress.calibration import load_calibration
    from compress.fidelity import compare_models
    from compress.surgery import remove_blocks

    model = onnx.load(work / "am.onnx")
    pruned = remove_blocks(model, [find_blocks(model).blocks[1]])
    calib = load_calibration(work / "cal")
    fid = compare_models(model, pruned, calib)
    # by hand: share of samples whose class index is the same
    a, b = (make_session(m) for m in (model, pruned))
    same = total = 0
    for batch in calib:
        ca, cb = a.run(["cls"], batch)[0], b.run(["cls"], batch)[0]
        same, total = same + int((ca == cb).sum()), total + ca.size
    assert 0 < same < total  # the case is discriminating: some classes change
    cls = fid["outputs"]["cls"]
    assert cls == {"agreement": same / total, "mismatches": total - same, "samples": total, "exact": True}
    assert "cosine" not in cls  # no cosine of class indices
    assert "max_abs" not in cls
    assert fid["agreement"] == same / total
    logits_loss = 1 - fid["outputs"]["logits"]["top1"]
    assert fid["loss"] == pytest.approx(max(logits_loss, 1 - same / total), abs=1e-12)
    assert fid["loss_metric"] == "max(1 - top1, 1 - agreement)"


def test_fidelity_accumulator_exact_outputs_unit() -> None:
    from compress.fidelity import FidelityAccumulator, fidelity_loss, worst

    acc = FidelityAccumulator()
    acc.update({"c": np.array([0, 1, 2, 3]), "m": np.array([[True, False]])},
               {"c": np.array([0, 1, 3, 3]), "m": np.array([[True, True]])})
    acc.update({"c": np.array([5, 5])}, {"c": np.array([5, 4])})
    res = acc.result()
    assert res["c"] == {"agreement": 4 / 6, "mismatches": 2, "samples": 6, "exact": True}
    assert res["m"]["agreement"] == 0.5
    assert worst(res, "agreement") == 0.5
    assert fidelity_loss({"agreement": 0.5, "cosine": None, "top1": None}) == (0.5, "1 - agreement")
    assert fidelity_loss({"agreement": 0.9, "cosine": 0.7, "top1": None}) == (pytest.approx(0.3), "max(1 - cosine, 1 - agreement)")


def test_min_fidelity_gate_uses_agreement_when_every_output_is_an_integer() -> None:
    from compress.gates import Gates, evaluate_gates

    report = {"candidate": {"latency": {"median_ms": 1.0}},
              "comparison": {"fidelity": {"cosine": None, "agreement": 0.75}}}
    (g,) = evaluate_gates(report, Gates(min_fidelity=0.8), previous=None)
    assert (g.passed, g.value, g.message) == (False, 0.75, "exact agreement vs baseline 0.75 < 0.8")


# --------------------------------------------------------------------------- 9. documented commands that failed


def test_int8_with_a_relative_calibration_path_keeps_the_working_directory(work, monkeypatch) -> None:
    from compress.calibration import load_calibration
    from compress.passes.int8 import Int8Config, int8_pass

    monkeypatch.chdir(work)
    calib = load_calibration("cal")  # relative: read lazily, while ORT calibrates
    before = sorted(os.listdir(work))
    out, report = int8_pass(onnx.load("m.onnx"), Int8Config(), data=calib)
    assert Path.cwd() == work
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) > 0
    assert not [w for w in report.warnings if "failed" in w]  # shape inference ran
    assert sorted(os.listdir(work)) == before  # nothing written into the working directory


def test_missing_plotter_is_a_note_not_a_failure(work, capsys, monkeypatch) -> None:
    import compress.reports
    from compress.errors import MissingDependencyError

    def no_matplotlib(purpose: str):
        raise MissingDependencyError("matplotlib", purpose=purpose, extra="plot")

    monkeypatch.setattr(compress.reports, "pyplot", no_matplotlib)
    for mod in ("compress.reports.scoring", "compress.reports.latency", "compress.reports.prune"):
        monkeypatch.setattr(f"{mod}.pyplot", no_matplotlib)
    r = run_cli_inprocess(["prune", work / "m.onnx", "--calib", work / "cal", "--scores-only",
                           "--report", work / "s.json"], capsys)
    assert r.rc == 0, r.stderr
    assert (work / "s.json").is_file()
    assert (work / "s.md").is_file()
    assert not (work / "s.png").exists()
    assert "note: s.png not written: matplotlib is required for" in r.stderr
    r = run_cli_inprocess(["build", work / "m.onnx", "-o", work / "b", "--calib", work / "cal", "--duration", "0",
                           "--iterations", "3", "--warmup-ms", "0"], capsys)
    assert r.rc == 0, r.stderr
    assert (work / "b" / "latency.json").is_file()
    assert not (work / "b" / "latency.png").exists()
    assert "note: latency.png not written" in r.stderr
    assert_no_leftovers(work)


# --------------------------------------------------------------------------- 10. the validators


def test_check_number_refuses_non_finite_bool_and_out_of_range() -> None:
    from compress.validate import FieldError, Interval, check_number

    for value, problem in [(math.nan, "must be a finite number (not nan or inf)"),
                           (math.inf, "must be a finite number (not nan or inf)"),
                           (True, "must be a number"), ("1", "must be a number"),
                           (-1, "must be >= 0 and <= 1"), (2, "must be >= 0 and <= 1")]:
        with pytest.raises(FieldError) as exc:
            check_number("C", "f", value, within=Interval(0, 1), example="0.5")
        assert exc.value.problem == problem
        assert exc.value.message.startswith("C.f = ")
        assert exc.value.hint == "e.g. f=0.5"
    check_number("C", "f", None, optional=True)
    check_number("C", "f", 1, within=Interval(0, 1))
    with pytest.raises(FieldError, match="must be > 0"):
        check_number("C", "f", 0, within=Interval(low=0, low_open=True))


def test_field_error_renders_for_each_front_end() -> None:
    from compress.validate import FieldError, as_flags

    exc = FieldError("BenchConfig", "warmup_s", math.inf, "must be a finite number (not nan or inf)", example="0.2")
    assert str(exc) == "BenchConfig.warmup_s = inf: must be a finite number (not nan or inf) (hint: e.g. warmup_s=0.2)"
    flag = as_flags(exc, {"warmup_s": ("--warmup-ms", "inf", "200")})
    assert (flag.message, flag.hint) == ("--warmup-ms inf: must be a finite number (not nan or inf)", "e.g. --warmup-ms 200")
    key = exc.as_key("p.yaml: build.warmup_ms", math.inf, "200")
    assert (key.message, key.hint) == ("p.yaml: build.warmup_ms = inf: must be a finite number (not nan or inf)",
                                       "e.g. warmup_ms: 200")
    assert as_flags(exc, {}) is exc


def test_stage_configs_validate_every_number() -> None:
    from compress.bench import BenchConfig
    from compress.build import BuildConfig
    from compress.gates import Gates
    from compress.prune import PruneConfig
    from compress.validate import FieldError

    cases = [
        (lambda: BenchConfig(iterations=0), "BenchConfig.iterations = 0: must be >= 1 and <= 100000"),
        (lambda: BenchConfig(warmup_s=math.inf), "BenchConfig.warmup_s = inf: must be a finite number"),
        (lambda: BenchConfig(duration_s=-1.0), "BenchConfig.duration_s = -1.0: must be >= 0 and <= 3600"),
        (lambda: BenchConfig(max_iterations=10**9), "BenchConfig.max_iterations = 1000000000: must be >= 1 and <= 10000000"),
        (lambda: Gates(max_regression_pct=math.nan), "Gates.max_regression_pct = nan: must be a finite number"),
        (lambda: Gates(min_speedup=0.0), "Gates.min_speedup = 0.0: must be > 0"),
        (lambda: PruneConfig(max_drop=-0.1), "PruneConfig.max_drop = -0.1: must be >= 0 and <= 1"),
        (lambda: PruneConfig(remove=-1), "PruneConfig.remove = -1: must be >= 0"),
        (lambda: PruneConfig(remove=True), "PruneConfig.remove = True: must be an integer"),
        (lambda: PruneConfig(keep=(-1,)), "PruneConfig.keep = (-1,): must be block indices (integers >= 0)"),
        (lambda: PruneConfig(metric="cosin"), "PruneConfig.metric = cosin: is not one of: ablation, angular, cka, cosine, cosine-signed, gradnorm, auto"),
        (lambda: PruneConfig(select="best"), "PruneConfig.select = best: is not one of: "),
        (lambda: PruneConfig(holdout=math.nan), "PruneConfig.holdout = nan: must be a finite number"),
        (lambda: BuildConfig(precision="fp8"), "BuildConfig.precision = fp8: is not one of: fp32, fp16, int8"),
        (lambda: BuildConfig(backend="cuda"), "BuildConfig.backend = cuda: is not one of: ort, trt"),
    ]
    for make, message in cases:
        with pytest.raises(FieldError) as exc:
            make()
        assert exc.value.message.startswith(message), exc.value.message


def test_measure_is_bounded_by_max_iterations() -> None:
    from compress.bench import BenchConfig, measure

    calls: list[int] = []
    t = measure(lambda: calls.append(1), BenchConfig(warmup_s=0.0, iterations=5, duration_s=3600.0, max_iterations=50))
    assert t.count == 50  # the hour-long duration stops at max_iterations
    assert len(calls) == 51  # plus the one warm-up run


def test_check_document_bounds_depth_size_and_keys() -> None:
    from compress.errors import ModelError
    from compress.validate import check_document, shown

    shared: list = ["x"] * 10
    for _ in range(6):
        shared = [shared] * 10  # 10^7 leaves, a few hundred objects
    with pytest.raises(ConfigError, match=r"^s: more than 200000 values"):
        check_document({"a": shared}, source="s")
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ModelError, match=r"^s: nested deeper than 64 levels at a\[0\]"):
        check_document({"a": deep}, source="s", error=ModelError)
    with pytest.raises(ConfigError, match=r"^s: key \(1, 2\) at b is not a string"):
        check_document({"b": {(1, 2): 3}}, source="s")
    check_document({"a": [1, {"b": None}]}, source="s")
    assert shown(shared) == "a list of 10 items"  # no repr of 10^7 leaves
    assert len(shown("y" * 10**6)) <= 150


def test_read_npz_header_never_reads_data_of_a_bomb(tmp_path) -> None:
    from compress.calibration import read_npz_header
    from compress.errors import CalibrationError

    p = tmp_path / "b.npz"
    _zip(p, {"x.npy": _npy_header((10**12,), "<f8")})
    with pytest.raises(CalibrationError, match=r"claims shape 1000000000000 of float64 \(8000000000000 bytes\)"):
        read_npz_header(p, name="b.npz")
    good = tmp_path / "g.npz"
    np.savez_compressed(good, x=np.zeros((1000, 64), np.float32))  # ~1000:1, still accepted
    assert read_npz_header(good, name="g.npz").arrays[0].shape == (1000, 64)

