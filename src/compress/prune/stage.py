"""The prune stage: :func:`prune` chooses blocks by a ``PruneConfig``, removes them and verifies.

Three ways to choose: a selection rule on the scores of the scoring batches
(:mod:`compress.prune.select`), the ``measured`` rule (:mod:`compress.prune.measured`), or
the fidelity budget ``max_drop`` (:func:`_prune_to_budget`: one block at a time, re-scored,
stopped before the held-out loss exceeds the budget). Then healing (with
``PruneConfig.heal``, :mod:`compress.prune.heal`), the held-out fidelity and the latency
(:mod:`compress.prune.cost`) go into one :class:`~compress.prune.config.PruneReport`. Does not modify the model;
nothing touches files.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import onnx

from compress.blocks import Block, BlockMap, MappedModel, remaining_blocks
from compress.calibration import describe, relabel
from compress.errors import ConfigError
from compress.fidelity import Batches, compare_models
from compress.log import logger
from compress.onnx_io import model_nbytes
from compress.prune.config import (
    CalibrationSplit,
    PruneConfig,
    PruneReport,
    _copy,
    check_blocks,
    split_batches,
)
from compress.prune.cost import _latency, _params
from compress.prune.heal import Removal, heal_spans
from compress.prune.measured import MeasuredChoice, select_measured
from compress.prune.select import AUTO_METRIC, MEASURED, SELECTIONS, Candidates, choose_metric
from compress.scoring.collect import ScoreConfig, ScoreReport, score
from compress.scoring.gradnorm import GRADNORM, carry_gradnorms, gradnorm_status, has_gradnorm, missing_gradnorm_error
from compress.surgery import remove_blocks, verify_removal


def _removal_order(scores: ScoreReport, config: PruneConfig, block_map: BlockMap, count: int) -> list[int]:
    keep = set(config.keep)
    metric = scores.metrics[config.metric]
    segments = None
    if config.select == "segment":
        cka = scores.metrics.get("cka")
        if cka and cka.get("segments"):
            idx = cka["scored_blocks"]
            segments = [(idx[a], idx[b - 1] + 1) for a, b in cka["segments"]]
    cands = Candidates(scores=metric["scores"], count=count, segments=segments, seed=config.seed,
                       removable=frozenset(b.index for b in block_map.blocks if b.removable and b.index not in keep))
    return SELECTIONS.get(config.select)(cands)


def _metrics_for(config: PruneConfig) -> tuple[str, ...]:
    names = [config.metric]
    if config.select == "segment" and "cka" not in names:
        names.append("cka")
    return tuple(names)


def _score(model: onnx.ModelProto, block_map: BlockMap, batches: Batches, config: PruneConfig, *,
           interval: int) -> ScoreReport:
    """Scores of ``config.metric`` (and ``cka`` for ``segment``) at ``interval``."""
    options = replace(config.options, interval=interval)
    score_config = ScoreConfig(metrics=_metrics_for(config), options=options)
    return score(MappedModel(model, block_map), score_config, data=batches)[1]


def _prune_to_budget(model: onnx.ModelProto, block_map: BlockMap, score_set: Batches, held: Batches,
                     config: PruneConfig) -> tuple[onnx.ModelProto, BlockMap, list[tuple[Block, float | None]], list[dict[str, Any]],
                                ScoreReport]:
    """Remove one block at a time while the held-out fidelity loss stays within the budget.

    Returns the pruned model, its block map, the removed blocks (of ``block_map``) with their
    scores, one step per tried block, and the first scores (of ``model``).
    """
    assert config.max_drop is not None
    current, current_map = _copy(model), block_map
    removed: list[tuple[Block, float | None]] = []
    steps: list[dict[str, Any]] = []
    first_scores = None
    name_to_original = {b.name: b for b in block_map.blocks}
    keep_names = {block_map.blocks[k].name for k in config.keep}  # indices checked by check_blocks
    while True:
        cands = [b for b in current_map.blocks if b.removable and b.name not in keep_names]
        if not cands:
            break
        # GradNorm was computed on the original model: its blocks keep their values (one-shot, as in SGLP).
        scores = _score(current, carry_gradnorms(current_map, block_map), score_set, config, interval=1)
        first_scores = first_scores or scores
        s = scores.metrics[config.metric]["scores"]
        best = min((b for b in cands if s[b.index] is not None), key=lambda b: (s[b.index], b.index), default=None)
        if best is None:
            break
        trial = remove_blocks(current, [best])
        if held:
            verify_removal(current, trial, next(iter(held)), blocks=[best])
        fid = compare_models(model, trial, held)
        step = {"block": best.name, "score": s[best.index], "loss": fid["loss"], "accepted": fid["loss"] <= config.max_drop}
        steps.append(step)
        logger.info("budget: without %s the loss is %.4g (budget %.4g)", best.name, fid["loss"], config.max_drop)
        if not step["accepted"]:
            break
        removed.append((name_to_original[best.name], s[best.index]))
        current = trial
        current_map = remaining_blocks(current, current_map, [best.index])
    if first_scores is None:
        first_scores = _score(model, block_map, score_set, config, interval=1)
    return current, current_map, removed, steps, first_scores


def _describe(block: Block, score: float | None) -> dict[str, Any]:
    """One entry of the report's ``removed`` list."""
    return {"index": block.index, "name": block.name, "params": block.params, "score": score}


def prune(model: MappedModel, config: PruneConfig, *, data: Batches) -> tuple[MappedModel, PruneReport]:
    """Choose blocks by ``config``, remove them and verify the result: ``(pruned model, report)``.

    The prune stage (the shape of :mod:`compress.stage`). ``model`` is not modified; the
    pruned model comes back with the map of the blocks it still has (indices renumbered).
    The calibration batches ``data`` are split into scoring and held-out batches (``config.holdout``); scores come
    from the first part, fidelity from the second (the same batches when there is only one).
    The report describes the data as ``batches`` do (:func:`compress.calibration.describe`:
    a :class:`~compress.calibration.CalibrationSet`'s ``description`` and ``random``); the
    scoring and held-out parts are described as the whole.

    With ``metric`` ``gradnorm`` the scores are the blocks' GradNorm from ``block_map``
    (:mod:`compress.scoring.gradnorm`); with ``select`` ``segment`` (SGLP: CKA segments,
    importance inside a segment from the metric, e.g. ``gradnorm``) or ``metric``
    ``gradnorm``, ``report.method["gradnorm"]`` says whether the map carries GradNorm
    (``absent``, or ``present (LOSS)``). With ``max_drop``, the blocks left after each removal
    keep the GradNorm of the original model (computed once, as in SGLP).

    Raises:
        ConfigError: inconsistent options; BlockError: more blocks asked for than removable,
        a ``--keep`` index out of range, a graph the checker rejects, metric ``gradnorm`` on a
        block map without GradNorm.
    """
    proto, block_map, batches = model.proto, model.block_map, data
    if (config.remove is None) == (config.max_drop is None) and config.select != "auto":
        raise ConfigError("say how much to prune", hint="pass one of --remove N, --ratio R, --auto or --max-drop X")
    check_blocks(config, block_map)
    if config.metric == GRADNORM and not has_gradnorm(block_map):
        raise missing_gradnorm_error("the block map")
    requested, why = config.metric, None
    if config.metric == AUTO_METRIC:
        metric, why = choose_metric(block_map)
        config = replace(config, metric=metric)
        logger.debug("metric auto: %s", why)
    calibration, random_calibration = describe(batches)
    score_set, held = split_batches(batches, config.holdout)
    holdout_is_scoring_data = held is score_set or len(batches) < 2
    if held is score_set:  # one set scores and verifies
        score_set = held = relabel(score_set, batches)
    else:
        score_set, held = relabel(score_set, batches), relabel(held, batches)
    split = CalibrationSplit(score_set, held)
    steps: list[dict[str, Any]] = []
    measured: MeasuredChoice | None = None
    if config.max_drop is not None:
        pruned, current_map, removed, steps, scores = _prune_to_budget(proto, block_map, score_set, held, config)
    elif config.select == MEASURED:
        measured = select_measured(proto, block_map, score_set, held, config, config.remove or 0)
        scores, chosen = measured.scores, measured.blocks
        removed = [(block_map.blocks[i], scores.metrics[config.metric]["scores"][i]) for i in chosen]
        pruned = measured.model
        current_map = remaining_blocks(measured.plain, block_map, chosen)
    else:
        count = config.remove or 0
        interval = count if config.select == "span" and count > 0 else 1
        scores = _score(proto, block_map, score_set, config, interval=interval)
        chosen = _removal_order(scores, config, block_map, count)
        removed = [(block_map.blocks[i], scores.metrics[config.metric]["scores"][i]) for i in chosen]
        pruned = remove_blocks(proto, [b for b, _ in removed]) if removed else _copy(proto)
        if removed and held:  # the guard's last check: ORT output shapes and dtypes are unchanged
            verify_removal(proto, pruned, next(iter(held)), blocks=[b for b, _ in removed])
        current_map = remaining_blocks(pruned, block_map, chosen)
    heal_report = None
    if measured is not None:
        fidelity, heal_report = measured.fidelity, measured.heal
    else:
        fidelity = compare_models(proto, pruned, held)
    if config.heal and removed and measured is None:
        pruned, fidelity, heal_report = heal_spans(proto, Removal(pruned, [b for b, _ in removed], fidelity),
                                                   split, config)
    method: dict[str, Any] = {
        "metric": config.metric, "select": "budget" if config.max_drop is not None else config.select,
        "remove": config.remove, "max_drop": config.max_drop, "keep": list(config.keep),
        "holdout": config.holdout, "interval": config.options.interval,
        "metric_requested": requested, "metric_choice": why}
    if config.select == "segment" or config.metric == GRADNORM:  # SGLP's own importance inside the segments
        method["gradnorm"] = gradnorm_status(block_map)
        logger.info("importance by %s; gradnorm: %s", config.metric, method["gradnorm"])
    if config.heal:
        method["heal"] = True
    report = PruneReport(
        method=method,
        calibration={"description": calibration, "random": random_calibration,
                     "scoring_batches": len(score_set), "holdout_batches": len(held),
                     "holdout_is_scoring_data": holdout_is_scoring_data},
        blocks_before=len(block_map.blocks),
        blocks_after=len(current_map.blocks),
        removed=[_describe(b, s) for b, s in removed],
        scores=scores.to_dict()["metrics"],
        steps=steps,
        params={"before": _params(proto), "after": _params(pruned)},
        size_bytes={"before": model_nbytes(proto), "after": model_nbytes(pruned)},
        fidelity=fidelity,
        measured=measured.report if measured is not None else None,
        heal=(heal_report or {"spans": [], "note": "no block was removed"}) if config.heal else None,
        latency=(_latency(proto, pruned, block_map, [b for b, _ in removed], next(iter(held)), config.latency)
                 if config.latency is not None and held else None),
    )
    return MappedModel(pruned, current_map), report
