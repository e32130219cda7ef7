"""The accumulator protocol and the metric registry.

:class:`Accumulator` (``cls(num_blocks, config)``, ``update(...)``, ``result()``),
:class:`BoundaryAccumulator` (fed one :class:`~compress.scoring.activations.BlockActivations`
per calibration batch), :class:`MetricResult` (what a metric measured, JSON-ready through
``to_dict()``), and :data:`METRICS` with :func:`register_metric`, :func:`get_metric` and
:func:`metric_names`. The metrics themselves register in :mod:`compress.scoring.tokens`,
:mod:`compress.scoring.cka` and :mod:`compress.scoring.ablation` (imported by
:mod:`compress.scoring.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from compress.errors import BlockError, CalibrationError, ConfigError
from compress.registry import Registry
from compress.scoring.activations import BlockActivations
from compress.scoring.options import MetricConfig, TokenRange

_CHUNK_ELEMENTS = 1 << 22
"""Elements per float64 temporary (32 MiB): bounds per-batch scratch memory."""


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


class Accumulator:
    """Base of all metric accumulators: ``cls(num_blocks, config)``, ``update(...)``, ``result()``.

    Attributes:
        name: registered metric name (set by :func:`register_metric`).
        needs_final: False: ``update(BlockActivations)`` once per batch; True (ablation):
            ``update(block, reference, ablated)`` with the model's final outputs.
        from_block_map: True (gradnorm): not fed at all; the scores come from the block map
            (``score_map(blocks, source=..., loss=...)``), with no ONNX Runtime pass.
        num_blocks: number of blocks L being scored.
        config: the options.
    """

    name: ClassVar[str] = ""
    needs_final: ClassVar[bool] = False
    from_block_map: ClassVar[bool] = False

    def __init__(self, num_blocks: int, config: MetricConfig | None = None) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise BlockError(f"no block to score (num_blocks={num_blocks!r})", hint="check the block map")
        self.num_blocks = num_blocks
        self.config = config if config is not None else MetricConfig()

    def result(self) -> MetricResult:  # pragma: no cover - abstract
        """What the metric measured over every batch so far (the accumulator stays usable).

        Raises:
            CalibrationError: no batch was added.
        """
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
