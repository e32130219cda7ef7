"""Precision and sparsity passes: fp16, int8 (Q/DQ), 2:4 sparsity; registry, purity, bad input."""

from __future__ import annotations

import json
import platform

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import models
from compress.errors import CalibrationError, ConfigError, ModelError
from compress.external import embedded_copy, read_array
from compress.passes import (
    PASSES,
    Fp16Config,
    Int8Config,
    SparsityConfig,
    fp16_pass,
    get_pass,
    int8_pass,
    measure_fidelity,
    prune_2_4,
    sparsity_pass,
)
from compress.passes.sparsity import is_2_4_sparse
from compress.runtime import make_session

# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """TinyTransformer (dim 32, depth 4), dynamo export, x: float32 [2, 8, 16]."""
    d = tmp_path_factory.mktemp("passes")
    return onnx.load(models.export_onnx(models.tiny_transformer(), models.transformer_input(), d / "t.onnx"))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """TinyResNet (8 channels), TorchScript export, x: float32 [batch, 3, 8, 8]."""
    d = tmp_path_factory.mktemp("passes")
    return onnx.load(models.export_onnx(models.tiny_resnet(), models.image_input(), d / "r.onnx",
                                        exporter="torchscript", dynamic_batch=True))


def _batches(shape: tuple[int, ...], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def tt_calib() -> list[dict[str, np.ndarray]]:
    return _batches((2, 8, 16), 8, seed=0)


@pytest.fixture(scope="module")
def tt_held() -> list[dict[str, np.ndarray]]:
    return _batches((2, 8, 16), 4, seed=1)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = make_session(model)
    return sess.run(None, feed)


def _model(nodes, inputs, outputs, inits, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _f32(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _elem(model: onnx.ModelProto, name: str) -> int:
    for t in model.graph.initializer:
        if t.name == name:
            return t.data_type
    raise KeyError(name)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


# ---------------------------------------------------------------------------------------------
# Registry, report, purity
# ---------------------------------------------------------------------------------------------


def test_registry_lists_passes_and_rejects_unknown_names() -> None:
    assert PASSES.names() == ["fp16", "int8", "smoothquant", "sparsity-2:4"]
    assert get_pass("int8").needs_calibration
    assert not get_pass("fp16").needs_calibration
    assert [get_pass(n).kind for n in PASSES.names()] == ["precision", "precision", "precision", "sparsity"]
    with pytest.raises(ConfigError) as err:
        get_pass("int4")
    assert err.value.message == "unknown pass 'int4'; valid: fp16, int8, smoothquant, sparsity-2:4"
    assert err.value.hint == "use --precision/--sparsity with one of: fp16, int8, smoothquant, sparsity-2:4"
    with pytest.raises(ConfigError, match="pass 'fp16' takes a Fp16Config, got SparsityConfig"):
        get_pass("fp16")(onnx.ModelProto(), SparsityConfig())


def test_register_pass_rejects_a_duplicate_name() -> None:
    from compress.passes import register_pass

    with pytest.raises(ValueError, match="already registered") as err:
        register_pass("fp16", config=Fp16Config, kind="precision")(fp16_pass)
    assert str(err.value) == "pass 'fp16' is already registered"
    assert PASSES.names() == ["fp16", "int8", "smoothquant", "sparsity-2:4"]
    assert get_pass("fp16").run is fp16_pass


@pytest.mark.parametrize("name", ["fp16", "int8", "sparsity-2:4"])
def test_passes_do_not_modify_their_input(name: str, transformer: onnx.ModelProto, tt_calib) -> None:
    before = transformer.SerializeToString()
    config = {"fp16": Fp16Config(), "int8": Int8Config(), "sparsity-2:4": SparsityConfig(min_channels=0)}[name]
    out, report = get_pass(name)(transformer, config, data=tt_calib[:2] if name != "sparsity-2:4" else None)
    assert transformer.SerializeToString() == before
    assert out is not transformer
    assert out.SerializeToString() != before
    json.dumps(report.to_dict())  # JSON-ready
    assert report.to_dict()["name"] == name


# ---------------------------------------------------------------------------------------------
# FP16
# ---------------------------------------------------------------------------------------------


def test_fp16_transformer_keeps_norms_fp32_and_matches_fp32(transformer, tt_held) -> None:
    out, report = fp16_pass(transformer, Fp16Config())
    # the 9 LayerNormalizations stay FP32 (8 in blocks + final norm), nothing else
    assert [(i["op"], i["reason"]) for i in report.items] == [("LayerNormalization", "normalization")] * 9
    assert report.changes["nodes_kept_fp32"] == 9
    # 1 Cast per LayerNorm input and output + 1 for the graph input and 1 for the output
    assert report.nodes_added == {"Cast": 2 * 9 + 2}
    assert report.changes["initializers_converted"] == 40
    assert report.changes["initializers_kept_fp32"] == 18
    producers = _producers(out)
    for node in out.graph.node:
        if node.op_type == "MatMul" and node.input[1] in {t.name for t in out.graph.initializer}:
            assert _elem(out, node.input[1]) == TensorProto.FLOAT16
        if node.op_type == "LayerNormalization":
            assert all(_elem(out, x) == TensorProto.FLOAT for x in node.input[1:])
            assert producers[node.input[0]].op_type == "Cast"
    # keep_io_types: input and output stay float32
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    fid = measure_fidelity(transformer, out, tt_held)
    assert fid["cosine"] >= 0.99999
    assert fid["max_abs"] < 1e-2
    assert fid["top1"] == 1.0


def test_fp16_without_keep_io_types_has_fp16_io(transformer, tt_held) -> None:
    out, report = fp16_pass(transformer, Fp16Config(keep_io_types=False, keep_softmax=True))
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert sorted({i["op"] for i in report.items}) == ["LayerNormalization", "Softmax"]
    assert report.changes["kept_fp32_by_rule"] == {"normalization": 9, "softmax": 4}
    y = _run(out, {"x": tt_held[0]["x"].astype(np.float16)})[0]
    assert y.dtype == np.float16
    fid = measure_fidelity(transformer, out, tt_held)  # float32 feeds are cast inside the graph
    assert fid["cosine"] >= 0.9999


def test_fp16_cnn_runs_on_ort_cpu_and_reductions_follow_the_limit(resnet) -> None:
    batches = _batches((2, 3, 8, 8), 2, seed=3)
    out, report = fp16_pass(resnet, Fp16Config())
    assert report.items == ()  # the global average pool sums 64 elements <= 4096
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len(convs) == 9
    assert all(_elem(out, n.input[1]) == TensorProto.FLOAT16 for n in convs)
    assert measure_fidelity(resnet, out, batches)["cosine"] >= 0.9999
    out, report = fp16_pass(resnet, Fp16Config(max_reduce_elements=32))
    assert [(i["op"], i["reason"]) for i in report.items] == [("ReduceMean", "reduction over 64 elements > 32")]


def _range_model() -> onnx.ModelProto:
    """y = ((x @ W) * 2**20 + 1e-9) * 2**-10: a huge constant, a tiny one, huge activations."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h1"], name="matmul"),
             helper.make_node("Mul", ["h1", "big"], ["h2"], name="scale_up"),
             helper.make_node("Add", ["h2", "eps"], ["h3"], name="add_eps"),
             helper.make_node("Mul", ["h3", "small"], ["y"], name="scale_down")]
    inits = [_init("W", rng.standard_normal((4, 4)).astype(np.float32)), _init("big", np.float32(2.0**20)),
             _init("eps", np.float32(1e-9)), _init("small", np.float32(2.0**-10))]
    return _model(nodes, [_f32("x", [2, 4])], [_f32("y", [2, 4])], inits)


def test_fp16_out_of_range_constants_and_activations_stay_fp32() -> None:
    model = _range_model()
    batches = _batches((2, 4), 3, seed=2)
    ref = _run(model, batches[0])[0]

    out, report = fp16_pass(model, Fp16Config())
    reasons = {i["node"]: i["reason"] for i in report.items}
    assert reasons == {
        "scale_up": "reads constant 'big' with |x| up to 1.05e+06 > 65504 (would be inf in FP16)",
        "add_eps": "reads constant 'eps' with 1 of 1 non-zero values below 5.96e-08 (would be 0 in FP16)",
    }
    assert _elem(out, "big") == TensorProto.FLOAT
    assert _elem(out, "W") == TensorProto.FLOAT16
    # h3 ~ 1e6 is cast to FP16 for scale_down: inf. ONNX Runtime CPU hides it (it has no FP16 Mul kernel,
    # runs Mul in FP32 and drops the Cast pair); the ONNX reference evaluator computes in FP16.
    assert np.isfinite(_run(out, batches[0])[0]).all()
    with np.errstate(over="ignore"):
        assert not np.isfinite(ReferenceEvaluator(embedded_copy(out)).run(None, batches[0])[0]).all()

    out, report = fp16_pass(model, Fp16Config(), data=batches)
    reasons = {i["node"]: i["reason"] for i in report.items}
    assert set(reasons) == {"scale_up", "add_eps", "scale_down"}
    assert reasons["scale_down"].startswith("input 'h3' reaches |x| = ")
    assert reasons["scale_down"].endswith("on calibration data (> 16376)")
    assert report.changes["calibration_batches"] == 3
    assert report.nodes_added == {"Cast": 2}  # x -> fp16 for the MatMul, h1 -> fp32; y is produced in FP32
    y = ReferenceEvaluator(embedded_copy(out)).run(None, batches[0])[0]
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=5e-3, atol=2.0)  # |y| ~ 1e3; FP16 weights: ~1e-3 relative


def test_fp16_decomposed_layernorm_and_batchnorm_stay_fp32() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="mean", keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="centre"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="variance", keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
        helper.make_node("Div", ["d", "std"], ["n"], name="normalize"),
        helper.make_node("Mul", ["n", "gamma"], ["g"], name="gamma"),
        helper.make_node("MatMul", ["g", "W"], ["h"], name="matmul"),
        helper.make_node("Unsqueeze", ["h", "axes23"], ["h4"], name="to_nchw"),
        helper.make_node("BatchNormalization", ["h4", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    inits = [_init("axes", np.array([-1], np.int64)), _init("two", np.float32(2.0)), _init("eps", np.float32(1e-5)),
             _init("gamma", rng.standard_normal(8).astype(np.float32)),
             _init("W", rng.standard_normal((8, 8)).astype(np.float32)), _init("axes23", np.array([3], np.int64)),
             *[_init(k, (rng.random(2) + 0.5).astype(np.float32)) for k in ("s", "b", "m", "v")]]
    model = _model(nodes, [_f32("x", [2, 2, 8])], [_f32("y", [2, 2, 8, 1])], inits)
    out, report = fp16_pass(model, Fp16Config(block_nodes=("gamma",)))
    reasons = {i["node"]: i["reason"] for i in report.items}
    written_out = "normalization written out as ReduceMean of squares"
    assert reasons == {"mean": written_out, "centre": written_out, "square": written_out, "variance": written_out,
                       "add_eps": written_out, "sqrt": written_out, "normalize": written_out,
                       "gamma": "user block list (node name)", "bn": "normalization"}
    feed = _batches((2, 2, 8), 1, seed=4)[0]
    np.testing.assert_allclose(_run(out, feed)[0], _run(model, feed)[0], rtol=2e-2, atol=2e-2)
    _, report = fp16_pass(model, Fp16Config(keep_normalization=False, block_ops=("MatMul",)))
    assert {i["node"]: i["reason"] for i in report.items} == {"matmul": "user block list (op type MatMul)"}


def test_fp16_bad_input() -> None:
    ints = _model([helper.make_node("Add", ["x", "c"], ["y"], name="add")],
                  [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                  [helper.make_tensor_value_info("y", TensorProto.INT64, [2])], [_init("c", np.array([1, 2], np.int64))])
    with pytest.raises(ModelError) as err:
        fp16_pass(ints, Fp16Config())
    assert err.value.message == "fp16: the model has no float32 weights to convert"
    with pytest.raises(ConfigError, match=r"^fp16: block list names unknown node\(s\): nope"):
        fp16_pass(_range_model(), Fp16Config(block_nodes=("nope",)))
    with pytest.raises(ConfigError, match=r"activation_limit must be in \(0, 65504\]"):
        Fp16Config(activation_limit=1e6)
    with pytest.raises(CalibrationError, match="calibration batch 0 does not fit the model"):
        fp16_pass(_range_model(), Fp16Config(), data=[{"x": np.zeros((2, 5), np.float32)}])


# ---------------------------------------------------------------------------------------------
# INT8
# ---------------------------------------------------------------------------------------------


def _zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    return [read_array(inits[n.input[2]]) for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_int8_transformer_symmetric_qdq_on_every_matmul(transformer, tt_calib, tt_held) -> None:
    out, report = int8_pass(transformer, Int8Config(), data=tt_calib)
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 26
    producers = _producers(out)
    for n in matmuls:  # both inputs (activations and weights) come from a DequantizeLinear
        assert [producers[x].op_type for x in n.input] == ["DequantizeLinear", "DequantizeLinear"]
    # one dedicated Q/DQ pair per MatMul input (outputs are not quantized)
    assert report.nodes_added == {"DequantizeLinear": 52, "QuantizeLinear": 52}
    assert report.changes["nodes_quantized"] == 26
    assert report.changes["nodes_not_quantized"] == 0
    zps = _zero_points(out)
    assert len(zps) == 104
    assert all(z.dtype == np.int8 and not z.any() for z in zps)
    assert report.changes["nonzero_zero_points"] == 0
    assert report.changes["per_channel_weight_scales"] == 18  # the 18 Linear weights, per output channel
    assert report.changes["calibration_batches"] == 8
    fid = measure_fidelity(transformer, out, tt_held)
    assert fid["cosine"] >= 0.999  # observed 0.9997 on held-out batches


def test_int8_quantizes_weights_stored_as_constant_nodes(transformer, tt_calib, tt_held) -> None:
    # Paddle-style graph: every weight is a Constant node, the graph has no initializer
    foreign = onnx.ModelProto()
    foreign.CopyFrom(transformer)
    constants = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
                 for t in foreign.graph.initializer]
    nodes = list(foreign.graph.node)
    del foreign.graph.initializer[:]
    del foreign.graph.node[:]
    foreign.graph.node.extend(constants + nodes)
    onnx.checker.check_model(foreign, full_check=True)
    out, report = int8_pass(foreign, Int8Config(), data=tt_calib)
    assert report.changes["nodes_quantized"] == 26  # as many as with initializers
    floats = sum(t.data_type == TensorProto.FLOAT and len(t.dims) > 0 for t in transformer.graph.initializer)
    assert any(w.startswith(f"{floats} float Constant node(s) made initializers") for w in report.warnings), report.warnings
    assert sum(n.op_type == "Constant" for n in foreign.graph.node) == len(constants)  # input unchanged
    assert measure_fidelity(foreign, out, tt_held)["cosine"] >= 0.999


def test_int8_excludes_nodes_and_op_types(resnet) -> None:
    calib = _batches((2, 3, 8, 8), 3, seed=5) + _batches((3, 3, 8, 8), 1, seed=6)  # shapes vary
    first_conv = next(n.name for n in resnet.graph.node if n.op_type == "Conv")
    out, report = int8_pass(resnet, Int8Config(method="entropy", exclude_nodes=(first_conv,),
                                               exclude_ops=("Gemm",)), data=calib)
    status = {i["node"]: (i["status"], i.get("reason")) for i in report.items}
    assert status[first_conv] == ("excluded", "excluded by name")
    gemm = next(n.name for n in resnet.graph.node if n.op_type == "Gemm")
    assert status[gemm] == ("excluded", "op type Gemm excluded")
    assert sum(s == ("quantized", None) for s in status.values()) == 8
    producers = _producers(out)
    for n in out.graph.node:
        if n.name in (first_conv, gemm):
            assert all(producers[x].op_type != "DequantizeLinear" for x in n.input if x in producers)
        elif n.op_type == "Conv":
            assert producers[n.input[0]].op_type == "DequantizeLinear"
    assert report.nodes_added == {"DequantizeLinear": 16, "QuantizeLinear": 16}
    assert measure_fidelity(resnet, out, calib[:2])["cosine"] >= 0.999


def test_int8_bad_models(transformer, tt_calib) -> None:
    half, _ = fp16_pass(transformer, Fp16Config())
    with pytest.raises(ModelError, match=r"^int8: the model already has float16 weights \(e.g. 'embed.bias'\)"):
        int8_pass(half, Int8Config(), data=tt_calib)
    quantized, _ = int8_pass(transformer, Int8Config(qdq_on_weights=False), data=tt_calib[:2])
    assert {t.data_type for t in quantized.graph.initializer if t.name.endswith("_quantized")} == {TensorProto.INT8}
    quantized = onnx.ModelProto.FromString(quantized.SerializeToString())
    keep = [t for t in quantized.graph.initializer if t.data_type != TensorProto.FLOAT]
    del quantized.graph.initializer[:]
    quantized.graph.initializer.extend(keep)
    with pytest.raises(ModelError, match="^int8: the model has no float32 weights to quantize"):
        int8_pass(quantized, Int8Config(), data=tt_calib)


def test_sparsity_survives_int8(transformer, tt_calib) -> None:
    from polygraphy.tools.sparse import SparsityPruner

    sparse, report = sparsity_pass(transformer, SparsityConfig(min_channels=0))
    quantized, _ = int8_pass(sparse, Int8Config(), data=tt_calib[:2])  # symmetric: 0 stays 0
    checker = SparsityPruner(embedded_copy(quantized))  # looks through the weights' Q/DQ pairs
    with np.errstate(over="ignore"):
        checker.check()
    assert len(checker.sparse_tensors) == report.changes["weights_pruned"] == 18


def test_int8_bad_calibration(transformer, tt_calib) -> None:
    with pytest.raises(CalibrationError) as err:
        int8_pass(transformer, Int8Config())
    assert err.value.message == "int8 needs calibration data"
    with pytest.raises(CalibrationError) as err:
        int8_pass(transformer, Int8Config(), data=[{"y": tt_calib[0]["x"]}])
    assert err.value.message == ("calibration batch 0 does not fit the model: missing input(s) x; "
                                 "unknown array(s) y (model inputs: x)")
    bad = [tt_calib[0], {"x": tt_calib[1]["x"].astype(np.float64)}]
    with pytest.raises(CalibrationError, match=r"^calibration batch 1: input 'x' is float64, the model wants float32"):
        int8_pass(transformer, Int8Config(), data=bad)
    with pytest.raises(CalibrationError, match=r"^calibration batch 0: input 'x' axis 2 is 12, the model wants 16"):
        int8_pass(transformer, Int8Config(), data=[{"x": np.zeros((2, 8, 12), np.float32)}])
    with pytest.raises(CalibrationError, match="^int8: the calibration data has no batches"):
        int8_pass(transformer, Int8Config(), data=[])
    with pytest.raises(ConfigError, match=r"^int8: unknown calibration method 'kl'; valid: minmax, entropy, percentile"):
        Int8Config(method="kl")
    with pytest.raises(ConfigError, match=r"^int8: exclude list names unknown node\(s\): nope"):
        int8_pass(transformer, Int8Config(exclude_nodes=("nope",)), data=tt_calib)
    with pytest.raises(ConfigError) as err:
        Int8Config(activation_type="fp8")
    assert err.value.message == "int8: unknown activation type 'fp8'; valid: int8, uint8"
    assert err.value.hint == "int8 (symmetric, TensorRT) or uint8 (asymmetric, ONNX Runtime CPU)"


def _qkv_model() -> onnx.ModelProto:
    """x [4, 8, 16] -> LayerNorm -> 3 MatMuls reading it (q, k, v) + residual Add -> Relu -> MatMul + residual Add.

    The Relu output ``a`` is read by one MatMul (``mm_2``) and by the residual Add ``res2``.
    """
    rng = np.random.default_rng(3)
    weights = [_init(n, (rng.standard_normal((16, 16)) / 4).astype(np.float32)) for n in ("wq", "wk", "wv", "w2")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
             *[helper.make_node("MatMul", ["ln", f"w{c}"], [c], name=f"mm_{c}") for c in "qkv"],
             helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"),
             helper.make_node("Add", ["qk", "v"], ["s"], name="add_s"),
             helper.make_node("Add", ["ln", "s"], ["h"], name="res1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["m"], name="mm_2"),
             helper.make_node("Add", ["a", "m"], ["y"], name="res2")]
    inits = [*weights, _init("g", np.ones(16, np.float32)), _init("b", np.zeros(16, np.float32))]
    return _model(nodes, [_f32("x", [4, 8, 16])], [_f32("y", [4, 8, 16])], inits)


def _qdq_params(model: onnx.ModelProto, node: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scale, zero point) of the DequantizeLinear in front of each input of ``node``."""
    inits = {t.name: read_array(t) for t in model.graph.initializer}
    producers = _producers(model)
    target = next(n for n in model.graph.node if n.name == node)
    return [(inits[producers[x].input[1]], inits[producers[x].input[2]]) for x in target.input]


def _fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear in numpy (round half to even, saturate to the zero point's type)."""
    info = np.iinfo(zp.dtype)
    q = np.clip(np.rint(x / scale) + zp.astype(np.int32), info.min, info.max)
    return ((q - zp.astype(np.int32)) * scale).astype(np.float32)


def _qkv_reference(model: onnx.ModelProto, out: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The quantized model's output in numpy: Q/DQ on MatMul inputs only, residual Adds in float."""
    w = {t.name: read_array(t) for t in model.graph.initializer}

    def mm(name: str, a: np.ndarray, weight: str) -> np.ndarray:
        (sa, za), (sw, zw) = _qdq_params(out, name)
        return _fake_quant(a, sa, za) @ _fake_quant(w[weight], sw, zw)  # weight scales per output column

    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ln = (x - mu) / np.sqrt(var + 1e-5)
    a = np.maximum(ln + mm("mm_q", ln, "wq") + mm("mm_k", ln, "wk") + mm("mm_v", ln, "wv"), 0)
    return a + mm("mm_2", a, "w2")


def _ort_optimized_ops(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime CPU executes (ORT_ENABLE_EXTENDED: QDQ fusions, no layout changes)."""
    from collections import Counter

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    make_session(model, options=opts)
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    return dict(Counter(n.op_type for n in optimized.graph.node))


@pytest.mark.parametrize("activation_type", ["int8", "uint8"])
def test_int8_quantizes_matmul_inputs_only_and_matches_numpy(activation_type: str) -> None:
    model = _qkv_model()
    rng = np.random.default_rng(4)
    calib = [{"x": rng.standard_normal((4, 8, 16)).astype(np.float32)} for _ in range(4)]
    out, report = int8_pass(model, Int8Config(activation_type=activation_type), data=calib)
    producers = _producers(out)
    res2 = next(n for n in out.graph.node if n.name == "res2")
    # ORT's quantizer fed res2 the Q/DQ copy of 'a' (mm_2 is its only quantized reader); the pass restores it
    assert [producers[x].op_type for x in res2.input] == ["Relu", "MatMul"]
    assert report.changes["float_inputs_restored"] == 1
    assert report.nodes_added == {"DequantizeLinear": 8, "QuantizeLinear": 8}  # 3 dedicated pairs on ln, 1 on a, 4 weights
    assert report.config["activation_type"] == activation_type
    for node in ("mm_q", "mm_k", "mm_v", "mm_2"):
        (sa, za), (sw, zw) = _qdq_params(out, node)
        assert za.dtype == (np.int8 if activation_type == "int8" else np.uint8)
        assert za.shape == ()
        assert sa.shape == ()
        assert zw.dtype == np.int8
        assert not zw.any()
        assert sw.shape == (16,)
    zp_ln = _qdq_params(out, "mm_q")[0][1]
    if activation_type == "int8":
        assert report.changes["nonzero_zero_points"] == 0
        assert not report.warnings
    else:  # asymmetric: the LayerNorm output's range is not centred on 0 (Relu's output has zero point 0)
        assert zp_ln != 128
        assert report.changes["nonzero_zero_points"] == 1
        assert not report.warnings  # no "not symmetric" warning: uint8 is asymmetric by request
    held = rng.standard_normal((4, 8, 16)).astype(np.float32)
    got = _run(out, {"x": held})[0]
    np.testing.assert_allclose(got, _qkv_reference(model, out, held), rtol=1e-5, atol=1e-4)
    ref = _run(model, {"x": held})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02  # observed 0.012 (int8), 0.010 (uint8)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="ORT's QDQ MatMul fusions differ on ARM (int8 activations allowed there)")
def test_int8_uint8_activations_run_as_integer_matmuls_on_ort_cpu(tmp_path) -> None:
    model = _qkv_model()
    rng = np.random.default_rng(4)
    calib = [{"x": rng.standard_normal((4, 8, 16)).astype(np.float32)} for _ in range(4)]
    assert _ort_optimized_ops(model, tmp_path)["MatMul"] == 4
    int8, _ = int8_pass(model, Int8Config(), data=calib)
    uint8, _ = int8_pass(model, Int8Config(activation_type="uint8"), data=calib)
    # int8: ORT turns an int8 Q->DQ pair into uint8 only when the Q feeds one DQ; the q/k/v pairs on 'ln'
    # are merged into one Q feeding 3 DQs, so those 3 MatMuls stay float
    ops = _ort_optimized_ops(int8, tmp_path)
    assert (ops.get("MatMul"), ops.get("MatMulIntegerToFloat")) == (3, 1)
    ops = _ort_optimized_ops(uint8, tmp_path)
    assert (ops.get("MatMul"), ops.get("MatMulIntegerToFloat"), ops.get("DequantizeLinear")) == (None, 4, None)


def test_int8_restore_float_inputs_drops_unused_qdq_pairs() -> None:
    from compress.passes.qdq import restore_float_inputs

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"], name="q"),
             helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["rd"], name="dq"),
             helper.make_node("Add", ["rd", "x"], ["y"], name="add")]
    model = _model(nodes, [_f32("x", [2, 4])], [_f32("y", [2, 4])],
                   [_init("s", np.float32(0.1)), _init("z", np.int8(0))])
    assert restore_float_inputs(model, {"mm_not_here"}) == 1
    assert [(n.name, list(n.input)) for n in model.graph.node] == [("relu", ["x"]), ("add", ["r", "x"])]
    assert not model.graph.initializer
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], np.maximum(x, 0) + x)


def test_int8_matmul_weights_only_keeps_activation_products_float(transformer, tt_calib, tt_held) -> None:
    out, report = int8_pass(transformer, Int8Config(matmul_weights_only=True), data=tt_calib)
    excluded = {i["node"]: i["reason"] for i in report.items if i["status"] == "excluded"}
    assert len(excluded) == 8  # 2 attention products (scores, context) in each of the 4 blocks
    assert set(excluded.values()) == {"MatMul of two activations (matmul_weights_only)"}
    inits = {t.name for t in transformer.graph.initializer}
    by_name = {n.name: n for n in transformer.graph.node}
    assert all(not set(by_name[n].input) & inits for n in excluded)
    assert report.changes["nodes_quantized"] == 18
    assert report.nodes_added == {"DequantizeLinear": 36, "QuantizeLinear": 36}
    producers = _producers(out)
    for n in out.graph.node:
        if n.name in excluded:
            assert all(producers[x].op_type != "DequantizeLinear" for x in n.input if x in producers)
    assert measure_fidelity(transformer, out, tt_held)["cosine"] >= 0.999
    assert report.config["matmul_weights_only"] is True


# ---------------------------------------------------------------------------------------------
# 2:4 sparsity
# ---------------------------------------------------------------------------------------------


def test_prune_2_4_keeps_the_two_largest_of_every_four() -> None:
    w = np.array([[1.0, -4.0, 3.0, 2.0, 0.5, 0.5, 0.5, -0.5]], np.float32)
    np.testing.assert_array_equal(prune_2_4(w, 1), [[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, 0.5, -0.5]])  # ties: lower index zeroed
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 2)).astype(np.float16)
    p = prune_2_4(w, 0)
    assert p.dtype == np.float16
    assert is_2_4_sparse(p, 0)
    assert not is_2_4_sparse(w, 0)
    groups, orig = np.moveaxis(p, 0, -1).reshape(-1, 4), np.abs(np.moveaxis(w, 0, -1).reshape(-1, 4))
    kept = np.sort(np.where(groups != 0, orig, -1), axis=1)[:, 2:]
    np.testing.assert_array_equal(kept, np.sort(orig, axis=1)[:, 2:])  # the 2 largest |w| survive
    with pytest.raises(ValueError, match="not a multiple of 4"):
        prune_2_4(w, 1)


def test_sparsity_transformer_matches_polygraphy(transformer, tt_held) -> None:
    from polygraphy.tools.sparse import SparsityPruner

    out, report = sparsity_pass(transformer, SparsityConfig(min_channels=0))
    pruned = {i["weight"]: i["axis"] for i in report.items if i["status"] == "pruned"}
    assert len(pruned) == 18
    assert set(pruned.values()) == {0}
    skipped = {i["reason"] for i in report.items if i["status"] == "skipped"}
    assert skipped == {"no constant weight (both inputs are computed at runtime)"}
    assert report.changes["skipped_by_reason"] == {"not_constant": 8}
    inits = {t.name: read_array(t) for t in out.graph.initializer}
    for name in pruned:
        assert is_2_4_sparse(inits[name], 0)
        assert not is_2_4_sparse(inits[name], 1)
        assert (inits[name] == 0).mean() == 0.5
    checker = SparsityPruner(embedded_copy(out))
    with np.errstate(over="ignore"):  # Polygraphy compares float32 values with sys.float_info.max
        checker.check()  # what `polygraphy inspect sparsity` runs
        theirs = SparsityPruner(embedded_copy(transformer)).prune()  # `polygraphy surgeon prune`: same weights, bit for bit
    assert checker.sparse_tensors == set(pruned)
    theirs_w = {t.name: read_array(t) for t in theirs.graph.initializer}
    for name in pruned:
        assert inits[name].tobytes() == theirs_w[name].tobytes()
    fid = measure_fidelity(transformer, out, tt_held)  # no fine-tuning: a tiny dim-32 model suffers
    assert 0.5 < fid["cosine"] < 0.95  # observed 0.72


def test_sparsity_default_threshold_skips_small_layers(transformer) -> None:
    out, report = sparsity_pass(transformer, SparsityConfig())
    assert report.changes["layers_pruned"] == 0
    assert report.changes["skipped_by_reason"] == {"too_small": 18, "not_constant": 8}
    assert out.graph.initializer == transformer.graph.initializer


def _layers_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    nodes = [
        helper.make_node("MatMul", ["a", "W_ok"], ["o1"], name="mm_ok"),
        helper.make_node("MatMul", ["a6", "W_k6"], ["o2"], name="mm_k6"),
        helper.make_node("Gemm", ["a12", "W_gemm"], ["o3"], name="gemm_t", transB=1),
        helper.make_node("Conv", ["img", "W_conv"], ["o4"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["img8", "W_dw"], ["o5"], name="conv_dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["a", "W_shared"], ["o6"], name="mm_shared"),
        helper.make_node("Add", ["a", "W_shared"], ["o7"], name="add_shared"),
        helper.make_node("MatMul", ["a", "W_twice"], ["o8"], name="mm_twice_1"),
        helper.make_node("MatMul", ["a", "W_twice"], ["o9"], name="mm_twice_2"),
        helper.make_node("MatMul", ["a", "W_narrow"], ["o10"], name="mm_narrow"),
        helper.make_node("MatMul", ["a", "W_excl"], ["o11"], name="mm_excluded"),
    ]
    inits = [_init("W_ok", w(8, 8)), _init("W_k6", w(6, 8)), _init("W_gemm", w(8, 12)), _init("W_conv", w(8, 4, 3, 3)),
             _init("W_dw", w(8, 1, 3, 3)), _init("W_shared", w(8, 8)), _init("W_twice", w(8, 8)),
             _init("W_narrow", w(8, 2)), _init("W_excl", w(8, 8))]
    inputs = [_f32("a", [8, 8]), _f32("a6", [2, 6]), _f32("a12", [2, 12]), _f32("img", [1, 4, 5, 5]),
              _f32("img8", [1, 8, 5, 5])]
    shapes = [[8, 8], [2, 8], [2, 8], [1, 8, 5, 5], [1, 8, 5, 5], [8, 8], [8, 8], [8, 8], [8, 8], [8, 2], [8, 8]]
    outputs = [_f32(f"o{i}", shape) for i, shape in enumerate(shapes, start=1)]
    return _model(nodes, inputs, outputs, inits)


def test_sparsity_skips_layers_with_reasons() -> None:
    from polygraphy.tools.sparse import SparsityPruner

    model = _layers_model()
    out, report = sparsity_pass(model, SparsityConfig(min_channels=4, exclude_nodes=("mm_excluded",)))
    items = {i["node"]: i for i in report.items}
    assert {k: i["status"] for k, i in items.items() if i["status"] == "pruned"} == dict.fromkeys(
        ["mm_ok", "gemm_t", "conv", "mm_twice_1", "mm_twice_2"], "pruned")
    assert {k: (i["code"], i["reason"]) for k, i in items.items() if i["status"] == "skipped"} == {
        "mm_k6": ("not_multiple_of_4", "input dim 6 (axis 0) is not a multiple of 4"),
        "conv_dw": ("not_multiple_of_4", "input dim 1 (axis 1) is not a multiple of 4"),
        "mm_shared": ("shared", "weight 'W_shared' is shared by 2 nodes ('mm_shared' (MatMul), 'add_shared' (Add)) "
                                "that cannot all be pruned the same way"),
        "mm_narrow": ("too_small", "8 input / 2 output channels < min_channels=4 (2:4 kernels pay off only on large layers)"),
        "mm_excluded": ("excluded", "excluded by name"),
    }
    assert (items["gemm_t"]["axis"], items["conv"]["axis"]) == (1, 1)
    inits = {t.name: read_array(t) for t in out.graph.initializer}
    assert is_2_4_sparse(inits["W_gemm"], 1)
    assert is_2_4_sparse(inits["W_conv"], 1)
    assert is_2_4_sparse(inits["W_ok"], 0)
    originals = {t.name: t for t in model.graph.initializer}
    for name in ("W_k6", "W_dw", "W_shared", "W_narrow", "W_excl"):
        assert numpy_helper.from_array(inits[name], name) == originals[name]
    assert report.changes["layers_pruned"] == 5
    assert report.changes["weights_pruned"] == 4
    checker = SparsityPruner(embedded_copy(out))
    with np.errstate(over="ignore"):
        checker.check()
    assert checker.sparse_tensors == {"W_ok", "W_gemm", "W_conv", "W_twice"}
    with pytest.raises(ConfigError, match=r"^sparsity: exclude list names unknown node\(s\): nope"):
        sparsity_pass(model, SparsityConfig(exclude_nodes=("nope",)))


# ---------------------------------------------------------------------------------------------
# Models whose weights stay on disk (external data)
# ---------------------------------------------------------------------------------------------


def _mlp_arrays() -> dict[str, np.ndarray]:
    """x [4, 64] -> MatMul w1 [64, 128] (32 KiB) + b1 -> Relu -> MatMul w2 [128, 128] (64 KiB: page-aligned)."""
    rng = np.random.default_rng(7)
    return {"w1": (rng.standard_normal((64, 128)) / 8).astype(np.float32),
            "b1": (rng.standard_normal(128) / 8).astype(np.float32),
            "w2": (rng.standard_normal((128, 128)) / 11).astype(np.float32)}


def _mlp_numpy(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    return np.maximum(x @ w["w1"] + w["b1"], 0) @ w["w2"]


@pytest.fixture
def external_mlp(tmp_path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the MLP in memory, the same model saved with all tensors in m.onnx.data and loaded by load_model)."""
    from compress import onnx_io

    arrays = _mlp_arrays()
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="mm2")]
    model = _model(nodes, [_f32("x", [4, 64])], [_f32("y", [4, 128])], [_init(n, a) for n, a in arrays.items()])
    saved = onnx.ModelProto()
    saved.CopyFrom(model)
    onnx.save_model(saved, str(tmp_path / "m.onnx"), save_as_external_data=True, size_threshold=0,
                    location="m.onnx.data")
    loaded = onnx_io.load_model(tmp_path / "m.onnx")
    assert all(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    return model, loaded


def _check_saved_data(result: onnx.ModelProto, path) -> int:
    """``path`` (written by save_model with external_data=True) has relative locations only, and its
    data file holds exactly the bytes of the tensors it references, plus page-alignment padding (zeros).
    Returns the padding bytes."""
    from compress import external

    on_disk = onnx.load(str(path), load_external_data=False)
    refs: dict[str, tuple[int, int]] = {}
    for t in external.model_tensors(on_disk):
        if t.data_location != TensorProto.EXTERNAL:
            assert len(t.raw_data) < external.INLINE_MAX_BYTES, t.name
            continue
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == path.name + ".data", info  # relative, beside the model
        refs[t.name] = (int(info["offset"]), int(info["length"]))
    assert refs
    data = (path.parent / (path.name + ".data")).read_bytes()
    pos, padding = 0, 0
    for offset, length in sorted(set(refs.values())):
        gap = offset - pos
        assert gap >= 0
        if gap:  # only to start a large tensor on a page
            assert length >= external.ALIGN_MIN_BYTES
            assert offset % external.PAGE_BYTES == 0
            assert gap < external.PAGE_BYTES
            assert data[pos:offset] == b"\0" * gap
        padding += gap
        pos = offset + length
    assert len(data) == pos == sum(length for _, length in set(refs.values())) + padding
    mine = {t.name: t for t in result.graph.initializer}
    for name, (offset, length) in refs.items():  # the bytes are the result's values
        assert data[offset:offset + length] == read_array(mine[name]).tobytes(), name
    return padding


def _no_big_embedded(model: onnx.ModelProto) -> None:
    from compress import external

    big = [t.name for t in external.model_tensors(model) if len(t.raw_data) >= external.INLINE_MAX_BYTES]
    assert big == []  # new weights go to the spill file / ORT's data file, never into the proto


@pytest.mark.parametrize("name", ["fp16", "int8", "sparsity-2:4"])
def test_passes_on_a_model_with_external_data(name: str, external_mlp, tmp_path) -> None:
    from compress import external, onnx_io

    model, loaded = external_mlp
    before = loaded.SerializeToString()
    x = _batches((4, 64), 1, seed=9)[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(ref, _mlp_numpy(x["x"], _mlp_arrays()), rtol=1e-5, atol=1e-5)
    config = {"fp16": Fp16Config(),
              "int8": Int8Config(activation_type="uint8"),  # ORT backend
              "sparsity-2:4": SparsityConfig(min_channels=0)}[name]
    out, report = get_pass(name)(loaded, config, data=_batches((4, 64), 4, seed=3) if name == "int8" else None)
    assert loaded.SerializeToString() == before  # the input (and its references) is not modified
    _no_big_embedded(out)
    got = make_session(out).run(None, x)[0]
    scale = float(np.abs(ref).max())
    if name == "fp16":
        assert _elem(out, "w1") == _elem(out, "w2") == TensorProto.FLOAT16
        assert external.data_ref(next(t for t in out.graph.initializer if t.name == "w2")) is not None
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=5e-3 * scale)
    elif name == "int8":
        assert report.changes["nodes_quantized"] == 2
        assert np.abs(got - ref).max() <= 0.05 * scale
        cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
        assert cos > 0.999
        where = {external.data_ref(t).path.parent for t in out.graph.initializer if external.is_external(t)}
        assert where
        assert all(external.in_temp_folder(p) for p in where)
        assert [sorted(f.name for f in p.iterdir()) for p in where] == [["int8.onnx.data"]]  # ORT's other files are gone
    else:
        pruned = {k: prune_2_4(v, 0) if k != "b1" else v for k, v in _mlp_arrays().items()}
        assert report.changes["layers_pruned"] == 2
        np.testing.assert_allclose(got, _mlp_numpy(x["x"], pruned), rtol=1e-4, atol=1e-4)
        b1 = next(t for t in out.graph.initializer if t.name == "b1")
        assert external.data_ref(b1).path == tmp_path / "m.onnx.data"  # an untouched weight keeps its reference
    written = onnx_io.save_model(out, tmp_path / "out.onnx", external_data=True)
    assert written == [tmp_path / "out.onnx", tmp_path / "out.onnx.data"]
    padding = _check_saved_data(out, tmp_path / "out.onnx")
    if name == "sparsity-2:4":  # w1 (32 KiB) + b1 (512 B), then w2 (64 KiB) starts on the next page
        assert padding == external.PAGE_BYTES - (32768 + 512) % external.PAGE_BYTES
    again = onnx_io.load_model(tmp_path / "out.onnx")
    np.testing.assert_array_equal(make_session(again).run(None, x)[0], got)


def test_fp16_activation_ranges_run_one_sample_at_a_time_with_the_same_maxima():
    from compress.graph import GraphIndex
    from compress.passes import fp16_ranges as fp16_mod
    from compress.runtime import add_outputs
    from hostile import residual_mlp

    model = residual_mlp(dim=16)
    feed = {"x": np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32) * 3}
    index = GraphIndex(model)
    assert fp16_mod._batch_axis_dynamic(index)
    assert [p["x"].shape for p in fp16_mod._samples(feed)] == [(1, 16)] * 4

    ranges, used = fp16_mod.activation_ranges(model, [feed])

    inner = [n for n in ranges if n != "x"]
    whole = make_session(add_outputs(model, inner)).run(inner, feed)
    want = {n: float(np.abs(v).max()) for n, v in zip(inner, whole, strict=True)} | {"x": float(np.abs(feed["x"]).max())}
    assert used == 1
    assert ranges.keys() == want.keys()
    for n in want:
        assert ranges[n] == pytest.approx(want[n], rel=1e-5), n
    static = onnx.ModelProto()
    static.CopyFrom(model)
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    assert not fp16_mod._batch_axis_dynamic(GraphIndex(static))  # a fixed batch is run whole


def test_ort_quantization_is_quieted_without_touching_the_root_logger_level() -> None:
    """Issue 15: ORT's quantizer advice is dropped while it runs; the root logger's level never changes."""
    import logging

    from compress.passes.int8_ort import quiet_ort_quantization

    root, named = logging.getLogger(), logging.getLogger("onnxruntime.quantization")
    levels = (root.level, named.level)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    root.addHandler(handler)
    try:
        def record(msg: str, level: int, path: str) -> logging.LogRecord:
            return logging.LogRecord("root", level, path, 1, msg, None, None)

        ort_file = "/site-packages/onnxruntime/quantization/quant_utils.py"
        with quiet_ort_quantization():
            assert root.level == levels[0]
            root.handle(record("ort advice", logging.WARNING, ort_file))
            root.handle(record("ort failure", logging.ERROR, ort_file))
            root.handle(record("someone else", logging.WARNING, "/app/other.py"))
            assert not named.isEnabledFor(logging.WARNING)
        root.handle(record("ort after", logging.WARNING, ort_file))
    finally:
        root.removeHandler(handler)
    assert seen == ["ort failure", "someone else", "ort after"]
    assert (root.level, named.level) == levels
    assert not root.filters
