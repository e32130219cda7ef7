"""compress build on ONNX Runtime: reports (schema pinned), gates and their exit codes, bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import models
from compress.cli import main
from compress.gates import GATE_EXIT_CODES

FAST = ["--warmup-ms", "5", "--iterations", "10", "--duration", "0.05"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("build")
    path = models.export_onnx(models.tiny_transformer(), models.transformer_input(), d / "t.onnx", dynamic_batch=True)
    small = models.export_onnx(models.tiny_transformer(depth=2), models.transformer_input(), d / "s.onnx",
                               dynamic_batch=True)
    calib = d / "calib"
    calib.mkdir()
    for i in range(3):
        np.savez(calib / f"b{i}.npz", x=models.transformer_input(2, 8, seed=30 + i).numpy())
    return str(path), str(small), str(calib)


def test_build_ort_writes_every_report(tiny, tmp_path, capsys) -> None:
    model, small, calib = tiny
    out = tmp_path / "build"
    rc = main(["build", small, "-o", str(out), "--calib", calib, "--baseline", model, *FAST])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "latency.json", "latency.md", "latency.png",
                                                      "model.onnx", "passes.json", "trtexec.sh"]
    report = json.loads((out / "latency.json").read_text())
    assert set(report) == {"schema_version", "backend", "provider", "percentile_method", "bench", "candidate",
                           "environment", "baseline", "comparison", "gates"}
    assert report["schema_version"] == 1
    assert report["provider"] == "CPUExecutionProvider"
    lat = report["candidate"]["latency"]
    assert set(lat) == {"count", "min_ms", "max_ms", "mean_ms", "median_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
                        "std_ms", "cov_pct", "total_s"}
    assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["count"] >= 10
    comp = report["comparison"]
    assert comp["speedup_median"] == pytest.approx(report["baseline"]["latency"]["median_ms"] / lat["median_ms"])
    assert 0 < comp["fidelity"]["cosine"] <= 1
    bench = json.loads((out / "benchmark.json").read_text())
    assert [b["name"] for b in bench] == ["s.onnx ort fp32 median", "s.onnx ort fp32 p99"]
    assert all(b["unit"] == "ms" for b in bench)
    assert (out / "trtexec.sh").read_text().splitlines()[-1].startswith("trtexec --onnx=model.onnx --saveEngine=engine.plan")
    assert str(tmp_path) not in (out / "latency.json").read_text()
    assert "## Latency: s.onnx (ort, CPUExecutionProvider)" in capsys.readouterr().out


@pytest.mark.parametrize(("gate", "args"), [
    ("max-latency", ["--max-latency-ms", "0.000001"]),
    ("min-speedup", ["--min-speedup", "1000"]),
    ("min-fidelity", ["--min-fidelity", "1"]),  # the pruned model's cosine is below 1 (a cosine above 1 is refused)
])
def test_failed_gates_exit_with_their_code(tiny, tmp_path, capsys, gate, args) -> None:
    model, small, calib = tiny
    rc = main(["build", small, "-o", str(tmp_path / "b"), "--calib", calib, "--baseline", model, *FAST, *args])
    assert rc == GATE_EXIT_CODES[gate]
    assert f"gate failed: {gate}: " in capsys.readouterr().err
    report = json.loads((tmp_path / "b" / "latency.json").read_text())  # the reports are still written
    assert [g["passed"] for g in report["gates"]] == [False]


def test_regression_gate_against_a_previous_report(tiny, tmp_path, capsys) -> None:
    model, small, calib = tiny
    assert main(["build", model, "-o", str(tmp_path / "a"), "--calib", calib, *FAST]) == 0
    previous = json.loads((tmp_path / "a" / "latency.json").read_text())
    previous["candidate"]["latency"]["median_ms"] = 1e-6  # a previous run that was impossibly fast
    (tmp_path / "prev.json").write_text(json.dumps(previous))
    rc = main(["build", model, "-o", str(tmp_path / "b"), "--calib", calib, *FAST,
               "--previous", str(tmp_path / "prev.json"), "--max-regression", "5"])
    assert rc == GATE_EXIT_CODES["max-regression"]
    assert "gate failed: max-regression: median 1e-06 -> " in capsys.readouterr().err


def test_bad_previous_report_is_named(tiny, tmp_path, capsys) -> None:
    model, _, calib = tiny
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    assert main(["build", model, "-o", str(tmp_path / "b"), "--previous", str(bad), "--max-regression", "5"]) == 1
    assert capsys.readouterr().err == (f"error: {bad} is not a compress latency report (schema_version 1 with a candidate)\n"
                                       "hint: pass the latency.json written by an earlier 'compress build'\n")
    assert not (tmp_path / "b").exists()


def test_output_folder_rules(tiny, tmp_path, capsys) -> None:
    model, _, calib = tiny
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["build", model, "-o", str(out), "--calib", calib, *FAST]) == 1
    assert capsys.readouterr().err == f"error: output folder {out} is not empty\nhint: pass --force to replace it, or choose another -o\n"
    assert main(["build", model, "-o", str(out), "--calib", calib, "--force", *FAST]) == 1
    assert "holds files other than an earlier build's files (notes.txt); refusing to replace it" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_failure_leaves_no_output_folder(tiny, tmp_path, capsys) -> None:
    model, _, calib = tiny
    out = tmp_path / "b"
    rc = main(["build", model, "-o", str(out), "--calib", calib, "--backend", "trt", *FAST])
    if "tensorrt" in sys.modules:
        pytest.skip("tensorrt is installed")
    assert rc == 1
    assert capsys.readouterr().err == ("error: tensorrt is required for 'compress build --backend trt' but is not installed\n"
                                       "hint: pip install 'onnx-compress[trt]'\n")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]


def test_dynamic_model_without_shapes_or_calibration(tiny, tmp_path, capsys) -> None:
    model, _, _ = tiny
    assert main(["build", model, "-o", str(tmp_path / "b"), *FAST]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: input 'x' has a dynamic dim 'batch': no shape to benchmark\n")
    assert main(["build", model, "-o", str(tmp_path / "c"), "--shapes", "x:1x8x16/2x8x16/4x8x16", *FAST]) == 0
    report = json.loads((tmp_path / "c" / "latency.json").read_text())
    assert report["bench"]["input_shapes"] == {"x": [2, 8, 16]}
    assert report["candidate"]["random_inputs"] is True


def test_int8_needs_real_calibration(tiny, tmp_path, capsys) -> None:
    model, _, _ = tiny
    assert main(["build", model, "-o", str(tmp_path / "b"), "--precision", "int8", "--random-calib", "2",
                 "--random-dims", "batch=2"]) == 1
    assert capsys.readouterr().err == "error: --precision int8 needs real calibration data\nhint: pass --calib DIR\n"


def test_build_runs_the_passes_in_order_with_fidelity(tiny, tmp_path) -> None:
    import onnx

    model, _, calib = tiny
    out = tmp_path / "b"
    assert main(["build", model, "-o", str(out), "--calib", calib, "--precision", "int8", "--sparsity", "2:4", *FAST]) == 0
    passes = json.loads((out / "passes.json").read_text())["passes"]
    assert [p["name"] for p in passes] == ["sparsity-2:4", "int8"]
    assert passes[1]["config"]["activation_type"] == "uint8"  # --int8-activations auto, --backend ort
    assert all(0 < p["fidelity"]["cosine"] <= 1 for p in passes)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("QuantizeLinear") > 0
    assert ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    report = json.loads((out / "latency.json").read_text())
    assert (report["candidate"]["precision"], report["candidate"]["sparsity"]) == ("int8", "2:4")


def test_build_int8_activations_option(tiny, tmp_path) -> None:
    import onnx
    from onnx import numpy_helper

    model, _, calib = tiny
    out = tmp_path / "b"
    assert main(["build", model, "-o", str(out), "--calib", calib, "--precision", "int8",
                 "--int8-activations", "int8", *FAST]) == 0
    passes = json.loads((out / "passes.json").read_text())["passes"]
    assert (passes[0]["config"]["activation_type"], passes[0]["config"]["symmetric"]) == ("int8", True)
    built = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in built.graph.initializer}
    zps = [inits[n.input[2]] for n in built.graph.node if n.op_type == "QuantizeLinear"]
    assert zps
    assert all(z.dtype == np.int8 and not z.any() for z in zps)


def test_uint8_activations_cannot_go_to_tensorrt(tiny, tmp_path, capsys) -> None:
    model, _, calib = tiny
    out = tmp_path / "b"
    assert main(["build", model, "-o", str(out), "--calib", calib, "--precision", "int8", "--backend", "trt",
                 "--int8-activations", "uint8", *FAST]) == 1
    assert capsys.readouterr().err == (
        "error: --int8-activations uint8 cannot go to TensorRT: its Q/DQ activations must be symmetric int8 "
        "(zero point 0)\nhint: leave --int8-activations at auto (int8 for --backend trt), or use --backend ort\n")
    assert not out.exists()


@pytest.mark.parametrize(("kwargs", "message", "hint"), [
    ({"precision": "int4"}, "BuildConfig.precision = int4: is not one of: fp32, fp16, int8", "e.g. precision=fp32"),
    ({"backend": "TRT"}, "BuildConfig.backend = TRT: is not one of: ort, trt", "e.g. backend=ort"),
])
def test_build_config_names_the_field_and_its_valid_values(kwargs, message, hint) -> None:
    from compress.build import BuildConfig
    from compress.validate import FieldError

    with pytest.raises(FieldError) as exc:
        BuildConfig(**kwargs)
    assert (exc.value.owner, exc.value.field) == ("BuildConfig", next(iter(kwargs)))
    assert (exc.value.message, exc.value.hint) == (message, hint)


def test_build_returns_data_and_the_glue_adds_gates(tiny, tmp_path) -> None:
    """build() evaluates no gate and renders nothing; render_build records the gates the caller evaluated."""
    import onnx

    from compress.build import BuildConfig, BuildResult, build
    from compress.gates import Gates, evaluate_gates
    from compress.reports.build import render_build, write_build_files

    _, small, _ = tiny
    config = BuildConfig(shapes=("x:1x8x16/2x8x16/4x8x16",), warmup_ms=0.0, iterations=3, duration=0.0)
    result = build(onnx.load(small), config, names={"model": "s.onnx", "baseline": None})
    assert isinstance(result, BuildResult)
    assert "gates" not in result.latency.to_dict()
    gates = evaluate_gates(result.latency.to_dict(), Gates(max_latency_ms=1e9), previous=None)
    reports = render_build(result, gates)
    assert "gates" not in result.latency.to_dict()  # not modified
    assert [g["name"] for g in reports.latency["gates"]] == ["max-latency"]
    assert "| max-latency | pass |" in reports.markdown
    assert render_build(result).latency["gates"] == []
    write_build_files(tmp_path, result, reports)
    assert json.loads((tmp_path / "latency.json").read_text())["gates"][0]["passed"] is True
