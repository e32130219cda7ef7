"""SmoothQuant (Xiao et al., 2023) as an ONNX -> ONNX pass before int8 (the ``smoothquant`` pass).

Activation outliers sit in a few channels; per-tensor activation scales then waste the int8
range on them. SmoothQuant divides each input channel ``j`` of a linear layer's activation
by ``s_j`` and multiplies row ``j`` of the weight by ``s_j``, which leaves ``X @ W`` unchanged:

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)

``max|X_j|`` comes from the calibration data (all consumers' activation tensors as extra
outputs of one ONNX Runtime pass), ``max|W_j,:|`` over every layer that reads the tensor
(they must share ``s``). ``alpha`` (default 0.5) moves the difficulty from the activations
(alpha -> 1) to the weights (alpha -> 0).

Per activation tensor ``X`` read by MatMul (constant B ``[K, N]``) / Gemm (constant B)
layers, the division is put where it is exact:

- ``layernorm``: ``X`` is made by a LayerNormalization with constant scale (and bias) that
  no other node reads, and every consumer of ``X`` is a smoothed layer: scale and bias are
  divided by ``s``;
- ``matmul``: ``X`` is ``MatMul(A, W0)`` (optionally ``+ b``) with constant ``W0``/``b`` read by
  nobody else, and every consumer of ``X`` is a smoothed layer: column ``j`` of ``W0`` and
  ``b_j`` are divided by ``s_j``;
- ``mul``: otherwise an explicit per-channel ``Mul(X, 1/s)`` feeds the smoothed layers (other
  consumers keep reading ``X``; e.g. the residual branch of a post-LN transformer).

Outputs are unchanged in exact arithmetic; in FP32 up to rounding (the tests check 1e-5).
Layers whose weight another node shares, or whose input dim does not match, are skipped
with the reason. Does not modify its input. Weights are read and rewritten one at a time
(:func:`compress.external.read_array` / :func:`~compress.external.array_tensor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from compress.errors import CalibrationError, ConfigError
from compress.external import array_tensor, read_array
from compress.graph import GraphIndex
from compress.log import logger
from compress.passes.base import PassReport, copy_model, op_counts, pass_options, register_pass, timer


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig:
    """Options of the ``smoothquant`` pass.

    Attributes:
        alpha: migration strength in [0, 1].
        op_types: layer types smoothed (MatMul with a constant B, Gemm with a constant B).
        exclude_nodes: layers never smoothed.
    """

    alpha: float = 0.5
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    exclude_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from compress.validate import Interval, check_number

        check_number("SmoothQuantConfig", "alpha", self.alpha, within=Interval(0, 1), example="0.5")
        bad = [t for t in self.op_types if t not in ("MatMul", "Gemm")]
        if bad or not self.op_types:
            raise ConfigError(f"smoothquant: op_types must be some of MatMul, Gemm, got {', '.join(self.op_types) or 'none'}",
                              hint="e.g. op_types=('MatMul', 'Gemm')")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options for the pass report (:func:`~compress.passes.base.pass_options` adds the data)."""
        return {"alpha": self.alpha, "op_types": list(self.op_types), "exclude_nodes": list(self.exclude_nodes)}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _layer_axis(node: onnx.NodeProto, index: GraphIndex) -> tuple[str, int] | None:
    """(weight name, its input-channel axis) of a smoothable layer, else None."""
    if len(node.input) < 2 or node.input[1] not in index.initializers or node.input[0] in index.constants:
        return None
    dims = tuple(index.initializers[node.input[1]].dims)
    if node.op_type == "MatMul":
        return (node.input[1], 0) if len(dims) == 2 else None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return None
        return node.input[1], (1 if _attr(node, "transB", 0) else 0)
    return None


def _row_maxima(weight: onnx.TensorProto, axis: int, channels: int) -> np.ndarray:
    """The max |W| per input channel (``axis``) of one weight, read from its file when external."""
    arr = read_array(weight)
    return np.abs(np.moveaxis(arr, axis, 0).reshape(channels, -1)).max(axis=1)


def channel_maxima(model: onnx.ModelProto, tensors: Sequence[str], batches: Any) -> dict[str, np.ndarray]:
    """Max |x| per last-axis channel of each tensor over ``batches`` (one ORT pass, extra outputs)."""
    from compress.runtime import add_outputs, load_session, run_batch

    sess = load_session(add_outputs(model, tensors), providers=("CPUExecutionProvider",))
    out: dict[str, np.ndarray] = {}
    count = 0
    for i, feed in enumerate(batches):
        values = run_batch(sess, feed, list(tensors), batch=i)
        count += 1
        for t, v in values.items():
            m = np.abs(np.asarray(v, dtype=np.float64)).reshape(-1, v.shape[-1]).max(axis=0)
            out[t] = m if t not in out else np.maximum(out[t], m)
    if not count:
        raise CalibrationError("smoothquant: the calibration data has no batches", hint="pass calibration batches")
    return out


@register_pass("smoothquant", config=SmoothQuantConfig, kind="precision", needs_calibration=True,
               summary="SmoothQuant: migrate activation outliers into the weights (exact), before int8")
def smoothquant_pass(model: onnx.ModelProto, config: SmoothQuantConfig, *,
                     data: Any = None) -> tuple[onnx.ModelProto, PassReport]:
    """Smooth the activations of ``model``'s MatMul/Gemm layers. Does not modify ``model``.

    ``data``: calibration batches (input name -> array) or a CalibrationSet; required.

    Returns the smoothed model and a report: one item per activation tensor with its
    consumers, how ``s`` was applied (``layernorm`` / ``matmul`` / ``mul``) and the outlier
    ratio (max / median of the channel maxima) before and after; skipped layers with reasons.

    Raises:
        CalibrationError: no calibration data.
        ConfigError: ``exclude_nodes`` names a node the model does not have.
    """
    elapsed = timer()
    if data is None:
        raise CalibrationError("smoothquant needs calibration data", hint="pass --calib with .npz batches")
    out = copy_model(model)
    index = GraphIndex(out)
    missing = [n for n in config.exclude_nodes if n not in index.node_by_key]
    if missing:
        raise ConfigError(f"smoothquant: exclude list names unknown node(s): {', '.join(missing)}",
                          hint="use node names as 'compress inspect' or Netron show them")
    groups: dict[str, list[tuple[str, str, int]]] = {}
    skipped: list[dict[str, Any]] = []
    for key, node in index.node_by_key.items():
        if node.op_type not in config.op_types or key in config.exclude_nodes:
            continue
        found = _layer_axis(node, index)
        if found is None:
            continue
        weight, axis = found
        readers = index.consumers.get(weight, [])
        if readers != [key]:
            skipped.append({"node": key, "status": "skipped", "reason": f"weight '{weight}' is shared by {len(readers)} nodes"})
            continue
        groups.setdefault(node.input[0], []).append((key, weight, axis))
    maxima = channel_maxima(out, list(groups), data) if groups else {}
    inits = {t.name: t for t in out.graph.initializer}
    new_nodes: list[tuple[int, onnx.NodeProto]] = []
    items: list[dict[str, Any]] = []
    how_count: dict[str, int] = {}
    for x, layers in groups.items():
        act = maxima[x]
        if any(inits[w].dims[axis] != act.size for _, w, axis in layers):
            skipped += [{"node": k, "status": "skipped", "reason": f"input dim of '{w}' does not match the {act.size} channels of '{x}'"}
                        for k, w, _ in layers]
            continue
        wmax = np.max([_row_maxima(inits[w], axis, act.size) for _, w, axis in layers], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(act, config.alpha) / np.power(wmax, 1.0 - config.alpha)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        s = np.clip(s, 1e-5, 1e5)
        for _, w, axis in layers:  # one weight in memory at a time; the scaled one is spilled when large
            weight_array = read_array(inits[w])
            shape = [1] * weight_array.ndim
            shape[axis] = act.size
            inits[w].CopyFrom(array_tensor((weight_array.astype(np.float64) * s.reshape(shape)).astype(weight_array.dtype), w))
            del weight_array
        keys = {k for k, _, _ in layers}
        how = _fold(out, index, inits, x, keys, s)
        if how is None:
            how = "mul"
            scale_name = f"{x}__smooth_scale"
            smoothed = f"{x}__smoothed"
            out.graph.initializer.append(array_tensor((1.0 / s).astype(np.float32), scale_name))
            mul = onnx.helper.make_node("Mul", [x, scale_name], [smoothed], name=f"{x}__smooth")
            for k in keys:
                node = index.node_by_key[k]
                node.input[0] = smoothed
            pos = index.position[index.producer[x]] + 1 if x in index.producer else 0
            new_nodes.append((pos, mul))
        how_count[how] = how_count.get(how, 0) + 1
        med = float(np.median(act)) or 1.0
        after = act / s
        items.append({"tensor": x, "nodes": sorted(keys), "status": "smoothed", "applied": how,
                      "outlier_ratio_before": float(act.max() / med),
                      "outlier_ratio_after": float(after.max() / (float(np.median(after)) or 1.0)),
                      "scale_min": float(s.min()), "scale_max": float(s.max())})
    for pos, node in sorted(new_nodes, key=lambda p: -p[0]):
        out.graph.node.insert(pos, node)
    logger.info("smoothquant: %d activation tensors smoothed (%s)", len(items),
                ", ".join(f"{k} {v}" for k, v in sorted(how_count.items())) or "none")
    changes = {"tensors_smoothed": len(items), "layers_smoothed": sum(len(i["nodes"]) for i in items),
               "layers_skipped": len(skipped), "applied": how_count}
    warnings = (f"{len(skipped)} layer(s) not smoothed (see items)",) if skipped else ()
    report = PassReport(name="smoothquant", nodes_before=op_counts(model), nodes_after=op_counts(out), changes=changes,
                        items=tuple(items + skipped), config=pass_options(config, data), warnings=warnings, seconds=elapsed())
    return out, report


def _only_reader(index: GraphIndex, tensor: str, key: str) -> bool:
    return index.consumers.get(tensor, []) == [key]


def _fold(model: onnx.ModelProto, index: GraphIndex, inits: dict[str, onnx.TensorProto], x: str,
          keys: set[str], s: np.ndarray) -> str | None:
    """Divide ``x`` by ``s`` inside its producer where exact; the way it was done, or None."""
    if x in index.graph_outputs or set(index.consumers.get(x, [])) != keys or x not in index.producer:
        return None
    pkey = index.producer[x]
    prod = index.node_by_key[pkey]

    def scale(name: str, axis: int = -1) -> None:
        arr = read_array(inits[name]).astype(np.float64)
        shape = [1] * arr.ndim
        shape[axis] = s.size
        inits[name].CopyFrom(array_tensor((arr / s.reshape(shape)).astype(np.float32), name))

    def ok_const(name: str, owner: str, *, last: int | None = None) -> bool:
        t = inits.get(name)
        return (t is not None and t.data_type == onnx.TensorProto.FLOAT and _only_reader(index, name, owner)
                and len(t.dims) >= 1 and t.dims[-1 if last is None else last] == s.size)

    if prod.op_type == "LayerNormalization":
        if _attr(prod, "axis", -1) != -1 or prod.output[0] != x:
            return None
        names = [n for n in prod.input[1:3] if n]
        if names and all(ok_const(n, pkey) and len(inits[n].dims) == 1 for n in names):
            for n in names:
                scale(n)
            return "layernorm"
        return None
    bias = None
    mm = prod
    mkey = pkey
    if prod.op_type == "Add":
        a, b = prod.input[0], prod.input[1]
        const = b if b in inits else a if a in inits else None
        other = a if const == b else b
        if const is None or other not in index.producer or not ok_const(const, pkey):
            return None
        mkey = index.producer[other]
        mm = index.node_by_key[mkey]
        if mm.op_type != "MatMul" or not _only_reader(index, other, pkey):
            return None
        bias = const
    if mm.op_type != "MatMul" or len(mm.input) < 2 or not ok_const(mm.input[1], mkey) or len(inits[mm.input[1]].dims) != 2:
        return None
    scale(mm.input[1])
    if bias is not None:
        scale(bias)
    return "matmul"


__all__ = ["SmoothQuantConfig", "channel_maxima", "smoothquant_pass"]
