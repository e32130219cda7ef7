"""Q/DQ graph edits and counts on ONNX Runtime's QDQ output (shared by ``int8`` and its fidelity target).

The int8 pass (:mod:`compress.passes.int8`) and the fidelity-target repair
(:func:`compress.passes.accuracy.repair_int8`) both undo parts of ORT's quantization on a
model they own: :func:`restore_float_inputs` points non-quantized consumers of an
activation ``QuantizeLinear -> DequantizeLinear`` pair back at the float tensor,
:func:`restore_float_weights` gives chosen nodes their float weights back, and
:func:`drop_dead_qdq` removes the Q/DQ nodes (and their scales, zero points and int8
weights) that nothing reads any more. These edit the model passed to them **in place**.
:func:`zero_points`, :func:`per_channel_weights` and :func:`quantized_nodes` only read the
graph (zero points are read one tensor at a time). Nothing here touches the file system.
"""

from __future__ import annotations

import numpy as np
import onnx

from compress.external import read_array


def restore_float_inputs(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Point non-quantized consumers of an activation Q -> DQ pair back at the float tensor.

    ``quantized``: names of the nodes meant to read quantized inputs. Every other node (not a
    Q/DQ) that reads the output of a DequantizeLinear fed by a QuantizeLinear reads the Q's
    float input instead; Q/DQ nodes left without consumers and their unused initializers are
    removed. Edits ``model`` in place; returns the number of inputs rewired.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    if rewired:
        drop_dead_qdq(model, weights=False)
    return rewired


def restore_float_weights(model: onnx.ModelProto, float_model: onnx.ModelProto, nodes: set[str]) -> int:
    """Give ``nodes`` back their float weights: inputs read from a DequantizeLinear of an initializer.

    ORT's QDQ output stores a weight as an int8 initializer behind a lone DequantizeLinear;
    :func:`restore_float_inputs` only undoes activation Q -> DQ pairs. Each such input of a
    node in ``nodes`` reads the float initializer that the same node reads in ``float_model``
    (the pass's input, same node names) instead; the int8 copies no longer read are removed.
    The float initializer is copied as it is (a reference when external: no bytes are read).
    Edits ``model`` in place; returns the number of inputs rewired.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = {t.name: t for t in float_model.graph.initializer}
    rewired = 0
    for node in graph.node:
        source = float_nodes.get(node.name)
        if node.name not in nodes or source is None or len(source.input) != len(node.input):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            weight = float_inits.get(source.input[i])
            if weight is None:
                continue
            if weight.name not in inits:
                graph.initializer.append(weight)
                inits.add(weight.name)
            node.input[i] = weight.name
            rewired += 1
    if rewired:
        drop_dead_qdq(model, weights=True)
    return rewired


def drop_dead_qdq(model: onnx.ModelProto, *, weights: bool) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads, and their scales and zero points.

    ``weights``: also the quantized initializers they read. Repeats until no dead Q/DQ is
    left (a Q feeding only dead DQs dies with them). Edits ``model`` in place.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    freed: set[str] = set()
    while True:
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        freed.update(x for n in dead for x in (n.input if weights else n.input[1:]))
        keep = [n for n in graph.node if n not in dead]
        del graph.node[:]
        graph.node.extend(keep)
    used = {x for n in graph.node for x in n.input} | outputs
    keep_inits = [t for t in graph.initializer if t.name not in freed or t.name in used]
    if len(keep_inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep_inits)


def zero_points(model: onnx.ModelProto) -> tuple[int, int]:
    """(zero-point tensors, those with a non-zero value) over all Q/DQ nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    seen: set[str] = set()
    nonzero = 0
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            if n.input[2] in seen:
                continue
            seen.add(n.input[2])
            if np.any(read_array(inits[n.input[2]]) != 0):
                nonzero += 1
    return len(seen), nonzero


def per_channel_weights(model: onnx.ModelProto) -> int:
    """Number of DequantizeLinear nodes whose scale initializer has more than one element (per-channel)."""
    inits = {t.name: t for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits
               and int(np.prod(inits[n.input[1]].dims)) > 1)


def quantized_nodes(model: onnx.ModelProto, op_types: set[str]) -> dict[str, bool]:
    """Node name -> every float input of it comes from a DequantizeLinear (per node of ``op_types``)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type not in op_types:
            continue
        data = [x for x in n.input[:2] if x]  # data inputs (A/B, X/W); a float bias stays float
        out[n.name] = bool(data) and all(x in producer and producer[x].op_type == "DequantizeLinear" for x in data)
    return out


__all__ = ["drop_dead_qdq", "per_channel_weights", "quantized_nodes", "restore_float_inputs", "restore_float_weights",
           "zero_points"]
