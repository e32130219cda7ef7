"""Random calibration for inputs without a batch axis (issue 10; Flux's 2-D ids, hand-built here).

The diffusers-based checks (per-stream span scores on SD3, ``--random-calib`` on the tiny Flux)
live at the end of tests/test_families.py, next to the session's exports.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import compress.onnx_io
from compress.calibration import check_calibration, random_calibration, shared_inputs
from compress.errors import CalibrationError, ConfigError
from compress.runtime import make_session


def _model() -> onnx.ModelProto:
    """y = x + sum(ids) + emb[tok]: x [batch, 4], tok [batch, 4] (int64), ids [n, 3] (no batch axis)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    tok = helper.make_tensor_value_info("tok", TensorProto.INT64, ["batch", 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4])
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [7, 4], np.arange(28, dtype=np.float32).tolist())
    nodes = [
        helper.make_node("ReduceSum", ["ids"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["xs"]),
        helper.make_node("Gather", ["emb", "tok"], ["e"]),
        helper.make_node("Unsqueeze", ["xs", "one"], ["xu"]),
        helper.make_node("Add", ["xu", "e"], ["y"]),
    ]
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "unbatched", [x, tok, ids], [y], initializer=[emb, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compress.onnx_io.check_model(model)
    return model


def test_random_calibration_gives_an_unbatched_input_its_own_shape() -> None:

    model = _model()
    assert shared_inputs(model) == frozenset({"ids"})
    calib = random_calibration(model, batches=3, batch_size=2, dims={"n": 5}, seed=1)
    check_calibration(calib, model)
    assert calib.files[0].shared == frozenset({"ids"})
    assert calib.samples == 6  # the batch axis of x/tok, not ids' 5 rows
    sess = make_session(model)
    for feed in calib:
        assert feed["x"].shape == (2, 4)
        assert feed["ids"].shape == (5, 3)
        assert feed["tok"].min() >= 0
        assert feed["tok"].max() < 7  # the embedding table's rows
        (out,) = sess.run(None, feed)
        want = (feed["x"] + feed["ids"].sum())[:, None, :] + np.arange(28, dtype=np.float32).reshape(7, 4)[feed["tok"]]
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5)


def test_random_calibration_asks_for_the_axis_0_size_of_an_unbatched_input() -> None:
    model = _model()
    with pytest.raises(CalibrationError) as err:
        random_calibration(model, batches=1, batch_size=2)
    assert err.value.message == "random calibration: model input 'ids' axis 0 has symbolic size 'n'; give its value"
    assert err.value.hint == "set it with dims, e.g. n=128"
    with pytest.raises(ConfigError) as bad:
        random_calibration(model, batches=1, batch_size=2, dims={"batch": 2})
    assert bad.value.message == "random calibration: the model has no symbolic dim 'batch'"
    assert bad.value.hint == "symbolic dims of its inputs (besides the batch axis): n"
