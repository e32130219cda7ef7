"""Check a calibration set against a model's inputs, from the file headers only.

:func:`model_input_types` and :func:`shared_inputs` describe the model's graph inputs
(which have no batch axis); :func:`check_calibration` checks names, dtypes, ranks and
static dims of every file before any work is done. Data is never cast: a dtype mismatch is
an error. Nothing here reads array data or modifies the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnx

from compress.calibration.npz import ArraySpec, CalibrationFile, _shape_str
from compress.calibration.source import CalibrationSet, load_calibration, with_labels
from compress.errors import CalibrationError
from compress.graph import TensorType, value_type


def model_input_types(model: onnx.ModelProto) -> dict[str, TensorType | None]:
    """Graph inputs (initializers excluded), in order, with their types (None if not a tensor).

    Does not modify ``model``.
    """
    inits = {t.name for t in model.graph.initializer}
    return {vi.name: value_type(vi) for vi in model.graph.input if vi.name not in inits}


def _check_names(f: CalibrationFile, expected: Sequence[str], labels: str | None = None) -> None:
    have = [a.name for a in f.arrays if a.name != labels]
    for name in expected:
        if name not in have:
            raise CalibrationError(f"{f.label()} has no array for model input '{name}'; it has: {', '.join(have)}",
                                   hint=f"the model expects: {', '.join(expected)} (one array per input, named exactly so)")
    for name in have:
        if name not in expected:
            raise CalibrationError(f"{f.label()}: array '{name}' is not an input of the model",
                                   hint=f"model inputs: {', '.join(expected)}; remove the array or rename it to the input it feeds")


def shared_inputs(model: onnx.ModelProto) -> frozenset[str]:
    """Inputs of ``model`` without a batch axis (Flux's 2-D ``img_ids``/``txt_ids``).

    The batch dim is the symbolic leading dim most inputs share, when some input has one
    (then an input with a static or other leading dim is shared); for a model with static
    leading dims only, it is the size that a strict majority of at least two inputs share.
    An input whose leading dim is another one is shared. Empty when the inputs agree or no
    batch dim can be told. Does not modify ``model``.
    """
    leading = {n: t.shape[0] for n, t in model_input_types(model).items() if t is not None and t.shape}
    leading = {n: d for n, d in leading.items() if d is not None}
    symbols = [d for d in leading.values() if isinstance(d, str)]
    if symbols:
        batch: Any = max(dict.fromkeys(symbols), key=symbols.count)  # ties: the first
    else:
        counts: dict[Any, int] = {}
        for d in leading.values():
            counts[d] = counts.get(d, 0) + 1
        ranked = sorted(counts.values(), reverse=True)
        if len(counts) < 2 or ranked[0] < 2 or ranked[0] == ranked[1]:
            return frozenset()
        batch = max(counts, key=lambda k: counts[k])
    return frozenset(n for n, d in leading.items() if d != batch)


def _check_array(f: CalibrationFile, a: ArraySpec, t: TensorType, batch_sizes: set[int], *,
                 batched: bool = True) -> None:
    if a.dtype != t.dtype:
        raise CalibrationError(
            f"{f.label()}: input '{a.name}' has dtype {a.dtype} but the model expects {t.dtype}",
            hint=f"save it with the model's dtype, e.g. {a.name}=array.astype(np.{t.dtype}); calibration data is never cast")
    if t.shape is None:
        return
    model_shape = _shape_str(t.shape)
    if len(a.shape) != len(t.shape):
        raise CalibrationError(
            f"{f.label()}: input '{a.name}' has rank {len(a.shape)} (shape {_shape_str(a.shape)}) "
            f"but the model expects rank {len(t.shape)} ({model_shape})",
            hint="save arrays with the model input's shape, batch axis first")
    if batched and isinstance(t.shape[0], int):
        bad = sorted(b for b in batch_sizes if b != t.shape[0])
        if bad:
            raise CalibrationError(
                f"{f.label()}: input '{a.name}' gives batches of {bad[0]} samples but the model has a static batch "
                f"size of {t.shape[0]} ({model_shape})",
                hint=f"pass --batch-size {t.shape[0]}" if t.shape[0] == 1 else
                     f"pass --batch-size {t.shape[0]} and save a multiple of {t.shape[0]} samples in every file")
    for axis, (got, want) in enumerate(zip(a.shape, t.shape, strict=True)):
        if (axis > 0 or not batched) and isinstance(want, int) and got != want:
            raise CalibrationError(
                f"{f.label()}: input '{a.name}' axis {axis} has size {got} but the model expects {want} ({model_shape})",
                hint="save arrays with the model input's shape, batch axis first")


def check_calibration(calib: CalibrationSet, model: onnx.ModelProto) -> None:
    """Check that every file of ``calib`` fits the inputs of ``model``, from the headers only.

    Checks, per file: one array per model input and no other, equal dtypes (data is never
    cast), equal ranks, static dims (axis 0 against the batch sizes after splitting), and
    that arrays sharing a symbolic dim agree on its size. Arrays a file holds as shared
    (no batch axis) must be inputs the model gives no batch axis (:func:`shared_inputs`),
    checked on axis 0 like any static dim; such an input held with a batch axis may not be
    split. NaN/Inf are found while streaming (:func:`iter_batches`). Does not modify ``model``.

    Raises:
        CalibrationError: naming the file, the input and the fix.
    """
    types = model_input_types(model)
    expected = list(types)
    unbatched = shared_inputs(model)
    used = sorted({b.file for b in calib.batches})
    sizes: dict[int, set[int]] = {}
    for b in calib.batches:
        sizes.setdefault(b.file, set()).add(b.size)
    for i in used:
        f = calib.files[i]
        _check_names(f, expected, calib.labels_key)
        by_name = {a.name: a for a in f.arrays}
        symbols: dict[str, tuple[str, int]] = {}
        for name in expected:
            t = types[name]
            if t is None:
                continue
            a = by_name[name]
            batched = _check_shared(f, a, t, name in unbatched, calib)
            _check_array(f, a, t, sizes[i], batched=batched)
            for axis, d in enumerate(t.shape or ()):
                if (axis == 0 and batched) or not isinstance(d, str):
                    continue  # the batch axis is checked by batch size; splitting makes it vary
                first = symbols.setdefault(d, (name, a.shape[axis]))
                if first[1] != a.shape[axis]:
                    raise CalibrationError(
                        f"{f.label()}: inputs '{first[0]}' and '{name}' disagree on dim '{d}' ({first[1]} vs {a.shape[axis]})",
                        hint="arrays that share a model dim must have the same size along it")


def _check_shared(f: CalibrationFile, a: ArraySpec, t: TensorType, unbatched: bool, calib: CalibrationSet) -> bool:
    """Whether array ``a`` is split along axis 0; errors when the file and the model disagree."""
    shape = _shape_str(t.shape) if t.shape is not None else "?"
    if a.name in f.shared and not unbatched:
        raise CalibrationError(
            f"{f.label()}: array '{a.name}' has {a.shape[0]} along axis 0 but the file's other arrays hold "
            f"{f.samples} samples, and model input '{a.name}' has a batch axis ({shape})",
            hint="all arrays of one file must hold the same samples along axis 0")
    if unbatched and a.name not in f.shared:
        whole = all(b.start == 0 and b.stop == f.samples for b in calib.batches if calib.files[b.file] is f)
        if not whole:
            raise CalibrationError(
                f"{f.label()}: model input '{a.name}' has no batch axis ({shape}) but the file is split into "
                f"batches along axis 0", hint="drop --batch-size (one batch per file); a shared input is passed whole")
        return True  # passed whole: the file is one batch
    return a.name not in f.shared


def load_calibration_for(path: str | os.PathLike[str], model: onnx.ModelProto, *,
                         batch_size: int | None = None) -> CalibrationSet:
    """The ``.npz`` calibration set at ``path`` as ``model`` reads it (not yet checked: :func:`check_calibration`).

    :func:`~compress.calibration.source.load_calibration` with the model's batch-free inputs
    as ``shared`` (:func:`shared_inputs`), then :func:`~compress.calibration.source.with_labels`
    with its input names. The one loader of the CLI, ``compress calib check`` and the pipeline.
    """
    calib = load_calibration(path, batch_size=batch_size, shared=shared_inputs(model) or None)
    return with_labels(calib, list(model_input_types(model)))
