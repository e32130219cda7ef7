"""The parity check of ``compress export``: the ONNX model in ONNX Runtime (CPU) against torch.

:func:`check_parity` runs ``onnx.checker`` on the exported model, runs it in ONNX Runtime
on the example inputs and compares every output with torch's (:func:`compare`); any
failure is an ExportError (nothing has been written then). An element fails when
``|onnx - torch| > atol + rtol * |torch|``; an output fails when any element does or its
cosine similarity with torch's is below ``min_cosine``. Does not modify the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from compress import onnx_io
from compress.errors import ExportError
from compress.export.config import ExportConfig, OutputParity
from compress.export.messages import _first_line


def check_parity(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], reference: Sequence[tuple[str, Any]],
                 graph_outputs: Sequence[str], config: ExportConfig) -> tuple[OutputParity, ...]:
    """Check ``model`` and compare its ONNX Runtime outputs with torch's; one :class:`OutputParity` per output.

    Args:
        model: the exported model (not modified).
        feeds: input name -> array, the example inputs as numpy.
        reference: ``(name, tensor)`` of torch's outputs, in the order of ``graph_outputs``.
        graph_outputs: the model's output names.
        config: the tolerances (``atol``, ``rtol``, ``min_cosine``).

    Raises:
        ExportError: the model fails ``onnx.checker``, ONNX Runtime cannot load or run it,
            it has an input torch was not given, or an output differs beyond the tolerances.
    """
    _check(model)
    got = _run_ort(model, feeds)
    parity = tuple(compare(n, got[g], _to_numpy(t), config)
                   for g, (n, t) in zip(graph_outputs, reference, strict=True))
    bad = next((p for p in parity if not p.ok), None)
    if bad is not None:
        raise ExportError(
            f"ONNX Runtime output {bad.name!r} differs from torch: max abs error {bad.max_abs_error:.3g}, "
            f"max rel error {bad.max_rel_error:.3g}, cosine {bad.cosine:.6f} "
            f"(allowed: atol {config.atol:g} + rtol {config.rtol:g}, cosine >= {config.min_cosine:g})",
            hint="nothing was written; try the other --exporter, or loosen --atol/--rtol/--min-cosine if the "
                 "difference is expected (e.g. float16)",
        )
    return parity


def _check(model: onnx.ModelProto) -> None:
    """``onnx.checker`` (full check) on ``model``; ExportError with its first line when it fails."""
    try:
        onnx_io.check_model(model, full_check=True)
    except Exception as exc:  # translates onnx.checker.check_model's errors (ValidationError, ...)
        raise ExportError(f"the exported model fails onnx.checker: {_first_line(exc)}",
                          hint="try the other --exporter or another --opset; nothing was written") from None


def _to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as a numpy array on the CPU (bfloat16 as ``ml_dtypes.bfloat16``)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def compare(name: str, got: np.ndarray, want: np.ndarray, config: ExportConfig) -> OutputParity:
    """Compare one ONNX output with torch's (see :class:`OutputParity` for the numbers)."""
    if got.shape != want.shape:
        return OutputParity(name, tuple(want.shape), str(want.dtype), math.inf, math.inf, 0.0, False)
    a = got.astype(np.float64).ravel()
    b = want.astype(np.float64).ravel()
    if a.size == 0:
        return OutputParity(name, tuple(want.shape), str(want.dtype), 0.0, 0.0, 1.0, True)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    same_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(same_nan, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max())
    big = np.abs(b) > config.atol
    max_rel = float((diff[big] / np.abs(b[big])).max()) if big.any() else 0.0
    fa, fb = np.nan_to_num(a, posinf=0.0, neginf=0.0), np.nan_to_num(b, posinf=0.0, neginf=0.0)
    na, nb = float(np.linalg.norm(fa)), float(np.linalg.norm(fb))
    cosine = 1.0 if na == 0 and nb == 0 else (float(fa @ fb / (na * nb)) if na and nb else 0.0)
    ok = bool(np.all(diff <= config.atol + config.rtol * np.abs(np.nan_to_num(b)))) and cosine >= config.min_cosine
    return OutputParity(name, tuple(want.shape), str(want.dtype), max_abs, max_rel, cosine, ok)


def _run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` in ONNX Runtime (CPU) on ``feeds``: output name -> array; ExportError when it cannot."""
    from compress.runtime import make_session

    try:
        sess = make_session(model)
    except Exception as exc:  # translates onnxruntime.InferenceSession's errors (make_session wraps it)
        raise ExportError(f"ONNX Runtime cannot load the exported model: {_first_line(exc)}",
                          hint="try the other --exporter or another --opset; nothing was written") from None
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ExportError(f"the exported model has input {missing[0]!r} that torch was not given",
                          hint="pass every input with --input")
    outputs = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(outputs, {n: feeds[n] for n in names})
    except Exception as exc:  # translates onnxruntime's InferenceSession.run errors
        raise ExportError(f"ONNX Runtime fails on the exported model: {_first_line(exc)}",
                          hint="try the other --exporter or another --opset; nothing was written") from None
    return dict(zip(outputs, values, strict=True))

