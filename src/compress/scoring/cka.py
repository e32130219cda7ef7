"""The ``cka`` metric: linear CKA between block boundaries, and the Fisher segmentation.

:func:`minibatch_hsic` is the unbiased HSIC estimator over minibatches; :class:`CkaAccumulator`
pools token (or sample) rows per token range and scores a span by ``1 - CKA`` of its two
ends (the estimator, the rows and the cost are in :mod:`compress.scoring.metrics`).
Importing this module registers the metric. Activations are read, never modified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from compress.errors import BlockError, CalibrationError, ConfigError
from compress.scoring.activations import BlockActivations, masked_view, token_view
from compress.scoring.base import _CHUNK_ELEMENTS, BoundaryAccumulator, MetricResult, _combine, _ranges, register_metric
from compress.scoring.options import _MIN_HSIC_ROWS
from compress.scoring.segment import auto_segment_count, fisher_segments, segment_losses


def minibatch_hsic(reps: Sequence[np.ndarray]) -> np.ndarray:
    """Unbiased linear-kernel HSIC (Song et al. 2012) between all pairs of representations.

    For Gram matrices ``K = X X^T`` with zeroed diagonals (``K~``), ``n`` rows::

        HSIC(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))

    Features are centred first (the estimator is invariant to it; it avoids cancellation).
    Features and Gram blocks (upper triangle only) are float32 when every input is float32
    or narrower, else float64; means and the sums over Gram entries are float64. Memory: the centred features plus a
    32 MiB scratch block.

    Args:
        reps: m arrays ``[n, D_r]`` with the same rows (n >= 4). Not modified.

    Returns:
        ``[m, m]`` float64 matrix of HSIC estimates.
    """
    n = reps[0].shape[0]
    if n < _MIN_HSIC_ROWS or any(x.shape[0] != n for x in reps):
        raise ValueError(f"minibatch_hsic needs >= 4 equal rows, got {[x.shape[0] for x in reps]}")
    work = np.float64 if any(np.dtype(x.dtype).itemsize > 4 for x in reps) else np.float32
    m = len(reps)
    centred = []
    sq = np.empty((m, n))  # squared row norms (the Gram diagonals)
    rowsum = np.empty((m, n))  # K~ 1
    total = np.empty(m)  # 1^T K~ 1
    for r, x in enumerate(reps):
        x = np.asarray(x).reshape(n, -1)
        xc = x.astype(work, copy=False) - x.mean(axis=0, dtype=np.float64).astype(work)
        col = xc.sum(axis=0, dtype=np.float64)  # ~0 after centring
        sq[r] = np.einsum("ij,ij->i", xc, xc)
        rowsum[r] = xc @ col.astype(work) - sq[r]
        total[r] = col @ col - sq[r].sum()
        centred.append(xc)
    # tr(K~_a K~_b) = <K~_a, K~_b>_F, from the upper triangle of row blocks: each block
    # [lo:hi, lo:] holds the diagonal square (counted once) and the part right of it,
    # which stands for itself and its mirror image (scaled by sqrt 2 to count twice).
    trace = np.zeros((m, m))
    step = max(1, min(n, _CHUNK_ELEMENTS // (m * n)))
    scratch = np.empty(m * step * n)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        b, w = hi - lo, n - lo
        g = scratch[: m * b * w].reshape(m, b, w)
        for r, x in enumerate(centred):
            g[r] = x[lo:hi] @ x[lo:].T
        g[:, np.arange(b), np.arange(b)] = 0.0
        g[:, :, b:] *= math.sqrt(2.0)
        flat = g.reshape(m, -1)
        trace += flat @ flat.T
    return (trace + np.outer(total, total) / ((n - 1) * (n - 2)) - (2.0 / (n - 2)) * (rowsum @ rowsum.T)) / (
        n * (n - 3)
    )


def _cka_from_hsic(h: np.ndarray) -> np.ndarray:
    """CKA matrix from mean HSIC; 0 off the diagonal where a self-HSIC is <= 0, 1 on it."""
    diag = np.diag(h).copy()
    ok = diag > 0
    root = np.sqrt(np.where(ok, diag, 1.0))
    cka = h / np.outer(root, root)
    cka[~(ok[:, None] & ok[None, :])] = 0.0
    np.fill_diagonal(cka, 1.0)
    return cka


class _CkaRange:
    """Minibatch-CKA state of one token range: a row pool and the running HSIC sum."""

    def __init__(self, m: int) -> None:
        self.pool: list[list[np.ndarray]] = [[] for _ in range(m)]
        self.rows = 0
        self.hsic_sum = np.zeros((m, m))
        self.minibatches = 0
        self.samples_mode: bool | None = None

    def add(self, rows: list[np.ndarray], min_rows: int) -> None:
        for pool, x in zip(self.pool, rows, strict=True):
            pool.append(x)
        self.rows += rows[0].shape[0]
        if self.rows >= min_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows >= _MIN_HSIC_ROWS:
            self.hsic_sum += minibatch_hsic([np.concatenate(p) if len(p) > 1 else p[0] for p in self.pool])
            self.minibatches += 1
            self.rows = 0
            self.pool = [[] for _ in self.pool]


@register_metric("cka")
class CkaAccumulator(BoundaryAccumulator):
    """Linear CKA between block boundaries (minibatch estimator) + Fisher segmentation.

    Representations: index 0 = input of block 0, index k = output of block k-1 (k = 1..L),
    then, for every block whose input is not the previous block's output (decided on the
    first batch), its input as an extra representation.
    """

    def _start(self, acts: BlockActivations) -> None:
        self.extra: dict[int, int] = {}  # block -> index of its input among the representations
        n = acts.num_blocks
        for i in range(1, n):
            a, b = acts.inputs[i], acts.outputs[i - 1]
            if a is not b and not (a.shape == b.shape and np.array_equal(a, b)):
                self.extra[i] = n + 1 + len(self.extra)
        self.states = [_CkaRange(n + 1 + len(self.extra)) for _ in _ranges(self.config)]
        self.masked = False
        self.tokens = 0  # token rows offered (real tokens when masked), before subsampling
        self.positions = 0
        self.rng = np.random.default_rng(self.config.seed)

    def _reps(self, acts: BlockActivations) -> list[np.ndarray]:
        return [acts.inputs[0], *acts.outputs, *(acts.inputs[i] for i in self.extra)]

    def _add(self, acts: BlockActivations) -> None:
        cfg = self.config
        reps = self._reps(acts)
        batch = {r.shape[0] for r in reps}
        if len(batch) != 1:
            raise BlockError(
                f"block boundaries of batch {self.batches} have different batch sizes {sorted(batch)}",
                hint="every boundary must hold the same samples on axis 0",
            )
        for state, token_range in zip(self.states, _ranges(cfg), strict=True):
            views = [token_view(r, channel_axis=cfg.channel_axis, token_range=token_range) for r in reps]
            tokens = {v.shape[1] for v in views}
            if state.samples_mode is None:
                state.samples_mode = len(tokens) > 1
            if state.samples_mode:
                rows = [v.reshape(v.shape[0], -1) for v in views]
            else:
                if len(tokens) > 1:
                    raise BlockError(
                        f"batch {self.batches}: block boundaries have different token counts {sorted(tokens)}, "
                        "unlike the first batch",
                        hint="feed calibration batches of one layout",
                    )
                self.positions += views[0].shape[0] * views[0].shape[1]
                if acts.mask is not None:
                    masked = [masked_view(r, acts.mask, channel_axis=cfg.channel_axis, token_range=token_range)
                              for r in reps]
                    if all(used for _, used in masked):  # padding rows leave every representation
                        self.masked = True
                        views = [v for v, _ in masked]
                self.tokens += views[0].shape[0] * views[0].shape[1]
                rows = [v.reshape(-1, v.shape[-1]) for v in views]
                if rows[0].shape[0] > cfg.max_tokens:
                    idx = np.sort(self.rng.choice(rows[0].shape[0], cfg.max_tokens, replace=False))
                    rows = [x[idx] for x in rows]
            state.add(rows, cfg.min_rows)

    def result(self) -> MetricResult:
        """CKA matrix, ``1 - CKA`` per span, Fisher segments of the L block outputs."""
        if self.batches == 0:
            raise self._no_data()
        n = self.num_blocks
        k = self.config.interval
        spans = self.spans
        dropped = []
        matrices = []
        for state in self.states:
            pending = state.rows
            state.flush()
            dropped.append(state.rows)
            if state.minibatches == 0:
                raise CalibrationError(
                    f"CKA needs at least {_MIN_HSIC_ROWS} rows (tokens or samples) per minibatch; "
                    f"the calibration data gave {pending}",
                    hint="provide more calibration samples",
                )
            matrices.append(_cka_from_hsic(state.hsic_sum / state.minibatches))
        per: list[list[float | None]] = []
        for cka in matrices:
            scores: list[float | None] = [None] * n
            for i in spans:
                scores[i] = float(1.0 - cka[self.extra.get(i, i), i + k])
            per.append(scores)
        mean = np.mean(matrices, axis=0)
        boundary = mean[: n + 1, : n + 1]
        outputs = boundary[1:, 1:]
        if self.config.segments is not None and self.config.segments > n:
            raise ConfigError(
                f"--segments {self.config.segments} is more than the model's {n} blocks",
                hint=f"use --segments from 1 to {n}, or leave it out for the automatic choice",
            )
        losses = segment_losses(outputs)
        count = self.config.segments if self.config.segments is not None else auto_segment_count(losses)
        segments = tuple(fisher_segments(outputs, count))
        ranges = self.config.token_ranges
        details: dict[str, Any] = {
            "interval": k,
            "batches": self.batches,
            "minibatches": [s.minibatches for s in self.states],
            "rows": "samples" if self.states[0].samples_mode else "tokens",
            "dropped_rows": dropped,
            "extra_inputs": sorted(self.extra),
            "segment_losses": losses.tolist(),
            "segment_count": "fixed" if self.config.segments is not None else "auto",
            "token_ranges": [str(t) for t in ranges],
            "tokens": self.tokens,
            "positions": self.positions,
            "masked": self.masked,
        }
        if ranges:
            details["per_range_matrix"] = {
                t.name: m[: n + 1, : n + 1].tolist() for t, m in zip(ranges, matrices, strict=True)
            }
        return MetricResult(
            self.name,
            _combine(per),
            per_range={t.name: tuple(v) for t, v in zip(ranges, per, strict=True)} if ranges else None,
            matrix=tuple(tuple(float(v) for v in row) for row in boundary),
            segments=segments,
            details=details,
        )
