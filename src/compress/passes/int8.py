"""Explicit INT8 quantization (Q/DQ) from calibration data (the ``int8`` pass).

TensorRT 10.1+ deprecated and TensorRT 11 removed implicit INT8 calibration: INT8 must be
explicit QuantizeLinear/DequantizeLinear pairs in the ONNX. This pass produces them with
ONNX Runtime's static quantizer (``onnxruntime.quantization.quantize_static``). By default
in the form TensorRT consumes:

- QDQ format, INT8 activations and weights, both **symmetric** (every zero point is 0);
- per-channel weight scales (``per_channel``), per-tensor activation scales;
- weights stay float with a Q/DQ pair on them (``qdq_on_weights``; TensorRT folds it) and
  every quantized node gets its own pair (``dedicated_qdq``), as Hugging Face Optimum's
  TensorRT preset does; biases stay float (``quantize_bias=False``): an int32 bias behind
  a DequantizeLinear is what TensorRT parsers have rejected ("only activation types
  allowed as input to this layer", ORT issues #14229 / #17738);
- only ``op_types`` are quantized (MatMul, Gemm, Conv by default). ``quant_pre_process``
  runs with ``skip_optimization=True``: its optimizer would fuse MatMul+Add into Gemm and
  a MatMul-only list would then miss them;
- only the *inputs of quantized nodes* go through Q/DQ (``quantize_outputs=False``): ORT's
  quantizer replaces a tensor by its Q/DQ copy for every consumer when just one of them is
  quantized (e.g. a LayerNorm output read by an FFN MatMul *and* the residual Add, which
  then adds INT8 noise to the residual stream); the pass rewires such non-quantized
  consumers back to the float tensor (``changes["float_inputs_restored"]``).

``activation_type="uint8"`` is the form ONNX Runtime's **CPU** kernels are fastest with
(U8S8: asymmetric uint8 activations, symmetric int8 weights, as ORT's own default). ORT
CPU fuses DequantizeLinear -> MatMul into ``MatMulIntegerToFloat`` only for uint8
activations on x86 (``session.qdqisint8allowed`` is off there); it converts an int8
Q -> DQ pair to uint8 itself only when the Q feeds a single DQ, which fails wherever
several MatMuls read one tensor (attention Q/K/V: ORT's common-subexpression elimination
merges their dedicated Q nodes), so those MatMuls stay FP32. Asymmetric activations also
keep one-sided tensors (GELU outputs feeding the FFN down-projection) at full resolution.
It is not TensorRT's form (non-zero activation zero points); TensorRT needs the default.
On x86 CPUs without VNNI, ORT's U8S8 kernels can saturate (ORT's ``reduce_range`` advice);
this pass never reduces the range.

``matmul_weights_only`` leaves MatMuls without a constant (initializer) input float:
attention score/context products of two activations (ORT's ``MatMulConstBOnly`` option
applies to the QOperator format only, so the pass excludes them by name).

Calibration methods: ``minmax`` (range of observed values), ``entropy`` (KL-optimal
threshold of a histogram) and ``percentile`` (``percentile`` of |x|).

ORT needs files: the model is streamed (one tensor at a time, never serialized whole) into
a folder under this process's temporary folder (:func:`compress.external.temp_folder`),
where ORT also keeps its own temporary files; the quantized model is loaded from there
with its weights left in ``int8.onnx.data`` (external references), and the folder's other
files are deleted. ORT's quantizer itself holds the weights in memory while it runs.
Nothing else touches the file system and the input model is not modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from compress.errors import BuildError, CalibrationError, CompressError, ConfigError, ModelError
from compress.external import read_array
from compress.graph import GraphIndex, TensorType
from compress.log import logger
from compress.passes.accuracy import TargetConfig
from compress.passes.base import (
    Batch,
    PassReport,
    check_model,
    constants_to_initializers,
    copy_model,
    describe_batches,
    name_nodes,
    op_counts,
    register_pass,
    timer,
)

if TYPE_CHECKING:
    from compress.calibration import CalibrationSet

#: Calibration methods by name (values: ``onnxruntime.quantization.CalibrationMethod`` members).
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: Activation types: name -> (ORT QuantType member, symmetric activations).
ACTIVATION_TYPES = {"int8": ("QInt8", True), "uint8": ("QUInt8", False)}
_LARGE = 1_500_000_000  # bytes (graph + tensor data); above this ORT writes its files with external data
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True, kw_only=True)
class Int8Config:
    """Options of the ``int8`` pass.

    Attributes:
        calibration: a CalibrationSet or a sequence of batches (input name -> array); required.
        method: calibration method, one of :data:`CALIBRATION_METHODS`.
        percentile: the percentile of |x| kept by ``method="percentile"`` (in (0, 100]).
        op_types: op types to quantize.
        exclude_nodes: node names never quantized.
        exclude_ops: op types never quantized (their nodes are listed as excluded).
        activation_type: ``"int8"``: symmetric INT8 activations, zero points 0 (TensorRT);
            ``"uint8"``: asymmetric UINT8 activations (ONNX Runtime CPU's fast U8S8 form;
            not for TensorRT). Weights are symmetric INT8 either way.
        matmul_weights_only: quantize only MatMuls with an initializer input (their
            weights); MatMuls of two activations (attention) stay float.
        per_channel: per-output-channel weight scales (else per tensor).
        preprocess: run ``quant_pre_process`` (shape inference only, ``skip_optimization``).
        qdq_on_weights: keep float weights with a Q/DQ pair (TensorRT style); False stores
            INT8 weights behind a DequantizeLinear.
        dedicated_qdq: one Q/DQ pair per quantized node input (TensorRT style).
        quantize_bias: quantize Gemm/Conv biases to int32 (off for TensorRT).
        quantize_outputs: also put Q/DQ on the outputs of the quantized nodes (ORT's
            default); off: only their inputs are quantized, as TensorRT wants (an output
            Q/DQ before a float bias Add or residual only adds error), and other consumers
            of a quantized input read the float tensor.
        max_batches: calibrate on at most this many batches (None: all).
        target: a fidelity target (:class:`~compress.passes.accuracy.TargetConfig`): the
            pass calibrates on the first batches, measures on the held-out rest, and keeps
            the nodes with the largest local error float until the target holds
            (:func:`~compress.passes.accuracy.repair_int8`); FidelityTargetError otherwise.
            None: no target (the pass only reports).
        smoothquant: SmoothQuant migration strength alpha applied before quantizing
            (:mod:`compress.passes.smoothquant`), or None.
        per_tensor_method: with a target that is missed with every node quantized, also
            calibrate with the other method(s) (minmax / percentile) and give each
            activation tensor the one with the least local error, when that helps
            (:func:`~compress.passes.accuracy.choose_methods`).
    """

    calibration: CalibrationSet | Sequence[Batch] | None = None
    method: str = "minmax"
    percentile: float = 99.999
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    activation_type: str = "int8"
    matmul_weights_only: bool = False
    per_channel: bool = True
    preprocess: bool = True
    qdq_on_weights: bool = True
    dedicated_qdq: bool = True
    quantize_bias: bool = False
    quantize_outputs: bool = False
    max_batches: int | None = None
    target: TargetConfig | None = None
    smoothquant: float | None = None
    per_tensor_method: bool = True

    def __post_init__(self) -> None:
        from compress.validate import check_number

        check_number("Int8Config", "smoothquant", self.smoothquant, low=0, high=1, example="0.5", optional=True)
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"int8: unknown calibration method {self.method!r}; valid: {', '.join(CALIBRATION_METHODS)}",
                              hint=f"use one of: {', '.join(CALIBRATION_METHODS)}")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ConfigError(f"int8: unknown activation type {self.activation_type!r}; valid: {', '.join(ACTIVATION_TYPES)}",
                              hint="int8 (symmetric, TensorRT) or uint8 (asymmetric, ONNX Runtime CPU)")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"int8: percentile must be in (0, 100], got {self.percentile}", hint="e.g. 99.999")
        if not self.op_types:
            raise ConfigError("int8: op_types is empty; nothing would be quantized", hint="e.g. MatMul,Gemm,Conv")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"int8: max_batches must be >= 1 or None, got {self.max_batches}",
                              hint="leave it out (None) to use every calibration batch")

    def to_dict(self) -> dict[str, Any]:
        return {"calibration": None if self.calibration is None else describe_batches(self.calibration),
                "method": self.method, "percentile": self.percentile, "op_types": list(self.op_types),
                "exclude_nodes": list(self.exclude_nodes), "exclude_ops": list(self.exclude_ops),
                "per_channel": self.per_channel, "preprocess": self.preprocess,
                "qdq_on_weights": self.qdq_on_weights, "dedicated_qdq": self.dedicated_qdq,
                "quantize_bias": self.quantize_bias, "quantize_outputs": self.quantize_outputs,
                "max_batches": self.max_batches, "matmul_weights_only": self.matmul_weights_only,
                "activation_type": self.activation_type, "weight_type": "int8",
                "symmetric": ACTIVATION_TYPES[self.activation_type][1], "format": "QDQ",
                "target": None if self.target is None else dataclasses.asdict(self.target),
                "smoothquant": self.smoothquant, "per_tensor_method": self.per_tensor_method}


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
        if start_index != self.count:
            raise BuildError(f"int8: calibration batches were asked for out of order ({start_index} after {self.count})",
                             hint="the installed onnxruntime reads calibration data in an unexpected order; report it")
        self._stop = min(end_index, self._len)

    def get_next(self) -> dict[str, np.ndarray] | None:
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


def _model_inputs(model: onnx.ModelProto) -> dict[str, TensorType | None]:
    index = GraphIndex(model)
    return {n: index.type_of(n) for n in index.graph_inputs}


def _first_line(exc: BaseException) -> str:
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

    class ReferenceShapeInference(SymbolicShapeInference):  # type: ignore[misc]
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
    """ORT's ``use_external_data_format``: the model has an external tensor or is large (sizes
    from :func:`compress.onnx_io.model_nbytes`, which reads no data)."""
    from compress import external, onnx_io

    return any(external.is_external(t) for t in external.model_tensors(model)) or onnx_io.model_nbytes(model) > _LARGE


def _keep_only_references(folder: Path, model: onnx.ModelProto) -> None:
    """Delete every file under ``folder`` that no tensor of ``model`` references (ORT's inputs
    and intermediate copies), so only the quantized model's data stays on disk."""
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


def _drop_unused_folders(folders: Sequence[Path], model: onnx.ModelProto) -> None:
    """Remove the folders of ``folders`` that no tensor of ``model`` references (quantizations the
    fidelity target did not keep)."""
    from compress import external

    used = {ref.path.parent for t in external.model_tensors(model) if (ref := external.data_ref(t)) is not None}
    for folder in folders:
        if folder not in used and not any(folder in p.parents for p in used):
            shutil.rmtree(folder, ignore_errors=True)


def _quantize(model: onnx.ModelProto, reader: BatchReader, config: Int8Config,
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
    extra = {"ActivationSymmetric": act_symmetric, "WeightSymmetric": True, "AddQDQPairToWeight": config.qdq_on_weights,
             "DedicatedQDQPair": config.dedicated_qdq, "QuantizeBias": config.quantize_bias,
             "CalibStridedMinMax": 1}
    if not config.quantize_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(config.op_types)
    if config.method == "percentile":
        extra["CalibPercentile"] = config.percentile
    ort_log = logging.getLogger()
    level = ort_log.level
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
        ort_log.setLevel(max(level, logging.ERROR))  # ORT logs its advice on the root logger
        with _ort_temp_files(folder):
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
    finally:
        ort_log.setLevel(level)
    _keep_only_references(folder, result)
    return result


def _restore_float_inputs(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Point non-quantized consumers of an activation Q -> DQ pair back at the float tensor.

    ``quantized``: names of the nodes meant to read quantized inputs. Every other node (not a
    Q/DQ) that reads the output of a DequantizeLinear fed by a QuantizeLinear reads the Q's
    float input instead; Q/DQ nodes left without consumers and their unused initializers are
    removed. Edits ``model`` in place; returns the number of inputs rewired.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    if rewired:
        drop_dead_qdq(model, weights=False)
    return rewired


def restore_float_weights(model: onnx.ModelProto, float_model: onnx.ModelProto, nodes: set[str]) -> int:
    """Give ``nodes`` back their float weights: inputs read from a DequantizeLinear of an initializer.

    ORT's QDQ output stores a weight as an int8 initializer behind a lone DequantizeLinear;
    :func:`_restore_float_inputs` only undoes activation Q -> DQ pairs. Each such input of a
    node in ``nodes`` reads the float initializer that the same node reads in ``float_model``
    (the pass's input, same node names) instead; the int8 copies no longer read are removed.
    The float initializer is copied as it is (a reference when external: no bytes are read).
    Edits ``model`` in place; returns the number of inputs rewired.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = {t.name: t for t in float_model.graph.initializer}
    rewired = 0
    for node in graph.node:
        source = float_nodes.get(node.name)
        if node.name not in nodes or source is None or len(source.input) != len(node.input):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            weight = float_inits.get(source.input[i])
            if weight is None:
                continue
            if weight.name not in inits:
                graph.initializer.append(weight)
                inits.add(weight.name)
            node.input[i] = weight.name
            rewired += 1
    if rewired:
        drop_dead_qdq(model, weights=True)
    return rewired


def drop_dead_qdq(model: onnx.ModelProto, *, weights: bool) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads, and their scales and zero points (``weights``:
    also the quantized initializers they read). Edits ``model`` in place."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    freed: set[str] = set()
    while True:
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        freed.update(x for n in dead for x in (n.input if weights else n.input[1:]))
        keep = [n for n in graph.node if n not in dead]
        del graph.node[:]
        graph.node.extend(keep)
    used = {x for n in graph.node for x in n.input} | outputs
    keep_inits = [t for t in graph.initializer if t.name not in freed or t.name in used]
    if len(keep_inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep_inits)


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes with no initializer (or Constant) input: products of two activations."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(x in consts for x in n.input)]


def _zero_points(model: onnx.ModelProto) -> tuple[int, int]:
    """(zero-point tensors, those with a non-zero value) over all Q/DQ nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    seen, nonzero = set(), 0
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            if n.input[2] in seen:
                continue
            seen.add(n.input[2])
            if np.any(read_array(inits[n.input[2]]) != 0):
                nonzero += 1
    return len(seen), nonzero


def _per_channel_weights(model: onnx.ModelProto) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits
               and int(np.prod(inits[n.input[1]].dims)) > 1)


def _quantized(model: onnx.ModelProto, op_types: set[str]) -> dict[str, bool]:
    """Node name -> every float input of it comes from a DequantizeLinear (per node of ``op_types``)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type not in op_types:
            continue
        data = [x for x in n.input[:2] if x]  # data inputs (A/B, X/W); a float bias stays float
        out[n.name] = bool(data) and all(x in producer and producer[x].op_type == "DequantizeLinear" for x in data)
    return out


@register_pass("int8", config=Int8Config, kind="precision", needs_calibration=True,
               summary="explicit INT8 Q/DQ (ONNX Runtime static quantization) from calibration data: symmetric "
                       "int8 (TensorRT) or uint8 activations (ONNX Runtime CPU)")
def int8_pass(model: onnx.ModelProto, config: Int8Config) -> tuple[onnx.ModelProto, PassReport]:
    """Quantize ``model`` to explicit INT8 Q/DQ on ``config.calibration``. Does not modify ``model``.

    Returns the quantized model and a report: Q/DQ counts, per-node status (quantized,
    excluded with the reason, not quantized), zero points (all 0 for ``activation_type``
    int8; uint8 activations have non-zero ones), per-channel weights, and the number of
    non-quantized consumers given back their float input (``float_inputs_restored``).

    Raises:
        ModelError: the model has float16 weights or no float32 weights.
        CalibrationError: no calibration data, or a batch that does not fit the model
            (names, dtypes, ranks, static dims), naming the batch and the input.
        ConfigError: ``exclude_nodes`` names a node the model does not have.
        BuildError: ONNX Runtime fails to quantize, or the result fails the checker.
    """
    elapsed = timer()
    if config.calibration is None:
        raise CalibrationError("int8 needs calibration data", hint="pass --calib with .npz batches ('compress calib')")
    halves = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    if halves:
        raise ModelError(f"int8: the model already has float16 weights (e.g. '{halves[0]}'); "
                         "ONNX Runtime quantizes float32 models only",
                         hint="quantize the FP32 model: use --precision int8 instead of fp16, not after it")
    work = copy_model(model)
    moved = constants_to_initializers(work)  # weights stored as Constant nodes (Paddle, caffe2 exports)
    if not any(t.data_type == onnx.TensorProto.FLOAT for t in work.graph.initializer):
        raise ModelError("int8: the model has no float32 weights to quantize",
                         hint="it is already quantized or has no float parameters; drop --precision int8")
    renamed = name_nodes(work)
    names = {n.name: n for n in work.graph.node}
    missing = [n for n in config.exclude_nodes if n not in names]
    if missing:
        raise ConfigError(f"int8: exclude list names unknown node(s): {', '.join(missing)}",
                          hint="use node names as 'compress inspect' or Netron show them")
    from compress.calibration import CalibrationSet, check_calibration

    if isinstance(config.calibration, CalibrationSet):
        if not len(config.calibration):
            raise CalibrationError("int8: the calibration data has no batches", hint="pass calibration data with at least one batch")
        check_calibration(config.calibration, work)
    reasons: dict[str, str] = {}
    for name in config.exclude_nodes:
        reasons[name] = "excluded by name"
    for name, node in names.items():
        if node.op_type in config.exclude_ops:
            reasons.setdefault(name, f"op type {node.op_type} excluded")
    if config.matmul_weights_only and "MatMul" in config.op_types:
        for name in _activation_matmuls(work):
            reasons.setdefault(name, "MatMul of two activations (matmul_weights_only)")
    warnings: list[str] = []
    if renamed:
        warnings.append(f"named {len(renamed)} unnamed or duplicate-named node(s) (e.g. {renamed[0]})")
    if moved:
        warnings.append(f"{len(moved)} float Constant node(s) made initializers so they quantize as weights "
                        f"(e.g. '{moved[0]}')")
    fit, held = config.calibration, None
    if config.target is not None:
        from compress.passes.accuracy import split_holdout

        fit, held, shared = split_holdout(config.calibration, config.target.holdout)
        if shared:
            warnings.append("one calibration batch: the fidelity target is measured on the batch it was calibrated on")
    smooth = None
    if config.smoothquant is not None:
        from compress.passes.smoothquant import SmoothQuantConfig, smoothquant_pass

        work, smooth = smoothquant_pass(work, SmoothQuantConfig(calibration=fit, alpha=config.smoothquant))
        names = {n.name: n for n in work.graph.node}
    reader = BatchReader(fit, _model_inputs(work), max_batches=config.max_batches)
    if not len(reader):
        raise CalibrationError("int8: the calibration data has no batches", hint="pass calibration data with at least one batch")
    folders: list[Path] = []  # ORT's output folders of this call (a fidelity target may quantize 3 times)
    result = _quantize(work, reader, config, sorted(reasons), warnings, folders)
    restored = 0
    target_report = None
    kept_float: dict[str, str] = {}
    if config.target is not None:
        from compress.passes.accuracy import repair_int8

        meant = {n for n, node in names.items() if node.op_type in config.op_types and n not in reasons}
        restored = _restore_float_inputs(copy_model(result), meant)
        others = {"minmax": ("percentile",), "percentile": ("minmax",)}.get(config.method, ("minmax", "percentile"))

        def requantize(method: str) -> onnx.ModelProto:
            again = BatchReader(fit, _model_inputs(work), max_batches=config.max_batches)
            return _quantize(work, again, dataclasses.replace(config, method=method, target=None), sorted(reasons), [],
                             folders)

        alternatives = {m: (lambda m=m: requantize(m)) for m in others} if config.per_tensor_method else None
        result, kept_float, target_report = repair_int8(
            model, work, result, meant & {n for n, q in _quantized(result, set(config.op_types)).items() if q},
            held, config.target, method=config.method, alternatives=alternatives)
    if not config.quantize_outputs and target_report is None:
        meant = {n for n, node in names.items() if node.op_type in config.op_types and n not in reasons}
        restored = _restore_float_inputs(result, meant)
    _drop_unused_folders(folders, result)
    warnings += check_model(result, what="int8", source=model)

    op_types = set(config.op_types)
    status = _quantized(result, op_types)
    items = []
    for name, node in names.items():
        if node.op_type not in op_types and name not in reasons:
            continue
        if name in reasons:
            items.append({"node": name, "op": node.op_type, "status": "excluded", "reason": reasons[name]})
        elif name in kept_float:
            items.append({"node": name, "op": node.op_type, "status": "kept float", "reason": kept_float[name]})
        elif status.get(name):
            items.append({"node": name, "op": node.op_type, "status": "quantized"})
        else:
            items.append({"node": name, "op": node.op_type, "status": "not quantized",
                          "reason": "ONNX Runtime left it float (no float input pair it can quantize)"})
    zp_total, zp_nonzero = _zero_points(result)
    after = op_counts(result)
    counts = {s: sum(1 for i in items if i["status"] == s) for s in ("quantized", "excluded", "not quantized", "kept float")}
    changes = {
        "quantize_linear": after.get("QuantizeLinear", 0) - op_counts(model).get("QuantizeLinear", 0),
        "dequantize_linear": after.get("DequantizeLinear", 0) - op_counts(model).get("DequantizeLinear", 0),
        "nodes_quantized": counts["quantized"], "nodes_excluded": counts["excluded"],
        "nodes_not_quantized": counts["not quantized"],
        "zero_points": zp_total, "nonzero_zero_points": zp_nonzero,
        "per_channel_weight_scales": _per_channel_weights(result),
        "calibration_batches": reader.count,
        "float_inputs_restored": restored,
        "nodes_kept_float": counts["kept float"],
    }
    if target_report is not None:
        changes["target"] = target_report
        if target_report.get("warning"):
            warnings.append(f"fidelity target: {target_report['warning']}")
    if smooth is not None:
        changes["smoothquant"] = dict(smooth.changes)
        warnings += list(smooth.warnings)
    if zp_nonzero and config.activation_type == "int8":
        warnings.append(f"{zp_nonzero} zero point(s) are not 0: the model is not symmetric (TensorRT needs 0)")
    if counts["not quantized"]:
        warnings.append(f"{counts['not quantized']} node(s) of {', '.join(sorted(op_types))} were not quantized")
    logger.info("int8: %d nodes quantized, %d excluded, %d Q + %d DQ inserted", counts["quantized"],
                counts["excluded"], changes["quantize_linear"], changes["dequantize_linear"])
    report = PassReport(name="int8", nodes_before=op_counts(model), nodes_after=after, changes=changes,
                        items=tuple(items), config=config.to_dict(), warnings=tuple(warnings), seconds=elapsed())
    return result, report


__all__ = ["ACTIVATION_TYPES", "CALIBRATION_METHODS", "BatchReader", "Int8Config", "check_batch", "int8_pass"]
