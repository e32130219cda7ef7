"""Paddle-style models: opset 12 and weights in Constant nodes still quantize (per channel) and prune to 2:4."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.external import read_array
from compress.passes import Int8Config, SparsityConfig, int8_pass, measure_fidelity, sparsity_pass
from compress.passes.sparsity import is_2_4_sparse

K, N = 32, 16


def paddle_style(opset: int = 12) -> onnx.ModelProto:
    """x[B,K] -> MatMul(Constant W) -> Add(Constant b) -> Relu -> MatMul(Constant W2) -> y[B,N]; opset ``opset``."""
    rng = np.random.default_rng(0)
    consts = {"w1": (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32),
              "b1": (0.1 * rng.standard_normal(K)).astype(np.float32),
              "w2": (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)}
    nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a, n)) for n, a in consts.items()]
    nodes += [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h2"]),
              helper.make_node("Relu", ["h2"], ["h3"]), helper.make_node("MatMul", ["h3", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((8, K)).astype(np.float32)} for _ in range(n)]


def test_int8_converts_opset_12_to_13_for_per_channel_scales_and_keeps_outputs() -> None:
    model = paddle_style(12)
    out, report = int8_pass(model, Int8Config(), data=feeds())
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert any(w.startswith("converted from ONNX opset 12 to 13") for w in report.warnings)
    assert any("3 float Constant node(s) made initializers" in w for w in report.warnings)
    quantized = [i for i in report.items if i["status"] == "quantized"]
    assert len(quantized) == 2
    scales = [read_array(t) for t in out.graph.initializer if t.name.startswith("w1") and t.name.endswith("_scale")]
    assert scales
    assert scales[0].shape == (K,)  # one scale per output channel
    assert 1 - measure_fidelity(model, out, feeds(2))["loss"] > 0.995
    assert [o.version for o in model.opset_import] == [12]  # the input is unchanged
    assert sum(n.op_type == "Constant" for n in model.graph.node) == 3


def test_int8_at_opset_13_is_not_converted() -> None:
    out, report = int8_pass(paddle_style(13), Int8Config(), data=feeds())
    assert not any("opset" in w for w in report.warnings)
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [13]


def test_2_4_prunes_weights_stored_in_constant_nodes() -> None:
    model = paddle_style(12)
    out, report = sparsity_pass(model, SparsityConfig(method="wanda", min_channels=16), data=feeds())
    assert report.changes["layers_pruned"] == 2
    assert any("3 float Constant node(s) made initializers so their weights can be pruned" in w for w in report.warnings)
    weights = {t.name: read_array(t) for t in out.graph.initializer}
    assert is_2_4_sparse(weights["w1"], axis=0)
    assert is_2_4_sparse(weights["w2"], axis=0)
    assert report.nodes_before["Constant"] == 3
    assert "Constant" not in report.nodes_after
    assert sum(n.op_type == "Constant" for n in model.graph.node) == 3  # the input is unchanged
