"""What every precision/sparsity pass shares: the registry, the report, graph helpers.

A pass is a pure function ``pass(model, config) -> (model, PassReport)``: it copies the
model, never modifies its input and writes no files outside this process's temporary
folder (:func:`compress.external.temp_folder`): weights stay where they are (external
references), and new or changed weights go one tensor at a time to the spill file
(:func:`compress.external.array_tensor`); ONNX Runtime's quantizer needs files, which
:mod:`compress.passes.int8` writes into a folder under the temporary folder.
Passes register under a name (``fp16``, ``int8``, ``sparsity-2:4``) in :data:`PASSES`.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx

from compress.errors import BlockError, BuildError, ConfigError
from compress.external import INLINE_MAX_BYTES, array_tensor, is_external, read_array
from compress.graph import node_inputs
from compress.registry import Registry

#: One calibration batch: model input name -> array (batch axis first).
Batch = Mapping[str, np.ndarray]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class PassReport:
    """What a pass changed.

    Attributes:
        name: the pass (``fp16``, ``int8``, ``sparsity-2:4``).
        nodes_before, nodes_after: node count per op type in the input and output graphs.
        changes: pass-specific counts, e.g. ``initializers_converted``, ``casts_inserted``,
            ``quantize_linear``, ``layers_pruned`` (ints or small dicts of ints).
        items: one entry per node the pass decided about (kept FP32, quantized/excluded,
            pruned/skipped), each with ``node``, ``op`` and ``reason`` where one applies.
        config: the options the pass ran with (JSON-ready).
        warnings: things the user should know (e.g. nodes renamed, layers skipped).
        seconds: wall time of the pass.
    """

    name: str
    nodes_before: Mapping[str, int]
    nodes_after: Mapping[str, int]
    changes: Mapping[str, Any]
    items: tuple[Mapping[str, Any], ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def nodes_added(self) -> dict[str, int]:
        """Per op type: nodes after minus nodes before (only non-zero differences)."""
        ops = sorted(set(self.nodes_before) | set(self.nodes_after))
        diff = {op: self.nodes_after.get(op, 0) - self.nodes_before.get(op, 0) for op in ops}
        return {op: d for op, d in diff.items() if d}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain types only)."""
        return {
            "name": self.name,
            "nodes_before": dict(sorted(self.nodes_before.items())),
            "nodes_after": dict(sorted(self.nodes_after.items())),
            "nodes_added": self.nodes_added,
            "changes": _plain(self.changes),
            "items": [_plain(i) for i in self.items],
            "config": _plain(self.config),
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 4),
        }


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@dataclass(frozen=True)
class Pass:
    """A registered pass: call it with ``(model, config)``; ``config=None`` uses the defaults.

    Attributes:
        name: the registered name.
        run: the pass function ``(model, config, *, data=None) -> (model, PassReport)``; ``data``:
            calibration batches (a :class:`~compress.calibration.CalibrationSet` or a
            sequence of batches), which configs never hold.
        config_type: its frozen config dataclass.
        kind: ``"precision"`` or ``"sparsity"`` (the CLI flag that selects it).
        needs_calibration: the pass fails without ``data``.
        summary: one line for ``--help``.
    """

    name: str
    run: Callable[..., tuple[onnx.ModelProto, PassReport]]
    config_type: type
    kind: str
    needs_calibration: bool
    summary: str

    def __call__(self, model: onnx.ModelProto, config: Any = None, *,
                 data: Any = None) -> tuple[onnx.ModelProto, PassReport]:
        """Run the pass on ``model`` with ``config`` (its defaults when None); ``model`` is not modified.

        The stage shape (:mod:`compress.stage`): ``data`` are the calibration batches (None:
        none; passes that need them raise CalibrationError).

        Raises:
            ConfigError: ``config`` is not this pass's config type.
        """
        if config is None:
            config = self.config_type()
        if not isinstance(config, self.config_type):
            raise ConfigError(f"pass {self.name!r} takes a {self.config_type.__name__}, got {type(config).__name__}",
                              hint=f"pass a {self.config_type.__name__} (or None for its defaults)")
        return self.run(model, config, data=data)


#: All passes by name.
PASSES: Registry[Pass] = Registry("pass", flag="--precision/--sparsity")


def register_pass(name: str, *, config: type, kind: str, needs_calibration: bool = False,
                  summary: str = "") -> Callable[[F], F]:
    """Decorator: register ``fn(model, config) -> (model, PassReport)`` as pass ``name``.

    The function itself is returned unchanged; :data:`PASSES` holds a :class:`Pass` for it.
    """

    def decorate(fn: F) -> F:
        doc = (fn.__doc__ or "").strip().splitlines()
        PASSES.register(name)(Pass(name, fn, config, kind, needs_calibration, summary or (doc[0] if doc else name)))
        return fn

    return decorate


def get_pass(name: str) -> Pass:
    """The pass called ``name``; ConfigError listing the valid names otherwise."""
    return PASSES.get(name)


def pass_names(kind: str | None = None) -> list[str]:
    """Registered pass names (of one ``kind`` if given), sorted."""
    return [n for n in PASSES.names() if kind is None or PASSES.get(n).kind == kind]


# --------------------------------------------------------------------------------------------
# Fidelity of a pass against its input
# --------------------------------------------------------------------------------------------


def _retype_inputs(candidate: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """``candidate`` with the input element types of ``reference``, cast inside the graph.

    Lets both models take the same feed when a pass changed input types (fp16 with
    ``keep_io_types=False``). Returns ``candidate`` itself when nothing differs.
    """
    ref_types = {i.name: i.type.tensor_type.elem_type for i in reference.graph.input}
    changed = [i for i in candidate.graph.input
               if i.name in ref_types and i.type.HasField("tensor_type")
               and i.type.tensor_type.elem_type != ref_types[i.name]]
    if not changed:
        return candidate
    out = copy_model(candidate)
    casts = []
    for inp in out.graph.input:
        if inp.name not in {c.name for c in changed}:
            continue
        inner = f"{inp.name}__as_{onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type).lower()}"
        for node in out.graph.node:
            for k, x in enumerate(node.input):
                if x == inp.name:
                    node.input[k] = inner
        for o in out.graph.output:
            if o.name == inp.name:
                raise BuildError(f"input {inp.name!r} is also an output; cannot compare it with a retyped input",
                                 hint="keep the model's input types (keep_io_types), or add an Identity node before that output")
        casts.append(onnx.helper.make_node("Cast", [inp.name], [inner], to=inp.type.tensor_type.elem_type,
                                           name=f"{inner}_cast"))
        inp.type.tensor_type.elem_type = ref_types[inp.name]
    nodes = casts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def measure_fidelity(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                     batches: Iterable[Batch]) -> dict[str, Any]:
    """Fidelity of ``candidate`` (a pass's output) against ``reference`` (its input) on ``batches``.

    Same result as :func:`compress.fidelity.compare_models`: per output cosine, max/mean abs
    error (+ top-1 agreement and KL for logits), the worst of each, and ``loss``. Inputs whose
    type the pass changed (FP16 inputs) are fed the reference's arrays, cast inside the graph.
    Runs ONNX Runtime on CPU; does not modify either model.

    Caveat for FP16: ONNX Runtime's CPU provider has no FP16 kernel for many ops (Conv,
    Gemm, Mul, Pow, ... on x86); it wraps them in Casts and computes them in FP32, and
    drops FP16->FP32 Cast pairs it creates. The numbers then show the rounding of weights
    and of tensors between ops, not FP16 arithmetic or FP16 overflow, and are optimistic
    for TensorRT FP16 (``onnx.reference.ReferenceEvaluator`` computes in true FP16, slowly).

    Raises:
        BuildError: ONNX Runtime cannot load ``candidate``.
        CalibrationError: a batch does not fit the models.
    """
    return FidelityProbe(reference, batches)(candidate)


class FidelityProbe:
    """:func:`measure_fidelity` against one ``reference`` on fixed ``batches``, for many candidates.

    The reference's outputs are computed once (:class:`compress.fidelity.HeldOut`, kept in
    memory as :func:`compress.fidelity.compare_models` keeps them for one candidate); each
    call loads one candidate session. ``probe(candidate)`` equals
    ``measure_fidelity(reference, candidate, batches)``. Does not modify either model.

    Raises:
        BuildError: ONNX Runtime cannot load the reference or a candidate.
        CalibrationError: a batch does not fit the models.
    """

    def __init__(self, reference: onnx.ModelProto, batches: Iterable[Batch]) -> None:
        from compress.fidelity import HeldOut

        self.reference = reference
        try:
            self._held = HeldOut(reference, batches)  # type: ignore[arg-type]
        except BlockError as exc:
            raise BuildError(f"cannot measure fidelity: {exc.message}", hint=exc.hint) from None

    def __call__(self, candidate: onnx.ModelProto) -> dict[str, Any]:
        """The fidelity dict of ``candidate`` (as :func:`measure_fidelity` returns it)."""
        try:
            return self._held.fidelity(_retype_inputs(candidate, self.reference))
        except BlockError as exc:
            raise BuildError(f"cannot measure fidelity: {exc.message}", hint=exc.hint) from None


# --------------------------------------------------------------------------------------------
# Graph helpers shared by the passes
# --------------------------------------------------------------------------------------------


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model`` (external tensors are copied as references: no bytes are read)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Number of nodes per op type in the main graph (domain-qualified for non-default domains)."""
    return dict(Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                        for n in model.graph.node))


def name_nodes(model: onnx.ModelProto) -> list[str]:
    """Give every unnamed or duplicate-named node of ``model`` a unique name, in place.

    Only for a copy a pass owns. New names are ``<op_type>_<index>`` (suffixed until unique).
    Returns the new names.
    """
    used: Counter[str] = Counter(n.name for n in model.graph.node if n.name)
    seen: set[str] = set()
    renamed: list[str] = []
    for i, node in enumerate(model.graph.node):
        if node.name and used[node.name] == 1:
            seen.add(node.name)
            continue
        if node.name and node.name not in seen:  # first of a duplicate keeps its name
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{i}"
        name, k = base, 1
        while name in used or name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
        renamed.append(name)
    return renamed


def toposort(graph: onnx.GraphProto) -> None:
    """Sort ``graph.node`` topologically in place, keeping the given order where it is valid.

    Nodes whose inputs can never be produced keep their relative order at the end (the
    checker then names them).
    """
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producers = {o for n in nodes for o in n.output if o}
    waiting: dict[str, list[int]] = {}
    missing = []
    for i, n in enumerate(nodes):
        need = {x for x in node_inputs(n) if x not in available and x in producers}
        missing.append(len(need))
        for x in need:
            waiting.setdefault(x, []).append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    done: set[str] = set()
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for o in nodes[i].output:
            if not o or o in done:
                continue
            done.add(o)
            for j in waiting.get(o, []):
                missing[j] -= 1
                if missing[j] == 0:
                    heapq.heappush(ready, j)
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]
    sorted_nodes = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)


def check_model(model: onnx.ModelProto, *, what: str, source: onnx.ModelProto | None = None) -> list[str]:
    """``onnx.checker`` with full type/shape checking; BuildError naming the pass otherwise.

    Runs :func:`compress.onnx_io.check_model`, which checks a model of any size with
    ``full_check`` (external tensors are checked from their references; no weight bytes are
    read or serialized). When full checking fails and ``source`` (the pass's input) fails
    it too, the problem is not the pass's: the result is checked without ``full_check`` and
    a warning is returned instead. Does not modify ``model`` or ``source``. Returns warnings.
    """
    from compress.onnx_io import check_model as check_any

    def run(m: onnx.ModelProto, full: bool) -> str | None:
        try:
            check_any(m, full_check=full)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
            return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None

    problem = run(model, True)
    warnings: list[str] = []
    if problem and source is not None and run(source, True) is not None:
        warnings.append(f"the input model already fails onnx.checker's full check; checked without it ({problem})")
        problem = run(model, False)
    if problem:
        raise BuildError(f"{what}: the result fails onnx.checker: {problem}",
                         hint="this is a bug in the pass or an unusual graph; exclude the node it names and retry")
    return warnings


def constants_to_initializers(model: onnx.ModelProto) -> list[str]:
    """Turn the main graph's float ``Constant`` nodes (a ``value`` tensor) into initializers, in place.

    Only for a copy a pass owns. Exporters such as Paddle's store weights as ``Constant``
    nodes; ONNX Runtime's quantizer and the weight passes only treat initializers as
    weights. The values and the graph's outputs are unchanged (the initializer takes the
    Constant's output name). IR < 4 models also list the new initializers as graph inputs,
    as that IR requires. An external value keeps its reference (no bytes are read); a large
    embedded one is moved to the spill file (:func:`compress.external.array_tensor`).
    Returns the names of the tensors moved.
    """
    moved: list[str] = []
    keep: list[onnx.NodeProto] = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None
                and value.data_type == onnx.TensorProto.FLOAT and len(node.output) == 1 and value.dims):
            if not is_external(value) and len(value.raw_data) >= INLINE_MAX_BYTES:
                tensor = array_tensor(read_array(value), node.output[0])  # large embedded values go to the spill file
            else:  # a reference (or a small value) is copied as it is: no bytes are read
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value)
                tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            if model.ir_version < 4:
                model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
            moved.append(tensor.name)
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def float_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers of the main graph with element type float32."""
    return [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]


def describe_batches(batches: Sequence[Batch] | Any) -> str:
    """A short description of calibration data for pass reports (:func:`compress.calibration.describe`)."""
    from compress.calibration import describe

    return describe(batches)[0]


def pass_options(config: Any, data: Any) -> dict[str, Any]:
    """A pass report's ``config``: the calibration data described (None: none), then ``config.to_dict()``."""
    return {"calibration": None if data is None else describe_batches(data), **config.to_dict()}


def timer() -> Callable[[], float]:
    """A stopwatch: the returned function gives the seconds since this call.

    Usage: ``elapsed = timer(); ...; elapsed()``.
    """
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
