"""The ``measured`` selection: candidate removal sets of every rule and metric, evaluated on held-out batches.

:func:`select_measured` scores the blocks once by every metric of :data:`MEASURED_METRICS`
(plus span scores when more than one block goes), collects the candidate sets the rules
give (:func:`_candidate_sets`), prunes the model by each (healed too, with
``PruneConfig.heal``) and keeps the one with the best held-out fidelity. ``lowest`` by the
configured metric is the first candidate and is displaced only by a strictly better one.
Models are never modified; nothing touches files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import onnx

from compress.blocks import BlockMap, MappedModel
from compress.errors import BlockError, ConfigError
from compress.fidelity import Batches, HeldOut
from compress.graph import GraphIndex
from compress.log import logger
from compress.prune.config import CalibrationSplit, PruneConfig, _copy
from compress.prune.cost import _params
from compress.prune.heal import Removal, _better, fit_spans, heal_spans, removed_spans
from compress.prune.select import MEASURED_METRICS, SELECTIONS, Candidates
from compress.scoring.collect import ScoreConfig, ScoreReport, score
from compress.scoring.gradnorm import GRADNORM, has_gradnorm
from compress.scoring.heal import LinearFit
from compress.surgery import remove_blocks, verify_removal


@dataclass
class MeasuredChoice:
    """What :func:`select_measured` keeps: the chosen blocks, the model to write and the candidate table."""

    blocks: list[int]
    plain: onnx.ModelProto
    model: onnx.ModelProto
    fidelity: dict[str, Any]
    heal: dict[str, Any] | None
    scores: ScoreReport
    report: dict[str, Any]


def _candidate_sets(config: PruneConfig, block_map: BlockMap, count: int, single: ScoreReport,
                    span: ScoreReport | None) -> tuple[dict[tuple[int, ...], list[str]], list[str]]:
    """Every candidate removal set -> the rules that give it (the default ``lowest/<metric>`` first), and notes."""
    keep = set(config.keep)
    removable = frozenset(b.index for b in block_map.blocks if b.removable and b.index not in keep)
    cka = single.metrics.get("cka")
    segments = None
    if cka and cka.get("segments"):
        idx = cka["scored_blocks"]
        segments = [(idx[a], idx[b - 1] + 1) for a, b in cka["segments"]]
    metrics = list(dict.fromkeys([config.metric, *single.metrics]))  # the default rule's metric first
    plan: list[tuple[str, str, ScoreReport]] = [("lowest", m, single) for m in metrics]
    plan += [("segment", m, single) for m in metrics] if segments else []
    if span is not None:
        plan += [("span", m, span) for m in metrics if m in span.metrics]
    elif count == 1:
        plan += [("span", m, single) for m in metrics if m != "cka"]
    sets: dict[tuple[int, ...], list[str]] = {}
    notes: list[str] = []
    for rule, metric, rep in plan:
        c = Candidates(scores=rep.metrics[metric]["scores"], removable=removable, count=count, segments=segments,
                       seed=config.seed)
        try:
            chosen = tuple(sorted(SELECTIONS.get(rule)(c)))
        except BlockError as exc:
            notes.append(f"{rule}/{metric}: {exc.message}")
            continue
        sets.setdefault(chosen, []).append(f"{rule}/{metric}")
    return sets, notes


def select_measured(model: onnx.ModelProto, block_map: BlockMap, score_set: Batches, held: Batches,
                    config: PruneConfig, count: int) -> MeasuredChoice:
    """Choose ``count`` blocks by measured fidelity: try a few candidate sets, keep the best on ``held``.

    Candidates (deduplicated; each set is evaluated once and lists every rule that gives it):
    ``lowest`` by ``config.metric`` (the default rule, always the first candidate) and by
    each of :data:`MEASURED_METRICS` (and ``gradnorm`` when ``block_map`` carries it); ``segment`` (SGLP, the CKA segments) by each; ``span``
    (the best contiguous run) by each token metric, from a second scoring pass with
    ``interval = count`` (``count == 1``: the single-block scores). With ``config.heal``, each
    candidate is also healed (:func:`heal_spans`; the fits of every candidate's spans come
    from one ORT pass) and the healed model is a candidate of its own.

    The held-out reference outputs are computed once (:class:`HeldOut`); each candidate costs
    one ORT session and one pass over the held-out batches (plus the ridge trials when
    healing). A candidate displaces the current best only when its fidelity is strictly
    better (:func:`_better`), so the choice is never worse on ``held`` than the default rule.

    The score reports describe the data as ``score_set`` does. Does not modify ``model``.

    Raises:
        BlockError, ConfigError: ``config.metric`` cannot be scored on this model;
            CalibrationError: a batch ORT rejects.
    """
    import time

    t0 = time.perf_counter()
    metrics = tuple(dict.fromkeys([config.metric, *MEASURED_METRICS]))
    extra_notes: list[str] = []
    last_notes: list[str] = []
    if has_gradnorm(block_map):
        metrics = tuple(dict.fromkeys([*metrics, GRADNORM]))  # read from the block map: no ORT work
    else:
        last_notes.append("no gradnorm candidates: the block map has no GradNorm (compress export --calib, "
                          "or prune --torch-source)")
    mapped = MappedModel(model, block_map)
    try:
        single = score(mapped, ScoreConfig(metrics=metrics, options=replace(config.options, interval=1)),
                       data=score_set)[1]
    except (BlockError, ConfigError) as exc:  # an extra metric does not apply here: the default rule's alone
        if len(metrics) == 1:
            raise
        extra_notes.append(f"the candidate metrics {', '.join(metrics[1:])} were not scored: {exc.message}")
        metrics = (config.metric,)
        single = score(mapped, ScoreConfig(metrics=metrics, options=replace(config.options, interval=1)),
                       data=score_set)[1]
    span = None
    token = tuple(m for m in metrics if m not in ("cka", "ablation"))
    if count > 1 and token:
        try:
            span = score(mapped, ScoreConfig(metrics=token, options=replace(config.options, interval=count)),
                         data=score_set)[1]
        except (BlockError, ConfigError) as exc:
            extra_notes.append(f"no span candidates: {exc.message}")
    sets, notes = _candidate_sets(config, block_map, count, single, span)
    notes = extra_notes + notes + last_notes
    reference = HeldOut(model, held)
    spans_fits: dict[tuple[int, int], list[LinearFit | str]] = {}
    mask_used = None
    if config.heal and count:
        spans = list({(s[0].index, s[-1].index): s for key in sets
                      for s in removed_spans([block_map.blocks[i] for i in key])}.values())
        fitted, mask_used = fit_spans(model, spans, score_set, token_mask=config.options.token_mask)
        spans_fits = {(s[0].index, s[-1].index): f for s, f in zip(spans, fitted, strict=True)}
    rows: list[dict[str, Any]] = []
    best: tuple[dict[str, Any], int, tuple[int, ...], onnx.ModelProto, onnx.ModelProto, dict[str, Any] | None] | None
    best = None
    index = GraphIndex(model)
    for key, rules in sets.items():
        blocks = [block_map.blocks[i] for i in key]
        plain = remove_blocks(model, blocks, index=index) if blocks else _copy(model)
        if blocks and held:
            verify_removal(model, plain, next(iter(held)), blocks=blocks)
        fid = reference.fidelity(plain)
        options: list[tuple[bool, onnx.ModelProto, dict[str, Any], dict[str, Any] | None]] = [(False, plain, fid, None)]
        if config.heal and blocks:
            fits = [spans_fits[s[0].index, s[-1].index] for s in removed_spans(blocks)]
            healed, hfid, heal_rep = heal_spans(model, Removal(plain, blocks, fid), CalibrationSplit(score_set, held),
                                                config, evaluate=reference.fidelity, fits=(fits, mask_used))
            options[0] = (False, plain, fid, heal_rep)
            if heal_rep["healed_spans"]:
                options.append((True, healed, hfid, heal_rep))
        for healed_flag, m, f, hrep in options:
            rows.append({"rules": rules, "blocks": list(key), "names": [b.name for b in blocks], "healed": healed_flag,
                         "healed_spans": hrep["healed_spans"] if healed_flag and hrep else 0,
                         "loss": f["loss"], "cosine": f["cosine"], "top1": f.get("top1"), "params": _params(m),
                         "chosen": False})
            if best is None or _better(f, best[0]):
                best = (f, len(rows) - 1, key, plain, m, hrep)
    assert best is not None  # the default rule always gives a set (its errors are the ones of --select lowest)
    fid, at, key, plain, chosen_model, hrep = best
    rows[at]["chosen"] = True
    seconds = time.perf_counter() - t0
    logger.info("measured: %d candidate sets, %d models evaluated in %.2f s; chose %s (%s)", len(sets), len(rows),
                seconds, list(key), ", ".join(rows[at]["rules"]))
    report = {"candidates": rows, "candidate_sets": len(sets), "evaluated": len(rows), "seconds": seconds,
              "default_rule": f"lowest/{config.metric}", "scoring_passes": 1 + (span is not None),
              "heal_fit_passes": int(bool(spans_fits)), "notes": notes,
              "fidelity_measure": "held-out fidelity loss (1 - top1 for logits, else 1 - cosine), ties by cosine"}
    if config.heal and not key:
        hrep = {"spans": [], "note": "no block was removed"}
    return MeasuredChoice(blocks=list(key), plain=plain, model=chosen_model, fidelity=fid, heal=hrep, scores=single,
                          report=report)
