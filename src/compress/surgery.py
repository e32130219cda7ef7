"""Graph surgery with onnx-graphsurgeon: remove blocks, check the result.

:func:`remove_blocks` returns a new model and never modifies its input. Removal is guarded: each
block is re-checked on the graph itself before the surgery (:func:`compress.blocks.check_block`:
its stream inputs are the residual streams and its outputs replace exactly them), and the
result is checked after it (every node of the removed blocks is gone, no node reads a
tensor that no longer exists, the graph outputs keep their names and types; with a
calibration batch, ONNX Runtime's output shapes and dtypes are unchanged:
:func:`verify_removal`). A failing check is a BlockError naming the block; nothing is
returned, so nothing can be written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from compress.blocks import Block, check_block
from compress.errors import BlockError
from compress.graph import GraphIndex, node_inputs, node_keys
from compress.runtime import load_session


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model`` (onnx-graphsurgeon writes into the TensorProtos it imports)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


#: A healing map for :func:`remove_blocks`: (span input tensor, weight ``[d_in, d_out]``, bias ``[d_out]``,
#: spatial axes): 0 = features last (``MatMul`` + ``Add``); n >= 1 = a channels-first feature map with n
#: spatial axes (a 1x1 ``Conv`` with the weight transposed and the bias).
HealMap = tuple[str, np.ndarray, np.ndarray, int]


def remove_blocks(model: onnx.ModelProto, blocks: Sequence[Block], *, check: bool = True,
                  index: GraphIndex | None = None,
                  heal: Mapping[tuple[int, int], HealMap] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` without ``blocks``: each stream output is replaced by its stream input.

    Consumers of a removed block's stream outputs read the matching stream inputs instead
    (a graph output gets an Identity); then dangling nodes are cleaned up and the graph is
    re-sorted. Node names and their metadata are kept for the nodes that remain. Nodes that
    only fed a removed block (the previous block's text stream when an MMDiT's last joint
    block goes) are dead afterwards and leave too.

    Args:
        model: the model to prune (not modified).
        blocks: the blocks to remove (removable ones of ``model``'s block map, any order).
        check: also run ``onnx.checker`` with full checks on the result (the structural
            guard before and the checks after the surgery always run).
        index: a :class:`GraphIndex` of ``model`` to reuse (one removal per block in a loop).
        heal: ``(block index, stream position) -> (input tensor, W, b, spatial)``: the
            consumers of that stream output of that (removed, last-of-its-span) block read
            ``MatMul(input, W) + b`` (nodes ``compress_heal_<block>_<stream>_{matmul,add}``),
            or for a channels-first feature map a 1x1 ``Conv`` with ``W^T`` and ``b``
            (``..._conv``), weights in the input tensor's float dtype, instead of the stream input
            (:mod:`compress.scoring.heal`). ``input`` is the span's input tensor.

    Raises:
        BlockError: naming the block, when a block is not removable, fails the structural
            guard on this graph, or leaves nodes behind; or when the result reads a missing
            tensor, changes the graph outputs, or fails ``onnx.checker`` (naming the node).
    """
    import onnx_graphsurgeon as gs

    for b in blocks:
        if not b.removable or not b.streams:
            raise BlockError(f"block {b.index} ({b.name}) is not removable: {b.reason}",
                             hint="choose removable blocks (compress inspect lists them)")
    index = index if index is not None and index.model is model else GraphIndex(model)
    for b in blocks:
        why = check_block(index, b)
        if why is not None:
            raise BlockError(f"block {b.index} ({b.name}) fails the structural check: {why}",
                             hint="the block map does not describe this graph's residual streams; nothing was "
                                  "written (re-run block detection: 'compress inspect MODEL.onnx')")
    meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.name and n.metadata_props}
    graph = gs.import_onnx(_copy(model))  # gs writes into the TensorProtos it imports
    tensors = graph.tensors()
    # Remove later blocks first: a removed block's input may be an earlier removed block's output.
    removed_indices = {b.index for b in blocks}
    for key in heal or {}:
        if key[0] not in removed_indices:
            raise BlockError(f"a healing map is given for block {key[0]}, which is not removed",
                             hint="heal only the last block of a removed span")
    for b in sorted(blocks, key=lambda b: b.index, reverse=True):
        for k, st in enumerate(b.streams):
            src, dst = tensors.get(st.input), tensors.get(st.output)
            if src is None or dst is None:
                raise BlockError(f"block {b.index} ({b.name}): boundary tensor missing from the graph",
                                 hint="the block map does not fit this model; re-run block detection")
            if heal and (b.index, k) in heal:
                src = _heal_nodes(graph, tensors, b, k, heal[b.index, k])
            for consumer in list(dst.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is dst:
                        consumer.inputs[i] = src
            if dst in graph.outputs:
                dst.inputs.clear()
                name = f"compress_skip_{b.index}" + (f"_{k}" if k else "")
                graph.nodes.append(gs.Node("Identity", name=name, inputs=[src], outputs=[dst]))
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
    _check_surgery(model, out, blocks)
    if check:
        check_model(out)
    return out


def _heal_nodes(graph: object, tensors: Mapping[str, object], block: Block, k: int, heal: HealMap) -> object:
    """Append ``MatMul(input, W) + b`` to the gs ``graph``; returns the result tensor."""
    import onnx_graphsurgeon as gs

    name, weight, bias, spatial = heal
    x = tensors.get(name)
    if x is None:
        raise BlockError(f"healing block {block.index} ({block.name}): span input {name!r} is not in the graph",
                         hint="the block map does not fit this model; nothing was written")
    dtype = np.dtype(x.dtype) if getattr(x, "dtype", None) is not None else np.dtype(np.float32)  # type: ignore[attr-defined]
    if not np.issubdtype(dtype, np.floating):
        raise BlockError(f"healing block {block.index} ({block.name}): span input {name!r} is {dtype}, not float",
                         hint="prune without --heal")
    tag = f"compress_heal_{block.index}_{k}"
    out = gs.Variable(f"{tag}_out", dtype=dtype)
    if spatial:  # channels-first feature map: the map over channels at every position is a 1x1 Conv
        kernel = np.ascontiguousarray(weight.T.reshape(weight.shape[1], weight.shape[0], *([1] * spatial)), dtype=dtype)
        w = gs.Constant(f"{tag}_weight", kernel)
        c = gs.Constant(f"{tag}_bias", np.ascontiguousarray(bias, dtype=dtype))
        graph.nodes.append(gs.Node("Conv", name=f"{tag}_conv", inputs=[x, w, c], outputs=[out],  # type: ignore[attr-defined]
                                   attrs={"kernel_shape": [1] * spatial}))
        return out
    w = gs.Constant(f"{tag}_weight", np.ascontiguousarray(weight, dtype=dtype))
    c = gs.Constant(f"{tag}_bias", np.ascontiguousarray(bias, dtype=dtype))
    mid = gs.Variable(f"{tag}_matmul_out", dtype=dtype)
    graph.nodes.append(gs.Node("MatMul", name=f"{tag}_matmul", inputs=[x, w], outputs=[mid]))  # type: ignore[attr-defined]
    graph.nodes.append(gs.Node("Add", name=f"{tag}_add", inputs=[mid, c], outputs=[out]))  # type: ignore[attr-defined]
    return out


def _check_surgery(model: onnx.ModelProto, out: onnx.ModelProto, blocks: Sequence[Block]) -> None:
    """The checks after the surgery (see the module docstring); BlockError naming the block."""
    keys = node_keys(model.graph)
    by_key = dict(zip(keys, model.graph.node, strict=True))
    left = {n.name for n in out.graph.node if n.name}
    for b in blocks:
        named = [by_key[k].name for k in b.nodes if k in by_key and by_key[k].name]
        stay = [n for n in named if n in left]
        if stay:
            raise BlockError(f"block {b.index} ({b.name}): the surgery would leave {len(stay)} of its {len(b.nodes)} "
                             f"nodes in the graph (first: {stay[0]!r}); they are still read outside the block",
                             hint="the block map does not fit this model; nothing was written")
    gone = len(model.graph.node) - len(out.graph.node) + sum(n.name.startswith(("compress_skip_", "compress_heal_"))
                                                            for n in out.graph.node)
    if gone < sum(len(b.nodes) for b in blocks):
        raise BlockError(f"the surgery removed {gone} nodes, fewer than the {sum(len(b.nodes) for b in blocks)} of "
                         f"blocks {', '.join(b.name for b in blocks)}",
                         hint="the block map does not fit this model; nothing was written")
    available = {i.name for i in out.graph.input} | {t.name for t in out.graph.initializer}
    for node in out.graph.node:
        missing = [x for x in node_inputs(node) if x not in available and not _produced_before(out, x)]
        if missing:
            raise BlockError(f"after removing {', '.join(b.name for b in blocks)}, node {node.name or node.op_type!r} "
                             f"reads {missing[0]!r}, which no longer exists",
                             hint="report this model; nothing was written")
        available.update(o for o in node.output if o)
    before = [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
    after = [(o.name, o.type.tensor_type.elem_type) for o in out.graph.output]
    if before != after:
        raise BlockError(f"removing {', '.join(b.name for b in blocks)} changes the graph outputs "
                         f"({before} -> {after})", hint="report this model; nothing was written")


def _produced_before(model: onnx.ModelProto, name: str) -> bool:
    """Whether a node of ``model`` produces ``name`` (subgraph reads are resolved by the checker)."""
    return any(name in n.output for n in model.graph.node)


def verify_removal(original: onnx.ModelProto, pruned: onnx.ModelProto, feed: Mapping[str, np.ndarray],
                   *, blocks: Sequence[Block] = ()) -> None:
    """Run both models on one calibration batch; BlockError when an output's shape or dtype changed.

    Also fails when ONNX Runtime cannot run the pruned model (naming the removed blocks).
    """
    names = [o.name for o in original.graph.output]
    what = ", ".join(b.name for b in blocks) or "the blocks"
    ref = load_session(original, providers=("CPUExecutionProvider",)).run(names, dict(feed))
    try:
        got = load_session(pruned, providers=("CPUExecutionProvider",)).run(names, dict(feed))
    except BlockError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BlockError(f"ONNX Runtime cannot run the model without {what}: {msg}",
                         hint="report this model; nothing was written") from None
    for name, a, b in zip(names, ref, got, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise BlockError(f"removing {what} changes output {name!r}: {a.dtype}{list(a.shape)} -> "
                             f"{b.dtype}{list(b.shape)}", hint="the block is not a residual block; nothing was written")


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
    from compress.onnx_io import check_model as onnx_check

    try:
        onnx_check(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()
        node = next((ln for ln in first if "node" in ln.lower()), first[0] if first else "")
        raise BlockError(f"the pruned graph fails onnx.checker: {node.strip()}",
                         hint="report this model; nothing was written") from None
    except Exception as exc:  # shape inference errors surface as InferenceError
        raise BlockError(f"the pruned graph fails onnx.checker: {str(exc).strip().splitlines()[0]}",
                         hint="report this model; nothing was written") from None
