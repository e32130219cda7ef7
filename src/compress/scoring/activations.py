"""The activations a boundary metric is fed, and their token view.

:class:`BlockActivations` holds the block boundaries of one calibration batch (validated:
float, finite, one input and one output per block). :func:`token_view` turns an
activation into ``[B, T, D]`` (samples, tokens, hidden; the rules are in
:mod:`compress.scoring.metrics`), :func:`masked_view` keeps only the real tokens of a
padding mask. Neither modifies the array it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compress.errors import BlockError, ConfigError
from compress.scoring.options import _RANGE_EXAMPLE, TokenRange


def _site(block: int, where: str, names: Sequence[str] | None) -> str:
    label = f"block {block}" if names is None or block >= len(names) else f"block {block} ({names[block]})"
    return f"{label} {where}"


@dataclass(frozen=True)
class BlockActivations:
    """The block boundaries of one calibration batch. Validated on construction.

    Attributes:
        inputs: ``inputs[i]`` = residual-stream input of block ``i`` (float, batch on axis 0).
        outputs: ``outputs[i]`` = output of block ``i`` (usually the shape of ``inputs[i]``).
        final: the model's final outputs for this batch (optional; unused by boundary metrics).
        names: block names, used only in error messages (optional).
        mask: the padding mask of the batch, ``[B, T]`` (nonzero = real token), or None.
            Token-level metrics use only the real tokens of every activation whose token
            view is ``[B, T, D]`` with the mask's ``B`` and ``T`` (others: every position).

    Raises:
        BlockError: unequal lengths, a non-float or rank-0 array, NaN or Inf (naming the
            block and whether its input or output is affected).
    """

    inputs: Sequence[np.ndarray]
    outputs: Sequence[np.ndarray]
    final: Mapping[str, np.ndarray] | None = None
    names: Sequence[str] | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mask is not None:
            m = np.asarray(self.mask)
            if m.ndim != 2:
                raise BlockError(f"the token mask must be [batch, tokens], got shape {list(m.shape)}",
                                 hint="pass the attention/padding mask input (--token-mask NAME) or --token-mask none")
            object.__setattr__(self, "mask", m != 0)
        ins = tuple(np.asarray(a) for a in self.inputs)
        outs = tuple(np.asarray(a) for a in self.outputs)
        if len(ins) != len(outs) or not ins:
            raise BlockError(
                f"block activations need one input and one output per block, got {len(ins)} inputs "
                f"and {len(outs)} outputs",
                hint="pass inputs[i] and outputs[i] for every block i",
            )
        checked: set[int] = set()
        for where, arrays in (("input", ins), ("output", outs)):
            for i, a in enumerate(arrays):
                if id(a) in checked:
                    continue
                checked.add(id(a))
                if a.ndim == 0 or not np.issubdtype(a.dtype, np.floating):
                    raise BlockError(
                        f"{_site(i, where, self.names)} is a {a.dtype} array of shape {a.shape}; "
                        "block boundaries must be float tensors of rank >= 1",
                        hint="choose block boundaries on the residual stream (hidden states)",
                    )
                if not np.isfinite(a).all():
                    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
                    raise BlockError(
                        f"{_site(i, where, self.names)} contains NaN or Inf ({bad} of {a.size} values)",
                        hint="the model overflows on this calibration data (common in float16); "
                        "check its inputs, or score a float32 model",
                    )
        object.__setattr__(self, "inputs", ins)
        object.__setattr__(self, "outputs", outs)

    @property
    def num_blocks(self) -> int:
        """Number of blocks L."""
        return len(self.inputs)


def _hidden_axis(ndim: int, channel_axis: int | None) -> int:
    axis = (1 if ndim >= 4 else ndim - 1) if channel_axis is None else channel_axis
    if not -ndim <= axis < ndim or axis % ndim == 0 and ndim > 1:
        raise ConfigError(
            f"--channel-axis {channel_axis} does not fit a rank-{ndim} activation (axis 0 is the batch)",
            hint=f"use an axis from 1 to {ndim - 1}, or leave --channel-axis out",
        )
    return axis % ndim


def token_view(
    array: np.ndarray,
    *,
    channel_axis: int | None = None,
    token_range: TokenRange | None = None,
    last_token: bool = False,
) -> np.ndarray:
    """An activation as ``[B, T, D]``: samples, tokens, hidden (see module docstring).

    Args:
        array: activation with the batch on axis 0 (rank 1 = one sample, one token).
        channel_axis: hidden axis; None = 1 for rank >= 4, else the last axis.
        token_range: slice of the (flattened) token axis; None = all tokens.
        last_token: keep only the last token (of the range) of each sample.

    Returns:
        A view or copy in the input's dtype; does not modify ``array``.

    Raises:
        ConfigError: a bad ``channel_axis`` or a range that selects no token.
    """
    a = np.asarray(array)
    if a.ndim == 1:
        a = a[None, :]
    axis = _hidden_axis(a.ndim, channel_axis)
    b, d = a.shape[0], a.shape[axis]
    if axis == a.ndim - 1:
        v = a.reshape(b, -1, d)  # [B, T, D]
        token_axis = 1
    else:
        v = np.moveaxis(a, axis, 1).reshape(b, d, -1)  # a view for contiguous NCHW: [B, D, T]
        token_axis = 2
    t = v.shape[token_axis]
    sel = slice(None)
    if token_range is not None:
        sel = slice(token_range.start, token_range.stop)
        if len(range(*sel.indices(t))) == 0:
            raise ConfigError(
                f"token range {token_range} selects no token of an activation of shape {a.shape} ({t} tokens)",
                hint=f"fix --token-ranges ({_RANGE_EXAMPLE})",
            )
        past = [e for e in (token_range.start, token_range.stop) if e is not None and not -t <= e <= t]
        if past:
            raise ConfigError(
                f"token range {token_range} does not fit an activation of shape {a.shape} ({t} tokens): "
                f"token {past[0]} is past its end",
                hint=f"fix --token-ranges so every range lies within 0..{t} (separate streams are scored per "
                     "stream without --token-ranges)",
            )
    if last_token:
        sel = slice(*sel.indices(t))
        sel = slice(range(t)[sel][-1], range(t)[sel][-1] + 1)
    v = v[:, :, sel] if token_axis == 2 else v[:, sel, :]
    return v.transpose(0, 2, 1) if token_axis == 2 else v


def masked_view(
    array: np.ndarray,
    mask: np.ndarray | None,
    *,
    channel_axis: int | None = None,
    token_range: TokenRange | None = None,
    last_token: bool = False,
) -> tuple[np.ndarray, bool]:
    """:func:`token_view` without the padding tokens of ``mask`` (bool ``[B, T]``).

    Returns ``([1, N, D] real tokens, True)`` when ``mask`` fits the activation's
    ``[B, T, D]`` token view, else ``(token_view(...), False)``. The token range slices
    the mask like the tokens; with ``last_token`` each sample keeps its last *real* token
    (samples without one are left out). The real tokens are copied; ``array`` is not modified.
    """
    if mask is None:
        return token_view(array, channel_axis=channel_axis, token_range=token_range, last_token=last_token), False
    full = token_view(array, channel_axis=channel_axis)
    if tuple(mask.shape) != tuple(full.shape[:2]):
        return token_view(array, channel_axis=channel_axis, token_range=token_range, last_token=last_token), False
    v = token_view(array, channel_axis=channel_axis, token_range=token_range)  # validates the range
    m = mask if token_range is None else mask[:, slice(token_range.start, token_range.stop)]
    if last_token:
        rows = np.flatnonzero(m.any(axis=1))
        last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
        return v[rows, last[rows]][None], True
    return v[m][None], True
