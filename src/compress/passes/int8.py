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

Where the code is: this module holds the config and the pass (the node selection and the
report); :mod:`compress.passes.int8_ort` runs ORT's quantizer from files in a folder under
this process's temporary folder (:func:`compress.external.temp_folder`), reading batches
through :class:`~compress.passes.int8_reader.BatchReader`; :mod:`compress.passes.qdq` edits
and counts the Q/DQ nodes of its output. Nothing else touches the file system and the
input model is not modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from compress.errors import CalibrationError, ConfigError, ModelError
from compress.log import logger
from compress.passes.accuracy import TargetConfig
from compress.passes.base import (
    Batch,
    PassReport,
    check_model,
    constants_to_initializers,
    copy_model,
    name_nodes,
    op_counts,
    pass_options,
    register_pass,
    timer,
)
from compress.passes.int8_ort import ACTIVATION_TYPES, CALIBRATION_METHODS, drop_unused_folders, quantize
from compress.passes.int8_reader import BatchReader, check_batch, model_inputs
from compress.passes.qdq import per_channel_weights, quantized_nodes, restore_float_inputs, zero_points

if TYPE_CHECKING:
    from compress.calibration import CalibrationSet


@dataclass(frozen=True, kw_only=True)
class Int8Config:
    """Options of the ``int8`` pass.

    Attributes:
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
        from compress.validate import Interval, check_number

        check_number("Int8Config", "smoothquant", self.smoothquant, within=Interval(0, 1), example="0.5", optional=True)
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
        """JSON-ready options for the pass report (:func:`~compress.passes.base.pass_options` adds the data)."""
        return {"method": self.method, "percentile": self.percentile, "op_types": list(self.op_types),
                "exclude_nodes": list(self.exclude_nodes), "exclude_ops": list(self.exclude_ops),
                "per_channel": self.per_channel, "preprocess": self.preprocess,
                "qdq_on_weights": self.qdq_on_weights, "dedicated_qdq": self.dedicated_qdq,
                "quantize_bias": self.quantize_bias, "quantize_outputs": self.quantize_outputs,
                "max_batches": self.max_batches, "matmul_weights_only": self.matmul_weights_only,
                "activation_type": self.activation_type, "weight_type": "int8",
                "symmetric": ACTIVATION_TYPES[self.activation_type][1], "format": "QDQ",
                "target": None if self.target is None else dataclasses.asdict(self.target),
                "smoothquant": self.smoothquant, "per_tensor_method": self.per_tensor_method}


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes with no initializer (or Constant) input: products of two activations."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(x in consts for x in n.input)]


def _opset_for_qdq(model: onnx.ModelProto, per_channel: bool) -> tuple[onnx.ModelProto, str]:
    """``(model, note)``: ``model`` converted to ONNX opset 13 where Q/DQ need it; note '' if unchanged.

    QuantizeLinear exists from opset 10 and takes a per-channel ``axis`` from opset 13. A model
    below that (a Paddle or older export) is converted with ``onnx.version_converter`` (the
    graph only; initializers, external ones included, are carried as they are). Where the
    converter fails and the model is at opset 10-12, per-channel weight scales are given up
    instead (note starts with "per-tensor"). Does not modify ``model``.

    Raises:
        ModelError: below opset 10 and the converter fails.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 13 or (opset >= 10 and not per_channel):
        return model, ""
    import onnx.version_converter

    try:
        converted = onnx.version_converter.convert_version(model, 13)
    except Exception as exc:  # noqa: BLE001 -- onnx's converter raises bare RuntimeError/ValueError
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if opset >= 10:
            return model, (f"per-tensor weight scales: the model is opset {opset} (per-channel QuantizeLinear "
                           f"needs 13) and onnx.version_converter could not convert it ({detail})")
        raise ModelError(f"int8: the model is ONNX opset {opset}; Q/DQ need opset 10 (per-channel: 13) and "
                         f"onnx.version_converter failed: {detail}",
                         hint="re-export the model at opset 13 or newer") from None
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    return converted, (f"converted from ONNX opset {opset} to 13 (onnx.version_converter) for "
                       f"{'per-channel ' if per_channel else ''}QuantizeLinear; the output is opset 13")


@register_pass("int8", config=Int8Config, kind="precision", needs_calibration=True,
               summary="explicit INT8 Q/DQ (ONNX Runtime static quantization) from calibration data: symmetric "
                       "int8 (TensorRT) or uint8 activations (ONNX Runtime CPU)")
def int8_pass(model: onnx.ModelProto, config: Int8Config, *,
              data: CalibrationSet | Sequence[Batch] | None = None) -> tuple[onnx.ModelProto, PassReport]:
    """Quantize ``model`` to explicit INT8 Q/DQ calibrated on ``data``. Does not modify ``model``.

    ``data``: a CalibrationSet or a sequence of batches (input name -> array); required.

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
    if data is None:
        raise CalibrationError("int8 needs calibration data", hint="pass --calib with .npz batches ('compress calib')")
    halves = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    if halves:
        raise ModelError(f"int8: the model already has float16 weights (e.g. '{halves[0]}'); "
                         "ONNX Runtime quantizes float32 models only",
                         hint="quantize the FP32 model: use --precision int8 instead of fp16, not after it")
    work = copy_model(model)
    moved = constants_to_initializers(work)  # weights stored as Constant nodes (Paddle, caffe2 exports)
    work, opset_note = _opset_for_qdq(work, config.per_channel)
    if opset_note.startswith("per-tensor"):
        config = dataclasses.replace(config, per_channel=False)
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

    if isinstance(data, CalibrationSet):
        if not len(data):
            raise CalibrationError("int8: the calibration data has no batches", hint="pass calibration data with at least one batch")
        check_calibration(data, work)
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
    if opset_note:
        warnings.append(opset_note)
    fit, held, shared = data, None, True
    if config.target is not None:
        from compress.passes.accuracy import split_holdout

        fit, held, shared = split_holdout(data, config.target.holdout)
        if shared:
            warnings.append("one calibration batch: the fidelity target is measured on the batch it was calibrated on")
    smooth = None
    if config.smoothquant is not None:
        from compress.passes.smoothquant import SmoothQuantConfig, smoothquant_pass

        work, smooth = smoothquant_pass(work, SmoothQuantConfig(alpha=config.smoothquant), data=fit)
        names = {n.name: n for n in work.graph.node}
    reader = BatchReader(fit, model_inputs(work), max_batches=config.max_batches)
    if not len(reader):
        raise CalibrationError("int8: the calibration data has no batches", hint="pass calibration data with at least one batch")
    folders: list[Path] = []  # ORT's output folders of this call (a fidelity target may quantize 3 times)
    result = quantize(work, reader, config, sorted(reasons), warnings, folders)
    restored = 0
    target_report = None
    kept_float: dict[str, str] = {}
    if config.target is not None:
        from compress.passes.accuracy import FidelityCheck, Int8Draft, repair_int8

        meant = {n for n, node in names.items() if node.op_type in config.op_types and n not in reasons}
        restored = restore_float_inputs(copy_model(result), meant)
        others = {"minmax": ("percentile",), "percentile": ("minmax",)}.get(config.method, ("minmax", "percentile"))

        def requantize(method: str) -> onnx.ModelProto:
            again = BatchReader(fit, model_inputs(work), max_batches=config.max_batches)
            return quantize(work, again, dataclasses.replace(config, method=method, target=None), sorted(reasons), [],
                             folders)

        alternatives = {m: (lambda m=m: requantize(m)) for m in others} if config.per_tensor_method else None
        quantized = frozenset(meant & {n for n, q in quantized_nodes(result, set(config.op_types)).items() if q})
        draft = Int8Draft(work, result, quantized, method=config.method, alternatives=alternatives)
        result, kept_float, target_report = repair_int8(
            draft, FidelityCheck(model, held, also=None if shared else fit), config.target)
    if not config.quantize_outputs and target_report is None:
        meant = {n for n, node in names.items() if node.op_type in config.op_types and n not in reasons}
        restored = restore_float_inputs(result, meant)
    drop_unused_folders(folders, result)
    warnings += check_model(result, what="int8", source=model)

    op_types = set(config.op_types)
    status = quantized_nodes(result, op_types)
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
    zp_total, zp_nonzero = zero_points(result)
    after = op_counts(result)
    counts = {s: sum(1 for i in items if i["status"] == s) for s in ("quantized", "excluded", "not quantized", "kept float")}
    changes: dict[str, Any] = {
        "quantize_linear": after.get("QuantizeLinear", 0) - op_counts(model).get("QuantizeLinear", 0),
        "dequantize_linear": after.get("DequantizeLinear", 0) - op_counts(model).get("DequantizeLinear", 0),
        "nodes_quantized": counts["quantized"], "nodes_excluded": counts["excluded"],
        "nodes_not_quantized": counts["not quantized"],
        "zero_points": zp_total, "nonzero_zero_points": zp_nonzero,
        "per_channel_weight_scales": per_channel_weights(result),
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
                        items=tuple(items), config=pass_options(config, data), warnings=tuple(warnings), seconds=elapsed())
    return result, report


__all__ = ["ACTIVATION_TYPES", "CALIBRATION_METHODS", "BatchReader", "Int8Config", "check_batch", "int8_pass"]
