"""Read-only queries on an ONNX graph: producers, consumers, constants, tensor types.

Nothing here modifies a model. Nodes are identified by their name; :func:`node_keys`
gives unnamed or duplicate-named nodes a stable key ``#<index>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from onnx import helper

#: Ops without inputs whose output is not a constant.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}

Dim = int | str | None

#: Initializer types that hold shapes and indices, not parameters.
_INDEX_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}


@dataclass(frozen=True)
class TensorType:
    """Element type and shape of a tensor; a dim is an int, a symbol, or None if unknown."""

    dtype: str
    shape: tuple[Dim, ...] | None

    def shape_str(self) -> str:
        """The shape as ``2x?xseq`` (``?`` for an unknown dim); ``?`` when the rank is unknown."""
        if self.shape is None:
            return "?"
        return "x".join("?" if d is None else str(d) for d in self.shape)

    def matches(self, other: TensorType) -> bool:
        """Same dtype and rank, and no two known (integer) dims that differ."""
        if self.dtype != other.dtype or self.shape is None or other.shape is None:
            return False
        if len(self.shape) != len(other.shape):
            return False
        # Symbolic dims may take any value (and tools rename them: batch vs unk__29), so only two
        # known integers can differ.
        return all(not (isinstance(a, int) and isinstance(b, int)) or a == b
                   for a, b in zip(self.shape, other.shape, strict=True))

    def static_shape(self) -> tuple[int, ...] | None:
        """The shape when the rank and every dim are known integers; None otherwise."""
        if self.shape is None:
            return None
        dims = tuple(d for d in self.shape if isinstance(d, int))
        return dims if len(dims) == len(self.shape) else None


def dtype_name(elem_type: int) -> str:
    """ONNX element type -> numpy-style name ("float32", "int64", ...)."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # onnx.helper: no numpy dtype for this element type (its error type varies by version)
        return onnx.TensorProto.DataType.Name(elem_type).lower()


#: ``dim_param`` values that name no dimension: every occurrence is its own unknown size.
_ANONYMOUS_DIMS = frozenset({"", "?", "-1"})


def value_type(value_info: onnx.ValueInfoProto) -> TensorType | None:
    """The TensorType declared by ``value_info``; None for non-tensor types.

    Dims written by other exporters are read as dynamic (None, unknown) when they are a
    negative ``dim_value`` (``-1``: Paddle, TF converters) or a ``dim_param`` of ``?``: two
    ``?`` dims are two unknown sizes, not one shared symbol.
    """
    t = value_info.type
    if not t.HasField("tensor_type"):
        return None
    tt = t.tensor_type
    shape: tuple[Dim, ...] | None = None
    if tt.HasField("shape"):
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value) if d.dim_value >= 0 else None)
            elif d.HasField("dim_param") and d.dim_param.strip() not in _ANONYMOUS_DIMS:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shape = tuple(dims)
    return TensorType(dtype_name(tt.elem_type), shape)


def node_keys(graph: onnx.GraphProto) -> list[str]:
    """A unique key per node: its name, or ``#<index>`` when unnamed or duplicated."""
    seen: dict[str, int] = {}
    for node in graph.node:
        seen[node.name] = seen.get(node.name, 0) + 1
    return [n.name if n.name and seen[n.name] == 1 else f"#{i}" for i, n in enumerate(graph.node)]


def subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensors read by the subgraphs (If/Loop/Scan bodies) of ``node``."""
    names: list[str] = []
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names.extend(x for x in [*n.input, *subgraph_inputs(n)] if x and x not in local)
            names.extend(o.name for o in g.output if o.name not in local)
    return names


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Non-empty inputs of ``node``, including outer-scope reads of its subgraphs."""
    return [x for x in node.input if x] + subgraph_inputs(node)


#: Largest serialized model whose missing shapes are measured with ONNX Runtime (see _runtime_types).
_RUNTIME_TYPES_MAX_BYTES = 1 << 30


def _runtime_types(model: onnx.ModelProto, types: dict[str, TensorType]) -> dict[str, TensorType]:
    """Types of node outputs that shape inference left without a shape, measured by ONNX Runtime.

    One run on placeholder inputs (ones for floats, zeros for integers); does not modify
    ``model`` or ``types``. Only for models whose graph inputs all have static shapes (then a
    run gives the shapes every run has; a TorchScript export's ``Reshape`` to a computed shape
    is the usual gap) and that hold at most 1 GiB (graph and tensor data). Best effort: {} when
    nothing is missing or ORT fails.
    """
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    missing = [o for n in graph.node for o in n.output if o and (o not in types or types[o].shape is None)]
    if not missing or len(missing) > 20000:
        return {}
    feeds: dict[str, np.ndarray] = {}
    for vi in graph.input:
        if vi.name in inits:
            continue
        t = value_type(vi)
        shape = t.static_shape() if t is not None else None
        if t is None or shape is None:
            return {}
        dtype = np.dtype(t.dtype) if t.dtype in np.sctypeDict else None
        if dtype is None:
            return {}
        feeds[vi.name] = (np.ones if dtype.kind == "f" else np.zeros)(shape, dtype=dtype)
    import onnxruntime as ort

    from compress.onnx_io import model_nbytes
    from compress.runtime.session import make_session

    if model_nbytes(model) > _RUNTIME_TYPES_MAX_BYTES:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    listed = {o.name for o in probe.graph.output}
    for name in missing:
        if name not in listed:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = make_session(probe, options=opts)
        values = sess.run(missing, feeds)
    except Exception:  # ONNX Runtime cannot run the probe (custom ops, unsupported types): types stay unknown
        return {}
    return {name: TensorType(np.asarray(v).dtype.name, tuple(int(d) for d in np.shape(v)))
            for name, v in zip(missing, values, strict=True) if isinstance(v, np.ndarray)}


class GraphIndex:
    """Producer/consumer maps, the constant closure and tensor types of a model's main graph.

    Built once per model; does not modify ``model``. Tensor types come from the model's
    own value_info plus ``onnx.shape_inference`` (run on a copy); shapes it cannot infer in
    a model with static input shapes are measured with one ONNX Runtime run (_runtime_types).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.keys = node_keys(self.graph)
        self.node_by_key = dict(zip(self.keys, self.graph.node, strict=True))
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.producer: dict[str, str] = {}
        self.consumers: dict[str, list[str]] = {}
        for key, node in zip(self.keys, self.graph.node, strict=True):
            for out in node.output:
                if out:
                    self.producer[out] = key
            for inp in dict.fromkeys(node_inputs(node)):
                self.consumers.setdefault(inp, []).append(key)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in self.graph.output]

    @cached_property
    def constants(self) -> frozenset[str]:
        """Tensors whose value does not depend on any graph input (the constant closure)."""
        const = set(self.initializers)
        for node in self.graph.node:  # nodes are topologically sorted in a valid model
            ins = node_inputs(node)
            if node.op_type in _NONDETERMINISTIC:
                continue
            if all(x in const for x in ins):
                const.update(o for o in node.output if o)
        return frozenset(const)

    @cached_property
    def types(self) -> dict[str, TensorType]:
        """Tensor name -> TensorType, for every tensor whose type is known or inferable."""
        types: dict[str, TensorType] = {}
        model = self.model
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:  # shape inference is best effort (custom ops, >2 GB)
            inferred = model
        for g in (model.graph, inferred.graph):
            for vi in [*g.input, *g.output, *g.value_info]:
                t = value_type(vi)
                if t is not None and (vi.name not in types or types[vi.name].shape is None):
                    types[vi.name] = t
        for init in self.graph.initializer:
            types.setdefault(init.name, TensorType(dtype_name(init.data_type), tuple(init.dims)))
        for name, t in _runtime_types(model, types).items():
            types[name] = t
        return types

    def type_of(self, name: str) -> TensorType | None:
        """The (inferred) type of tensor ``name``; None when it is unknown."""
        return self.types.get(name)

    def weight_tensor(self, name: str) -> onnx.TensorProto | None:
        """The stored tensor behind ``name``: an initializer or a ``Constant`` node's value; else None.

        Some exporters (caffe2, older TF converters) store weights as ``Constant`` nodes.
        """
        t = self.initializers.get(name)
        if t is not None:
            return t
        key = self.producer.get(name)
        if key is None:
            return None
        node = self.node_by_key[key]
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            return None
        return next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)

    def params_of(self, keys: Iterable[str]) -> int:
        """Number of parameters read by the given nodes (each stored tensor counted once).

        Parameters are the elements of non-scalar, non-index stored tensors (initializers and
        ``Constant`` node values, :meth:`weight_tensor`).
        """
        seen: set[str] = set()
        total = 0
        for key in keys:
            for x in node_inputs(self.node_by_key[key]):
                if x in seen:
                    continue
                t = self.weight_tensor(x)
                if t is not None and t.data_type not in _INDEX_TYPES:
                    seen.add(x)
                    n = int(np.prod(t.dims)) if len(t.dims) else 1
                    total += n if n > 1 else 0
        return total
