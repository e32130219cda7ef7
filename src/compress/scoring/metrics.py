"""Block-importance metrics: streaming accumulators over calibration batches.

Protocol (what a collector does)::

    acc = get_metric("cosine")(num_blocks, MetricConfig(interval=1))
    for batch in calibration:                       # one ORT run per batch
        acc.update(BlockActivations(inputs=[...], outputs=[...]))
    result = acc.result()                           # MetricResult; result.to_dict() is JSON-ready

``inputs[i]`` / ``outputs[i]`` are block ``i``'s residual-stream input and output for the
batch (any float dtype; batch on axis 0). Accumulators keep sums and counts only (O(L^2)
state plus per-batch temporaries), never the activations. The ``ablation`` metric
(``needs_final`` is True) is fed differently: ``acc.update(block, reference, ablated)``
with the model's final outputs with and without block ``block``.

Every score is "higher = more important" (prune the lowest). ``scores[i]`` belongs to the
span that starts at block ``i`` (``interval`` blocks, ``i .. i + interval - 1``); spans that
run past the last block, or whose two ends differ in shape, are not scored (None).

Token view (:func:`token_view`): an activation becomes ``[B, T, D]`` (samples, tokens,
hidden). The hidden axis is ``channel_axis``; by default axis 1 for rank >= 4 (NCHW,
NCDHW: every spatial position is a token) and the last axis otherwise (``[B, T, D]``;
``[B, D]`` has one token per sample). A :class:`TokenRange` slices the token axis (the
flattened spatial axis for NCHW); ``last_token`` keeps token ``T - 1`` of each sample.

Per-token metrics (per token along the hidden axis; sums and means in float64):

- ``cosine`` (Sana 1.5 block importance, abs variant): mean over tokens of ``1 - |cos|``.
- ``cosine-signed`` (ShortGPT Block Influence, ModelOpt Minitron): mean of ``1 - cos``.
- ``angular`` (Gromov et al. 2024): mean of ``arccos(cos) / pi`` in ``[0, 1]``; usually
  with ``last_token=True``.

  Zero vectors: ``cos = 1`` when both are zero, ``cos = 0`` when exactly one is zero.
  Numerics (relative error per token <= ``r`` = 1e-4 for float32 activations, 1e-10 for
  float64): per batch, one squared norm per token of every boundary and one dot product
  per token of every span, read in place in float32 (float32 activations) or float64 (any
  other float dtype), give ``cos`` in float64. Tokens with ``1 - |cos|`` below
  ``sqrt(D) eps / r`` (nearly parallel or anti-parallel, where that loses digits) are
  recomputed from the normalised difference ``|x^ -+ y^|^2`` (``x^ = x/|x|``;
  ``1 - cos = |x^ - y^|^2 / 2``, angle ``2 atan2(|x^ - y^|, |x^ + y^|)``): in float32
  where its error bound allows (``details["refined_tokens"]``), else in float64
  (``details["exact_tokens"]``; also zero vectors and under/overflowing squared norms).
  Nearly identical vectors keep their precision.

``cka``: linear CKA between the ``L + 1`` boundary representations (input of block 0,
output of every block), by the minibatch estimator of Nguyen, Raghu & Kornblith (2021):
the unbiased HSIC of Song et al. (2012) is averaged over minibatches and
``CKA(X, Y) = mean HSIC(X, Y) / sqrt(mean HSIC(X, X) * mean HSIC(Y, Y))``. Rows are
tokens (``B * T``; at most ``max_tokens`` per batch, a fixed-seed random subset) when all
representations have the same number of tokens per sample, else samples with
features flattened (CNN stages of different resolution). Batches with fewer than
``min_rows`` rows are pooled with the next ones. The score is ``1 - CKA(input of block
i, output of block i + interval - 1)``; ``matrix`` holds the (L+1) x (L+1) CKA and
``segments`` the Fisher optimal segmentation of the L block outputs by ``1 - CKA``
(:mod:`compress.scoring.segment`). A representation with non-positive self-HSIC
(constant) has CKA 0 with everything else. Cost per batch: about ``(L+1) n^2 D / 2``
multiply-adds for ``n`` rows (``n <= max_tokens``), i.e. ``n / (24 D)`` of a transformer
forward pass; lower ``max_tokens`` when D is small.

Token ranges (per modality): with ``token_ranges``, every metric is computed separately
on each range (``per_range``) and ``scores`` is the *combined* score: the unweighted
mean of the per-range scores, so a short text range counts as much as a long image
range. For CKA the per-range matrices are averaged the same way. Token ranges are for a
*single* stream that concatenates modalities (Flux's single-stream blocks in older
diffusers); a range must fit the token axis (start and stop within ``-T .. T``), else it
is a ConfigError: a range past the end used to slice a stream silently.

Streams (per modality on separate tensors, e.g. an MMDiT's image and text hidden
states): the collector (:mod:`compress.scoring.collect`) scores each stream with its own
accumulator and fuses the per-stream scores of a block (:func:`fuse_streams`). The
default fusion is ``max``: a block is only as redundant as its *least* redundant stream
(for the per-token metrics: the largest per-stream ``1 - |cos|``), so a block that leaves
the image unchanged but rewrites the text is kept. ``mean`` averages the streams
(optionally weighted by ``stream_weights``, e.g. ``image=3,text=1``).

NaN/Inf in any activation raises :class:`~compress.errors.BlockError` naming the block
and whether its input or output is affected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from compress.errors import BlockError, CalibrationError, ConfigError
from compress.registry import Registry
from compress.scoring.segment import auto_segment_count, fisher_segments, segment_losses

__all__ = [
    "METRICS",
    "AblationAccumulator",
    "Accumulator",
    "BlockActivations",
    "BoundaryAccumulator",
    "MetricConfig",
    "MetricResult",
    "STREAM_FUSIONS",
    "TokenRange",
    "fuse_streams",
    "get_metric",
    "masked_view",
    "metric_names",
    "minibatch_hsic",
    "parse_stream_weights",
    "parse_token_ranges",
    "register_metric",
    "token_view",
]

_CHUNK_ELEMENTS = 1 << 22
"""Elements per float64 temporary (32 MiB): bounds per-batch scratch memory."""

_EXACT_ELEMENTS = 1 << 15
"""Elements per row chunk of the exact per-token path (float64 temporaries of 256 KiB stay in cache)."""

_MIN_HSIC_ROWS = 4
"""The unbiased HSIC estimator needs at least 4 rows."""

_RANGE_ITEM = re.compile(r"^(?P<name>[A-Za-z_][\w.-]*)=(?P<start>[+-]?\d+)?:(?P<stop>[+-]?\d+)?$")
_RANGE_EXAMPLE = "e.g. --token-ranges text=0:77,image=77:"


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TokenRange:
    """A named slice ``[start:stop]`` of the token axis (Python slice semantics).

    Attributes:
        name: label of the range ("text", "image"); not "combined".
        start: first token (negative counts from the end); None = 0.
        stop: one past the last token (negative counts from the end); None = the end.
    """

    name: str
    start: int | None = None
    stop: int | None = None

    def __str__(self) -> str:
        s = "" if self.start is None else str(self.start)
        e = "" if self.stop is None else str(self.stop)
        return f"{self.name}={s}:{e}"


def parse_token_ranges(spec: str) -> tuple[TokenRange, ...]:
    """Parse ``"text=0:77,image=77:"`` into TokenRanges (empty string -> ()).

    Raises:
        ConfigError: bad syntax, duplicate or reserved names (names the --token-ranges flag).
    """
    ranges: list[TokenRange] = []
    if not spec.strip():
        return ()
    for item in (p.strip() for p in spec.split(",")):
        m = _RANGE_ITEM.match(item)
        if m is None:
            raise ConfigError(
                f"bad token range {item!r} in --token-ranges {spec!r}: expected NAME=START:STOP",
                hint=f"separate ranges with commas, leave START or STOP empty for an open end ({_RANGE_EXAMPLE})",
            )
        name = m["name"]
        if name == "combined" or any(r.name == name for r in ranges):
            what = "reserved" if name == "combined" else "repeated"
            raise ConfigError(
                f"token range name {name!r} is {what} in --token-ranges {spec!r}",
                hint=f"give every range its own name other than 'combined' ({_RANGE_EXAMPLE})",
            )
        start = None if m["start"] is None else int(m["start"])
        stop = None if m["stop"] is None else int(m["stop"])
        ranges.append(TokenRange(name, start, stop))
    return tuple(ranges)


@dataclass(frozen=True, kw_only=True)
class MetricConfig:
    """Options shared by all metrics (each metric reads the ones it uses).

    Attributes:
        interval: span length n: score ``i`` compares the input of block ``i`` with the
            output of block ``i + n - 1`` (cosine, cosine-signed, angular, cka).
        token_ranges: per-modality scoring (see module docstring); () = all tokens.
        last_token: keep only the last token of each sample (cosine, cosine-signed, angular).
        channel_axis: the hidden axis; None = 1 for rank >= 4, else the last axis.
        segments: CKA Fisher segmentation: number of segments; None = automatic (elbow).
        max_tokens: CKA: at most this many token rows per batch (fixed-seed random subset).
        min_rows: CKA: pool batches until a minibatch has at least this many rows (>= 4).
        seed: seed of the CKA row-subsampling generator.
        stream_fusion: how the per-stream scores of a multi-stream block combine
            (:data:`STREAM_FUSIONS`; default ``max``, see :func:`fuse_streams`).
        stream_weights: ``(stream name, weight)`` pairs for ``stream_fusion="mean"``
            (streams not named weigh 1).
        token_mask: the padding mask: ``auto`` (default: the model input that looks like an
            attention mask, see :func:`compress.scoring.collect.find_token_mask`), ``none``
            (every position is a token), or the name of a model input (``--token-mask``).
    """

    interval: int = 1
    token_ranges: tuple[TokenRange, ...] = ()
    last_token: bool = False
    channel_axis: int | None = None
    segments: int | None = None
    max_tokens: int = 1024
    min_rows: int = 8
    seed: int = 0
    stream_fusion: str = "max"
    stream_weights: tuple[tuple[str, float], ...] = ()
    token_mask: str = "auto"

    def __post_init__(self) -> None:
        def bad(flag: str, value: Any, need: str) -> ConfigError:
            return ConfigError(f"{flag} {value!r} is invalid: {need}", hint=f"pass {flag} {need}")

        for flag, value, low in (
            ("--interval", self.interval, 1),
            ("--max-tokens", self.max_tokens, _MIN_HSIC_ROWS),
            ("--min-rows", self.min_rows, _MIN_HSIC_ROWS),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(flag, value, f"an integer >= {low}")
        if self.segments is not None and (
            isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1
        ):
            raise bad("--segments", self.segments, "an integer >= 1")
        if self.channel_axis is not None and (
            isinstance(self.channel_axis, bool) or not isinstance(self.channel_axis, int)
        ):
            raise bad("--channel-axis", self.channel_axis, "an integer axis")
        if not isinstance(self.token_ranges, tuple) or not all(isinstance(r, TokenRange) for r in self.token_ranges):
            raise ConfigError(
                "token_ranges must be a tuple of TokenRange", hint="build it with parse_token_ranges('text=0:77,...')"
            )
        names = [r.name for r in self.token_ranges]
        if len(set(names)) != len(names) or "combined" in names:
            raise ConfigError(f"token range names must be unique and not 'combined': {names}", hint=_RANGE_EXAMPLE)
        if not isinstance(self.token_mask, str) or not self.token_mask.strip():
            raise bad("--token-mask", self.token_mask, "auto, none or the name of a model input")
        if self.stream_fusion not in STREAM_FUSIONS:
            raise bad("--stream-fusion", self.stream_fusion, f"one of {', '.join(STREAM_FUSIONS)}")
        if self.stream_weights and self.stream_fusion != "mean":
            raise ConfigError("--stream-weights needs --stream-fusion mean",
                              hint="pass --stream-fusion mean --stream-weights image=3,text=1")
        if not isinstance(self.stream_weights, tuple) or not all(
            isinstance(w, tuple) and len(w) == 2 and isinstance(w[0], str) and isinstance(w[1], (int, float))
            and not isinstance(w[1], bool) and math.isfinite(w[1]) and w[1] >= 0 for w in self.stream_weights
        ) or (self.stream_weights and sum(w for _, w in self.stream_weights) <= 0):
            raise bad("--stream-weights", self.stream_weights, "NAME=WEIGHT pairs with weights >= 0 (not all 0)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (token ranges as ``NAME=START:STOP`` strings)."""
        return {
            "interval": self.interval,
            "token_ranges": [str(t) for t in self.token_ranges],
            "last_token": self.last_token,
            "channel_axis": self.channel_axis,
            "segments": self.segments,
            "max_tokens": self.max_tokens,
            "min_rows": self.min_rows,
            "seed": self.seed,
            "stream_fusion": self.stream_fusion,
            "stream_weights": {k: w for k, w in self.stream_weights},
            "token_mask": self.token_mask,
        }


#: Ways to fuse the per-stream scores of a multi-stream block (see :func:`fuse_streams`).
STREAM_FUSIONS = ("max", "mean")


def parse_stream_weights(spec: str) -> tuple[tuple[str, float], ...]:
    """Parse ``"image=3,text=1"`` into ``(("image", 3.0), ("text", 1.0))`` (empty -> ()).

    Raises:
        ConfigError: bad syntax or a repeated name (naming the --stream-weights flag).
    """
    out: list[tuple[str, float]] = []
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or not math.isfinite(weight) or weight < 0 or any(n == name.strip() for n, _ in out):
            raise ConfigError(f"bad stream weight {item!r} in --stream-weights {spec!r}: expected NAME=WEIGHT "
                              "(a weight >= 0, each stream once)",
                              hint="e.g. --stream-fusion mean --stream-weights hidden_states=3,encoder_hidden_states=1")
        out.append((name.strip(), weight))
    return tuple(out)


def fuse_streams(per_stream: Mapping[str, float | None], config: MetricConfig) -> float | None:
    """One score for a block from its per-stream scores (None where a stream is not scored).

    ``max`` (default): the block is only as redundant as its least redundant stream (the
    most important stream decides). ``mean``: the mean, weighted by ``config.stream_weights``
    (a stream not named weighs 1). None when no stream has a score.
    """
    values = {k: v for k, v in per_stream.items() if v is not None}
    if not values:
        return None
    if config.stream_fusion == "max":
        return max(values.values())
    weights = dict(config.stream_weights)
    w = {k: float(weights.get(k, 1.0)) for k in values}
    total = sum(w.values())
    if total <= 0:
        return None
    return sum(w[k] * v for k, v in values.items()) / total


# --------------------------------------------------------------------------- activations


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
    """:func:`token_view` without the padding: ``([1, N, D] real tokens, True)`` when ``mask``
    (bool ``[B, T]``) fits the activation's ``[B, T, D]`` token view, else ``(token_view(...), False)``.

    The token range slices the mask like the tokens; with ``last_token`` each sample keeps
    its last *real* token (samples without one are left out). The real tokens are copied.
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


# --------------------------------------------------------------------------- results


def _clean(value: Any) -> Any:
    """JSON-ready copy: tuples -> lists, numpy scalars -> Python, NaN/Inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


Scores = tuple[float | None, ...]


@dataclass(frozen=True)
class MetricResult:
    """What a metric measured. Higher score = more important block (prune the lowest).

    Attributes:
        name: metric name ("cosine", "cka", ...).
        scores: per block (span start), the combined score; None = not scored.
        per_range: token-range name -> per-block scores, or None without token ranges.
        matrix: CKA only: (L+1) x (L+1) similarity between boundaries (index 0 = input of
            block 0, index k = output of block k-1).
        segments: CKA only: half-open block ranges of the Fisher segmentation.
        details: metric-specific extras (counts, per-output errors, ...), JSON-ready.
    """

    name: str
    scores: Scores
    per_range: Mapping[str, Scores] | None = None
    matrix: tuple[tuple[float, ...], ...] | None = None
    segments: tuple[tuple[int, int], ...] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, Python numbers, None for NaN/Inf)."""
        return _clean(
            {
                "name": self.name,
                "scores": self.scores,
                "per_range": self.per_range,
                "matrix": self.matrix,
                "segments": self.segments,
                "details": self.details,
            }
        )


# --------------------------------------------------------------------------- registry


class Accumulator:
    """Base of all metric accumulators: ``cls(num_blocks, config)``, ``update(...)``, ``result()``.

    Attributes:
        name: registered metric name (set by :func:`register_metric`).
        needs_final: False: ``update(BlockActivations)`` once per batch; True (ablation):
            ``update(block, reference, ablated)`` with the model's final outputs.
        num_blocks: number of blocks L being scored.
        config: the options.
    """

    name: ClassVar[str] = ""
    needs_final: ClassVar[bool] = False

    def __init__(self, num_blocks: int, config: MetricConfig | None = None) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise BlockError(f"no block to score (num_blocks={num_blocks!r})", hint="check the block map")
        self.num_blocks = num_blocks
        self.config = config if config is not None else MetricConfig()

    def result(self) -> MetricResult:  # pragma: no cover - abstract
        raise NotImplementedError


A = TypeVar("A", bound=type[Accumulator])

METRICS: Registry[type[Accumulator]] = Registry("metric", flag="--metric")
"""Metric name -> accumulator class."""


def register_metric(name: str) -> Callable[[A], A]:
    """Class decorator: register an :class:`Accumulator` subclass as metric ``name``."""

    def decorate(cls: A) -> A:
        cls.name = name
        METRICS.register(name)(cls)
        return cls

    return decorate


def get_metric(name: str) -> type[Accumulator]:
    """The accumulator class of metric ``name``; ConfigError listing the valid names otherwise."""
    return METRICS.get(name)


def metric_names() -> list[str]:
    """Registered metric names, sorted."""
    return METRICS.names()


class BoundaryAccumulator(Accumulator):
    """An accumulator fed with :class:`BlockActivations`, one call per calibration batch.

    Raises:
        ConfigError: on construction, an ``interval`` longer than ``num_blocks``.
    """

    def __init__(self, num_blocks: int, config: MetricConfig | None = None) -> None:
        super().__init__(num_blocks, config)
        self.batches = 0
        k = self.config.interval
        if k > num_blocks:
            raise ConfigError(
                f"--interval {k} is longer than the model's {num_blocks} blocks",
                hint=f"use --interval from 1 to {num_blocks}",
            )
        self.spans = list(range(num_blocks - k + 1))
        """Start blocks of the scored spans."""

    def update(self, acts: BlockActivations) -> None:
        """Add one calibration batch."""
        if acts.num_blocks != self.num_blocks:
            raise BlockError(
                f"batch {self.batches} has {acts.num_blocks} blocks; the metric was set up for {self.num_blocks}",
                hint="feed the same block boundaries for every calibration batch",
            )
        if self.batches == 0:
            self._start(acts)
        self._add(acts)
        self.batches += 1

    def _start(self, acts: BlockActivations) -> None:
        """Set up data-dependent state from the first batch."""

    def _add(self, acts: BlockActivations) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _no_data(self) -> CalibrationError:
        return CalibrationError(
            f"metric {self.name!r} received no calibration batch", hint="pass at least one calibration sample"
        )


def _ranges(config: MetricConfig) -> tuple[TokenRange | None, ...]:
    return config.token_ranges if config.token_ranges else (None,)


def _combine(per_range: list[list[float | None]]) -> Scores:
    """Unweighted mean over ranges; None where any range is None."""
    out: list[float | None] = []
    for values in zip(*per_range, strict=True):
        out.append(None if any(v is None for v in values) else float(np.mean(values)))
    return tuple(out)


# --------------------------------------------------------------------------- per-token metrics


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
        """Sum of the per-token distance of the flat token indices ``tokens`` of ``[B, T, D]``
        views x, y, in float64 (normalised-difference form, zero-vector rule); a few rows at a
        time (``_EXACT_ELEMENTS``: the temporaries stay in cache)."""
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
            kw = {"channel_axis": cfg.channel_axis, "token_range": token_range, "last_token": cfg.last_token}
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


# --------------------------------------------------------------------------- CKA


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


# --------------------------------------------------------------------------- ablation


def _per_sample(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)


def _log_softmax(a: np.ndarray) -> np.ndarray:
    shifted = a - a.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@register_metric("ablation")
class AblationAccumulator(Accumulator):
    """How far the model's final outputs move when one block is skipped.

    Per block and float output, over all calibration batches:

    - ``cosine_distance``: mean over samples of ``1 - cos`` of the flattened sample
      (zero-vector rule as the per-token metrics);
    - ``mae``: mean absolute error over all elements;
    - outputs named in ``logits`` only: ``kl`` = mean over positions of
      ``KL(softmax(reference) || softmax(ablated))`` along the last axis (nats), and
      ``top1_agreement`` = fraction of positions whose argmax is unchanged.

    Which outputs are logits is the caller's decision (``score_blocks`` passes
    :func:`compress.fidelity.logit_outputs`, decided from the graph): a shape rule would
    take a ``[B, T, D]`` embedding for ``[B, T, V]`` logits and score it with a softmax.

    Score of a block: the mean ``kl`` over its logits outputs when there is one, else the
    mean ``cosine_distance`` over its float outputs. Non-float outputs are skipped. If an
    ablated output has NaN/Inf the block is essential: its score is ``inf`` (None in JSON,
    with ``details["nonfinite"]`` listing it).
    """

    needs_final: ClassVar[bool] = True

    def __init__(
        self, num_blocks: int, config: MetricConfig | None = None, *, logits: Collection[str] = ()
    ) -> None:
        super().__init__(num_blocks, config)
        self.logits = frozenset(logits)
        self.stats: dict[int, dict[str, dict[str, float]]] = {}
        self.nonfinite: set[int] = set()

    def update(self, block: int, reference: Mapping[str, np.ndarray], ablated: Mapping[str, np.ndarray]) -> None:
        """Add one batch: final outputs of the full model and of the model without ``block``."""
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.num_blocks:
            raise BlockError(
                f"ablation block index {block!r} is outside 0..{self.num_blocks - 1}", hint="pass the block's position"
            )
        block = int(block)
        per_output = self.stats.setdefault(block, {})
        for name, ref in reference.items():
            ref = np.asarray(ref)
            if name not in ablated or np.shape(ablated[name]) != ref.shape:
                got = "missing" if name not in ablated else f"shape {list(np.shape(ablated[name]))}"
                raise BlockError(
                    f"output {name!r} of the model without block {block} is {got}; the full model gives "
                    f"shape {list(ref.shape)}",
                    hint="block removal must keep the model's outputs; check that the block is removable",
                )
            if not np.issubdtype(ref.dtype, np.floating):
                continue
            abl = np.asarray(ablated[name])
            if not np.isfinite(ref).all():
                raise BlockError(
                    f"model output {name!r} contains NaN or Inf (reference run for block {block})",
                    hint="the model overflows on this calibration data; check its inputs",
                )
            if not np.isfinite(abl).all():
                self.nonfinite.add(block)
                continue
            s = per_output.setdefault(name, dict.fromkeys(("cos_sum", "samples", "abs_sum", "elements"), 0.0))
            x, y = _per_sample(ref), _per_sample(abl)
            d2, _, zx, zy = _pair_terms(x, y)
            s["cos_sum"] += float(np.where(zx & zy, 0.0, np.where(zx | zy, 1.0, 0.5 * d2)).sum())
            s["samples"] += x.shape[0]
            s["abs_sum"] += float(np.abs(x - y).sum())
            s["elements"] += x.size
            if name in self.logits and ref.ndim >= 1 and ref.shape[-1] >= 2:
                lp = _log_softmax(ref.astype(np.float64))
                lq = _log_softmax(abl.astype(np.float64))
                kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
                s["kl_sum"] = s.get("kl_sum", 0.0) + float(kl.sum())
                s["top1_sum"] = s.get("top1_sum", 0.0) + float((ref.argmax(-1) == abl.argmax(-1)).sum())
                s["positions"] = s.get("positions", 0.0) + kl.size

    def result(self) -> MetricResult:
        """Per-block score (KL for logits, else 1 - cosine) and per-output details."""
        if not self.stats:
            raise CalibrationError("metric 'ablation' received no ablated run", hint="pass at least one block")
        scores: list[float | None] = [None] * self.num_blocks
        outputs: dict[str, dict[str, dict[str, float]]] = {}
        for block, per_output in sorted(self.stats.items()):
            table = {}
            for name, s in per_output.items():
                row = {"cosine_distance": s["cos_sum"] / s["samples"], "mae": s["abs_sum"] / s["elements"]}
                if "positions" in s:
                    row["kl"] = s["kl_sum"] / s["positions"]
                    row["top1_agreement"] = s["top1_sum"] / s["positions"]
                table[name] = row
            outputs[str(block)] = table
            kls = [r["kl"] for r in table.values() if "kl" in r]
            if block in self.nonfinite:
                scores[block] = math.inf
            elif kls:
                scores[block] = float(np.mean(kls))
            elif table:
                scores[block] = float(np.mean([r["cosine_distance"] for r in table.values()]))
        details = {"outputs": outputs, "nonfinite": sorted(self.nonfinite)}
        return MetricResult(self.name, tuple(scores), details=details)
