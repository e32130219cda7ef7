"""FP16 conversion by ONNX Runtime's converter without reading external data, and its clean-up.

:func:`convert` runs ``onnxruntime.transformers.float16.convert_float_to_float16`` on a
model the ``fp16`` pass owns (the converter edits it) with its per-initializer shape
look-up patched to read ``dims`` instead of data (:func:`_shapes_from_dims`), then gives
the external tensors it retyped their float16 bytes one tensor at a time, chunk by chunk
(:func:`_finish_float16_tensors`; new data goes to the spill file,
:func:`compress.external.array_tensor`). The clean-ups (:func:`untype_initializers`,
:func:`drop_round_trips`, :func:`tidy_value_info`) edit the model passed to them in place;
:func:`initializer_counts` only reads. Which nodes stay FP32 is decided in
:mod:`compress.passes.fp16`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from compress import external
from compress.errors import MissingDependencyError

#: Elements per chunk when scanning or converting a weight (bounds the temporaries of one tensor).
SCAN_CHUNK = 1 << 20
_FLOAT = onnx.TensorProto.FLOAT
_FLOAT16 = onnx.TensorProto.FLOAT16


def _converter() -> Any:
    """ORT's float16 converter.

    Note: ``import onnxruntime.transformers`` appends its folder to ``sys.path`` (its modules
    import each other by bare name); ``onnxruntime.quantization`` imports it too, so this
    cannot be undone here.
    """
    try:
        from onnxruntime.transformers import float16
    except ImportError as exc:  # pragma: no cover - ships with every onnxruntime wheel
        raise MissingDependencyError("onnxruntime (with onnxruntime.transformers)",
                                     purpose=f"the fp16 pass ({exc})", extra="dev") from None
    return float16.convert_float_to_float16


_CONVERTER_LOCK = threading.Lock()


@contextlib.contextmanager
def _shapes_from_dims() -> Iterator[None]:
    """While active, the converter takes an initializer's shape from its ``dims``, not its data.

    ``float16.convert_float_to_float16`` calls its module function
    ``make_value_info_from_tensor`` (``numpy_helper.to_array(tensor).shape``) for every
    initializer it converts, which would read (and fail on) external data; the replacement
    gives the same value info (``to_array(t).shape == tuple(t.dims)``) without reading.
    The module attribute is restored on exit; a lock keeps concurrent conversions apart.
    """
    from onnxruntime.transformers import float16

    def value_info(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    with _CONVERTER_LOCK:
        original = float16.make_value_info_from_tensor
        float16.make_value_info_from_tensor = value_info
        try:
            yield
        finally:
            float16.make_value_info_from_tensor = original


def _to_float16(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` (float32) as float16, exactly as the converter does it.

    Same as ``convert_np_to_float16(x, low, high)`` (magnitudes clamped into [low, high]),
    chunk by chunk (:data:`SCAN_CHUNK` elements): holds the float16 result and one chunk of
    temporaries. Does not modify ``values``.
    """
    from onnxruntime.transformers.float16 import convert_np_to_float16

    flat = values.reshape(-1)
    out = np.empty(flat.size, dtype=np.float16)
    for start in range(0, flat.size, SCAN_CHUNK):
        chunk = np.asarray(flat[start:start + SCAN_CHUNK], dtype=np.float32)
        out[start:start + chunk.size] = convert_np_to_float16(chunk, low, high)
    return out.reshape(values.shape)


def _finish_float16_tensors(model: onnx.ModelProto, low: float, high: float) -> int:
    """Give the tensors the converter retyped to float16 their float16 data, one at a time, in place.

    The converter converts embedded data but only retypes an external tensor (its data is
    not in the proto): such a tensor says FLOAT16 while its file holds float32 bytes. It is
    read as float32, converted (:func:`_to_float16` with the converter's ``low``/``high``) and replaced by
    :func:`compress.external.array_tensor` (spilled when large). Embedded float16 tensors
    the converter made of at least ``INLINE_MAX_BYTES`` are moved to the spill file too.
    Returns the number of tensors replaced.
    """
    done = 0
    for t in external.model_tensors(model):
        if t.data_type != _FLOAT16:
            continue
        n = math.prod(t.dims)
        ref = external.data_ref(t)
        if ref is not None and ref.length == 4 * n and n:
            as_float = onnx.TensorProto()
            as_float.CopyFrom(t)
            as_float.data_type = _FLOAT
            values = external.map_array(as_float)
            half = _to_float16(values if values is not None else external.read_array(as_float), low, high)
            t.CopyFrom(external.array_tensor(half, t.name))
            done += 1
        elif ref is None and len(t.raw_data) >= external.INLINE_MAX_BYTES:
            half = np.frombuffer(t.raw_data, dtype=np.float16).reshape(tuple(t.dims))
            t.CopyFrom(external.array_tensor(half, t.name))
            done += 1
    return done


def convert(model: onnx.ModelProto, *, min_positive_val: float, max_finite_val: float,
            **options: Any) -> onnx.ModelProto:
    """ORT's converter on ``model`` (which it edits) without reading external data.

    Then the retyped external tensors get their float16 data
    (:func:`_finish_float16_tensors`). ``options`` go to ``convert_float_to_float16``
    (``keep_io_types``, ``node_block_list``, ...). Returns the converter's model.

    Raises:
        MissingDependencyError: ``onnxruntime.transformers`` cannot be imported.
        Exception: whatever the converter raises (the pass reports it as a BuildError).
    """
    convert = _converter()
    with _shapes_from_dims():
        converted = convert(model, min_positive_val=min_positive_val, max_finite_val=max_finite_val, **options)
    _finish_float16_tensors(converted, min_positive_val, max_finite_val)
    return converted


def untype_initializers(model: onnx.ModelProto) -> None:
    """Drop value_info (and, for IR >= 4, graph inputs) that name initializers, in place.

    The converter retypes every float value_info to FP16 and then "casts back" inputs of
    FP32 nodes found there: an FP32 initializer listed in value_info (dynamo exports list
    them all) would get a useless Cast(float -> float) before every FP32 reader.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    keep = [v for v in g.value_info if v.name not in inits]
    del g.value_info[:]
    g.value_info.extend(keep)
    if model.ir_version >= 4:
        inputs = [i for i in g.input if i.name not in inits]
        del g.input[:]
        g.input.extend(inputs)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def drop_round_trips(model: onnx.ModelProto, original: set[str]) -> int:
    """Remove inserted ``Cast(to=fp16) -> Cast(to=fp32)`` pairs; returns the Casts removed.

    The converter inserts a Cast to FP16 after every FP32 node and a Cast back before every
    FP32 reader; between two FP32 nodes this round trip only loses precision (and turns
    |x| > 65504 into inf). Readers of the second Cast read the FP32 tensor directly.
    """
    g = model.graph
    casts = [n for n in g.node if n.op_type == "Cast" and n.name not in original]
    by_output = {n.output[0]: n for n in casts}
    graph_outputs = {o.name for o in g.output}
    fixed = {i.name for i in g.input} | {t.name for t in g.initializer}
    rename: dict[str, str] = {}
    removed: set[str] = set()
    for c2 in casts:
        c1 = by_output.get(c2.input[0])
        if _cast_to(c2) != _FLOAT or c1 is None or _cast_to(c1) != _FLOAT16:
            continue
        x, y = c1.input[0], c2.output[0]
        if y in graph_outputs:
            if x in fixed or x in graph_outputs or x in rename:
                continue
            rename[x] = y
        else:
            rename[y] = x
        removed.add(c2.name)

    def resolve(name: str) -> str:
        seen = set()
        while name in rename and name not in seen:
            seen.add(name)
            name = rename[name]
        return name

    kept = [n for n in g.node if n.name not in removed]
    for n in kept:
        for i, x in enumerate(n.input):
            n.input[i] = resolve(x)
        for i, x in enumerate(n.output):
            n.output[i] = resolve(x)
    read = {x for n in kept for x in n.input} | graph_outputs
    dead = {n.name for n in kept if n.name not in original and n.op_type == "Cast" and n.output[0] not in read}
    kept = [n for n in kept if n.name not in dead]
    del g.node[:]
    g.node.extend(kept)
    return len(removed) + len(dead)


def tidy_value_info(model: onnx.ModelProto) -> None:
    """Keep only value_info of produced, non-output tensors (one entry per name), in place."""
    g = model.graph
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    outputs = {o.name for o in g.output}
    keep = [v for v in g.value_info if v.name in produced and v.name not in outputs]
    keep = list({v.name: v for v in keep}.values())
    del g.value_info[:]
    g.value_info.extend(keep)


def initializer_counts(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """Float32 initializers converted to / kept as FP32, and initializer bytes before and after.

    Sizes come from ``dims`` and the element type: no data is read.
    """
    b = {t.name: t.data_type for t in before.graph.initializer}
    a = {t.name: t.data_type for t in after.graph.initializer}
    converted = sum(1 for k, v in b.items() if v == _FLOAT and a.get(k) == _FLOAT16)
    kept = sum(1 for k, v in b.items() if v == _FLOAT and a.get(k) == _FLOAT)

    def nbytes(m: onnx.ModelProto) -> int:
        return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                   for t in m.graph.initializer)

    return {"initializers_converted": converted, "initializers_kept_fp32": kept,
            "initializer_bytes_before": nbytes(before), "initializer_bytes_after": nbytes(after)}


__all__ = ["SCAN_CHUNK", "convert", "drop_round_trips", "initializer_counts", "tidy_value_info", "untype_initializers"]
