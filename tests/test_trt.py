"""TensorRT: the version logic (with a stand-in module, everywhere) and a real build (where tensorrt imports)."""

from __future__ import annotations

import enum
import sys
import types

import numpy as np
import pytest

import compress.onnx_io
from compress.build.trt import EngineConfig, ShapeProfile, network_flags, precision_flags, trtexec_command
from compress.errors import BuildError, ConfigError, MissingDependencyError


def fake_tensorrt(version: str) -> types.SimpleNamespace:
    """The members of the tensorrt module that the version logic reads, per the 10.x / 11.x API docs."""
    major = int(version.split(".")[0])
    creation = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major <= 10 else {"STRONGLY_TYPED": 0}
    builder_flags = ["DEBUG", "GPU_FALLBACK", "REFIT", "TF32", "SPARSE_WEIGHTS"]
    if major <= 10:
        builder_flags = ["FP16", "INT8", *builder_flags]
    return types.SimpleNamespace(
        __version__=version,
        NetworkDefinitionCreationFlag=enum.IntEnum("NetworkDefinitionCreationFlag", creation),
        BuilderFlag=enum.Enum("BuilderFlag", builder_flags),
    )


def test_tensorrt_11_is_strongly_typed_without_precision_flags() -> None:
    trt = fake_tensorrt("11.1.0")
    assert network_flags(trt, EngineConfig()) == 0  # STRONGLY_TYPED is deprecated and ignored in 11
    assert precision_flags(trt, EngineConfig()) == []
    with pytest.raises(ConfigError) as err:
        precision_flags(trt, EngineConfig(legacy_precision="fp16"))
    assert err.value.message == "--legacy-precision fp16: TensorRT 11.1.0 has no FP16/INT8 builder flags"


def test_tensorrt_10_sets_strongly_typed_or_legacy_flags() -> None:
    trt = fake_tensorrt("10.16.1")
    assert network_flags(trt, EngineConfig()) == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert precision_flags(trt, EngineConfig()) == []
    legacy = EngineConfig(legacy_precision="int8")
    assert network_flags(trt, legacy) == 0  # weakly typed
    assert precision_flags(trt, legacy) == [trt.BuilderFlag.FP16, trt.BuilderFlag.INT8]


def test_tensorrt_8_needs_explicit_batch() -> None:
    trt = fake_tensorrt("8.6.1")
    assert network_flags(trt, EngineConfig(legacy_precision="fp16")) == 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def test_trtexec_command() -> None:
    cfg = EngineConfig(profiles=(ShapeProfile.parse("input_ids:1x16/8x128/16x128"),), sparse_weights=True)
    cmd = trtexec_command("model.onnx", "engine.plan", cfg, tensorrt_major=11)
    assert cmd.startswith("trtexec --onnx=model.onnx --saveEngine=engine.plan --timingCacheFile=timing.cache ")
    assert "--stronglyTyped" not in cmd
    assert "--fp16" not in cmd
    assert "--sparsity=enable" in cmd
    assert "--minShapes=input_ids:1x16 --optShapes=input_ids:8x128 --maxShapes=input_ids:16x128" in cmd
    assert "--stronglyTyped" in trtexec_command("m.onnx", "e.plan", EngineConfig(), tensorrt_major=10)
    assert "--fp16 --int8" in trtexec_command("m.onnx", "e.plan", EngineConfig(legacy_precision="int8"), tensorrt_major=10)


@pytest.mark.parametrize(("spec", "message"), [
    ("x", "--shapes 'x' is not NAME:MIN/OPT/MAX"),
    ("x:1x2/3", "--shapes 'x:1x2/3' is not NAME:MIN/OPT/MAX"),
    ("x:1xa/1x2/1x3", "--shapes 'x:1xa/1x2/1x3': dims must be integers joined by 'x'"),
    ("x:4x2/1x2/8x2", "--shapes 'x:4x2/1x2/8x2': need equal ranks and MIN <= OPT <= MAX in every dim"),
])
def test_bad_shapes(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ShapeProfile.parse(spec)
    assert err.value.message == message


def test_static_shape_profile() -> None:
    p = ShapeProfile.parse("x:1x3x224x224")
    assert p.min == p.opt == p.max == (1, 3, 224, 224)


def test_missing_tensorrt_names_the_extra(monkeypatch) -> None:
    if "tensorrt" in sys.modules:
        pytest.skip("tensorrt is installed")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as when absent
    from compress.build.trt import build_engine

    with pytest.raises(MissingDependencyError) as err:
        build_engine("model.onnx", EngineConfig())
    assert err.value.message == "tensorrt is required for 'compress build --backend trt' but is not installed"
    assert err.value.hint == "pip install 'onnx-compress[trt]'"


@pytest.mark.trt
def test_real_engine_build_and_timing(tmp_path) -> None:
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import onnx

    import models
    from compress.bench import BenchConfig
    from compress.build.trt import build_engine, time_engine

    path = models.export_onnx(models.tiny_transformer(), models.transformer_input(), tmp_path / "t.onnx")
    engine = build_engine(str(path), EngineConfig())
    assert engine.plan
    assert engine.info["strongly_typed"]
    assert {t["name"] for t in engine.info["io"]} == {"x", "y"}
    timing = time_engine(engine.plan, {"x": models.transformer_input().numpy()}, BenchConfig(duration_s=0.2))
    assert timing.count >= 10
    bad = tmp_path / "bad.onnx"
    m = onnx.load(str(path))
    m.graph.node[0].op_type = "NoSuchOp"
    compress.onnx_io.save_model(m, str(bad))
    with pytest.raises(BuildError, match="TensorRT cannot parse the model"):
        build_engine(str(bad), EngineConfig())
    assert np.isfinite(timing.median_ms)
