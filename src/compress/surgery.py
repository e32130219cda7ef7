"""Graph surgery with onnx-graphsurgeon: mark tensors as outputs, remove blocks.

Both functions return a new model and never modify their input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx

from compress.blocks import Block
from compress.errors import BlockError
from compress.graph import GraphIndex


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def add_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the tensors ``names`` appended as graph outputs.

    Tensors that already are graph outputs are not added twice. Output types come from
    shape inference where known (element type only otherwise). Does not modify ``model``.
    """
    index = GraphIndex(model)
    out = _copy(model)
    existing = {o.name for o in out.graph.output}
    for name in dict.fromkeys(names):
        if name in existing:
            continue
        if name not in index.producer and name not in index.graph_inputs:
            raise BlockError(f"tensor {name!r} is not produced in the graph", hint="the block map does not fit this model")
        t = index.type_of(name)
        elem = onnx.TensorProto.FLOAT if t is None else onnx.helper.np_dtype_to_tensor_dtype(__import__("numpy").dtype(t.dtype))
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        existing.add(name)
    return out


def remove_blocks(model: onnx.ModelProto, blocks: Sequence[Block], *, check: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` without ``blocks``: each block's output is replaced by its input.

    Consumers of a removed block's output read the block's input instead (a graph output
    gets an Identity); then dangling nodes are cleaned up and the graph is re-sorted.
    Node names and their metadata are kept for the nodes that remain.

    Raises:
        BlockError: when a block is not removable, or the result fails ``onnx.checker``
            (naming the offending node).
    """
    import onnx_graphsurgeon as gs

    for b in blocks:
        if not b.removable or b.input is None or b.output is None:
            raise BlockError(f"block {b.index} ({b.name}) is not removable: {b.reason}")
    meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.name and n.metadata_props}
    graph = gs.import_onnx(_copy(model))  # gs writes into the TensorProtos it imports
    tensors = graph.tensors()
    # Remove later blocks first: a removed block's input may be an earlier removed block's output.
    for b in sorted(blocks, key=lambda b: b.index, reverse=True):
        src, dst = tensors.get(b.input), tensors.get(b.output)
        if src is None or dst is None:
            raise BlockError(f"block {b.index} ({b.name}): boundary tensor missing from the graph",
                             hint="the block map does not fit this model; re-run block detection")
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
        if dst in graph.outputs:
            dst.inputs.clear()
            graph.nodes.append(gs.Node("Identity", name=f"compress_skip_{b.index}", inputs=[src], outputs=[dst]))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.functions.extend(f for f in model.functions if f not in out.functions)
    for node in out.graph.node:
        if node.name in meta and not node.metadata_props:
            node.metadata_props.extend(meta[node.name])
    out.metadata_props.extend(model.metadata_props)
    if model.ir_version < 4:
        _list_initializers_as_inputs(out, model)
    if check:
        check_model(out)
    return out


def _list_initializers_as_inputs(out: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too (gs exports them as initializers only).

    The inputs keep the original model's order; initializers it did not list are appended.
    """
    present = {i.name for i in out.graph.input} | {t.name for t in out.graph.initializer}
    inputs = [i for i in model.graph.input if i.name in present]
    listed = {i.name for i in inputs}
    inputs += [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
               for t in out.graph.initializer if t.name not in listed]
    del out.graph.input[:]
    out.graph.input.extend(inputs)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full checks; BlockError naming the node on failure."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()
        node = next((ln for ln in first if "node" in ln.lower()), first[0] if first else "")
        raise BlockError(f"the pruned graph fails onnx.checker: {node.strip()}",
                         hint="report this model; nothing was written") from None
    except Exception as exc:  # shape inference errors surface as InferenceError
        raise BlockError(f"the pruned graph fails onnx.checker: {str(exc).strip().splitlines()[0]}",
                         hint="report this model; nothing was written") from None
