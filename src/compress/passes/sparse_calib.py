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

Everything is numpy; ``H`` of a 4096-wide input is 128 MiB in float64. Activations come from
the *float* model for every layer at once (one pass), not layer by layer from the already
pruned model as in the SparseGPT paper.

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


def collect_input_stats(model: onnx.ModelProto, tensors: Mapping[str, tuple[str, bool]], batches: Any) -> dict[str, InputStats]:
    """Per tensor (name -> (layout, needs the Hessian)): channel square norms and optionally X^T X.

    One ORT session with the tensors as extra outputs, streamed over ``batches``.

    Raises:
        CalibrationError: no batches, or a batch that does not fit the model.
    """
    from compress.runtime import add_outputs, load_session, run_batch

    names = list(tensors)
    sess = load_session(add_outputs(model, names), providers=("CPUExecutionProvider",))
    stats = {t: InputStats(layout=tensors[t][0]) for t in names}
    for i, feed in enumerate(batches):
        values = run_batch(sess, feed, names, batch=i)
        for t, v in values.items():
            rows = _as_rows(v, stats[t].layout)
            s = stats[t]
            sq = (rows * rows).sum(axis=0)
            s.sq_norm = sq if s.sq_norm is None else s.sq_norm + sq
            if tensors[t][1]:
                h = rows.T @ rows
                s.hessian = h if s.hessian is None else s.hessian + h
            s.tokens += rows.shape[0]
            s.batches += 1
    if not names or not any(s.batches for s in stats.values()):
        raise CalibrationError("sparsity: the calibration data has no batches",
                               hint="pass calibration batches (--calib DIR) for --sparsity-method wanda/sparsegpt")
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


def sparsify(weight: np.ndarray, op: str, axis: int, method: str, stats: InputStats | None, *,
             damp: float = 0.01, block_size: int = 128) -> tuple[np.ndarray, str]:
    """The 2:4 version of one weight by ``method``; returns ``(weight, method used)``."""
    if method == "magnitude" or stats is None:
        return prune_2_4(weight, axis), "magnitude"
    one_by_one = weight.ndim == 2 if op != "Conv" else (weight.ndim == 4 and weight.shape[2:] == (1, 1))
    if method == "sparsegpt" and one_by_one and stats.hessian is not None:
        rows, back = layer_rows(weight, op, axis)
        out = sparsegpt_2_4(rows, stats.hessian, damp=damp, block_size=block_size)
        return back(out).astype(weight.dtype), "sparsegpt"
    assert stats.sq_norm is not None
    if op == "Conv":
        moved = np.moveaxis(weight, 1, -1)  # [O, kh, kw, I]
        pruned = wanda_2_4(moved, moved.ndim - 1, stats.sq_norm)
        return np.moveaxis(pruned, -1, 1), "wanda"
    return wanda_2_4(weight, axis, stats.sq_norm), "wanda"


def needs(method: str, op: str, weight_shape: Sequence[int]) -> bool:
    """Whether ``method`` needs X^T X for this layer (SparseGPT on MatMul/Gemm/1x1 Conv)."""
    if op == "Conv":
        return method == "sparsegpt" and len(weight_shape) == 4 and tuple(weight_shape[2:]) == (1, 1)
    return method == "sparsegpt" and len(weight_shape) == 2


__all__ = ["METHODS", "InputStats", "collect_input_stats", "mask_2_4", "sparsegpt_2_4", "sparsify", "wanda_2_4"]
