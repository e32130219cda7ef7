"""The configuration and result of the prune stage, and the data helpers every prune module shares.

:class:`PruneConfig` (one frozen config, checked in ``__post_init__``; the CLI and
``compress run`` share it), :class:`PruneReport`, :func:`check_blocks` (the config against
a block map, before any work), :func:`split_batches` (scoring vs held-out batches).
Nothing here runs a model or touches files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import onnx

from compress.bench import BenchConfig
from compress.blocks import BlockMap
from compress.config import StageConfig, option
from compress.errors import ConfigError
from compress.fidelity import Batches
from compress.prune.select import AUTO_METRIC, SELECTIONS
from compress.scoring import MetricConfig, metric_names
from compress.scoring.heal import RIDGE_GRID
from compress.stage import set_fields

PRUNE_SCHEMA = 1



@dataclass(frozen=True, kw_only=True)
class PruneConfig(StageConfig):
    """How to choose and verify.

    Attributes:
        metric: the score to rank blocks by; ``auto`` = :func:`choose_metric` (``ablation``
            is allowed; slow; ``gradnorm`` reads the blocks' GradNorm from the block map).
        select: selection rule name (:data:`SELECTIONS`); default ``lowest``
            (:func:`select_measured`).
        remove: number of blocks to remove (``lowest``, ``span``, ``segment``, baselines).
        max_drop: fidelity budget; removes one block at a time while the loss stays <= it.
        keep: indices of blocks never to remove.
        holdout: share of calibration batches held back for verification (never scored).
        options: metric options (interval, token ranges, ...).
        latency: how long to time ORT latency of both models; None = do not time.
        seed: seed of the ``random`` baseline.
        heal: replace each removed span by a fitted linear map where that improves the
            held-out fidelity (:func:`heal_spans`).
        heal_refit: for every removed span after the first, also try the map fitted with the
            span's input taken from the model pruned and healed so far (the map then corrects
            the upstream spans' error too; one more pass of both models per span); the better
            of the two on the held-out batches is kept.
        heal_ridge: relative ridge strength of the healing fit (>= 0; ``--heal-ridge``); None
            (default) = per span, the best held-out fidelity over :data:`RIDGE_GRID`.
    """

    metric: str = option(AUTO_METRIC, choices=lambda: [*metric_names(), AUTO_METRIC], flag="",
                         help="the score to rank blocks by (auto: ablation for convolutional blocks, else cosine; "
                              "gradnorm: SGLP's GradNorm, stored in the block map by 'compress export --calib')")
    select: str = option("lowest", choices=SELECTIONS.names, flag="",
                         help="selection rule (lowest, span, segment, measured, auto, or the baselines last/random)")
    remove: int | None = option(None, minimum=0, metavar="N", help="remove N blocks")
    max_drop: float | None = option(None, minimum=0, metavar="X", help="fidelity budget (e.g. 0.02)")
    keep: tuple[int, ...] = option((), minimum=0, metavar="I,J", help="block indices never to remove")
    holdout: float = option(0.25, key="", metavar="F",
                            help="share of calibration batches held back for verification (default 0.25)")
    options: MetricConfig = field(default_factory=MetricConfig)
    latency: BenchConfig | None = field(default_factory=BenchConfig)
    seed: int = option(0, help="seed of the 'random' baseline")
    heal: bool = option(False, help="replace each removed span by a closed-form linear map per stream (fitted on the "
                                    "scoring batches), kept only where it improves the held-out fidelity")
    heal_ridge: float | None = option(
        None, minimum=0, metavar="R",
        help="relative ridge strength of the healing fit (x trace(X^T X)/d); default: per span, the best on the "
             f"held-out batches of {', '.join(f'{r:g}' for r in RIDGE_GRID)}")
    heal_refit: bool = option(
        True, flag="",
        help="heal each span after the first also with a map fitted on its input in the model already pruned "
             "(and healed) upstream, and keep the better of the two fits on the held-out batches")

    def __post_init__(self) -> None:
        """Checks every field once (the CLI and ``compress run`` share it); blocks are checked by :func:`check_blocks`."""
        from compress.validate import FieldError, Interval, check_choice, check_int, check_number

        check_choice("PruneConfig", "metric", self.metric, [*metric_names(), AUTO_METRIC])
        check_choice("PruneConfig", "select", self.select, SELECTIONS.names())
        check_int("PruneConfig", "remove", self.remove, within=Interval(low=0), example="2", optional=True)
        check_number("PruneConfig", "max_drop", self.max_drop, within=Interval(0, 1), example="0.02", optional=True)
        check_number("PruneConfig", "holdout", self.holdout, within=Interval(0, 1, high_open=True), example="0.25")
        check_int("PruneConfig", "seed", self.seed, example="0")
        if not isinstance(self.heal, bool):
            raise FieldError("PruneConfig", "heal", self.heal, "must be true or false", example="true")
        if not isinstance(self.heal_refit, bool):
            raise FieldError("PruneConfig", "heal_refit", self.heal_refit, "must be true or false", example="true")
        check_number("PruneConfig", "heal_ridge", self.heal_ridge, within=Interval(low=0), example="1e-2", optional=True)
        if not isinstance(self.keep, tuple) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                       for k in self.keep):
            raise FieldError("PruneConfig", "keep", self.keep, "must be block indices (integers >= 0)", example="0,5")


@dataclass(frozen=True)
class PruneReport:
    """What :func:`compress.prune.prune` did (``MODEL.prune.json`` without the file names).

    JSON-ready values; :meth:`to_dict` gives the report's layout (schema :data:`PRUNE_SCHEMA`;
    the optional parts only when present). Fidelity losses are ``1 - top1`` for logits outputs,
    ``1 - cosine`` otherwise (worst output); sizes in bytes; parameters in elements.

    Attributes:
        method: the rule as run (metric, select, remove, max_drop, keep, holdout, ...).
        calibration: the data (description, random, scoring/held-out batch counts).
        blocks_before / blocks_after: block counts of the input and the pruned model.
        removed: one entry per removed block (index, name, params, score).
        scores: per-metric scores of the scoring pass (``scores.json``'s ``metrics``).
        steps: the fidelity budget's steps (``max_drop``), else empty.
        params / size_bytes: ``{"before": ..., "after": ...}``.
        fidelity: the pruned model against the input on the held-out batches.
        measured: the candidate table of the ``measured`` rule (None otherwise).
        heal: the healing report (None without ``heal``).
        latency: the latency estimate (None without ``latency`` or held-out batches).
    """

    method: dict[str, Any]
    calibration: dict[str, Any]
    blocks_before: int
    blocks_after: int
    removed: list[dict[str, Any]]
    scores: dict[str, Any]
    steps: list[dict[str, Any]]
    params: dict[str, int]
    size_bytes: dict[str, int]
    fidelity: dict[str, Any]
    measured: dict[str, Any] | None = None
    heal: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    schema_version: int = field(default=PRUNE_SCHEMA, init=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: ``schema_version`` first, then the fields; ``measured``, ``heal``, ``latency`` when set."""
        return {
            "schema_version": self.schema_version, "method": self.method, "calibration": self.calibration,
            "blocks_before": self.blocks_before, "blocks_after": self.blocks_after, "removed": self.removed,
            "scores": self.scores, "steps": self.steps, "params": self.params, "size_bytes": self.size_bytes,
            "fidelity": self.fidelity, **set_fields(self, ("measured", "heal", "latency")),
        }


class CalibrationSplit(NamedTuple):
    """The calibration batches of one prune run, as :func:`split_batches` returns them.

    Attributes:
        scoring: the batches block scores and healing fits are computed on.
        held: the held-out batches fidelity is measured on (the same batches as
            ``scoring`` when there is only one batch, or ``holdout`` is 0).
    """

    scoring: Batches
    held: Batches


def check_blocks(config: PruneConfig, block_map: BlockMap, *, counts: Sequence[int] = ()) -> None:
    """Before any work: ``keep`` names existing blocks, and ``remove`` (and ``counts``) fit the removable ones.

    Raises:
        FieldError: a ``keep`` index out of range (field ``keep``), or more blocks asked
            for than can be removed (field ``remove``).
    """
    from compress.validate import FieldError

    n = len(block_map.blocks)
    bad = sorted(k for k in set(config.keep) if not 0 <= k < n)
    if bad:
        raise FieldError("PruneConfig", "keep", ",".join(map(str, config.keep)),
                         f"block {bad[0]} does not exist: the model has blocks 0..{n - 1} (see 'compress inspect')",
                         example="0" if n else None)
    free = sum(1 for b in block_map.blocks if b.removable and b.index not in set(config.keep))
    for count in (*([config.remove] if config.remove is not None and config.max_drop is None else []), *counts):
        if count > free:
            raise FieldError("PruneConfig", "remove", count,
                             f"asks for {count} blocks, but only {free} of the {n} blocks can be removed"
                             + (f" ({len(config.keep)} kept)" if config.keep else ""),
                             advice="ask for fewer blocks (see 'compress inspect'), or keep fewer")


def blocks_for_ratio(ratio: float, block_map: BlockMap) -> int:
    """The block count ``--ratio`` / ``prune.ratio`` asks for: ``round(ratio * number of blocks)``."""
    return round(ratio * len(block_map.blocks))


def split_batches(batches: Batches, holdout: float) -> CalibrationSplit:
    """``(scoring batches, held-out batches)``: every k-th batch is held out; both non-empty when n >= 2.

    ``max(1, round(holdout * n))`` of the ``n`` batches are held out, evenly spaced; with
    ``holdout == 0`` or fewer than two batches both parts are all the batches. A
    :class:`~compress.calibration.CalibrationSet` stays lazy (split by
    :func:`~compress.calibration.split_calibration`); other batches become lists.

    Raises:
        ConfigError: ``holdout`` not in [0, 1).
    """
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout {holdout} must be in [0, 1)", hint="e.g. --holdout 0.25")
    from compress.calibration import CalibrationSet, split_calibration

    if isinstance(batches, CalibrationSet):  # stays lazy: batches are read when iterated
        if holdout == 0 or len(batches) < 2:
            return CalibrationSplit(batches, batches)
        return CalibrationSplit(*split_calibration(batches, holdout=holdout))  # type: ignore[arg-type]
    items = list(batches)
    if holdout == 0 or len(items) < 2:
        return CalibrationSplit(items, items)
    h = max(1, round(holdout * len(items)))
    held = {math.floor((k + 0.5) * len(items) / h) for k in range(h)}
    return CalibrationSplit([b for i, b in enumerate(items) if i not in held], [b for i, b in enumerate(items) if i in held])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
