"""Training-free healing of a removed span: one closed-form linear map per stream (ReplaceMe).

For a removed contiguous span of blocks and each of its streams, ``X`` is the span's input
(the first block's stream input) and ``Y`` its output (the last block's stream output),
as token rows ``[N, d]`` (hidden axis last; padding tokens left out when the model has a
token mask, :func:`compress.scoring.collect.find_token_mask`). A feature map of rank >= 4
(``[N, C, H, W]``, channels first, as the metrics' default channel axis) gives one row per
position (``C`` features): the map is then a 1x1 convolution. The map is

    T = argmin ||[X 1] T - Y||^2 + lambda ||W - W0||^2,     T = [W; b]

with ``W0 = I`` when ``Y`` has ``X``'s width (so the strongest ridge gives back plain
removal, the identity; ``W0 = 0`` otherwise) and the bias not penalised. ``lambda`` is
``ridge * trace(X^T X) / d``, i.e. relative to the mean squared feature of ``X`` times ``N``.
:class:`LinearFit` keeps only ``[X 1]^T [X 1]``, ``[X 1]^T Y`` and ``sum |Y|^2``, in
float64: memory ``(d + 1)^2 + (d + 1) d_out`` numbers per stream, independent of the number of
batches. The fit's own residual ``||[X 1] T - Y||^2 / ||Y||^2`` comes from the same sums, as
does the residual of plain removal ``||X - Y||^2 / ||Y||^2`` (same width only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compress.errors import BlockError

_ROWS_PER_CHUNK = 1 << 14
"""Token rows upcast to float64 at a time."""

#: Default relative ridge strength of :meth:`LinearFit.solve`.
DEFAULT_RIDGE = 1e-4

#: Ridge strengths tried per span when none is given (``--heal-ridge`` left out): measured on
#: all-MiniLM-L6-v2 (3 of 6 layers removed, 40 news documents), the held-out cosine rose from
#: 0.817 (1e-4) to 0.836 (1e-1) and fell again at 1; no single value is right for every model.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class LinearMap:
    """A fitted map ``y = x @ weight + bias`` (float64) and how well it fits its own data.

    Attributes:
        weight: ``[d_in, d_out]``.
        bias: ``[d_out]``.
        rows: token rows the fit saw.
        residual: ``||[X 1] T - Y||^2 / ||Y||^2`` on the fit data.
        skip_residual: ``||X - Y||^2 / ||Y||^2`` (what removal without the map leaves), None
            when the widths differ.
        ridge: the relative ridge strength; ``lam`` the absolute one.
    """

    weight: np.ndarray
    bias: np.ndarray
    rows: int
    residual: float
    skip_residual: float | None
    ridge: float
    lam: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x @ weight + bias`` in float64 for token rows ``x`` ``[N, d]`` (not modified)."""
        return x.astype(np.float64) @ self.weight + self.bias


class LinearFit:
    """Running sums for the ridge least-squares map from token rows ``x [N, d_in]`` to ``y [N, d_out]``."""

    def __init__(self, d_in: int, d_out: int, *, spatial: int = 0) -> None:
        """Sums for a ``d_in -> d_out`` map; ``spatial``: spatial axes of a channels-first stream (0: features last)."""
        self.d_in, self.d_out, self.spatial = d_in, d_out, spatial
        self.xtx = np.zeros((d_in + 1, d_in + 1))
        self.xty = np.zeros((d_in + 1, d_out))
        self.yy = 0.0
        self.rows = 0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows (any float dtype); BlockError on mismatched shapes or non-finite values."""
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise BlockError(f"healing fit: rows {list(x.shape)} -> {list(y.shape)} do not fit a "
                             f"{self.d_in} -> {self.d_out} map", hint="feed calibration batches of one layout")
        for lo in range(0, x.shape[0], _ROWS_PER_CHUNK):
            xa = np.empty((min(_ROWS_PER_CHUNK, x.shape[0] - lo), self.d_in + 1))
            xa[:, :-1] = x[lo : lo + _ROWS_PER_CHUNK]
            xa[:, -1] = 1.0
            yc = y[lo : lo + _ROWS_PER_CHUNK].astype(np.float64)
            if not (np.isfinite(xa).all() and np.isfinite(yc).all()):
                raise BlockError("healing fit: the span's boundary activations contain NaN or Inf",
                                 hint="score a float32 model, or prune without --heal")
            self.xtx += xa.T @ xa
            self.xty += xa.T @ yc
            self.yy += float(np.einsum("ij,ij->", yc, yc))
        self.rows += x.shape[0]

    def solve(self, ridge: float = DEFAULT_RIDGE) -> LinearMap:
        """The ridge solution (see the module docstring).

        Raises:
            BlockError: no rows were seen.
        """
        if self.rows == 0:
            raise BlockError("healing fit saw no token", hint="check the calibration data and the token mask")
        d = self.d_in
        same = d == self.d_out
        lam = float(ridge) * float(np.trace(self.xtx[:d, :d])) / d
        target = np.zeros((d + 1, self.d_out))
        if same:
            target[:d] = np.eye(d)
        a = self.xtx.copy()
        a[np.arange(d), np.arange(d)] += lam
        rhs = self.xty + lam * target
        try:
            t = np.linalg.solve(a, rhs)
            if not np.isfinite(t).all():
                raise np.linalg.LinAlgError
        except np.linalg.LinAlgError:
            t = np.linalg.lstsq(a, rhs, rcond=None)[0]
        scale = max(self.yy, 1e-300)
        res = float(np.einsum("ij,ij->", t, self.xtx @ t) - 2.0 * np.einsum("ij,ij->", t, self.xty) + self.yy)
        skip = None
        if same:
            skip = max(0.0, float(np.trace(self.xtx[:d, :d]) - 2.0 * np.trace(self.xty[:d]) + self.yy)) / scale
        return LinearMap(weight=t[:d], bias=t[d], rows=self.rows, residual=max(0.0, res) / scale,
                         skip_residual=skip, ridge=float(ridge), lam=lam)
