"""Block removal with onnx-graphsurgeon against torch models with the same blocks deleted."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import models
from compress.blocks import find_blocks
from compress.errors import BlockError
from compress.runtime import add_outputs, make_session
from compress.surgery import remove_blocks


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = make_session(model)
    return sess.run(None, {"x": x})[0]


def _torch_without(module: torch.nn.Module, removed: list[int]) -> torch.nn.Module:
    ref = copy.deepcopy(module)
    keep = [b for i, b in enumerate(ref.blocks) if i not in removed]
    ref.blocks = torch.nn.Sequential(*keep) if isinstance(ref.blocks, torch.nn.Sequential) else torch.nn.ModuleList(keep)
    return ref


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["transformer", "resnet"])
def test_removed_blocks_match_torch(tmp_path, kind: str, exporter: str) -> None:
    module = models.tiny_transformer() if kind == "transformer" else models.tiny_resnet()
    x = models.transformer_input() if kind == "transformer" else models.image_input()
    model = onnx.load(models.export_onnx(module, x, tmp_path / "m.onnx", exporter=exporter))
    before = onnx.ModelProto()
    before.CopyFrom(model)
    bm = find_blocks(model)
    for removed in ([1], [0, 2], [3], [0, 1, 2, 3]):
        pruned = remove_blocks(model, [bm.blocks[i] for i in removed])
        with torch.no_grad():
            expected = _torch_without(module, removed)(x).numpy()
        np.testing.assert_allclose(_run(pruned, x.numpy()), expected, rtol=1e-5, atol=1e-5)
        kept = [n for b in bm.blocks if b.index not in removed for n in b.nodes]
        assert {n.name for n in pruned.graph.node} >= set(kept)
        assert not {n.name for n in pruned.graph.node} & {n for i in removed for n in bm.blocks[i].nodes}
    assert model == before, "remove_blocks modified its input"


def test_node_counts_and_metadata_survive(tmp_path) -> None:
    model = onnx.load(models.export_onnx(models.tiny_transformer(), models.transformer_input(), tmp_path / "m.onnx"))
    bm = find_blocks(model)
    pruned = remove_blocks(model, [bm.blocks[2]])
    assert len(pruned.graph.node) == len(model.graph.node) - len(bm.blocks[2].nodes)
    assert all(n.metadata_props for n in pruned.graph.node)
    # the pruned model is still self-describing: its blocks are the 3 that remain
    assert [b.name for b in find_blocks(pruned).blocks] == ["blocks.0", "blocks.1", "blocks.3"]


def test_removing_the_block_that_produces_the_graph_output() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="/blocks.0/Relu"),
             helper.make_node("Neg", ["h"], ["y"], name="/blocks.1/Neg")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:]), opset_imports=[helper.make_opsetid("", 18)])
    bm = find_blocks(model)
    pruned = remove_blocks(model, [bm.blocks[1]])
    assert [n.op_type for n in pruned.graph.node] == ["Relu", "Identity"]
    assert [o.name for o in pruned.graph.output] == ["y"]
    x = np.array([[-1, 2, -3], [4, -5, 6]], dtype=np.float32)
    np.testing.assert_array_equal(_run(pruned, x), np.maximum(x, 0))


def test_not_removable_block_is_refused() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/blocks.0/Relu"),
             helper.make_node("Neg", ["a"], ["b"], name="/blocks.0/Neg"),
             helper.make_node("Add", ["a", "b"], ["y"], name="/blocks.1/Add")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(BlockError) as err:
        remove_blocks(model, [find_blocks(model).blocks[0]])
    assert err.value.message == ("block 0 (blocks.0) is not removable: 2 outputs leave the block (a, b); a replaces "
                                 "no input of the same type (a removable block has one output per stream)")


def test_add_outputs_exposes_boundaries_once() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="r"), helper.make_node("Neg", ["h"], ["y"], name="n")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:]), opset_imports=[helper.make_opsetid("", 18)])
    out = add_outputs(model, ["h", "y", "h"])
    assert [o.name for o in out.graph.output] == ["y", "h"]
    assert [o.name for o in model.graph.output] == ["y"]
    with pytest.raises(BlockError, match="tensor 'nope' is not produced in the graph"):
        add_outputs(model, ["nope"])


def test_ir3_model_keeps_its_initializers_listed_as_inputs() -> None:
    # A model no one here exported: onnx's own ResNet-50 test model (IR 3, opset 9), where every
    # initializer must also be a graph input. gs exports initializers only; remove_blocks re-lists them.
    from pathlib import Path

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    if not path.exists():
        pytest.skip("this onnx wheel ships no light_resnet50.onnx")
    model = onnx.load(str(path))
    assert model.ir_version == 3
    blocks = find_blocks(model)
    assert blocks.source == "graph"
    removable = [b for b in blocks.blocks if b.removable]
    assert len(removable) == 12
    before = model.SerializeToString()
    pruned = remove_blocks(model, removable[:2])  # runs the full checker
    assert model.SerializeToString() == before
    assert pruned.ir_version == 3
    inputs = {i.name for i in pruned.graph.input}
    assert {t.name for t in pruned.graph.initializer} <= inputs
    gone = {n for b in removable[:2] for n in b.nodes}
    names = [n.name for n in pruned.graph.node]
    assert gone
    assert not gone & set(names)
    # besides the 20 block nodes only their weights' ConstantOfShape producers (unnamed, hoisted) are dropped
    kept = {n.output[0] for n in pruned.graph.node}
    dropped = [n.op_type for n in model.graph.node if n.name not in gone and n.output[0] not in kept]
    assert dropped == ["ConstantOfShape"] * 14
    feed = {"gpu_0/data_0": np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)}
    out = make_session(pruned).run(None, feed)[0]
    assert out.shape == (1, 1000)
    assert np.isfinite(out).all()
