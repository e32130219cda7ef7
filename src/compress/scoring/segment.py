"""Fisher optimal segmentation of an ordered sequence of blocks (SGLP).

SGLP (Similarity-Guided Layer Partition, arXiv 2410.14720) splits a network's blocks into
contiguous segments of mutually similar blocks, using the CKA similarity between block
outputs, and prunes inside each segment. The split is Fisher's (1958) optimal partition of
an ordered sequence into ``k`` contiguous groups, found exactly by dynamic programming.

Within-segment loss. With dissimilarity ``d_ij = 1 - S_ij`` (``S`` symmetrised as
``(S + S.T) / 2``), the loss of the segment ``[a, b)`` is

    cost(a, b) = (1 / (b - a)) * sum_{a <= i < j < b} d_ij

which is Fisher's within-group sum of squares when ``d_ij`` is half a squared Euclidean
distance. The loss of a partition is the sum of its segments' costs; ``fisher_segments``
returns a partition with the smallest loss (ties: the leftmost split points).

Automatic ``k`` (when ``k`` is None): let ``E(k)`` be the optimal loss with ``k`` segments
(``E(1) >= E(2) >= ... >= E(L)``). The chosen ``k`` is the *elbow*: the ``k`` in
``[min(2, L), max(min(2, L), L - 1)]`` whose ``E(k)`` lies furthest below the chord from
``(1, E(1))`` to ``(L, E(L))`` (ties: the smallest such ``k``). A similarity matrix made of
``g`` perfectly similar, mutually dissimilar groups gives ``k = g``.

Pure numpy; O(L^2) memory and O(k L^2) time, trivial for L up to a few hundred.
"""

from __future__ import annotations

import numpy as np

from compress.errors import ConfigError

__all__ = ["auto_segment_count", "fisher_segments", "segment_costs", "segment_losses"]


def _check_similarity(similarity: np.ndarray) -> np.ndarray:
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ConfigError(
            f"segmentation needs a non-empty square similarity matrix, got shape {s.shape}",
            hint="pass the L x L CKA similarity between block outputs",
        )
    if not np.isfinite(s).all():
        raise ConfigError("segmentation similarity matrix contains NaN or Inf", hint="check the CKA scores")
    return (s + s.T) / 2.0


def segment_costs(similarity: np.ndarray) -> np.ndarray:
    """Within-segment loss of every contiguous segment.

    Args:
        similarity: L x L similarity (1 = identical); symmetrised internally. Not modified.

    Returns:
        ``(L + 1, L + 1)`` float64 array ``C`` with ``C[a, b] = cost(a, b)`` (module
        docstring) for ``0 <= a < b <= L`` and ``inf`` elsewhere.
    """
    s = _check_similarity(similarity)
    n = s.shape[0]
    d = 1.0 - s
    np.fill_diagonal(d, 0.0)
    prefix = np.zeros((n + 1, n + 1))
    prefix[1:, 1:] = d.cumsum(axis=0).cumsum(axis=1)
    a = np.arange(n + 1)[:, None]
    b = np.arange(n + 1)[None, :]
    block = prefix[b, b] - prefix[a, b] - prefix[b, a] + prefix[a, a]  # sum of d over [a,b) x [a,b)
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(b > a, 0.5 * block / np.maximum(b - a, 1), np.inf)
    return cost


def _dynamic_program(similarity: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Tables ``F[k, b]`` (best loss of ``[0, b)`` in ``k`` segments) and their argmin splits."""
    cost = segment_costs(similarity)
    n = cost.shape[0] - 1
    best = np.full((k_max + 1, n + 1), np.inf)
    split = np.zeros((k_max + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, k_max + 1):
        total = best[k - 1][:, None] + cost  # [a, b]: k-1 segments over [0, a), then [a, b)
        split[k] = np.argmin(total, axis=0)
        best[k] = total[split[k], np.arange(n + 1)]
    return best, split


def segment_losses(similarity: np.ndarray) -> np.ndarray:
    """Optimal partition loss ``E(k)`` for ``k = 1 .. L`` (index ``k - 1``); float64, length L."""
    n = np.asarray(similarity).shape[0]
    best, _ = _dynamic_program(similarity, n)
    return best[1:, n].copy()


def auto_segment_count(losses: np.ndarray) -> int:
    """The elbow of ``E(k)`` (module docstring): the automatic number of segments.

    Args:
        losses: ``E(1) .. E(L)`` as returned by :func:`segment_losses`.
    """
    e = np.asarray(losses, dtype=np.float64)
    n = e.shape[0]
    lo = min(2, n)
    hi = max(lo, n - 1)
    if n <= 2:
        return lo
    ks = np.arange(lo, hi + 1)
    chord = e[0] + (e[n - 1] - e[0]) * (ks - 1) / (n - 1)
    gain = chord - e[ks - 1]
    return int(ks[int(np.argmax(gain))])


def fisher_segments(similarity: np.ndarray, k: int | None = None) -> list[tuple[int, int]]:
    """Fisher optimal partition of blocks ``0 .. L-1`` into ``k`` contiguous segments.

    Args:
        similarity: L x L similarity between block outputs (e.g. linear CKA); the
            dissimilarity is ``1 - similarity``. Not modified.
        k: number of segments, ``1 <= k <= L``; None picks it with :func:`auto_segment_count`.

    Returns:
        Half-open block index ranges ``[(0, b1), (b1, b2), ..., (b_{k-1}, L)]`` minimising the
        summed within-segment loss (module docstring).

    Raises:
        ConfigError: ``k`` out of range or a malformed matrix.
    """
    n = _check_similarity(similarity).shape[0]
    if k is None:
        k = auto_segment_count(segment_losses(similarity))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ConfigError(
            f"cannot split {n} blocks into {k!r} segments",
            hint=f"use --segments with a value from 1 to {n}, or leave it out for the automatic choice",
        )
    k = int(k)
    _, split = _dynamic_program(similarity, k)
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(int(split[j, bounds[-1]]))
    bounds.reverse()
    return [(bounds[i], bounds[i + 1]) for i in range(k)]
