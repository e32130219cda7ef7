"""2:4 mask arithmetic on numpy arrays: magnitude pruning, score masks, the sparsity check.

The pattern TensorRT's sparse tensor cores use: in every group of 4 consecutive values
along one axis (a layer's input dimension), at least 2 are zero. :func:`prune_2_4` zeroes
the 2 smallest magnitudes, :func:`mask_2_4` keeps the 2 largest scores (the masks of
:mod:`compress.passes.sparse_calib`), :func:`is_2_4_sparse` checks the pattern. Ties zero
the lower index first. Pure functions: inputs are never modified, no model or file is read.
"""

from __future__ import annotations

import numpy as np


def prune_2_4(weight: np.ndarray, axis: int) -> np.ndarray:
    """A copy of ``weight`` with the 2 smallest |w| of every 4 consecutive along ``axis`` set to 0.

    ``weight.shape[axis]`` must be a multiple of 4. Ties are broken towards the lower index
    (that one is zeroed), as Polygraphy's pruner does. Vectorised; does not modify ``weight``.

    Raises:
        ValueError: ``weight.shape[axis]`` is not a multiple of 4.
    """
    if weight.shape[axis] % 4:
        raise ValueError(f"axis {axis} of shape {weight.shape} is not a multiple of 4")
    moved = np.moveaxis(weight, axis, -1)
    groups = np.array(moved).reshape(-1, 4)
    order = np.argsort(np.abs(groups.astype(np.float64)), axis=1, kind="stable")
    np.put_along_axis(groups, order[:, :2], 0, axis=1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def is_2_4_sparse(weight: np.ndarray, axis: int) -> bool:
    """True when every group of 4 consecutive values along ``axis`` has at least 2 zeros."""
    if weight.shape[axis] % 4:
        return False
    groups = np.moveaxis(weight, axis, -1).reshape(-1, 4)
    return bool(((groups == 0).sum(axis=1) >= 2).all())


def mask_2_4(score: np.ndarray) -> np.ndarray:
    """Boolean keep-mask of ``score[..., 4g]`` (groups on the last axis): the 2 largest of every 4 kept.

    Ties keep the higher index (the lower is pruned first), as :func:`prune_2_4`.
    """
    groups = score.reshape(-1, 4)
    order = np.argsort(groups, axis=1, kind="stable")
    keep = np.ones_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :2], False, axis=1)
    return keep.reshape(score.shape)


__all__ = ["is_2_4_sparse", "mask_2_4", "prune_2_4"]
