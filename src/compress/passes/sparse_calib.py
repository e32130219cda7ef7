"""2:4 masks from calibration data: Wanda and SparseGPT (used by the ``sparsity-2:4`` pass).

Both need the inputs of every pruned layer on calibration data; they are collected in one
ONNX Runtime run per batch (the layers' input activations as extra graph outputs) and
reduced on the fly, so no activation outlives its batch:

- **Wanda** (Sun et al., 2023): the importance of weight ``W[k, n]`` (``k`` = input channel)
  is ``|W[k, n]| * ||X_k||_2``, the input channel's L2 norm over all calibration tokens
  (for Conv: over batch and pixels). In every group of 4 consecutive input channels the 2
  least important weights (per output channel, per kernel tap) become 0. The weights that
  stay are not changed.
- **SparseGPT** (Frantar & Alistarh, 2023): one-shot optimal brain surgeon. With
  ``H = X^T X`` accumulated per layer input in float64 (``X``: all calibration tokens,
  ``[tokens, K]``; dampened by ``damp * mean(diag H)``), the input channels are visited in
  order; at the start of every group of 4 the 2 weights of each output channel with the
  least ``w^2 / [H^-1]_kk^2`` (from the Cholesky factor of ``H^-1``) are chosen, each pruned
  weight's error is spread over the not yet visited input channels through ``H^-1``, lazily
  in blocks of ``block_size`` channels. The surviving weights change to compensate.
  Applies to MatMul/Gemm and to 1x1 Conv (group 1); other Conv layers use Wanda (the
  report says so).

Everything is numpy; ``H`` of a 4096-wide input is 128 MiB in float64. :func:`collect_input_stats`
runs whatever model it is given: the ``sparsity-2:4`` pass gives it the model with the layers
upstream already pruned (sequential, as in both papers), or the float model once for all
layers (``sequential=False``).

``onnxsim`` 0.8.1 (PyPI) ships ONNX-level ``apply_wanda_pruning`` / ``apply_sparsegpt_pruning``
with ``n=2, m=4``; measured side by side on all-MiniLM-L6-v2 (4 calibration batches of 8 x 128
tokens, output cosine vs FP32 on 4 other batches, 2 shared cores): its Wanda gave exactly the
magnitude result (cosine 0.7084: it only takes activation norms of 2-D MatMul inputs, and
BERT's are 3-D), its SparseGPT the same weights as this module (cosine 0.8581) in 425 s
against 71 s here; neither has a fidelity target or per-layer fallback. It is not a dependency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from compress.errors import BuildError, CalibrationError
from compress.passes.nm import mask_2_4, prune_2_4

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class InputStats:
    """Statistics of one layer input tensor over the calibration tokens."""

    sq_norm: np.ndarray | None = None  # sum of x_k^2 per input channel (float64)
    hessian: np.ndarray | None = None  # X^T X (float64), only when asked for
    hessian_held: np.ndarray | None = None  # the part of ``hessian`` from the odd-numbered batches
    tokens: int = 0
    layout: str = "last"  # "last": channels on the last axis (MatMul/Gemm), "nchw": axis 1 (Conv)
    batches: int = 0
    notes: list[str] = field(default_factory=list)


def _as_rows(x: np.ndarray, layout: str) -> np.ndarray:
    """``[tokens, channels]`` view (float64) of an activation."""
    x = np.asarray(x, dtype=np.float64)
    if layout == "nchw":
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _real_rows(rows: np.ndarray, value: np.ndarray, layout: str, mask: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """The rows of the real tokens when ``mask`` ``[B, T]`` fits ``value``'s leading axes, else all rows.

    A ``last``-layout value fits as ``[B, T, C]`` or flattened ``[B*T, C]`` (batch-major);
    anything else (``[T, B, C]``, attention heads, an ``nchw`` feature map) keeps every row.
    """
    if mask is None or layout != "last":
        return rows, False
    if (value.ndim == 3 and tuple(value.shape[:2]) == tuple(mask.shape)) or (value.ndim == 2 and len(value) == mask.size):
        return rows[mask.reshape(-1)], True
    return rows, False


def collect_input_stats(model: onnx.ModelProto, tensors: Mapping[str, tuple[str, bool]], batches: Any, *,
                        token_mask: str | None = None) -> dict[str, InputStats]:
    """Per tensor (name -> (layout, needs the Hessian)): channel square norms and optionally X^T X.

    One ORT session with the tensors as extra outputs, streamed over ``batches``.
    ``token_mask``: the model input holding the padding mask (bool/int ``[batch, tokens]``,
    :func:`compress.scoring.find_token_mask`): padding tokens are left out of a tensor's
    statistics wherever the mask fits its token rows (``InputStats.notes`` says where).

    Raises:
        CalibrationError: no batches, a batch that does not fit the model, or lacks the mask.
    """
    from compress.runtime import add_outputs, load_session, run_batch
    from compress.scoring.collect import batch_mask

    names = list(tensors)
    sess = load_session(add_outputs(model, names), providers=("CPUExecutionProvider",))
    stats = {t: InputStats(layout=tensors[t][0]) for t in names}
    masked: dict[str, bool] = {}
    for i, feed in enumerate(batches):
        mask = batch_mask(feed, token_mask, batch=i)
        values = run_batch(sess, feed, names, batch=i)
        for t, v in values.items():
            s = stats[t]
            rows, used = _real_rows(_as_rows(v, s.layout), v, s.layout, mask)
            masked[t] = masked.get(t, True) and used
            sq = (rows * rows).sum(axis=0)
            s.sq_norm = sq if s.sq_norm is None else s.sq_norm + sq
            if tensors[t][1]:
                h = rows.T @ rows
                s.hessian = h if s.hessian is None else s.hessian + h
                if i % 2:
                    s.hessian_held = h if s.hessian_held is None else s.hessian_held + h
            s.tokens += rows.shape[0]
            s.batches += 1
    if not names or not any(s.batches for s in stats.values()):
        raise CalibrationError("sparsity: the calibration data has no batches",
                               hint="pass calibration batches (--calib DIR) for --sparsity-method wanda/sparsegpt")
    if token_mask is not None:
        for t, s in stats.items():
            s.notes.append(f"real tokens only ({token_mask})" if masked.get(t) else
                           f"every position: {token_mask} does not fit this tensor's rows")
    return stats


def wanda_2_4(weight: np.ndarray, axis: int, sq_norm: np.ndarray) -> np.ndarray:
    """2:4 along ``axis`` (the input channels) by ``|W| * ||X_k||``; kept weights unchanged."""
    moved = np.moveaxis(np.asarray(weight), axis, -1)  # [..., K]
    if moved.shape[-1] != sq_norm.size:
        raise BuildError(f"wanda: weight input dim {moved.shape[-1]} does not match {sq_norm.size} activation channels",
                         hint="exclude this layer (--exclude) or use --sparsity-method magnitude")
    score = np.abs(moved.astype(np.float64)) * np.sqrt(sq_norm)
    keep = mask_2_4(score)
    return np.moveaxis(np.where(keep, moved, 0).astype(moved.dtype), -1, axis)


def sparsegpt_2_4(weight_rows: np.ndarray, hessian: np.ndarray, *, damp: float = 0.01,
                  block_size: int = 128) -> np.ndarray:
    """SparseGPT 2:4 of ``weight_rows`` ``[outputs, K]`` (groups along K) for ``H = X^T X`` ``[K, K]``.

    Returns the pruned and compensated weights in float64 (exactly 2 zeros in every 4-group
    of every row, or more where weights were 0). Input channels that never fire
    (``H_kk = 0``) are pruned first (their weights cannot matter).
    """
    w = np.array(weight_rows, dtype=np.float64)
    rows, k = w.shape
    if k % 4 or block_size % 4:
        raise BuildError(f"sparsegpt: input dim {k} / block size {block_size} not a multiple of 4",
                         hint="this layer cannot be 2:4 sparse; exclude it")
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    try:
        lower = np.linalg.cholesky(h)
        inv = np.linalg.inv(lower)
        hinv = inv.T @ inv  # H^-1
        upper = np.linalg.cholesky(hinv).T  # H^-1 = upper^T upper
    except np.linalg.LinAlgError:
        raise BuildError("sparsegpt: the layer's input Hessian is not positive definite even after dampening",
                         hint="raise the dampening or use --sparsity-method wanda") from None
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        blk = w[:, b0:b1].copy()
        err = np.zeros_like(blk)
        u = upper[b0:b1, b0:b1]
        diag = np.diag(u)
        keep = np.ones_like(blk, dtype=bool)
        for i in range(b1 - b0):
            if i % 4 == 0:
                score = blk[:, i:i + 4] ** 2 / diag[i:i + 4] ** 2
                score[dead[b0 + i:b0 + i + 4][None, :].repeat(rows, 0)] = -1.0
                keep[:, i:i + 4] = mask_2_4(score)
            col = blk[:, i]
            q = np.where(keep[:, i], col, 0.0)
            e = (col - q) / u[i, i]
            blk[:, i:] -= np.outer(e, u[i, i:])
            blk[:, i] = q
            err[:, i] = e
        w[:, b0:b1] = blk
        if b1 < k:
            w[:, b1:] -= err @ upper[b0:b1, b1:]
    return w


def layer_rows(weight: np.ndarray, op: str, axis: int) -> tuple[np.ndarray, Any]:
    """``[outputs, K]`` rows of a MatMul/Gemm/1x1-Conv weight and the inverse mapping."""
    if op == "Conv":  # [O, I, 1, 1]
        shape = weight.shape
        return weight.reshape(shape[0], shape[1]), lambda r: r.reshape(shape)
    if axis == 0:  # [K, N]
        return weight.T, lambda r: r.T
    return weight, lambda r: r  # Gemm transB: [N, K]


#: SparseGPT dampenings (share of ``mean(diag H)``) that ``damp=None`` chooses from per layer.
DAMP_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)

#: Weight rows (output channels, evenly spaced) :func:`choose_damp` prunes per candidate: SparseGPT
#: solves each row on its own for a shared ``H``, so a subset estimates the whole layer's error.
DAMP_SAMPLE_ROWS = 128


def output_error(delta_rows: np.ndarray, hessian: np.ndarray) -> float:
    """``||X ΔWᵀ||²_F = tr(ΔW H ΔWᵀ)``: a weight change's squared output error on the tokens of ``H = XᵀX``."""
    return float(((delta_rows @ hessian) * delta_rows).sum())


def choose_damp(rows: np.ndarray, stats: InputStats, *, block_size: int,
                grid: Sequence[float] = DAMP_GRID) -> tuple[float, dict[str, float]]:
    """The dampening of ``grid`` whose SparseGPT result, fitted on the even batches, errs least on the odd ones.

    ``rows``: the layer's ``[outputs, K]`` weight rows. Each candidate prunes ``rows`` with
    ``H_even`` and is scored by :func:`output_error` on ``H_odd`` (relative to the
    output's energy there): held-out layer output error, no model run. Too little dampening
    overfits the few calibration tokens (``H`` of rank below K), too much ignores them.
    Only :data:`DAMP_SAMPLE_ROWS` evenly spaced rows are pruned per candidate.
    Returns ``(damp, {damp: relative error})``; without odd batches, ``(grid[0], {})``.
    """
    if stats.hessian is None or stats.hessian_held is None or not np.any(stats.hessian - stats.hessian_held):
        return float(grid[0]), {}
    fit, held = stats.hessian - stats.hessian_held, stats.hessian_held
    rows = np.asarray(rows)[:: max(1, len(rows) // DAMP_SAMPLE_ROWS)]
    base = max(output_error(np.asarray(rows, dtype=np.float64), held), 1e-30)
    errors: dict[str, float] = {}
    for d in grid:
        try:
            pruned = sparsegpt_2_4(rows, fit, damp=d, block_size=block_size)
        except BuildError:
            continue
        errors[f"{d:g}"] = output_error(pruned - rows, held) / base
    if not errors:
        return float(grid[0]), {}
    best = min(errors, key=lambda k: (errors[k], float(k)))
    return float(best), errors


@dataclass(frozen=True)
class MaskMethod:
    """How :func:`sparsify` chooses the 2 of every 4 weights.

    ``name``: one of :data:`METHODS`; ``damp``: SparseGPT's dampening (share of
    ``mean(diag H)``; None: chosen per layer, :func:`choose_damp`); ``block_size``: SparseGPT's
    lazy-update block (input channels, a multiple of 4).
    """

    name: str = "magnitude"
    damp: float | None = 0.01
    block_size: int = 128


def sparsify(weight: np.ndarray, op: str, axis: int, stats: InputStats | None,
             how: MaskMethod) -> tuple[np.ndarray, dict[str, Any]]:
    """The 2:4 version of one weight by ``how``; returns ``(weight, {"method": used, ...})``.

    ``axis``: the weight's input-channel axis; ``stats``: its input's statistics (None:
    magnitude). SparseGPT with ``how.damp=None`` picks the dampening per layer
    (:func:`choose_damp`; the dict gives ``damp`` and ``damp_errors``). Does not modify ``weight``.
    """
    method, damp, block_size = how.name, how.damp, how.block_size
    if method == "magnitude" or stats is None:
        return prune_2_4(weight, axis), {"method": "magnitude"}
    one_by_one = weight.ndim == 2 if op != "Conv" else (weight.ndim == 4 and weight.shape[2:] == (1, 1))
    if method == "sparsegpt" and one_by_one and stats.hessian is not None:
        rows, back = layer_rows(weight, op, axis)
        info: dict[str, Any] = {"method": "sparsegpt"}
        if damp is None:
            damp, info["damp_errors"] = choose_damp(rows, stats, block_size=block_size)
        info["damp"] = damp
        out = sparsegpt_2_4(rows, stats.hessian, damp=damp, block_size=block_size)
        return back(out).astype(weight.dtype), info
    assert stats.sq_norm is not None
    if op == "Conv":
        moved = np.moveaxis(weight, 1, -1)  # [O, kh, kw, I]
        pruned = wanda_2_4(moved, moved.ndim - 1, stats.sq_norm)
        return np.moveaxis(pruned, -1, 1), {"method": "wanda"}
    return wanda_2_4(weight, axis, stats.sq_norm), {"method": "wanda"}


def needs(method: str, op: str, weight_shape: Sequence[int]) -> bool:
    """Whether ``method`` needs X^T X for this layer (SparseGPT on MatMul/Gemm/1x1 Conv)."""
    if op == "Conv":
        return method == "sparsegpt" and len(weight_shape) == 4 and tuple(weight_shape[2:]) == (1, 1)
    return method == "sparsegpt" and len(weight_shape) == 2


__all__ = ["DAMP_GRID", "DAMP_SAMPLE_ROWS", "METHODS", "InputStats", "MaskMethod", "choose_damp", "collect_input_stats", "mask_2_4", "output_error",
           "sparsegpt_2_4", "sparsify", "wanda_2_4"]
