"""FP32 -> FP16, keeping FP32 where FP16 is unsafe (the ``fp16`` pass).

TensorRT 10.12+/11 builds strongly typed networks: precision comes from the ONNX itself,
so FP16 means casting the graph. The conversion is done by ONNX Runtime's maintained
converter (``onnxruntime.transformers.float16.convert_float_to_float16``, a fork of
onnxconverter-common's that also retargets ``Cast(to=float)`` nodes and handles
initializers shared by FP32 and FP16 nodes); this module decides which nodes stay FP32,
then tidies the result (topological order, no FP32->FP16->FP32 round trips).

A node stays FP32 (with the first matching reason reported) when it is:

1. on the user's block list (``block_ops`` by op type, ``block_nodes`` by name);
2. an op whose ONNX schema has no float16 type for a float32 tensor it uses (ML ops,
   ``Celu``, old ``CumSum``, ...) or that has no ONNX schema at all (custom domains);
3. a normalization (``keep_normalization``): LayerNormalization, Batch/Instance/Group
   normalization, RMSNormalization, ..., and normalizations written out as
   ``ReduceMean(x**2)`` (+ the centring ``Sub``/``ReduceMean`` and the ``Add(eps)``,
   ``Sqrt``, ``Div``/``Reciprocal`` chain after it);
4. a sum-like reduction (ReduceSum/Mean/SumSquare/L1/L2/LogSum/LogSumExp/Prod,
   GlobalAveragePool/GlobalLpPool) over more than ``max_reduce_elements`` elements, or
   over a number of elements not known statically;
5. Softmax/LogSoftmax when ``keep_softmax``;
6. a reader of a float constant outside the FP16 range: a finite |x| > 65504 (would become
   inf), or more than ``underflow_share`` of its non-zero values below 2**-24 (would
   flush to zero); the Constant node holding such a value stays FP32 too;
7. with calibration batches: the producer or a reader of a tensor whose largest finite |x|
   over the batches exceeds ``activation_limit`` (65504 / 4 by default: a margin for
   inputs the calibration did not show);
8. a ``Cast`` from a non-float type whose readers all stay FP32 (integers above 2048 are
   not exact in FP16).

Graph inputs and outputs stay FP32 with ``keep_io_types`` (Cast nodes at the boundary).
Initializers read only by FP32 nodes stay FP32; all others become FP16, values beyond
the FP16 range clamped to +-65504 (and tiny ones to +-2**-24) by the converter.

This module holds the config, the rules and the pass; :mod:`compress.passes.fp16_ranges`
measures the activation ranges of rule 7 and :mod:`compress.passes.fp16_convert` runs the
converter on external data and tidies its output. The pass does not modify its input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from compress import external
from compress.errors import BuildError, CompressError, ConfigError, ModelError
from compress.graph import GraphIndex
from compress.passes.base import (
    Batch,
    PassReport,
    check_model,
    copy_model,
    float_initializers,
    name_nodes,
    op_counts,
    pass_options,
    register_pass,
    timer,
    toposort,
)
from compress.passes.fp16_convert import (
    SCAN_CHUNK,
    convert,
    drop_round_trips,
    initializer_counts,
    tidy_value_info,
    untype_initializers,
)
from compress.passes.fp16_ranges import activation_ranges

if TYPE_CHECKING:
    from compress.calibration import CalibrationSet

#: Largest finite float16 value.
FP16_MAX = 65504.0
#: Smallest positive float16 value (subnormal); smaller magnitudes round to zero.
FP16_TINY = 2.0**-24

NORM_OPS = frozenset({
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "RMSNormalization", "LpNormalization", "MeanVarianceNormalization", "SimplifiedLayerNormalization",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupNorm", "SkipGroupNorm",
})
SUM_REDUCTIONS = frozenset({
    "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "GlobalAveragePool", "GlobalLpPool",
})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
#: Ops whose fixed-float inputs the converter itself keeps FP32 (see ALWAYS_FLOAT_INPUTS there).
_CONVERTER_MIXED = frozenset({"Resize", "GroupNorm", "SkipGroupNorm"})
_NORM_CHAIN = frozenset({"Add", "Sqrt", "Reciprocal", "Div", "Mul", "Pow"})
_FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True, kw_only=True)
class Fp16Config:
    """Options of the ``fp16`` pass (see the module docstring for the rules).

    Attributes:
        keep_io_types: graph inputs/outputs stay float32 (Cast nodes at the boundary).
        keep_normalization: normalizations stay FP32 (rule 3).
        keep_softmax: Softmax/LogSoftmax stay FP32 (rule 5).
        max_reduce_elements: sum-like reductions over more elements stay FP32 (rule 4);
            None turns the rule off.
        activation_limit: with calibration, tensors whose largest |x| exceeds this keep their
            producer and readers FP32 (rule 7); at most 65504.
        underflow_share: a constant with more than this share of non-zero values below 2**-24
            keeps its readers FP32 (rule 6).
        block_ops: op types that stay FP32.
        block_nodes: node names that stay FP32.
        max_batches: use at most this many calibration batches for rule 7 (None: all).
    """

    keep_io_types: bool = True
    keep_normalization: bool = True
    keep_softmax: bool = False
    max_reduce_elements: int | None = 4096
    activation_limit: float = FP16_MAX / 4
    underflow_share: float = 0.01
    block_ops: tuple[str, ...] = ()
    block_nodes: tuple[str, ...] = ()
    max_batches: int | None = 8

    def __post_init__(self) -> None:
        if not 0 < self.activation_limit <= FP16_MAX:
            raise ConfigError(f"fp16: activation_limit must be in (0, {FP16_MAX:g}], got {self.activation_limit}",
                              hint="leave it at the default, or lower it to keep more nodes in FP32")
        if not 0 <= self.underflow_share <= 1:
            raise ConfigError(f"fp16: underflow_share must be in [0, 1], got {self.underflow_share}",
                              hint="a share of the weights, e.g. 0.5")
        if self.max_reduce_elements is not None and self.max_reduce_elements < 1:
            raise ConfigError(f"fp16: max_reduce_elements must be >= 1 or None, got {self.max_reduce_elements}",
                              hint="leave it out (None) for no limit")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"fp16: max_batches must be >= 1 or None, got {self.max_batches}",
                              hint="leave it out (None) to use every calibration batch")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options for the pass report (:func:`~compress.passes.base.pass_options` adds the data)."""
        return {"keep_io_types": self.keep_io_types, "keep_normalization": self.keep_normalization,
                "keep_softmax": self.keep_softmax, "max_reduce_elements": self.max_reduce_elements,
                "activation_limit": self.activation_limit, "underflow_share": self.underflow_share,
                "block_ops": list(self.block_ops), "block_nodes": list(self.block_nodes),
                "max_batches": self.max_batches}


# --------------------------------------------------------------------------------------------
# Which nodes stay FP32
# --------------------------------------------------------------------------------------------


class _Plan:
    """Node name -> (rule, reason) pairs saying why it stays FP32, in rule order."""

    def __init__(self) -> None:
        self.reasons: dict[str, list[tuple[str, str]]] = {}

    def block(self, name: str, rule: str, reason: str) -> None:
        entries = self.reasons.setdefault(name, [])
        if all(r != reason for _, r in entries):
            entries.append((rule, reason))

    def __contains__(self, name: object) -> bool:
        return name in self.reasons


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    out = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}
    return out


def _float_tensors(index: GraphIndex, node: onnx.NodeProto) -> list[str]:
    names = [x for x in [*node.input, *node.output] if x]
    return [x for x in names if (t := index.type_of(x)) is not None and t.dtype == "float32"]


def _schema_reason(node: onnx.NodeProto, index: GraphIndex, opsets: Mapping[str, int]) -> str | None:
    domain = node.domain if node.domain != "ai.onnx" else ""
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        return f"no ONNX schema for {domain + '::' if domain else ''}{node.op_type}; kept FP32 to be safe"
    if node.op_type in _CONVERTER_MIXED and not domain:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for names, formals in ((node.input, schema.inputs), (node.output, schema.outputs)):
        for i, name in enumerate(names):
            if not name or not formals:
                continue
            formal = formals[min(i, len(formals) - 1)]
            types = allowed.get(formal.type_str, {formal.type_str})
            t = index.type_of(name)
            if t is not None and t.dtype == "float32" and "tensor(float16)" not in types:
                return f"ONNX {node.op_type}-{schema.since_version} has no float16 type for '{formal.name}'"
    return None


#: Constants of at most this many elements are kept in memory for scalar/axes look-ups.
_SMALL_CONSTANT = 64


def _float_constants(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto | np.ndarray, str | None]]:
    """Float32 constants, one at a time: (tensor name, TensorProto or value, Constant node name or None).

    Initializers and ``Constant(value=...)`` tensors are yielded as protos (read them with
    :func:`_tensor_values`); ``value_float(s)`` attributes as arrays. Reads no data.
    """
    for t in float_initializers(model):
        yield t.name, t, None
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for a in node.attribute:
            if a.name == "value" and a.t.data_type == _FLOAT:
                yield node.output[0], a.t, node.name
            elif a.name == "value_float":
                yield node.output[0], np.array(a.f, dtype=np.float32), node.name
            elif a.name == "value_floats":
                yield node.output[0], np.array(list(a.floats), dtype=np.float32), node.name


def _tensor_values(value: onnx.TensorProto | np.ndarray) -> np.ndarray:
    """The values of a constant.

    A read-only memory map for an external float tensor (nothing is read until used), else
    the array (one tensor in memory).
    """
    if isinstance(value, np.ndarray):
        return value
    mapped = external.map_array(value)
    return mapped if mapped is not None else external.read_array(value)


def _constant_values(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, str | None]]:
    """Small float32 constants (at most :data:`_SMALL_CONSTANT` elements): name -> (value, Constant node or None).

    Only these are held in memory (for scalar and axes look-ups); the range rule scans the
    others one at a time (:func:`_range_problems`).
    """
    out: dict[str, tuple[np.ndarray, str | None]] = {}
    for name, value, node in _float_constants(model):
        size = value.size if isinstance(value, np.ndarray) else math.prod(value.dims)
        if size <= _SMALL_CONSTANT:
            out[name] = (np.array(_tensor_values(value)), node)
    return out


def _range_problems(model: onnx.ModelProto, underflow_share: float) -> Iterator[tuple[str, str | None, str]]:
    """(constant, Constant node or None, problem) for each float32 constant outside the FP16 range.

    Scans one tensor at a time, in chunks of :data:`SCAN_CHUNK` elements.
    """
    for name, value, node in _float_constants(model):
        problem = _range_problem(_tensor_values(value), underflow_share)
        if problem is not None:
            yield name, node, problem


def _range_problem(value: np.ndarray, underflow_share: float) -> str | None:
    flat = value.reshape(-1)
    big, nonzero, tiny = 0.0, 0, 0
    for start in range(0, flat.size, SCAN_CHUNK):
        chunk = np.asarray(flat[start:start + SCAN_CHUNK])
        v = np.abs(chunk[np.isfinite(chunk)].astype(np.float64))
        if v.size == 0:
            continue
        big = max(big, float(v.max()))
        nz = v[v > 0]
        nonzero += int(nz.size)
        tiny += int((nz < FP16_TINY).sum())
    if big > FP16_MAX:
        return f"|x| up to {big:.3g} > {FP16_MAX:g} (would be inf in FP16)"
    if nonzero and tiny and tiny / nonzero > underflow_share:
        return f"{tiny} of {nonzero} non-zero values below {FP16_TINY:.3g} (would be 0 in FP16)"
    return None


def _const_scalar(name: str, consts: Mapping[str, tuple[np.ndarray, str | None]], index: GraphIndex) -> float | None:
    if name in consts:
        v = consts[name][0]
    elif name in index.initializers and math.prod(index.initializers[name].dims) == 1:
        v = external.read_array(index.initializers[name])
    else:
        return None
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def _node(index: GraphIndex, tensor: str) -> tuple[str, onnx.NodeProto] | None:
    key = index.producer.get(tensor)
    return (key, index.node_by_key[key]) if key is not None else None


def _decomposed_norms(index: GraphIndex, consts: Mapping[str, tuple[np.ndarray, str | None]]) -> list[str]:
    """Nodes of normalizations written out as ReduceMean(x**2) -> sqrt -> div."""
    members: list[str] = []
    for key, node in index.node_by_key.items():
        if node.op_type not in ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"):
            continue
        group = [key]
        if node.op_type in ("ReduceMean", "ReduceSum"):
            src = _node(index, node.input[0])
            if src is None:
                continue
            sq_key, sq = src
            squared = (sq.op_type == "Pow" and _const_scalar(sq.input[1], consts, index) == 2.0) or \
                      (sq.op_type == "Mul" and sq.input[0] == sq.input[1])
            if not squared:
                continue
            group.append(sq_key)
            centre = _node(index, sq.input[0])
            if centre is not None and centre[1].op_type == "Sub":
                mean = _node(index, centre[1].input[1])
                if mean is not None and mean[1].op_type == "ReduceMean" and mean[1].input[0] == centre[1].input[0]:
                    group += [centre[0], mean[0]]
        current = node
        for _ in range(4):  # Add(eps) -> Sqrt -> Div / Reciprocal -> Mul
            readers = index.consumers.get(current.output[0], [])
            if len(readers) != 1 or index.node_by_key[readers[0]].op_type not in _NORM_CHAIN:
                break
            nxt = index.node_by_key[readers[0]]
            group.append(readers[0])
            joins = [x for x in nxt.input if x and x != current.output[0] and x not in index.constants]
            if nxt.op_type in ("Div", "Mul") and joins:
                break
            current = nxt
        members += group
    return members


def _axes(node: onnx.NodeProto, consts: Mapping[str, tuple[np.ndarray, str | None]],
          index: GraphIndex) -> tuple[list[int] | None, bool]:
    """(axes or None when all/unknown, known)."""
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints), True
    if len(node.input) > 1 and node.input[1]:
        name = node.input[1]
        if name in index.initializers:
            return [int(x) for x in external.read_array(index.initializers[name]).reshape(-1)], True
        if name in consts:
            return [int(x) for x in consts[name][0].reshape(-1)], True
        hit = _node(index, name)
        if hit is not None and hit[1].op_type == "Constant":
            for a in hit[1].attribute:
                if a.name == "value":
                    return [int(x) for x in external.read_array(a.t).reshape(-1)], True
        return None, False
    return None, True


def _reduced_elements(node: onnx.NodeProto, index: GraphIndex,
                      consts: Mapping[str, tuple[np.ndarray, str | None]]) -> int | None:
    """Number of input elements summed into one output element; None if unknown."""
    t = index.type_of(node.input[0])
    if t is None or t.shape is None:
        return None
    shape = list(t.shape)
    if node.op_type.startswith("Global"):
        dims = shape[2:]
    else:
        axes, known = _axes(node, consts, index)
        if not known:
            return None
        noop = any(a.name == "noop_with_empty_axes" and a.i for a in node.attribute)
        if not axes:
            dims = [] if noop else shape
        else:
            try:
                dims = [shape[a % len(shape)] for a in axes]
            except ZeroDivisionError:
                dims = []
    int_dims = [d for d in dims if isinstance(d, int)]
    if len(int_dims) != len(dims):
        return None
    return int(np.prod(int_dims)) if int_dims else 1


def _plan(model: onnx.ModelProto, index: GraphIndex, config: Fp16Config,
          ranges: Mapping[str, float] | None) -> _Plan:
    plan = _Plan()
    opsets = _opsets(model)
    consts = _constant_values(model)
    float_nodes = {index.keys[i] for i, n in enumerate(model.graph.node) if _float_tensors(index, n)}
    block_ops, block_nodes = set(config.block_ops), set(config.block_nodes)
    for key, node in index.node_by_key.items():
        if key in block_nodes:
            plan.block(key, "user", "user block list (node name)")
        if node.op_type in block_ops:
            plan.block(key, "user", f"user block list (op type {node.op_type})")
        if key in float_nodes and (why := _schema_reason(node, index, opsets)):
            plan.block(key, "no_fp16_type", why)
        if config.keep_normalization and node.op_type in NORM_OPS:
            plan.block(key, "normalization", "normalization")
        if node.op_type in SUM_REDUCTIONS and key in float_nodes and config.max_reduce_elements is not None:
            n = _reduced_elements(node, index, consts)
            if n is None:
                plan.block(key, "reduction", "reduction over a number of elements not known statically")
            elif n > config.max_reduce_elements:
                plan.block(key, "reduction", f"reduction over {n} elements > {config.max_reduce_elements}")
        if config.keep_softmax and node.op_type in SOFTMAX_OPS:
            plan.block(key, "softmax", "softmax (keep_softmax)")
    if config.keep_normalization:
        for key in _decomposed_norms(index, consts):
            plan.block(key, "normalization", "normalization written out as ReduceMean of squares")
    for name, const_node, problem in _range_problems(model, config.underflow_share):
        if const_node is not None:
            plan.block(const_node, "constant_range", f"holds a constant with {problem}")
        for reader in index.consumers.get(name, []):
            plan.block(reader, "constant_range", f"reads constant '{name}' with {problem}")
    for name, top in (ranges or {}).items():
        if top <= config.activation_limit:
            continue
        what = f"'{name}' reaches |x| = {top:.3g} on calibration data (> {config.activation_limit:g})"
        if name in index.producer:
            plan.block(index.producer[name], "activation_range", f"output {what}")
        for reader in index.consumers.get(name, []):
            plan.block(reader, "activation_range", f"input {what}")
    for key, node in index.node_by_key.items():  # rule 8
        if node.op_type != "Cast" or key in plan:
            continue
        src = index.type_of(node.input[0])
        readers = index.consumers.get(node.output[0], [])
        if src is not None and not src.dtype.startswith("float") and readers and all(r in plan for r in readers):
            plan.block(key, "integer_cast", "casts integers to float for FP32 nodes only")
    return plan


@register_pass("fp16", config=Fp16Config, kind="precision",
               summary="FP32 -> FP16 (Cast insertion), FP32 kept for norms, big reductions and out-of-range values")
def fp16_pass(model: onnx.ModelProto, config: Fp16Config, *,
              data: CalibrationSet | Sequence[Batch] | None = None) -> tuple[onnx.ModelProto, PassReport]:
    """Convert ``model`` to FP16, keeping FP32 where FP16 is unsafe. Does not modify ``model``.

    ``data``: a CalibrationSet or a sequence of batches for rule 7 (None: no rule 7).

    Returns the converted model (it passes ``onnx.checker`` with full checking) and a
    report listing every node kept FP32 with its reasons.

    Raises:
        ModelError: the model has no float32 weights (already FP16, or integer-only).
        ConfigError: ``block_nodes`` names a node the model does not have.
        CalibrationError: a calibration batch does not fit the model.
        BuildError: the converted model fails the checker.
    """
    elapsed = timer()
    if not float_initializers(model) and not any(
            n.op_type == "Constant" and any(a.t.data_type == _FLOAT for a in n.attribute) for n in model.graph.node):
        raise ModelError("fp16: the model has no float32 weights to convert",
                         hint="it is already FP16 or has no float parameters; drop --precision fp16")
    work = copy_model(model)
    renamed = name_nodes(work)
    untype_initializers(work)
    index = GraphIndex(work)
    missing = [n for n in config.block_nodes if n not in index.node_by_key]
    if missing:
        raise ConfigError(f"fp16: block list names unknown node(s): {', '.join(missing)}",
                          hint="use node names as 'compress inspect' or Netron show them")
    ranges, used = (None, 0)
    if data is not None:
        from compress.calibration import CalibrationSet, check_calibration

        if isinstance(data, CalibrationSet):
            check_calibration(data, work)
        ranges, used = activation_ranges(work, data, max_batches=config.max_batches)
    plan = _plan(work, index, config, ranges)
    original_names = {n.name for n in work.graph.node}
    try:
        converted = convert(work, keep_io_types=config.keep_io_types, op_block_list=[],
                            node_block_list=sorted(plan.reasons), min_positive_val=FP16_TINY, max_finite_val=FP16_MAX)
    except CompressError:  # ours: a data file that changed while it was read
        raise
    except Exception as exc:  # the converter raises plain exceptions (ValueError, AssertionError)
        raise BuildError(f"fp16: the FP16 converter failed: {type(exc).__name__}: {exc}",
                         hint="block the node it names with a node block list, or skip --precision fp16") from None
    toposort(converted.graph)
    dropped = drop_round_trips(converted, original_names)
    tidy_value_info(converted)
    warnings = check_model(converted, what="fp16", source=model)

    types = {n.name: n for n in work.graph.node}
    float_nodes = {n.name for n in work.graph.node if _float_tensors(index, n)}
    items = tuple({"node": k, "op": types[k].op_type, "precision": "fp32", "rule": v[0][0],
                   "reason": "; ".join(r for _, r in v)}
                  for k, v in plan.reasons.items() if k in float_nodes)
    casts = sum(1 for n in converted.graph.node if n.op_type == "Cast" and n.name not in original_names)
    by_rule: dict[str, int] = {}
    for item in items:
        by_rule[item["rule"]] = by_rule.get(item["rule"], 0) + 1
    changes: dict[str, Any] = {
        **initializer_counts(model, converted),
        "float_nodes": len(float_nodes), "nodes_kept_fp32": len(items),
        "nodes_fp16": len(float_nodes) - len(items), "kept_fp32_by_rule": by_rule,
        "casts_inserted": casts, "round_trip_casts_removed": dropped,
        "calibration_batches": used,
    }
    if renamed:
        warnings.append(f"named {len(renamed)} unnamed or duplicate-named node(s) (e.g. {renamed[0]})")
    report = PassReport(name="fp16", nodes_before=op_counts(model), nodes_after=op_counts(converted),
                        changes=changes, items=items, config=pass_options(config, data), warnings=tuple(warnings),
                        seconds=elapsed())
    return converted, report


__all__ = ["FP16_MAX", "FP16_TINY", "Fp16Config", "activation_ranges", "fp16_pass"]
