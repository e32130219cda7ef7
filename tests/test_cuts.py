"""Graph-only block detection (compress.blocks.cuts): residual cuts grouped by repeating structure."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import compress.onnx_io
import models
from compress.blocks import BlockMap, find_blocks
from compress.blocks.cuts import Cut, blocks_from_graph, residual_cuts
from compress.errors import BlockError
from compress.graph import node_keys
from compress.runtime import make_session
from compress.surgery import remove_blocks

# --------------------------------------------------------------------------- helpers


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _stripped(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without node names and node metadata (no module paths left)."""
    out = _copy(model)
    for node in out.graph.node:
        node.name = ""
        del node.metadata_props[:]
    return out


def _renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with onnxsim-style node names (``Reshape_0``, ``Gemm_1``) and no metadata."""
    out = _copy(model)
    for i, node in enumerate(out.graph.node):
        node.name = f"{node.op_type}_{i}"
        del node.metadata_props[:]
    return out


def _boundaries(bm: BlockMap) -> list[tuple[str | None, str | None]]:
    return [(b.input, b.output) for b in bm.blocks]


def _produced(model: onnx.ModelProto, bm: BlockMap) -> list[set[str]]:
    """The tensors each block's nodes produce."""
    nodes = dict(zip(node_keys(model.graph), model.graph.node, strict=True))
    return [{o for k in b.nodes for o in nodes[k].output} for b in bm.blocks]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = make_session(model)
    return sess.run(None, feeds)[0]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    compress.onnx_io.check_model(model, full_check=True)
    return model


def _weight(name: str, rows: int, cols: int, rng: np.random.Generator) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [rows, cols], rng.normal(0, 0.3, (rows, cols)).astype(np.float32))


def _masked_model(*, mask_from_ids: bool, depth: int = 4) -> onnx.ModelProto:
    """Residual MLP layers that all read one float mask built outside the stream::

        mask_from_ids=False:  x[2,8,16] float, mask[2,8,1] float
            mm = (1 - mask) * -1e4                       (side, read by every layer)
            h0 = x @ Win
        mask_from_ids=True:   ids[2,8] int64
            mm = float(ids == 0) * -1e4                  (side, computed from ids by value)
            h0 = Gather(E, ids)
        layer i:  h{i+1} = h{i} + relu(h{i} @ W{i} + mm)
        y = h{depth} @ Wout
    """
    rng = np.random.default_rng(0)
    inits = [_weight(f"W{i}", 16, 16, rng) for i in range(depth)] + [_weight("Wout", 16, 4, rng)]
    inits += [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]), helper.make_tensor("big", TensorProto.FLOAT, [], [-1e4])]
    if mask_from_ids:
        inits += [_weight("E", 10, 16, rng), helper.make_tensor("zero", TensorProto.INT64, [], [0]),
                  helper.make_tensor("axis", TensorProto.INT64, [1], [-1])]
        nodes = [
            helper.make_node("Gather", ["E", "ids"], ["h0"]),
            helper.make_node("Equal", ["ids", "zero"], ["pad"]),
            helper.make_node("Cast", ["pad"], ["padf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["padf", "axis"], ["pad3"]),
            helper.make_node("Mul", ["pad3", "big"], ["mm"]),
        ]
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 8])]
    else:
        inits.append(_weight("Win", 16, 16, rng))
        nodes = [
            helper.make_node("MatMul", ["x", "Win"], ["h0"]),
            helper.make_node("Sub", ["one", "mask"], ["inv"]),
            helper.make_node("Mul", ["inv", "big"], ["mm"]),
        ]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 16]),
                  helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 8, 1])]
    for i in range(depth):
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"a{i}"]),
            helper.make_node("Add", [f"a{i}", "mm"], [f"b{i}"]),
            helper.make_node("Relu", [f"b{i}"], [f"c{i}"]),
            helper.make_node("Add", [f"h{i}", f"c{i}"], [f"h{i + 1}"]),
        ]
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "Wout"], ["y"]))
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 4])], inits)


# --------------------------------------------------------------------------- exported models


@pytest.mark.parametrize("anonymise", [_stripped, _renamed], ids=["stripped", "renamed"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["transformer", "resnet"])
def test_graph_blocks_match_module_path_blocks(
    exported, kind: str, exporter: str, anonymise: Callable[[onnx.ModelProto], onnx.ModelProto]
) -> None:
    model = exported[kind, exporter]
    ref = find_blocks(model)
    assert ref.source == ("metadata" if exporter == "dynamo" else "names")
    anonymous = anonymise(model)
    bm = find_blocks(anonymous)
    assert bm.source == "graph"
    assert bm.containers == ("graph",)
    assert [b.name for b in bm.blocks] == ["graph.0", "graph.1", "graph.2", "graph.3"]
    assert _boundaries(bm) == _boundaries(ref)
    assert all(b.removable for b in bm.blocks)
    assert [b.params for b in bm.blocks] == [b.params for b in ref.blocks]
    assert [b.shape for b in bm.blocks] == [b.shape for b in ref.blocks]
    assert blocks_from_graph(anonymous) == bm
    # the graph method finds the same blocks when module paths are present too
    assert _boundaries(blocks_from_graph(model)) == _boundaries(ref)


def test_depth6_transformer(exported) -> None:
    model = exported["transformer6", "dynamo"]
    ref = find_blocks(model)
    bm = find_blocks(_stripped(model))
    assert len(bm.blocks) == 6
    assert _boundaries(bm) == _boundaries(ref)
    assert all(a.output == b.input for a, b in zip(bm.blocks, bm.blocks[1:], strict=False))
    assert all(b.removable for b in bm.blocks)


def test_residual_cuts_of_resnet(exported) -> None:
    model = _stripped(exported["resnet", "dynamo"])
    cuts = residual_cuts(model)
    ref = find_blocks(exported["resnet", "dynamo"])
    # every block boundary is a cut; a ResNet block (relu(x + f(x))) has one more: the Add
    names = [c.tensor for c in cuts]
    bounds = [ref.blocks[0].input] + [b.output for b in ref.blocks]
    assert [n for n in names if n in bounds] == bounds
    assert len(cuts) == 13  # x, stem Conv, stem Relu, 4 x (Add, Relu), ReduceMean, y
    assert cuts[0] == Cut(-1, "x")
    assert cuts[-1] == Cut(len(model.graph.node) - 1, "y")


@pytest.mark.parametrize("kind", ["transformer", "resnet"])
def test_removing_graph_blocks_equals_removing_module_blocks(exported, kind: str) -> None:
    model = exported[kind, "dynamo"]
    x = (models.transformer_input() if kind == "transformer" else models.image_input()).numpy()
    ref = find_blocks(model)
    anonymous = _stripped(model)
    bm = find_blocks(anonymous)
    by_path = remove_blocks(model, [ref.blocks[1], ref.blocks[2]])
    by_graph = remove_blocks(anonymous, [bm.blocks[1], bm.blocks[2]])
    assert len(by_graph.graph.node) == len(by_path.graph.node) < len(model.graph.node)
    y_path, y_graph, y_full = _run(by_path, {"x": x}), _run(by_graph, {"x": x}), _run(model, {"x": x})
    np.testing.assert_allclose(y_graph, y_path, rtol=0, atol=1e-6)
    assert np.abs(y_full - y_graph).max() > 1e-3  # the blocks did something


def test_dynamically_quantized_model(exported, tmp_path: Path) -> None:
    """ORT dynamic INT8: the weights are applied to the stream in integer form
    (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul); the float stream still cuts."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    model = exported["transformer", "torchscript"]
    compress.onnx_io.save_model(model, tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.quantize_dynamic(tmp_path / "m.onnx", tmp_path / "q.onnx")
    quantized = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "MatMulInteger" for n in quantized.graph.node)
    bm = blocks_from_graph(_stripped(quantized))
    assert _boundaries(bm) == _boundaries(find_blocks(model))
    assert all(b.removable for b in bm.blocks)


# --------------------------------------------------------------------------- hand-built graphs


@pytest.mark.parametrize("mask_from_ids", [False, True], ids=["mask-input", "mask-from-ids"])
def test_float_mask_read_by_every_layer_is_a_side_input(mask_from_ids: bool) -> None:
    model = _masked_model(mask_from_ids=mask_from_ids)
    bm = find_blocks(model)
    assert bm.source == "graph"
    assert _boundaries(bm) == [("h0", "h1"), ("h1", "h2"), ("h2", "h3"), ("h3", "h4")]
    assert all(b.side_inputs == ("mm",) and b.removable for b in bm.blocks)
    assert [len(b.nodes) for b in bm.blocks] == [4, 4, 4, 4]
    assert [c.tensor for c in residual_cuts(model)][-6:] == ["h0", "h1", "h2", "h3", "h4", "y"]
    rng = np.random.default_rng(1)
    if mask_from_ids:
        feeds = {"ids": rng.integers(0, 10, (2, 8)).astype(np.int64)}
    else:
        feeds = {"x": rng.normal(size=(2, 8, 16)).astype(np.float32),
                 "mask": (rng.random((2, 8, 1)) > 0.3).astype(np.float32)}
    pruned = remove_blocks(model, [bm.blocks[2]])
    expected = _masked_model(mask_from_ids=mask_from_ids)
    # the same graph written without layer 2: h3 = h2, so rename layer 3's reads
    keep = [helper.make_node(n.op_type, ["h2" if x == "h3" else x for x in n.input], n.output, **{
        a.name: helper.get_attribute_value(a) for a in n.attribute})
        for n in expected.graph.node if not any(o in ("a2", "b2", "c2", "h3") for o in n.output)]
    del expected.graph.node[:]
    expected.graph.node.extend(keep)
    assert len(expected.graph.node) == len(pruned.graph.node)
    np.testing.assert_allclose(_run(pruned, feeds), _run(expected, feeds), rtol=0, atol=1e-6)


def test_graph_order_need_not_be_topological() -> None:
    model = _masked_model(mask_from_ids=False)
    shuffled = _copy(model)
    nodes = list(shuffled.graph.node)
    random.Random(0).shuffle(nodes)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes)
    # (shape inference needs graph order, so only the node sets and outputs are compared)
    got, expected = blocks_from_graph(shuffled), blocks_from_graph(model)
    assert [b.output for b in got.blocks] == [b.output for b in expected.blocks] == ["h1", "h2", "h3", "h4"]
    assert _produced(shuffled, got) == _produced(model, expected)


def _post_norm_model(depth: int = 3) -> onnx.ModelProto:
    """BERT-style post-norm layers after an embedding LayerNorm::

        e = LN(x @ Win)
        layer i:  a = LN(h + h @ Wa{i});  h' = LN(a + relu(a @ W1{i}) @ W2{i})
        y = h @ Wout

    Segments: [LN] [attn, LN, ffn, LN] x depth; the embedding LN matches a layer's last
    segment, so the run could start one segment early: the later start must win.
    """
    rng = np.random.default_rng(0)
    inits = [_weight("Win", 8, 16, rng), _weight("Wout", 16, 4, rng),
             helper.make_tensor("g", TensorProto.FLOAT, [16], np.ones(16, np.float32)),
             helper.make_tensor("b", TensorProto.FLOAT, [16], np.zeros(16, np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "Win"], ["emb"]),
             helper.make_node("LayerNormalization", ["emb", "g", "b"], ["h0"], axis=-1)]
    for i in range(depth):
        inits += [_weight(f"Wa{i}", 16, 16, rng), _weight(f"W1{i}", 16, 32, rng), _weight(f"W2{i}", 32, 16, rng)]
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"Wa{i}"], [f"p{i}"]),
            helper.make_node("Add", [f"h{i}", f"p{i}"], [f"r{i}"]),
            helper.make_node("LayerNormalization", [f"r{i}", "g", "b"], [f"a{i}"], axis=-1),
            helper.make_node("MatMul", [f"a{i}", f"W1{i}"], [f"f{i}"]),
            helper.make_node("Relu", [f"f{i}"], [f"q{i}"]),
            helper.make_node("MatMul", [f"q{i}", f"W2{i}"], [f"o{i}"]),
            helper.make_node("Add", [f"a{i}", f"o{i}"], [f"s{i}"]),
            helper.make_node("LayerNormalization", [f"s{i}", "g", "b"], [f"h{i + 1}"], axis=-1),
        ]
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "Wout"], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)


def test_post_norm_layers_start_after_the_embedding_norm() -> None:
    bm = find_blocks(_post_norm_model())
    assert _boundaries(bm) == [("h0", "h1"), ("h1", "h2"), ("h2", "h3")]
    assert all(b.removable and len(b.nodes) == 8 for b in bm.blocks)


def test_stages_give_single_residual_blocks() -> None:
    """Two CNN-like stages, each opened by a different block D (ResNet's downsample block)::

        D0 A A D1 A A A      A:  h = h + relu(h @ W)        D:  h = h + sigmoid(h @ W) * h

    ``[D, A, A]`` repeats twice, but the single A blocks (two runs: 2 and 3) win.
    """
    rng = np.random.default_rng(0)
    inits, nodes, h, stream = [], [], "x", []
    for i, kind in enumerate("DAADAAA"):
        inits.append(_weight(f"W{i}", 16, 16, rng))
        out = f"{kind.lower()}{i}"
        if kind == "A":
            nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
                      helper.make_node("Add", [h, f"r{i}"], [out])]
        else:
            nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]), helper.make_node("Sigmoid", [f"m{i}"], [f"s{i}"]),
                      helper.make_node("Mul", [f"s{i}", h], [f"g{i}"]), helper.make_node("Add", [h, f"g{i}"], [out])]
        stream.append((h, out))
        h = out
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 16]) for n in ("x", "y")]
    bm = blocks_from_graph(_model(nodes, vi[:1], vi[1:], inits))
    assert _boundaries(bm) == [stream[i] for i in (1, 2, 4, 5, 6)]
    assert _boundaries(bm)[0] == ("d0", "a1")
    assert [b.name for b in bm.blocks] == [f"graph.{i}" for i in range(5)]
    assert all(b.removable and len(b.nodes) == 3 for b in bm.blocks)


def test_no_repetition_gives_no_blocks() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], [_weight("W", 16, 16, rng)])
    assert [c.tensor for c in residual_cuts(model)] == ["x", "a", "b", "y"]
    assert blocks_from_graph(model) == BlockMap(("graph",), "graph", ())
    with pytest.raises(BlockError) as err:
        find_blocks(model)
    assert err.value.message == "no repeated blocks found in the model (no module paths, no repeating residual structure)"
    assert err.value.hint == "export with 'compress export' (it writes a block map) or pass --blocks CONTAINER"


def _foreign_stack(*, residual: bool, dim: str | int = "?") -> onnx.ModelProto:
    """A foreign-exporter stack (weights as Constant nodes, batch dim ``?`` or -1)::

        x -> [MatMul(W_i) -> Relu (-> Add x_i if residual)] x 4 -> Identity -> y
    """
    rng = np.random.default_rng(3)
    nodes, h = [], "x"
    for i in range(4):
        w = helper.make_tensor(f"w{i}", TensorProto.FLOAT, [16, 16], rng.normal(0, 0.3, (16, 16)).astype(np.float32))
        nodes += [helper.make_node("Constant", [], [f"W{i}"], value=w),
                  helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        out = f"r{i}"
        if residual:
            nodes.append(helper.make_node("Add", [h, f"r{i}"], [f"h{i}"]))
            out = f"h{i}"
        h = out
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [dim, 16]) for n in ("x", "y")]
    if dim == -1:  # helper refuses a negative dim_value; foreign exporters write one
        for v in vi:
            v.type.tensor_type.shape.dim[0].dim_value = -1
    graph = helper.make_graph(nodes, "g", vi[:1], vi[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("dim", ["?", -1])
def test_foreign_graph_residual_blocks_only_with_constant_node_weights(dim: str | int) -> None:
    """Issue 10: graph-only detection proposes residual blocks only; Constant-node weights are
    weights (heavy nodes, parameters); ``?`` and ``-1`` dims are unknown sizes."""
    from compress.graph import GraphIndex

    plain = _foreign_stack(residual=False, dim=dim)
    assert GraphIndex(plain).type_of("x").shape == (None, 16)
    assert blocks_from_graph(plain).blocks == ()  # VGG-like plain layers: repeated, but no skip connection
    res = blocks_from_graph(_foreign_stack(residual=True, dim=dim))
    assert len(res.blocks) >= 3
    assert all(b.removable for b in res.blocks)
    assert all(b.params == 256 for b in res.blocks)  # the 16x16 Constant node weight of each block


def test_repeated_ops_without_weights_are_not_blocks() -> None:
    """x -> Relu -> Relu -> Relu -> y repeats, but applies no weight: not blocks."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 16]) for n in ("x", "y")]
    assert blocks_from_graph(_model(nodes, vi[:1], vi[1:], [])).blocks == ()


def test_does_not_modify_the_model() -> None:
    model = _masked_model(mask_from_ids=False)
    before = model.SerializeToString()
    blocks_from_graph(model)
    residual_cuts(model)
    assert model.SerializeToString() == before


# --------------------------------------------------------------------------- a real model


@pytest.mark.slow
def test_minilm_graph_blocks_match_metadata_blocks(minilm_path: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(minilm_path)).eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 16, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask), str(tmp_path / "minilm.onnx"), dynamo=True, opset_version=18,
                          external_data=False, input_names=["input_ids", "attention_mask"], verbose=False)
    exported = onnx.load(str(tmp_path / "minilm.onnx"))
    ref = find_blocks(exported)
    assert ref.source == "metadata"
    bm = find_blocks(_stripped(exported))
    assert bm.source == "graph"
    assert len(bm.blocks) == 6
    assert _boundaries(bm) == _boundaries(ref)
    assert all(b.removable for b in bm.blocks)
    # the attention mask (float, built once, read by all six layers) is a side input of each
    assert all(len(b.side_inputs) == 1 and b.side_inputs == bm.blocks[0].side_inputs for b in bm.blocks)
