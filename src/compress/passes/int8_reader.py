"""Calibration batches for ONNX Runtime's static quantizer: the reader and its batch check.

:class:`BatchReader` is the ``CalibrationDataReader`` that :mod:`compress.passes.int8_ort`
hands to ``quantize_static``; it checks every batch against the model's inputs
(:func:`check_batch`: names, dtype, rank, static dims; data is never cast) as ORT asks for
it, so a bad batch is reported by its index as a CalibrationError. Nothing here reads a
model's weights or touches the file system.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx

from compress.errors import BuildError, CalibrationError
from compress.graph import GraphIndex, TensorType
from compress.passes.base import Batch


class BatchReader:
    """ORT ``CalibrationDataReader`` over batches, checking each against the model inputs.

    A batch must hold exactly one array per model input, with the input's dtype (data is
    never cast), rank and static non-batch dims. ``count`` is the number of batches handed
    out; ``active`` is True while ORT is consuming them.

    ``len()`` and ``set_range(start, end)`` let ``quantize_static`` feed the calibrator one
    batch per ``collect_data`` call (extra option ``CalibStridedMinMax=1``; despite its name
    ORT applies it to every method): the histogram calibrators (entropy, percentile) then
    accept batches of different shapes, and MinMax holds one batch of activations at a time.
    Ranges must be asked for in order (ORT does).
    """

    def __init__(self, batches: Iterable[Batch], inputs: Mapping[str, TensorType | None], *,
                 max_batches: int | None = None) -> None:
        if not hasattr(batches, "__len__"):
            batches = list(batches)
        self._batches = batches
        self._inputs = dict(inputs)
        self._len = len(batches) if max_batches is None else min(len(batches), max_batches)  # type: ignore[arg-type]
        self._it: Iterator[Batch] = iter(batches)
        self._stop = self._len
        self.count = 0
        self.active = False

    def __len__(self) -> int:
        return self._len

    def set_range(self, start_index: int, end_index: int) -> None:
        """Hand out batches up to ``end_index`` (exclusive) next; ``start_index`` must be :attr:`count`.

        Raises:
            BuildError: ORT asks for batches out of order.
        """
        if start_index != self.count:
            raise BuildError(f"int8: calibration batches were asked for out of order ({start_index} after {self.count})",
                             hint="the installed onnxruntime reads calibration data in an unexpected order; report it")
        self._stop = min(end_index, self._len)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch (checked with :func:`check_batch`), or None at the end of the range.

        Raises:
            CalibrationError: the batch does not fit the model inputs.
        """
        if self.count >= self._stop:
            self.active = False
            return None
        batch = next(self._it, None)
        if batch is None:
            self.active = False
            return None
        check_batch(batch, self._inputs, index=self.count)
        self.count += 1
        self.active = True
        return dict(batch)

    def rewind(self) -> None:
        """Start again from the first batch (``count`` 0, the whole range)."""
        self._it = iter(self._batches)
        self.count = 0
        self._stop = self._len


def check_batch(batch: Batch, inputs: Mapping[str, TensorType | None], *, index: int) -> None:
    """CalibrationError unless ``batch`` has exactly the model's inputs with their dtype, rank and static dims."""
    hint = "calibration arrays must be named like the model inputs and have their dtype and shape ('compress inspect')"
    missing = [n for n in inputs if n not in batch]
    extra = [n for n in batch if n not in inputs]
    if missing or extra:
        parts = ([f"missing input(s) {', '.join(missing)}"] if missing else []) + \
                ([f"unknown array(s) {', '.join(extra)}"] if extra else [])
        raise CalibrationError(f"calibration batch {index} does not fit the model: {'; '.join(parts)}"
                               f" (model inputs: {', '.join(inputs)})", hint=hint)
    for name, t in inputs.items():
        if t is None:
            continue
        arr = np.asarray(batch[name])
        if arr.dtype.name != t.dtype:
            raise CalibrationError(f"calibration batch {index}: input '{name}' is {arr.dtype.name}, the model wants {t.dtype}",
                                   hint="calibration data is never cast; save it with the model's dtype")
        if t.shape is None:
            continue
        if arr.ndim != len(t.shape):
            raise CalibrationError(f"calibration batch {index}: input '{name}' has rank {arr.ndim} "
                                   f"(shape {list(arr.shape)}), the model wants rank {len(t.shape)} ({t.shape_str()})",
                                   hint=hint)
        for axis, (have, want) in enumerate(zip(arr.shape, t.shape, strict=True)):
            if isinstance(want, int) and have != want:
                raise CalibrationError(f"calibration batch {index}: input '{name}' axis {axis} is {have}, "
                                       f"the model wants {want} (shape {t.shape_str()})", hint=hint)


def model_inputs(model: onnx.ModelProto) -> dict[str, TensorType | None]:
    """Graph input name -> its element type and shape (None where the model does not say)."""
    index = GraphIndex(model)
    return {n: index.type_of(n) for n in index.graph_inputs}


__all__ = ["BatchReader", "check_batch", "model_inputs"]
