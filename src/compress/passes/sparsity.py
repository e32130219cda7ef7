"""2:4 structured sparsity of MatMul/Gemm/Conv weights (the ``sparsity-2:4`` pass).

In every group of 4 consecutive weights along the layer's **input** (reduction) dimension
2 become 0: by default (``method="magnitude"``) the 2 smallest magnitudes (ties: the lower
index is zeroed first); ``wanda`` and ``sparsegpt`` choose them from calibration data
(:mod:`compress.passes.sparse_calib`; SparseGPT also updates the kept weights, with its
dampening chosen per layer by held-out layer error), padding tokens left out of the
statistics (``token_mask``), optionally wave by wave from the already pruned model
(``sequential``; the report's ``calibration_passes`` counts the ORT passes). That is the
layout TensorRT's sparse tensor-core tactics use and the one ``polygraphy inspect
sparsity`` checks:

- ``MatMul(A, B)`` with a constant ``B[..., K, N]``: groups along K (axis -2; axis 0 of 2-D B);
- ``Gemm(A, B)``: along K = axis 1 of B if ``transB`` else axis 0;
- ``Conv(X, W[O, I/group, kh, kw])``: along the input channels (axis 1), per (o, kh, kw).

A layer is skipped, with the reason in the report, when its weight is not a constant
initializer (computed at runtime, or the constant is MatMul's A input), is not float, is
excluded by name, has an input dim that is not a multiple of 4, has fewer than
``min_channels`` input or output channels, or is shared with another node that cannot be
pruned the same way (pruning it would change that node too).

``min_channels`` defaults to 256: NVIDIA engineers answering "no speedup with 2:4" reports
(TensorRT issues #4065, #1403, #4694) say sparse tactics pay off only for large layers
(convolutions with >= 256 channels); below that TensorRT picks dense kernels and the
pruning costs accuracy for nothing. Set it to 0 to prune every eligible layer.

Pruning without fine-tuning changes outputs. With a fidelity ``target`` the pass measures
every pruned layer's local error (its output with only its weight pruned, one ORT pass over
held-out calibration batches) and keeps the costliest layers dense until the model's
fidelity holds (:func:`compress.passes.accuracy.search_fallback`); the report gives
``sparse_fraction``, the share of the considered layers' weights made zero. No speedup shows on ONNX Runtime CPU; only TensorRT on an Ampere or
newer GPU runs sparse kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from compress.errors import CalibrationError, ConfigError
from compress.external import array_tensor, read_array
from compress.graph import GraphIndex
from compress.passes.accuracy import FidelityCheck, TargetConfig
from compress.passes.base import (
    PassReport,
    constants_to_initializers,
    copy_model,
    name_nodes,
    op_counts,
    pass_options,
    register_pass,
    timer,
)
from compress.passes.nm import is_2_4_sparse, prune_2_4

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True, kw_only=True)
class SparsityConfig:
    """Options of the ``sparsity-2:4`` pass.

    Attributes:
        min_channels: skip layers with fewer input or output channels than this (default
            256, see the module docstring); 0 prunes every eligible layer.
        op_types: which of MatMul, Gemm, Conv to prune.
        exclude_nodes: node names never pruned.
        method: how the 2 of every 4 weights are chosen: ``magnitude`` (the smallest |w|,
            no data), ``wanda`` (|w| times the input channel's activation norm) or
            ``sparsegpt`` (one-shot OBS with compensation of the kept weights); the last two
            need calibration data (:mod:`compress.passes.sparse_calib`).
        target: a fidelity target (:class:`~compress.passes.accuracy.TargetConfig`): the
            layers whose 2:4 costs the most (local error on held-out batches) stay dense
            until it holds; FidelityTargetError otherwise. None: no target.
        damp: SparseGPT's dampening of ``H`` (share of its mean diagonal); None (default):
            chosen per layer from :data:`~compress.passes.sparse_calib.DAMP_GRID` by the
            layer's output error on the odd calibration batches with ``H`` of the even ones
            (:func:`~compress.passes.sparse_calib.choose_damp`).
        block_size: SparseGPT's lazy-update block (input channels, a multiple of 4).
        sequential: ``wanda``/``sparsegpt`` take each layer's input statistics from the model
            with the layers before it already pruned (as both papers do), in waves: one ORT
            pass over the calibration batches per set of layers whose inputs no unpruned
            layer feeds. False (default): one pass of the float model for all layers.
            Measured on all-MiniLM-L6-v2 and EfficientNet-Lite0 (``benchmarks/bench_build.py``)
            sequential moved SparseGPT's loss by at most 0.013 of magnitude's and made Wanda's
            worse, at 1.5x (SparseGPT) to 17x (Wanda) the pass time.
        token_mask: the model input holding the padding mask, ``auto`` (found by name and
            type, :func:`compress.scoring.find_token_mask`) or ``none``: wanda/sparsegpt leave
            padding tokens out of the activation statistics where the mask fits the tensor.
    """

    min_channels: int = 256
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    exclude_nodes: tuple[str, ...] = ()
    method: str = "magnitude"
    target: TargetConfig | None = None
    damp: float | None = None
    block_size: int = 128
    sequential: bool = False
    token_mask: str = "auto"

    def __post_init__(self) -> None:
        from compress.passes.sparse_calib import METHODS
        from compress.validate import Interval, check_choice, check_int, check_number

        check_choice("SparsityConfig", "method", self.method, METHODS)
        if self.damp is not None:
            check_number("SparsityConfig", "damp", self.damp, within=Interval(0, 1, low_open=True), example="0.01")
        check_int("SparsityConfig", "block_size", self.block_size, within=Interval(4, 1 << 16), example="128")
        if self.block_size % 4:
            raise ConfigError(f"sparsity: block_size must be a multiple of 4, got {self.block_size}", hint="e.g. 128")
        if self.min_channels < 0:
            raise ConfigError(f"sparsity: min_channels must be >= 0, got {self.min_channels}", hint="e.g. 0 to sparsify every layer")
        bad = [t for t in self.op_types if t not in ("MatMul", "Gemm", "Conv")]
        if bad or not self.op_types:
            raise ConfigError(f"sparsity: op_types must be some of MatMul, Gemm, Conv, got {', '.join(self.op_types) or 'none'}",
                              hint="e.g. op_types=('MatMul', 'Gemm', 'Conv')")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options for the pass report (:func:`~compress.passes.base.pass_options` adds the data)."""
        return {"min_channels": self.min_channels, "op_types": list(self.op_types),
                "exclude_nodes": list(self.exclude_nodes), "pattern": "2:4", "method": self.method,
                "target": None if self.target is None else dataclasses.asdict(self.target),
                "damp": self.damp, "block_size": self.block_size, "sequential": self.sequential,
                "token_mask": self.token_mask}


@dataclass
class _Layer:
    key: str
    op: str
    weight: str | None
    axis: int | None = None
    shape: tuple[int, ...] = ()
    channels: tuple[int, int] = (0, 0)  # (input, output)
    code: str | None = None  # None: prunable
    reason: str | None = None

    def skip(self, code: str, reason: str) -> None:
        if self.code is None:
            self.code, self.reason = code, reason


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _describe_source(index: GraphIndex, name: str) -> str:
    key = index.producer.get(name)
    if key is not None:
        return f"computed by {index.node_by_key[key].op_type} node '{key}'"
    if name in index.graph_inputs:
        return "a graph input"
    return "not found"


def _layer(key: str, node: onnx.NodeProto, index: GraphIndex, config: SparsityConfig) -> _Layer:
    a, b = (node.input[0], node.input[1]) if len(node.input) > 1 else (node.input[0], "")
    inits = index.initializers
    if b not in inits:
        layer = _Layer(key, node.op_type, b or None)
        if node.op_type == "MatMul" and a in inits:
            layer.skip("not_constant", "the constant is MatMul's A input; only B weights [K, N] are pruned")
        elif node.op_type == "MatMul" and a not in index.constants and b not in index.constants:
            layer.skip("not_constant", "no constant weight (both inputs are computed at runtime)")
        else:
            layer.skip("not_constant", f"weight '{b}' is not a constant initializer ({_describe_source(index, b)})")
        return layer
    t = inits[b]
    shape = tuple(int(d) for d in t.dims)
    layer = _Layer(key, node.op_type, b, shape=shape)
    rank = len(shape)
    if node.op_type == "MatMul":
        if rank < 2:
            layer.skip("rank", f"weight has rank {rank}; 2:4 needs a [K, N] matrix")
            return layer
        layer.axis, layer.channels = rank - 2, (shape[-2], shape[-1])
    elif node.op_type == "Gemm":
        trans = _attr(node, "transB", 0)
        layer.axis, layer.channels = (1, (shape[1], shape[0])) if trans else (0, (shape[0], shape[1]))
    else:  # Conv
        if rank < 3:
            layer.skip("rank", f"weight has rank {rank}; expected [O, I/group, k...]")
            return layer
        layer.axis, layer.channels = 1, (shape[1], shape[0])
    if key in config.exclude_nodes:
        layer.skip("excluded", "excluded by name")
    if t.data_type not in _FLOAT_TYPES:
        name = onnx.TensorProto.DataType.Name(t.data_type).lower()
        layer.skip("dtype", f"weight is {name}, not float (prune before quantizing)")
    k, n = layer.channels
    if k % 4:
        layer.skip("not_multiple_of_4", f"input dim {k} (axis {layer.axis}) is not a multiple of 4")
    if min(k, n) < config.min_channels:
        layer.skip("too_small", f"{k} input / {n} output channels < min_channels={config.min_channels} "
                                "(2:4 kernels pay off only on large layers)")
    uses = [i for i, x in enumerate(node.input) if x == b]
    if uses != [1]:
        layer.skip("shared", f"weight '{b}' is read at inputs {uses} of the same node")
    return layer


def _resolve_shared(layers: list[_Layer], index: GraphIndex) -> None:
    by_weight: dict[str, list[_Layer]] = {}
    for layer in layers:
        if layer.weight is not None and layer.weight in index.initializers:
            by_weight.setdefault(layer.weight, []).append(layer)
    for weight, group in by_weight.items():
        readers = index.consumers.get(weight, [])
        if len(readers) <= 1:
            continue
        ours = {layer.key for layer in group}
        axes = {layer.axis for layer in group}
        ok = set(readers) <= ours and len(axes) == 1 and all(layer.code is None for layer in group)
        if ok:
            continue
        others = ", ".join(f"'{r}' ({index.node_by_key[r].op_type})" for r in readers[:4])
        more = f" and {len(readers) - 4} more" if len(readers) > 4 else ""
        for layer in group:
            layer.skip("shared", f"weight '{weight}' is shared by {len(readers)} nodes ({others}{more}) "
                                 "that cannot all be pruned the same way")


def _zeros(arr: np.ndarray) -> float:
    return float((arr == 0).mean()) if arr.size else 0.0


def _summary(layers: list[_Layer], elements: int, weights: int, index: GraphIndex, dense: Mapping[str, str],
             target: Mapping[str, Any] | None) -> dict[str, Any]:
    by_code: dict[str, int] = {}
    for layer in layers:
        if layer.code is not None:
            by_code[layer.code] = by_code.get(layer.code, 0) + 1
    pruned = sum(1 for layer in layers if layer.code is None and layer.weight not in dense)
    total = 0
    for w in {layer.weight for layer in layers if layer.weight in index.initializers}:
        total += int(np.prod(index.initializers[w].dims))
    out = {"layers_considered": len(layers), "layers_pruned": pruned,
           "layers_skipped": sum(1 for layer in layers if layer.code is not None),
           "layers_kept_dense": sum(1 for layer in layers if layer.code is None and layer.weight in dense),
           "skipped_by_reason": by_code, "weights_pruned": weights, "elements_zeroed": elements,
           "sparse_fraction": elements / total if total else 0.0}
    if target is not None:
        out["target"] = dict(target)
    return out


def _stat_tensors(index: GraphIndex, layers: list[_Layer], config: SparsityConfig) -> dict[str, tuple[str, bool]]:
    """Input tensor -> (layout, needs X^T X) of the prunable layers that wanda/sparsegpt use."""
    from compress.passes.sparse_calib import needs

    wanted: dict[str, tuple[str, bool]] = {}
    for layer in layers:
        if layer.code is not None:
            continue
        node = index.node_by_key[layer.key]
        if node.op_type == "Conv" and _attr(node, "group", 1) != 1:
            continue  # grouped: input channels of a weight row are a slice of the activation; magnitude
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            continue
        x = node.input[0]
        layout = "nchw" if node.op_type == "Conv" else "last"
        prev = wanted.get(x, (layout, False))
        wanted[x] = (layout, prev[1] or needs(config.method, node.op_type, layer.shape))
    return wanted


def _waves(index: GraphIndex, layers: list[_Layer]) -> list[list[_Layer]]:
    """The prunable layers in waves: a layer's wave comes after every prunable layer upstream of its input.

    All layers of a wave can take their input statistics from one pass of the model with the
    earlier waves pruned (a layer never feeds another layer of its own wave).
    """
    todo = [layer for layer in layers if layer.code is None and layer.weight is not None]
    bit = {layer.key: 1 << i for i, layer in enumerate(todo)}
    upstream: dict[str, int] = {}  # tensor -> bitmask of the prunable layers it depends on
    for key in index.keys:
        node = index.node_by_key[key]
        mask = 0
        for x in node.input:
            mask |= upstream.get(x, 0)
        mask |= bit.get(key, 0)
        for y in node.output:
            upstream[y] = mask
    waves: list[list[_Layer]] = []
    while todo:
        pending = 0
        for layer in todo:
            pending |= bit[layer.key]
        ready = [layer for layer in todo if not upstream.get(index.node_by_key[layer.key].input[0], 0) & pending]
        if not ready:  # cannot happen in a topologically sorted graph; prune the rest together
            ready = list(todo)
        waves.append(ready)
        todo = [layer for layer in todo if layer not in ready]
    return waves


def _meet_target(check: FidelityCheck, out: onnx.ModelProto, originals: Mapping[str, onnx.TensorProto],
                 layers: list[_Layer], index: GraphIndex,
                 target: TargetConfig) -> tuple[onnx.ModelProto, dict[str, str], dict[str, Any]]:
    """Restore the pruned weights with the largest local error until the target holds (as ``check`` measures).

    ``out``: the pruned model; ``originals``: each pruned weight's initializer before pruning
    (its keys are the weights pruned). Returns the model, weight -> why it was kept dense,
    and the report. Does not modify ``out``.
    """
    from compress.passes.accuracy import (
        Fallback,
        FidelityTargetError,
        Variant,
        kept_reasons,
        local_errors,
        search_fallback,
    )

    model = check.reference
    ref = copy_model(model)
    name_nodes(ref)
    names = [n.name for n in ref.graph.node]
    pruned = {t.name: t for t in out.graph.initializer if t.name in originals}
    variants: dict[str, Variant] = {}
    node_of: dict[str, str] = {}
    for layer in layers:
        if layer.weight is None or layer.weight not in originals or layer.weight in node_of.values():
            continue
        name = names[index.position[layer.key]]
        node = ref.graph.node[index.position[layer.key]]
        sparse = onnx.TensorProto()
        sparse.CopyFrom(pruned[layer.weight])
        sparse.name = f"{layer.weight}__2_4"
        inputs = tuple(sparse.name if x == layer.weight else x for x in node.input)
        variants[name] = Variant(inputs, (), (sparse,))
        node_of[name] = layer.weight
    held_list = check.held if hasattr(check.held, "__len__") else list(check.held)
    errors = local_errors(ref, variants, held_list)
    ranking = sorted(errors, key=lambda n: (-errors[n]["rel_error"], n))

    def make(kept: Any) -> onnx.ModelProto:
        restored = copy_model(out)
        back = {node_of[n] for n in kept}
        for t in restored.graph.initializer:
            if t.name in back:
                t.CopyFrom(originals[t.name])
        return restored

    report: dict[str, Any] = {"local_error": [{"node": n, "weight": node_of[n], **errors[n]} for n in ranking]}
    try:
        final, kept, search = search_fallback(Fallback(ranking, make, what="sparsity-2:4", unit="kept dense"),
                                              FidelityCheck(model, held_list, check.also), target)
    except FidelityTargetError as exc:
        raise FidelityTargetError(exc.message, hint=exc.hint, report={**report, **exc.report}) from None
    report.update(search)
    reasons = kept_reasons(kept, search, errors, verb="kept dense")
    return final, {node_of[n]: reasons[n] for n in kept}, report


@register_pass("sparsity-2:4", config=SparsityConfig, kind="sparsity",
               summary="2:4 structured sparsity of MatMul/Gemm/Conv weights along their input dim")
def sparsity_pass(model: onnx.ModelProto, config: SparsityConfig, *,
                  data: Any = None) -> tuple[onnx.ModelProto, PassReport]:
    """Prune ``model``'s MatMul/Gemm/Conv weights to 2:4 sparsity. Does not modify ``model``.

    ``data``: calibration batches or a CalibrationSet, for ``wanda``/``sparsegpt`` and a
    ``target`` (None: magnitude without a target only).

    Weights are read, pruned and written back one at a time (new values go to the spill
    file, :func:`compress.external.array_tensor`); untouched weights keep their references.
    Float ``Constant`` nodes become initializers first (:func:`~compress.passes.base.constants_to_initializers`:
    Paddle-style exports keep their weights there). Returns the pruned model (otherwise only
    initializer values change) and a report with one entry
    per considered layer: ``status`` pruned or skipped, ``reason``/``code`` for skips, the
    weight, its shape and the group axis, the share of zeros before and after.

    Raises:
        ConfigError: ``exclude_nodes`` names a node the model does not have.
    """
    elapsed = timer()
    source, moved = model, []
    if any(n.op_type == "Constant" for n in model.graph.node):
        model = copy_model(model)
        moved = constants_to_initializers(model)  # weights stored as Constant nodes (Paddle, caffe2 exports)
    index = GraphIndex(model)
    missing = [n for n in config.exclude_nodes if n not in index.node_by_key]
    if missing:
        raise ConfigError(f"sparsity: exclude list names unknown node(s): {', '.join(missing)}",
                          hint="use node names as 'compress inspect' or Netron show them")
    layers = [_layer(k, n, index, config) for k, n in index.node_by_key.items() if n.op_type in config.op_types]
    _resolve_shared(layers, index)

    fit, held, shared = data, None, True
    warnings: list[str] = []
    if moved:
        warnings.append(f"{len(moved)} float Constant node(s) made initializers so their weights can be pruned "
                        f"(e.g. '{moved[0]}')")
    if config.target is not None:
        if data is None:
            raise CalibrationError("sparsity: a fidelity target needs calibration data",
                                   hint="pass --calib DIR, or turn the target off (--target-fidelity none)")
        from compress.passes.accuracy import split_holdout

        fit, held, shared = split_holdout(data, config.target.holdout)
        if shared:
            warnings.append("one calibration batch: the fidelity target is measured on the batch the masks came from")
    if config.method != "magnitude" and fit is None:
        raise CalibrationError(f"sparsity: method {config.method} needs calibration data",
                               hint="pass --calib DIR, or use --sparsity-method magnitude")
    wanted = _stat_tensors(index, layers, config) if config.method != "magnitude" else {}
    mask_input, mask_how = None, None
    if wanted:
        from compress.scoring.collect import find_token_mask

        mask_input, mask_how = find_token_mask(model, config.token_mask)
    if config.sequential and wanted:
        waves = _waves(index, layers)
        if len(waves) > 1 and not hasattr(fit, "__len__") and iter(fit) is fit:
            fit = list(fit)  # a one-shot iterator: kept for the waves' passes
    else:
        waves = [[layer for layer in layers if layer.code is None and layer.weight is not None]]
    from compress.log import progress
    from compress.passes.sparse_calib import MaskMethod, collect_input_stats, sparsify

    how = MaskMethod(config.method, config.damp, config.block_size)

    out = copy_model(model)
    position = {t.name: i for i, t in enumerate(out.graph.initializer)}
    done: dict[str, tuple[float, float]] = {}
    used: dict[str, dict[str, Any]] = {}
    originals: dict[str, onnx.TensorProto] = {}
    zeroed: dict[str, int] = {}
    elements = 0
    stats_passes = 0
    for wave in progress(waves, desc=f"2:4 {config.method}", total=len(waves)) if len(waves) > 1 else waves:
        tensors = {x: wanted[x] for x in dict.fromkeys(index.node_by_key[w.key].input[0] for w in wave) if x in wanted}
        stats = collect_input_stats(out, tensors, fit, token_mask=mask_input) if tensors else {}
        stats_passes += bool(tensors)
        for layer in wave:
            if layer.weight is None or layer.weight in done:
                continue
            assert layer.axis is not None
            tensor = out.graph.initializer[position[layer.weight]]
            before = read_array(tensor)  # one weight in memory at a time (read from its file when external)
            x = index.node_by_key[layer.key].input[0]
            after, used[layer.weight] = sparsify(before, layer.op, layer.axis, stats.get(x), how)
            zeroed[layer.weight] = int(((after == 0) & (before != 0)).sum())
            elements += zeroed[layer.weight]
            originals[layer.weight] = onnx.TensorProto()
            originals[layer.weight].CopyFrom(tensor)  # a reference when external: no bytes copied
            done[layer.weight] = (_zeros(before), _zeros(after))
            tensor.CopyFrom(array_tensor(after.astype(before.dtype, copy=False), tensor.name))  # spilled when large
            del before, after
        del stats
    target_report = None
    dense: dict[str, str] = {}
    if config.target is not None and done:
        check = FidelityCheck(model, held, also=None if shared else fit)
        out, dense, target_report = _meet_target(check, out, originals, layers, index, config.target)
        for w in dense:
            elements -= zeroed[w]
    items: list[Mapping[str, Any]] = []
    for layer in layers:
        item: dict[str, Any] = {"node": layer.key, "op": layer.op, "weight": layer.weight,
                                "shape": list(layer.shape), "axis": layer.axis}
        if layer.code is None and layer.weight in dense:
            item.update(status="kept dense", reason=dense[layer.weight])
        elif layer.code is None and layer.weight in done:
            zb, za = done[layer.weight]
            item.update(status="pruned", zeros_before=round(zb, 4), zeros_after=round(za, 4),
                        **used[layer.weight])
        else:
            item.update(status="skipped", code=layer.code, reason=layer.reason)
        items.append(item)
    if target_report is not None and target_report.get("warning"):
        warnings.append(f"fidelity target: {target_report['warning']}")
    skipped = [layer for layer in layers if layer.code is not None and layer.code != "not_constant"]
    if skipped:
        warnings.append(f"{len(skipped)} weight layer(s) skipped (see items for reasons)")
    report = PassReport(name="sparsity-2:4", nodes_before=op_counts(source), nodes_after=op_counts(out),
                        changes={**_summary(layers, elements, len(done) - len(dense), index, dense, target_report),
                                 "calibration_passes": stats_passes, "token_mask": mask_how},
                        items=tuple(items),
                        config=pass_options(config, data), warnings=tuple(warnings), seconds=elapsed())
    return out, report


__all__ = ["SparsityConfig", "is_2_4_sparse", "prune_2_4", "sparsity_pass"]
