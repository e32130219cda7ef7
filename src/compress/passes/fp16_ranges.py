"""Largest |x| of every float32 activation on calibration data (rule 7 of the ``fp16`` pass).

:func:`activation_ranges` runs ONNX Runtime (CPU) on the model with every float32 tensor
as an extra output, one batch at a time, and one sample at a time where the batch axis is
dynamic (:func:`_batch_axis_dynamic`, :func:`_samples`): the same maxima, with a run
holding 1/batch of the activations. Only the maxima outlive a run; the model is not
modified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from compress.errors import BlockError, ModelError
from compress.graph import GraphIndex
from compress.passes.base import Batch


def _float_activations(model: onnx.ModelProto, index: GraphIndex) -> list[str]:
    names = [i for i in index.graph_inputs if (t := index.type_of(i)) is not None and t.dtype == "float32"]
    for node in model.graph.node:
        for o in node.output:
            t = index.type_of(o)
            if o and o not in index.constants and t is not None and t.dtype == "float32":
                names.append(o)
    return list(dict.fromkeys(names))


def activation_ranges(model: onnx.ModelProto, batches: Iterable[Batch], *,
                      max_batches: int | None = None) -> tuple[dict[str, float], int]:
    """Largest finite |x| of every float32 activation (graph inputs included) over ``batches``.

    Runs ONNX Runtime (CPU) once per batch with every float32 tensor as an extra output.
    Returns (tensor -> max |x|, batches used). Does not modify ``model``.

    Raises:
        CalibrationError: a batch does not fit the model, or there is no batch.
        ModelError: ONNX Runtime cannot load the model.
    """
    from compress.errors import CalibrationError
    from compress.runtime import add_outputs, load_session, run_batch

    index = GraphIndex(model)
    names = _float_activations(model, index)
    try:
        session = load_session(add_outputs(model, [n for n in names if n not in index.graph_inputs]),
                               providers=("CPUExecutionProvider",))
    except BlockError as exc:
        raise ModelError(f"fp16: {exc.message}", hint=exc.hint) from None
    inner = [n for n in names if n not in index.graph_inputs]
    top: dict[str, float] = dict.fromkeys(names, 0.0)
    splittable = _batch_axis_dynamic(index)
    used = 0
    for i, feed in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        # One sample at a time where the batch axis allows it: every float activation is fetched,
        # so a run holds all of them; per sample that is 1/batch of the memory, same maxima.
        for part in (_samples(feed) if splittable else [feed]):
            values = run_batch(session, part, inner, batch=i) if inner else {}
            for n in names:
                arr = np.asarray(values[n] if n in values else part[n])
                finite = np.abs(arr[np.isfinite(arr)]) if arr.size else arr
                if finite.size:
                    top[n] = max(top[n], float(finite.max()))
            del values
        used += 1
    if not used:
        raise CalibrationError("fp16: the calibration data has no batches",
                               hint="pass calibration batches, or none to skip the activation-range rule")
    return top, used


def _batch_axis_dynamic(index: GraphIndex) -> bool:
    """Whether every graph input has a symbolic or unknown first dim (a batch axis a run may change)."""
    types = index.types
    for name in index.graph_inputs:
        t = types.get(name)
        if t is None or not t.shape or isinstance(t.shape[0], int):
            return False
    return bool(index.graph_inputs)


def _samples(feed: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``feed`` split along axis 0 into batches of one, when every input has the same batch size > 1."""
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in feed.values()}
    size = next(iter(sizes)) if len(sizes) == 1 else None
    if size is None or size <= 1:
        return [dict(feed)]
    return [{k: np.asarray(v)[j:j + 1] for k, v in feed.items()} for j in range(size)]


__all__ = ["activation_ranges"]
