"""The per-token metrics: ``cosine``, ``cosine-signed`` and ``angular``.

Each is the mean over tokens of a distance between a span's input and output, token by
token along the hidden axis; the formulas, the zero-vector rule and the numerics (a fast
path from dot products, a float32 second tier and an exact float64 tier for nearly
parallel tokens) are in :mod:`compress.scoring.metrics`. Importing this module registers
the three metrics. Activations are read, never modified.
"""

from __future__ import annotations

import math
from typing import ClassVar, TypedDict

import numpy as np

from compress.scoring.activations import BlockActivations, masked_view, token_view
from compress.scoring.base import (
    _CHUNK_ELEMENTS,
    BoundaryAccumulator,
    MetricResult,
    _combine,
    _ranges,
    register_metric,
)
from compress.scoring.options import MetricConfig, TokenRange


class _ViewOptions(TypedDict):
    """Keyword arguments of :func:`token_view` / :func:`masked_view` for one token range."""

    channel_axis: int | None
    token_range: TokenRange | None
    last_token: bool


_EXACT_ELEMENTS = 1 << 15
"""Elements per row chunk of the exact per-token path (float64 temporaries of 256 KiB stay in cache)."""


def _pair_terms(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of two ``[N, D]`` arrays: ``|x^ - y^|^2``, ``|x^ + y^|^2`` (x^ = x/|x|) and zero masks."""
    xh = x.astype(np.float64)  # copies: normalised in place below
    yh = y.astype(np.float64)
    nx = np.sqrt(np.einsum("ij,ij->i", xh, xh))
    ny = np.sqrt(np.einsum("ij,ij->i", yh, yh))
    zx, zy = nx == 0.0, ny == 0.0
    xh /= np.where(zx, 1.0, nx)[:, None]
    yh /= np.where(zy, 1.0, ny)[:, None]
    diff = xh - yh
    xh += yh  # now the sum
    return np.einsum("ij,ij->i", diff, diff), np.einsum("ij,ij->i", xh, xh), zx, zy


_F32_EPS = float(np.finfo(np.float32).eps)

_REFINE_REL_ERR = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
"""Target relative error per token of the fast per-token path, by working dtype (see _refine_below)."""


def _work_dtype(a: np.ndarray) -> np.dtype:
    """float32 stays float32 (the fast path); every other float dtype is computed in float64."""
    return np.dtype(np.float32) if a.dtype == np.float32 else np.dtype(np.float64)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_d a[..., d] * b[..., d]`` of two ``[B, T, D]`` views as float64 ``[B, T]``.

    Float32 and float64 operands are read in place (float32 products and sums, no copy);
    other dtypes are upcast to float64 a few samples at a time (<= ``_CHUNK_ELEMENTS``).
    """
    if a.dtype in (np.float32, np.float64) and b.dtype in (np.float32, np.float64):
        return np.einsum("...d,...d->...", a, b).astype(np.float64, copy=False)
    out = np.empty(a.shape[:2])
    step = max(1, _CHUNK_ELEMENTS // max(1, a.shape[1] * a.shape[2]))
    for lo in range(0, a.shape[0], step):
        x = a[lo : lo + step].astype(np.float64)
        y = x if b is a else b[lo : lo + step].astype(np.float64)
        out[lo : lo + step] = np.einsum("...d,...d->...", x, y)
    return out


def _refine_below(d: int, *dtypes: np.dtype) -> float:
    """``1 - |cos|`` below which a token is recomputed exactly (see _TokenPairAccumulator).

    The dot product of two float32 (float64) vectors of length ``d`` has an error of about
    ``sqrt(d) * eps`` relative to ``|x| |y|`` (measured: at most ``0.7 sqrt(d) eps`` on
    Gaussian data with outlier features, d = 64..4096), so ``1 - |cos|`` from dot products is
    within a relative ``_REFINE_REL_ERR`` (1e-4 for float32, 1e-10 for float64) above this.
    """
    eps = max(float(np.finfo(t).eps) for t in dtypes)
    worst = min(_REFINE_REL_ERR[np.dtype(t)] for t in dtypes)
    return math.sqrt(d) * eps / worst


class _TokenPairAccumulator(BoundaryAccumulator):
    """Shared machinery of cosine, cosine-signed and angular: mean of a per-token distance.

    Fast path, per batch: the squared norm of every token of every boundary (once per
    boundary: the output of block i is the input of block i + 1) and the dot products of
    each span's two ends, read in place in the activations' dtype (float32 or float64; other
    dtypes are upcast to float64 in chunks), then ``cos = x.y / (|x| |y|)`` in float64 per
    token. Tokens with ``1 - |cos|`` below :func:`_refine_below` (nearly parallel or
    anti-parallel; relative error of the rest <= 1e-4 for float32, 1e-10 for float64) go to
    a float32 normalised-difference tier (:meth:`_refined_sum`, float32 activations only)
    and, where that is not accurate enough either, to the exact float64 form
    (:func:`_pair_terms`), as do zero vectors (the zero-vector rule) and squared norms that
    may have under- or overflowed in the working dtype.
    """

    one_zero: ClassVar[float] = 1.0
    """The per-token value when exactly one of the two vectors is zero."""

    def __init__(self, num_blocks: int, config: MetricConfig | None = None) -> None:
        super().__init__(num_blocks, config)
        r = len(_ranges(self.config))
        self.sums = np.zeros((r, num_blocks))
        self.counts = np.zeros((r, num_blocks), dtype=np.int64)
        self.positions = np.zeros((r, num_blocks), dtype=np.int64)  # all positions, padding included
        self.masked = False
        self.refined = np.zeros((r, num_blocks), dtype=np.int64)  # float32 second tier
        self.exact = np.zeros((r, num_blocks), dtype=np.int64)  # float64 recomputed
        self.unscored: dict[int, str] = {}

    @staticmethod
    def _distance(d2: np.ndarray, p2: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _exact_sum(self, xv: np.ndarray, yv: np.ndarray, tokens: np.ndarray) -> float:
        """Sum of the per-token distance at the flat token indices ``tokens`` of ``[B, T, D]`` views x, y.

        In float64 (normalised-difference form, zero-vector rule), a few rows at a time
        (``_EXACT_ELEMENTS``: the temporaries stay in cache).
        """
        total = 0.0
        step = max(1, _EXACT_ELEMENTS // max(1, xv.shape[-1]))
        for lo in range(0, tokens.size, step):
            b, t = np.divmod(tokens[lo : lo + step], xv.shape[1])
            d2, p2, zx, zy = _pair_terms(xv[b, t], yv[b, t])
            value = self._distance(d2, p2)
            total += float(np.where(zx & zy, 0.0, np.where(zx | zy, self.one_zero, value)).sum())
        return total

    def _span_sum(self, xv: np.ndarray, yv: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> tuple[float, int, int]:
        """Sum of the per-token distance over ``[B, T, D]`` views x, y with squared norms sx, sy.

        Returns the sum, the number of tokens of the float32 second tier
        (:meth:`_refined_sum`) and the number recomputed exactly in float64.
        """
        dot = _rowdot(xv, yv).ravel()
        sx, sy = sx.ravel(), sy.ravel()
        wx, wy = _work_dtype(xv), _work_dtype(yv)
        # squared norms >= tiny / eps^2: what underflowed to 0 (or subnormal) is negligible
        low = max(float(np.finfo(t).tiny) / float(np.finfo(t).eps) ** 2 for t in (wx, wy))
        with np.errstate(all="ignore"):
            c = np.clip(dot / np.sqrt(sx * sy), -1.0, 1.0)
            d2, p2 = 2.0 - 2.0 * c, 2.0 + 2.0 * c  # |x^ - y^|^2, |x^ + y^|^2
            fast = (np.minimum(d2, p2) >= 2.0 * _refine_below(xv.shape[-1], wx, wy)) & (sx >= low) & (sy >= low)
            fast &= (sx < math.inf) & (sy < math.inf)
            value = self._distance(d2, p2)
        total = float(value.sum() if fast.all() else value[fast].sum())
        slow = np.flatnonzero(~fast)
        refined = 0
        d = xv.shape[-1]
        if slow.size and wx == wy == np.float32 and math.sqrt(d) * _F32_EPS <= _REFINE_REL_ERR[wx] / 4:
            sane = ((sx >= low) & (sy >= low) & (sx < math.inf) & (sy < math.inf))[slow]
            part, left = self._refined_sum(xv, yv, slow[sane], c, sx, sy)
            total += part
            refined = int(np.count_nonzero(sane)) - left.size
            slow = np.concatenate([slow[~sane], left])
        if slow.size:
            total += self._exact_sum(xv, yv, slow)
        return total, refined, int(slow.size)

    def _refined_sum(
        self, xv: np.ndarray, yv: np.ndarray, tokens: np.ndarray, c: np.ndarray, sx: np.ndarray, sy: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """Float32 tokens the fast path cannot resolve (``1 - |cos|`` small), second tier.

        ``q = |x/|x| - s y/|y||^2`` (``s`` = sign of the fast ``cos``) in float32 with the
        fast path's norms: ``q`` is ``|x^ - y^|^2`` (``s = 1``) or ``|x^ + y^|^2`` (``s = -1``;
        the other one is ``4 - q``), with a relative error of at most ``2 delta + 4 delta^2 / q
        + 2 eps / sqrt(q)`` (``delta`` = relative error of a float32 norm, about
        ``sqrt(D) eps``; the last term is the rounding of the scaled elements). It is kept
        where that is <= 1e-4, i.e. ``q >= max(16 delta^2, (8 eps)^2 / 1e-4) / 1e-4``
        (``1 - |cos| >= 4.6e-5`` for D <= 40,000).

        Returns the sum over the kept tokens and the flat indices of the others.
        """
        r = _REFINE_REL_ERR[np.dtype(np.float32)]
        delta = math.sqrt(xv.shape[-1]) * _F32_EPS
        q_min = max(16 * delta**2, (8 * _F32_EPS) ** 2 / r) / r
        total = 0.0
        left = []
        step = max(1, 2 * _EXACT_ELEMENTS // max(1, xv.shape[-1]))
        for lo in range(0, tokens.size, step):
            j = tokens[lo : lo + step]
            b, t = np.divmod(j, xv.shape[1])
            flip = c[j] < 0
            x, y = xv[b, t], yv[b, t]  # float32 copies, scaled in place
            x *= (1.0 / np.sqrt(sx[j])).astype(np.float32)[:, None]
            y *= (np.where(flip, -1.0, 1.0) / np.sqrt(sy[j])).astype(np.float32)[:, None]
            x -= y
            q = np.einsum("ij,ij->i", x, x).astype(np.float64)
            ok = q >= q_min
            d2, p2 = np.where(flip, 4.0 - q, q), np.where(flip, q, 4.0 - q)
            total += float(self._distance(d2[ok], p2[ok]).sum())
            left.append(j[~ok])
        return total, np.concatenate(left) if left else tokens[:0]

    def _add(self, acts: BlockActivations) -> None:
        cfg = self.config
        k = cfg.interval
        for r, token_range in enumerate(_ranges(cfg)):
            kw: _ViewOptions = {"channel_axis": cfg.channel_axis, "token_range": token_range, "last_token": cfg.last_token}
            seen: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # id -> (token view, squared norms, positions)
            for i in self.spans:
                x, y = acts.inputs[i], acts.outputs[i + k - 1]
                if x.shape != y.shape:
                    self.unscored.setdefault(i, f"shape {list(x.shape)} -> {list(y.shape)}")
                    continue
                for a in (x, y):
                    if id(a) not in seen:  # the output of block j is also the input of block j + 1
                        v, used = masked_view(a, acts.mask, **kw)
                        self.masked |= used
                        p = token_view(a, **kw).shape if used else v.shape
                        seen[id(a)] = (v, _rowdot(v, v), p[0] * p[1])
                (xv, sx, pos), (yv, sy, _) = seen[id(x)], seen[id(y)]
                total, refined, exact = self._span_sum(xv, yv, sx, sy)
                self.sums[r, i] += total
                self.positions[r, i] += pos
                self.counts[r, i] += xv.shape[0] * xv.shape[1]
                self.refined[r, i] += refined
                self.exact[r, i] += exact

    def result(self) -> MetricResult:
        """Mean distance per span (combined over token ranges, see module docstring)."""
        if self.batches == 0:
            raise self._no_data()
        spans = set(self.spans)
        per: list[list[float | None]] = []
        for r in range(self.sums.shape[0]):
            per.append(
                [
                    float(self.sums[r, i] / self.counts[r, i]) if i in spans and self.counts[r, i] else None
                    for i in range(self.num_blocks)
                ]
            )
        ranges = self.config.token_ranges
        per_range = {t.name: tuple(v) for t, v in zip(ranges, per, strict=True)} if ranges else None
        details = {
            "interval": self.config.interval,
            "last_token": self.config.last_token,
            "batches": self.batches,
            "tokens": [int(c) for c in self.counts.sum(axis=0)],
            "positions": [int(c) for c in self.positions.sum(axis=0)],
            "masked": self.masked,
            "refined_tokens": [int(c) for c in self.refined.sum(axis=0)],
            "exact_tokens": [int(c) for c in self.exact.sum(axis=0)],
            "token_ranges": [str(t) for t in ranges],
            "unscored": {str(i): why for i, why in sorted(self.unscored.items())},
        }
        return MetricResult(self.name, _combine(per), per_range=per_range, details=details)


@register_metric("cosine")
class CosineAccumulator(_TokenPairAccumulator):
    """Sana 1.5: mean over tokens of ``1 - |cos(x_in, x_out)|``."""

    @staticmethod
    def _distance(d2: np.ndarray, p2: np.ndarray) -> np.ndarray:
        return 0.5 * np.minimum(d2, p2)


@register_metric("cosine-signed")
class SignedCosineAccumulator(_TokenPairAccumulator):
    """ShortGPT Block Influence / ModelOpt Minitron: mean over tokens of ``1 - cos(x_in, x_out)``."""

    @staticmethod
    def _distance(d2: np.ndarray, p2: np.ndarray) -> np.ndarray:
        return 0.5 * d2


@register_metric("angular")
class AngularAccumulator(_TokenPairAccumulator):
    """Gromov et al. 2024: mean over tokens of ``arccos(cos(x_in, x_out)) / pi``."""

    one_zero: ClassVar[float] = 0.5

    @staticmethod
    def _distance(d2: np.ndarray, p2: np.ndarray) -> np.ndarray:
        return (2.0 / math.pi) * np.arctan2(np.sqrt(d2), np.sqrt(p2))
