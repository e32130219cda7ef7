"""Random calibration inputs for a model: only for smoke tests, never a silent fallback.

:func:`random_calibration` describes a :class:`~compress.calibration.source.CalibrationSet`
with ``random=True`` whose batches are drawn when iterated (nothing is held in memory);
sizes are bounded by :data:`MAX_RANDOM_BATCHES` and :data:`MAX_RANDOM_ELEMENTS`.
:func:`static_batch` gives the model's fixed batch size, the default batch size. Does not
modify the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx

from compress.calibration.check import model_input_types, shared_inputs
from compress.calibration.npz import _README, ArraySpec, CalibrationFile, _shape_str
from compress.calibration.source import CalibrationSet, _RandomSpec, _split
from compress.errors import CalibrationError, ConfigError
from compress.graph import GraphIndex, TensorType

#: Most batches, and values per batch (all inputs together; 1 GiB of float32), of random calibration data.
MAX_RANDOM_BATCHES = 100_000
MAX_RANDOM_ELEMENTS = 1 << 28

#: Values of random integer inputs are drawn from ``[0, high)``; ``high`` is the row count of the
#: embedding table the input indexes (a Gather on an initializer), else this.
DEFAULT_RANDOM_INT_HIGH = 2


def _gather_table_rows(index: GraphIndex, name: str) -> int | None:
    rows: list[int] = []
    for key in index.consumers.get(name, []):
        node = index.node_by_key[key]
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] != name:
            continue
        table = index.initializers.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is not None and len(table.dims) > 0:
            rows.append(int(table.dims[axis]))
    return min(rows) if rows else None


def _random_spec(name: str, t: TensorType | None, index: GraphIndex, *, batch_size: int,
                 dims: Mapping[str, int], batched: bool = True) -> _RandomSpec:
    """How to fill input ``name`` (its shape, dtype and kind of values).

    ``batched=False`` (no batch axis, :func:`shared_inputs`): the model's own shape, axis 0
    included (a symbolic axis 0 takes its size from ``dims``).

    Raises:
        CalibrationError: the input has no known shape, is a scalar, has a dim without a
            value or a static batch size other than ``batch_size``, or a non-numeric dtype.
    """
    if t is None or t.shape is None:
        raise CalibrationError(f"random calibration: model input '{name}' has no known shape",
                               hint="give calibration data as .npz files instead; " + _README)
    if not t.shape:
        raise CalibrationError(f"random calibration: model input '{name}' is a scalar; random data needs a batch axis",
                               hint="give calibration data as .npz files instead; " + _README)
    shape: list[int] = []
    for axis, d in enumerate(t.shape):
        if axis == 0 and batched:
            if isinstance(d, int) and d != batch_size:
                raise CalibrationError(
                    f"random calibration: model input '{name}' has a static batch size of {d}, not {batch_size}",
                    hint=f"pass --batch-size {d}")
            shape.append(batch_size)
        elif isinstance(d, int):
            shape.append(d)
        elif isinstance(d, str) and d in dims:
            shape.append(int(dims[d]))
        else:
            what = f"symbolic size '{d}'" if d else "an unknown size"
            example = d or "seq"
            raise CalibrationError(f"random calibration: model input '{name}' axis {axis} has {what}; give its value",
                                   hint=f"set it with dims, e.g. {example}=128")
    try:
        dt: np.dtype | None = np.dtype(t.dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "biuf":
        raise CalibrationError(f"random calibration: model input '{name}' has dtype {t.dtype}; cannot make random data for it",
                               hint="give calibration data as .npz files instead; " + _README)
    if "mask" in name.lower():
        return _RandomSpec(name, dt.name, tuple(shape), "ones")
    if dt.kind == "b":
        return _RandomSpec(name, dt.name, tuple(shape), "bool")
    if dt.kind in "iu":
        high = _gather_table_rows(index, name) or DEFAULT_RANDOM_INT_HIGH
        return _RandomSpec(name, dt.name, tuple(shape), "int", high)
    return _RandomSpec(name, dt.name, tuple(shape), "normal")


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed leading dim shared by every batched graph input (:func:`shared_inputs` excluded).

    None when one is symbolic, unknown, or they differ. Does not modify ``model``.
    """
    shared = shared_inputs(model)
    sizes = {t.shape[0] if t is not None and t.shape else None
             for n, t in model_input_types(model).items() if n not in shared}
    size = sizes.pop() if len(sizes) == 1 else None
    return size if isinstance(size, int) and size > 0 else None


def random_calibration(model: onnx.ModelProto, *, batches: int, batch_size: int | None = None,
                       dims: Mapping[str, int] | None = None, seed: int = 0) -> CalibrationSet:
    """Random inputs for ``model``: only for smoke tests, never a silent fallback.

    The set has ``random=True`` and its description starts with "random", so every report
    says so. Batch ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` when it is
    iterated (nothing is held in memory). An input whose model shape has no batch axis
    (:func:`shared_inputs`, the rule real calibration data follows: Flux's 2-D
    ``img_ids``/``txt_ids``) gets the model's own shape, drawn once per batch and passed whole
    (``CalibrationFile.shared``). Float inputs are standard normal; inputs whose name
    contains "mask" are ones; integer inputs are uniform in ``[0, high)``, ``high`` being the
    row count of the embedding table they index (a Gather on an initializer), else
    :data:`DEFAULT_RANDOM_INT_HIGH`; bool inputs are fair coin flips. Does not modify ``model``.

    Args:
        model: the model whose inputs to fill.
        batches: number of batches (>= 1).
        batch_size: samples per batch (>= 1); a static batch dim in the model must equal it.
            None: the model's fixed batch (:func:`static_batch`), else 1.
        dims: sizes of the symbolic dims other than the batch axis, e.g. ``{"seq": 128}``
            (axis 0 of an input without a batch axis included).
        seed: the random seed.

    Raises:
        ConfigError: ``batches``/``batch_size`` not positive, or ``dims`` names an unknown dim.
        CalibrationError: an input has a dim without a value, no shape, or a non-numeric dtype.
    """
    if batch_size is None:
        batch_size = static_batch(model) or 1
    if batches <= 0 or batch_size <= 0:
        raise ConfigError(f"random calibration needs at least one batch of one sample, got {batches} batches of {batch_size}",
                          hint="e.g. --random-calib 4 --random-dims batch=2")
    dims = dict(dims or {})
    types = model_input_types(model)
    shared = shared_inputs(model)
    known = sorted({d for n, t in types.items() if t and t.shape for d in t.shape[0 if n in shared else 1:]
                    if isinstance(d, str)})
    for name in dims:
        if name not in known:
            raise ConfigError(f"random calibration: the model has no symbolic dim '{name}'",
                              hint=f"symbolic dims of its inputs (besides the batch axis): {', '.join(known) or 'none'}")
    if batches > MAX_RANDOM_BATCHES:
        raise ConfigError(f"random calibration: {batches} batches; at most {MAX_RANDOM_BATCHES} are made",
                          hint="random inputs are for smoke tests: e.g. --random-calib 4")
    index = GraphIndex(model)
    specs = tuple(_random_spec(n, t, index, batch_size=batch_size, dims=dims, batched=n not in shared)
                  for n, t in types.items())
    elements = sum(math.prod(s.shape) for s in specs)
    if elements > MAX_RANDOM_ELEMENTS:
        shapes = ", ".join(f"{s.name} {_shape_str(s.shape)}" for s in specs)
        raise ConfigError(f"random calibration: one batch would hold {elements} values ({shapes}); "
                          f"at most {MAX_RANDOM_ELEMENTS} are made",
                          hint="use a smaller batch size or smaller dims (e.g. --random-dims batch=2,seq=128)")
    arrays = tuple(ArraySpec(s.name, s.dtype, s.shape) for s in specs)
    unbatched = frozenset(n for n in shared if n in types)
    files = tuple(CalibrationFile(None, f"random batch {i}", arrays, unbatched) for i in range(batches))
    extra = "".join(f", {k}={v}" for k, v in sorted(dims.items()))
    desc = f"random inputs (seed {seed}, {batches} batches of {batch_size} samples{extra})"
    return CalibrationSet(desc, files, _split(files, None), batch_size, True, (seed, specs))
