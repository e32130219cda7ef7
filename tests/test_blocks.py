"""Block detection: module paths from metadata and names, containers, boundaries, removability."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import models
from compress.blocks import BlockMap, choose_containers, find_blocks, find_containers
from compress.errors import BlockError
from compress.runtime import add_outputs, make_session


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["transformer", "resnet"])
def test_blocks_match_torch_hooks(exported, kind: str, exporter: str) -> None:
    model = exported[kind, exporter]
    bm = find_blocks(model)
    assert bm.source == ("metadata" if exporter == "dynamo" else "names")
    assert bm.containers == ("blocks",)
    assert [b.name for b in bm.blocks] == [f"blocks.{i}" for i in range(4)]
    assert all(b.removable for b in bm.blocks)
    # consecutive blocks share the residual stream
    assert all(a.output == b.input for a, b in zip(bm.blocks, bm.blocks[1:], strict=False))
    torch_model = models.tiny_transformer() if kind == "transformer" else models.tiny_resnet()
    x = models.transformer_input() if kind == "transformer" else models.image_input()
    hooks = models.block_hooks(torch_model, torch_model.blocks, x)
    names = [t for b in bm.blocks for t in (b.input, b.output)]
    sess = make_session(add_outputs(model, names))
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x.numpy()}), strict=True))
    for b, (h_in, h_out) in zip(bm.blocks, hooks, strict=True):
        np.testing.assert_allclose(values[b.input], h_in.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values[b.output], h_out.numpy(), rtol=1e-5, atol=1e-5)


def test_block_params_and_shape(exported) -> None:
    bm = find_blocks(exported["transformer", "dynamo"])
    torch_block = models.tiny_transformer().blocks[0]
    assert bm.blocks[0].params == sum(p.numel() for p in torch_block.parameters())
    assert bm.blocks[0].shape == (2, 8, 32)
    assert bm.blocks[0].dtype == "float32"


def test_spec_overrides_detection_and_unknown_container_is_an_error(exported) -> None:
    model = exported["transformer", "dynamo"]
    assert find_blocks(model, spec="blocks").source == "user"
    with pytest.raises(BlockError) as err:
        find_blocks(model, spec="layers")
    assert err.value.message == "no block container 'layers' in the model"
    assert err.value.hint == "--blocks takes a module path prefix followed by an index; candidates: blocks"


def test_block_map_round_trip_and_mismatch(exported) -> None:
    model = exported["resnet", "dynamo"]
    bm = find_blocks(model)
    assert BlockMap.from_dict(bm.to_dict()) == bm
    assert find_blocks(model, block_map=bm.to_dict()) == bm
    other = find_blocks(exported["resnet", "torchscript"]).to_dict()
    with pytest.raises(BlockError, match="the block map does not fit this model: node '/blocks/blocks.0/conv1/Conv' is not in the graph"):
        find_blocks(model, block_map=other)
    with pytest.raises(BlockError, match="not a compress block map"):
        find_blocks(model, block_map={"blocks": []})


def test_containers_prefer_the_longest_list_and_join_same_class_siblings() -> None:
    paths = {f"n{i}": p for i, p in enumerate([
        "stem", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0",
        "layer2.1.conv1", "layer2.2.conv1", "layer3.0.heads.0", "layer3.0.heads.1", "layer3.0.heads.2",
        "layer3.0.heads.3", "fc"])}
    assert find_containers(paths.values())["layer3.0.heads"] == {0, 1, 2, 3}
    classes = {"layer1.0": "Bottleneck", "layer1.1": "Bottleneck", "layer2.0": "Bottleneck",
               "layer2.1": "Bottleneck", "layer2.2": "Bottleneck", "layer3.0.heads.0": "Head",
               "layer3.0.heads.1": "Head", "layer3.0.heads.2": "Head", "layer3.0.heads.3": "Head",
               "layer2.0.downsample.0": "Conv2d"}
    # the 4-entry nested list wins on length; no sibling has the same class
    assert choose_containers(paths, classes) == ["layer3.0.heads"]
    del paths["n8"], paths["n9"], paths["n10"]  # now heads has 2 entries, layer2 has 3
    assert choose_containers(paths, classes) == ["layer2", "layer1"]
    assert choose_containers(paths, {}) == ["layer2"]  # without classes: no siblings joined


def _side_model() -> onnx.ModelProto:
    """TorchScript-style names; block 0 computes a mask that block 1 also reads (hoisted)::

        x, m -> /blocks.0/Mul: mm = m * 2   (side, read by both blocks)
                /blocks.0/Add: h1 = x + mm
                /blocks.1/Add: h2 = h1 + mm
                /blocks.1/Relu: h3 = relu(h2)
                /head/Neg:     y = -h3
    """
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Mul", ["m", "two"], ["mm"], name="/blocks.0/Mul"),
        helper.make_node("Add", ["x", "mm"], ["h1"], name="/blocks.0/Add"),
        helper.make_node("Add", ["h1", "mm"], ["h2"], name="/blocks.1/Add"),
        helper.make_node("Relu", ["h2"], ["h3"], name="/blocks.1/Relu"),
        helper.make_node("Neg", ["h3"], ["y"], name="/head/Neg"),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("x", "m", "y")]
    graph = helper.make_graph(nodes, "side", vi[:2], vi[2:], initializer=[two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_hoisted_side_nodes_are_not_part_of_the_block() -> None:
    bm = find_blocks(_side_model())
    b0, b1 = bm.blocks
    assert (b0.input, b0.output, b0.nodes, b0.side_inputs) == ("x", "h1", ("/blocks.0/Add",), ("mm",))
    assert (b1.input, b1.output, b1.nodes, b1.side_inputs) == ("h1", "h3", ("/blocks.1/Add", "/blocks.1/Relu"), ("mm",))
    assert b0.removable
    assert b1.removable


def test_block_that_changes_shape_is_not_removable() -> None:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, dtype=np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [3, 3], np.ones(9, dtype=np.float32))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h1"], name="/blocks.0/MatMul"),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="/blocks.1/MatMul"),
        helper.make_node("Relu", ["h2"], ["y"], name="/blocks.1/Relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=[w, w2])
    bm = find_blocks(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert not bm.blocks[0].removable
    assert bm.blocks[0].reason == "no input has the output's type float32[2x3] (inputs: x [2x4])"
    assert bm.blocks[1].removable
    assert bm.blocks[1].params == 9


def test_two_outputs_are_not_removable() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="/blocks.0/Relu"),
        helper.make_node("Neg", ["a"], ["b"], name="/blocks.0/Neg"),
        helper.make_node("Add", ["a", "b"], ["c"], name="/blocks.1/Add"),
        helper.make_node("Relu", ["c"], ["y"], name="/blocks.1/Relu"),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:]), opset_imports=[helper.make_opsetid("", 18)])
    b0 = find_blocks(model).blocks[0]
    assert not b0.removable
    # one input per output: x carries into both a and b, so one of them (a) is no stream
    assert b0.reason == ("2 outputs leave the block (a, b); a replaces no input of the same type "
                         "(a removable block has one output per stream)")


def test_gpt2_dynamo_blocks_are_repaired_with_scope_repair() -> None:
    """The dynamo export of GPT-2 has an optimizer-made Split without a name scope, which
    broke the metadata boundaries of some layers (issue 10: a K/V slice taken for the residual
    input). The Split now takes its neighbours' module path, so the metadata blocks are right
    as found (source ``metadata``, no graph repair needed)."""
    import contextlib
    import io

    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=32, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    module = GPT2Model(config).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = torch.onnx.export(module, (ids,), dynamo=True, opset_version=18, external_data=False).model_proto
    bm = find_blocks(model)
    assert bm.source == "metadata"
    assert [b.name for b in bm.blocks] == ["h.0", "h.1", "h.2", "h.3"]
    assert all(b.removable for b in bm.blocks)
    hooks = models.block_hooks(module, module.h, ids)
    sess = make_session(add_outputs(model, [bm.blocks[2].output]))
    feed = {sess.get_inputs()[0].name: ids.numpy()}
    np.testing.assert_allclose(sess.run([bm.blocks[2].output], feed)[0], hooks[2][1].numpy(), rtol=1e-5, atol=1e-5)


def _two_stream_model(*, join: bool) -> onnx.ModelProto:
    """Two streams (image x [2,3,4], text t [2,2,4]) through two blocks; with ``join`` block 1
    concatenates them into one [2,5,4] tensor (Flux before its single-stream blocks)::

        /blocks.0: x1 = x + relu(x + t_mean), t1 = t + relu(t)     (a joint block: 2 streams)
        /blocks.1: join: c = concat(t1, x1) + 1   |   else: x2 = x1 + relu(x1), t2 = t1 * 2
    """
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("ReduceMean", ["t", "axes"], ["tm"], name="/blocks.0/ReduceMean"),
        helper.make_node("Add", ["x", "tm"], ["xa"], name="/blocks.0/Add"),
        helper.make_node("Relu", ["xa"], ["xr"], name="/blocks.0/Relu"),
        helper.make_node("Add", ["x", "xr"], ["x1"], name="/blocks.0/Add_1"),
        helper.make_node("Relu", ["t"], ["tr"], name="/blocks.0/Relu_1"),
        helper.make_node("Add", ["t", "tr"], ["t1"], name="/blocks.0/Add_2"),
    ]
    if join:
        nodes += [helper.make_node("Concat", ["t1", "x1"], ["c"], name="/blocks.1/Concat", axis=1),
                  helper.make_node("Add", ["c", "one"], ["y"], name="/blocks.1/Add")]
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 4])]
    else:
        nodes += [helper.make_node("Relu", ["x1"], ["xr2"], name="/blocks.1/Relu"),
                  helper.make_node("Add", ["x1", "xr2"], ["y"], name="/blocks.1/Add"),
                  helper.make_node("Mul", ["t1", "two"], ["z"], name="/blocks.1/Mul")]
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4]),
                helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2, 4])]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
           helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 2, 4])]
    graph = helper.make_graph(nodes, "streams", ins, outs, initializer=[one, two, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_two_stream_blocks_are_removed_on_both_streams() -> None:
    from compress.surgery import remove_blocks

    model = _two_stream_model(join=False)
    bm = find_blocks(model)
    b0, b1 = bm.blocks
    assert [(s.name, s.input, s.output) for s in b0.streams] == [("x", "x", "x1"), ("t", "t", "t1")]
    assert [(s.name, s.input, s.output) for s in b1.streams] == [("x", "x1", "y"), ("t", "t1", "z")]
    assert b0.removable
    assert b1.removable
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    t = np.random.default_rng(1).normal(size=(2, 2, 4)).astype(np.float32)
    sess = make_session(remove_blocks(model, [b0]))
    y, z = sess.run(["y", "z"], {"x": x, "t": t})
    np.testing.assert_allclose(y, x + np.maximum(x, 0), rtol=1e-6)  # block 1 on the untouched streams
    np.testing.assert_allclose(z, t * 2, rtol=1e-6)
    # a schema-1 block map (one stream per block, no "streams" list) still loads
    old = bm.to_dict()
    old["schema_version"] = 1
    for b in old["blocks"]:
        del b["streams"]
    assert [len(b.streams) for b in BlockMap.from_dict(old).blocks] == [1, 1]
    assert BlockMap.from_dict(bm.to_dict()) == bm


def test_a_block_that_joins_streams_is_reported_not_removed() -> None:
    bm = find_blocks(_two_stream_model(join=True))
    b1 = bm.blocks[1]
    assert not b1.removable
    assert b1.reason == ("the block joins streams: t1, x1 are combined into y float32[2x5x4] "
                         "(no output replaces each input)")
