"""ONNX Runtime's static quantizer, run from files in this process's temporary folder (the ``int8`` driver).

:func:`quantize` runs ``quant_pre_process`` (shape inference only) and ``quantize_static``
(QDQ format) on a model with the options of an :class:`~compress.passes.int8.Int8Config`
(:class:`QuantizeOptions`: the fields it reads) and a :class:`~compress.passes.int8_reader.BatchReader`.

ORT needs files: the model is streamed (one tensor at a time, never serialized whole) into
a folder under this process's temporary folder (:func:`compress.external.temp_folder`),
where ORT also keeps its own temporary files; the quantized model is loaded from there
with its weights left in ``int8.onnx.data`` (external references), and the folder's other
files are deleted. ORT's quantizer itself holds the weights in memory while it runs.
Nothing else touches the file system and the input model is not modified.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import onnx

from compress.errors import BuildError, CalibrationError, CompressError
from compress.passes.base import copy_model
from compress.passes.int8_reader import BatchReader

#: Calibration methods by name (values: ``onnxruntime.quantization.CalibrationMethod`` members).
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: Activation types: name -> (ORT QuantType member, symmetric activations).
ACTIVATION_TYPES = {"int8": ("QInt8", True), "uint8": ("QUInt8", False)}
_LARGE = 1_500_000_000  # bytes (graph + tensor data); above this ORT writes its files with external data
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


class QuantizeOptions(Protocol):
    """The fields of :class:`~compress.passes.int8.Int8Config` that :func:`quantize` reads."""

    @property
    def method(self) -> str:
        """Calibration method, a key of :data:`CALIBRATION_METHODS`."""

    @property
    def percentile(self) -> float:
        """Percentile of |x| kept by ``method="percentile"``."""

    @property
    def op_types(self) -> tuple[str, ...]:
        """Op types to quantize."""

    @property
    def activation_type(self) -> str:
        """A key of :data:`ACTIVATION_TYPES`."""

    @property
    def per_channel(self) -> bool:
        """Per-output-channel weight scales."""

    @property
    def preprocess(self) -> bool:
        """Run ``quant_pre_process`` (symbolic shapes first)."""

    @property
    def qdq_on_weights(self) -> bool:
        """Float weights with a Q/DQ pair (ORT's ``AddQDQPairToWeight``)."""

    @property
    def dedicated_qdq(self) -> bool:
        """One Q/DQ pair per quantized node input (ORT's ``DedicatedQDQPair``)."""

    @property
    def quantize_bias(self) -> bool:
        """Quantize Gemm/Conv biases to int32."""

    @property
    def quantize_outputs(self) -> bool:
        """Also put Q/DQ on the outputs of the quantized nodes."""


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's symbolic shape inference (what ``quant_pre_process`` runs first), in memory.

    ``SymbolicShapeInference.infer_shapes`` saves ``sym_shape_infer_temp.onnx`` into the
    process's working directory when inference is incomplete, which would write into (and
    replace a file of) the user's folder; the same steps are run here without that save.
    The library never changes the working directory.

    The inference reads initializer values (inputs of shape arithmetic, of Add/Mul/Concat,
    ...) through ``numpy_helper.to_array``, which cannot read compress's absolute external
    references: a subclass reads them with :func:`compress.external.read_array` instead (one
    tensor at a time, dropped after use), and non-float external tensors (int64 shape and
    index tensors, read by ``Constant`` nodes and subgraph inference) are embedded in the
    copy it runs on. Float weights keep their references. Returns that copy with the
    inferred value info; the caller writes it with :func:`compress.onnx_io.save_model`.
    Does not modify ``model``.

    Raises:
        RuntimeError: inference is incomplete (the caller quantizes without it).
        Exception: whatever the inference raises.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from compress import external

    class ReferenceShapeInference(SymbolicShapeInference):
        def _get_value(self, node: onnx.NodeProto, idx: int) -> Any:
            name = node.input[idx]
            if name in self.sympy_data_:
                return self.sympy_data_[name]
            return external.read_array(self.initializers_[name])

    view = copy_model(model)
    for t in external.model_tensors(view):
        ref = external.data_ref(t)
        if ref is not None and t.data_type not in _FLOATS:
            data = external.read_bytes(ref, name=t.name)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
    ssi = ReferenceShapeInference(2**31 - 1, False, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    ssi._preprocess(view)
    done = False
    while ssi.run_:
        done = ssi._infer_impl()
    ssi._update_output_from_vi()
    if not done:
        raise RuntimeError("incomplete symbolic shape inference")
    return ssi.out_mp_


_TEMPDIR_LOCK = threading.Lock()


@contextlib.contextmanager
def _ort_temp_files(folder: Path) -> Iterator[None]:
    """While active, ``tempfile``'s default folder is ``folder`` (restored on exit).

    ONNX Runtime's quantizer makes its own temporary folders with
    ``tempfile.TemporaryDirectory(prefix="ort.quant.")`` / ``"pre.quant."`` and no ``dir``
    (``quantize_static``, ``quant_pre_process``); they hold the calibration model with all
    weights. Setting ``tempfile.tempdir`` (the documented default for ``dir``) puts them in
    this pass's folder under :func:`compress.external.temp_folder`. The working directory
    is never changed.
    """
    with _TEMPDIR_LOCK:
        previous = tempfile.tempdir
        tempfile.tempdir = str(folder)
        try:
            yield
        finally:
            tempfile.tempdir = previous


def _needs_external_format(model: onnx.ModelProto) -> bool:
    """ORT's ``use_external_data_format``: the model has an external tensor or is large.

    Sizes come from :func:`compress.onnx_io.model_nbytes`, which reads no data.
    """
    from compress import external, onnx_io

    return any(external.is_external(t) for t in external.model_tensors(model)) or onnx_io.model_nbytes(model) > _LARGE


def _keep_only_references(folder: Path, model: onnx.ModelProto) -> None:
    """Delete every file under ``folder`` that no tensor of ``model`` references.

    Those are ORT's inputs and intermediate copies; only the quantized model's data stays
    on disk (the whole folder goes when ``model`` references none of it).
    """
    from compress import external

    keep = {ref.path for t in external.model_tensors(model) if (ref := external.data_ref(t)) is not None}
    if not any(folder == p.parent or folder in p.parents for p in keep):
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.resolve() in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def drop_unused_folders(folders: Sequence[Path], model: onnx.ModelProto) -> None:
    """Remove the folders of ``folders`` that no tensor of ``model`` references.

    Those hold quantizations the fidelity target did not keep; ``model`` is not modified.
    """
    from compress import external

    used = {ref.path.parent for t in external.model_tensors(model) if (ref := external.data_ref(t)) is not None}
    for folder in folders:
        if folder not in used and not any(folder in p.parents for p in used):
            shutil.rmtree(folder, ignore_errors=True)


class _OrtQuantizationRecords(logging.Filter):
    """Drops records below ERROR that ONNX Runtime's quantization modules log on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for an ORT quantization record below ERROR (its advice is meant for its own scripts)."""
        return record.levelno >= logging.ERROR or "onnxruntime/quantization/" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_ort_quantization() -> Iterator[None]:
    """While active, ONNX Runtime's quantization logs only errors; every other logger is untouched.

    ORT's quantizer logs through its own ``onnxruntime.quantization.*`` loggers (their level
    is raised to ERROR) and through the root logger's module functions (a filter on the root
    logger drops those records; the root logger's level is never changed). Both are restored
    on exit.
    """
    named = logging.getLogger("onnxruntime.quantization")
    saved = named.level
    records = _OrtQuantizationRecords()
    named.setLevel(logging.ERROR)
    logging.getLogger().addFilter(records)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(records)
        named.setLevel(saved)


def quantize(model: onnx.ModelProto, reader: BatchReader, config: QuantizeOptions,
             excluded: list[str], warnings: list[str], folders: list[Path] | None = None) -> onnx.ModelProto:
    """quant_pre_process + quantize_static from files in a folder under the temporary folder.

    The model (symbolic shapes added when ``preprocess``) is written once with
    :func:`compress.onnx_io.save_model` (external data streamed tensor by tensor); ORT reads
    it from there, writes its temporary files there (:func:`_ort_temp_files`) and the
    result beside it (``use_external_data_format`` when the model has external tensors or is
    large). The result is loaded with :func:`compress.onnx_io.load_model`: its tensors
    reference ``int8.onnx.data`` in that folder, which therefore stays until the process
    exits (:func:`compress.external.temp_folder`); every other file there is deleted (the
    whole folder when the result references none of it). The folder is appended to
    ``folders`` (so the caller can remove the ones its final model does not reference).
    Does not modify ``model``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    from compress import external, onnx_io

    large = _needs_external_format(model)
    act_type, act_symmetric = ACTIVATION_TYPES[config.activation_type]
    extra: dict[str, object] = {"ActivationSymmetric": act_symmetric, "WeightSymmetric": True, "AddQDQPairToWeight": config.qdq_on_weights,
             "DedicatedQDQPair": config.dedicated_qdq, "QuantizeBias": config.quantize_bias,
             "CalibStridedMinMax": 1}
    if not config.quantize_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(config.op_types)
    if config.method == "percentile":
        extra["CalibPercentile"] = config.percentile
    folder = Path(tempfile.mkdtemp(prefix="int8-", dir=external.temp_folder()))
    if folders is not None:
        folders.append(folder)
    src, pre, out = (folder / n for n in ("model.onnx", "pre.onnx", "int8.onnx"))
    try:
        shaped = model
        if config.preprocess:
            try:
                shaped = _symbolic_shapes(model)
            except Exception as exc:  # fails on some graphs (and without sympy): ONNX shape inference only
                warnings.append(f"symbolic shape inference failed ({_first_line(exc)}); ONNX shape inference only")
        onnx_io.save_model(shaped, src, external_data=True)  # streamed: one tensor at a time
        del shaped
        source = src
        with _ort_temp_files(folder), quiet_ort_quantization():
            if config.preprocess:
                try:
                    quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True,
                                      save_as_external_data=large, external_data_location="pre.onnx.data")
                    source = pre
                except Exception as exc:  # go on without it
                    warnings.append(f"quant_pre_process failed ({_first_line(exc)}); quantized without it")
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # ORT prints progress per batch
                    quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=list(config.op_types), per_channel=config.per_channel,
                                    reduce_range=False, activation_type=getattr(QuantType, act_type), weight_type=QuantType.QInt8,
                                    nodes_to_exclude=excluded, use_external_data_format=large,
                                    calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[config.method]),
                                    calibration_providers=["CPUExecutionProvider"], extra_options=extra)
            except CompressError:  # ours, raised by the reader inside ORT's loop
                raise
            except Exception as exc:
                if reader.active:
                    raise CalibrationError(f"calibration batch {reader.count - 1} does not fit the model: {_first_line(exc)}",
                                           hint="check the calibration data against the model's inputs ('compress inspect')") from None
                raise BuildError(f"int8: ONNX Runtime quantization failed: {type(exc).__name__}: {_first_line(exc)}",
                                 hint="exclude the node it names (exclude_nodes) or use fewer op types") from None
        result = onnx_io.load_model(out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _keep_only_references(folder, result)
    return result


__all__ = ["ACTIVATION_TYPES", "CALIBRATION_METHODS", "QuantizeOptions", "drop_unused_folders", "quantize", "quiet_ort_quantization"]
