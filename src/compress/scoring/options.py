"""Options shared by the metrics and the fusion of per-stream scores.

:class:`MetricConfig` (frozen, validated on construction: a bad value is a ConfigError
naming its CLI flag), :class:`TokenRange` and its parser :func:`parse_token_ranges`, and
the multi-stream fusion: :data:`STREAM_FUSIONS`, :func:`parse_stream_weights`,
:func:`fuse_streams` (see :mod:`compress.scoring.metrics` for what ranges and streams
mean). Pure Python; nothing here reads activations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from compress.errors import ConfigError

_MIN_HSIC_ROWS = 4
"""The unbiased HSIC estimator needs at least 4 rows."""

_RANGE_ITEM = re.compile(r"^(?P<name>[A-Za-z_][\w.-]*)=(?P<start>[+-]?\d+)?:(?P<stop>[+-]?\d+)?$")
_RANGE_EXAMPLE = "e.g. --token-ranges text=0:77,image=77:"

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
