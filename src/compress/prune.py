"""Depth pruning: choose the blocks to remove from their scores, remove them, verify.

Selection rules (:data:`SELECTIONS`; each takes the per-block scores of one metric and
returns the blocks to remove, lowest score = least important):

- ``lowest``: the ``count`` removable blocks with the lowest scores (``--remove N`` /
  ``--ratio R``);
- ``span``: the contiguous run of ``count`` removable blocks whose span score (the metric
  computed with ``interval = count``: input of the first block vs output of the last) is
  lowest (``--span``);
- ``segment``: SGLP. The CKA Fisher segmentation splits the blocks into contiguous
  segments of similar representations; the least important block of each segment is
  taken first (segments in order of that block's score), then the second least important,
  and so on (``--per-segment``);
- ``auto``: from the score distribution: sort the removable scores, take the largest
  relative jump ``log(s[k] / s[k-1])`` between consecutive scores for ``1 <= k <= n/2``,
  and remove the ``k`` blocks below it. Scale-free and never a fixed threshold (``--auto``);
- ``last`` and ``random``: baselines (drop the last ``count`` removable blocks; a seeded
  random choice), for benchmarks.

The metric defaults to ``auto`` (:func:`choose_metric`): ``ablation`` for convolutional blocks
(rank-4 NCHW feature maps), ``cosine`` otherwise (token sequences ``[B, T, D]``, vectors).

``--max-drop X`` is a fidelity budget: remove one block at a time (lowest score), re-score
the pruned model, verify it on calibration batches held back from scoring, and stop
before the fidelity loss exceeds ``X`` (iterative, like SLEB). The fidelity loss is
``1 - top1`` agreement with the original for logits outputs and ``1 - cosine`` otherwise
(worst output).

Every function here is pure: models are never modified, nothing touches files.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from compress.bench import BenchConfig, Timing, measure
from compress.blocks import Block, BlockMap, remaining_blocks
from compress.errors import BlockError, ConfigError
from compress.fidelity import FidelityAccumulator, logit_outputs, worst
from compress.graph import GraphIndex
from compress.log import logger, progress
from compress.registry import Registry
from compress.scoring import MetricConfig
from compress.scoring.collect import ScoreConfig, ScoreReport, make_session, run_batch, score_blocks
from compress.surgery import add_outputs, remove_blocks

PRUNE_SCHEMA = 1

Batches = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Candidates:
    """What a selection rule sees: per-block scores and which blocks it may remove."""

    scores: Sequence[float | None]
    removable: frozenset[int]
    count: int
    segments: Sequence[tuple[int, int]] | None = None
    seed: int = 0


Selector = Callable[[Candidates], list[int]]
SELECTIONS: Registry[Selector] = Registry("selection rule", flag="--select")


def _ranked(c: Candidates) -> list[int]:
    return sorted((i for i in c.removable if c.scores[i] is not None), key=lambda i: (c.scores[i], i))


def _need(c: Candidates, available: int) -> None:
    if c.count > available:
        raise BlockError(f"cannot remove {c.count} blocks: only {available} can be removed",
                         hint="ask for fewer (--remove/--ratio), or free blocks from --keep")


@SELECTIONS.register("lowest")
def select_lowest(c: Candidates) -> list[int]:
    ranked = _ranked(c)
    _need(c, len(ranked))
    return sorted(ranked[: c.count])


@SELECTIONS.register("span")
def select_span(c: Candidates) -> list[int]:
    """``scores[i]`` must be span scores (interval = count): input of i vs output of i+count-1."""
    spans = [i for i, s in enumerate(c.scores) if s is not None and all(j in c.removable for j in range(i, i + c.count))]
    if not spans:
        raise BlockError(f"no run of {c.count} contiguous removable blocks", hint="ask for a shorter --span")
    best = min(spans, key=lambda i: (c.scores[i], i))
    return list(range(best, best + c.count))


@SELECTIONS.register("segment")
def select_per_segment(c: Candidates) -> list[int]:
    """SGLP: blocks of one CKA segment are redundant with each other, so each segment keeps one.

    Round by round, the least important spare block of every segment (segments ordered by
    that block's score) is taken. A segment's spare blocks are its removable ones, except
    the most important of them when the segment has no other block to represent it: a
    one-block segment is a representation of its own and is emptied only when the spare
    blocks of all segments are not enough (then representatives go, lowest score first).
    """
    if not c.segments:
        raise BlockError("per-segment selection needs CKA segments", hint="score with --metric cka")
    ranked = _ranked(c)
    _need(c, len(ranked))
    queues = [[i for i in ranked if a <= i < b] for a, b in c.segments]
    reserve: list[int] = []
    for (a, b), q in zip(c.segments, queues, strict=True):
        if q and len(q) == b - a:  # every block of the segment is a candidate: keep its most important
            reserve.append(q.pop())
    chosen: list[int] = []
    while len(chosen) < c.count and any(queues):
        heads = sorted((q[0] for q in queues if q), key=lambda i: (c.scores[i], i))
        for i in heads[: c.count - len(chosen)]:
            chosen.append(i)
            next(q for q in queues if q and q[0] == i).pop(0)
    chosen += sorted(reserve, key=lambda i: (c.scores[i], i))[: c.count - len(chosen)]
    return sorted(chosen)


@SELECTIONS.register("auto")
def select_auto(c: Candidates) -> list[int]:
    ranked = _ranked(c)
    if len(ranked) < 2:
        return []
    s = [max(float(c.scores[i]), 1e-12) for i in ranked]  # type: ignore[arg-type]
    limit = max(1, len(s) // 2)
    k = max(range(1, limit + 1), key=lambda k: (math.log(s[k] / s[k - 1]) if k < len(s) else -math.inf, -k))
    return sorted(ranked[:k])


@SELECTIONS.register("last")
def select_last(c: Candidates) -> list[int]:
    ranked = sorted(c.removable)
    _need(c, len(ranked))
    return ranked[len(ranked) - c.count:] if c.count else []


@SELECTIONS.register("random")
def select_random(c: Candidates) -> list[int]:
    ranked = sorted(c.removable)
    _need(c, len(ranked))
    return sorted(random.Random(c.seed).sample(ranked, c.count))


#: ``PruneConfig.metric`` value that picks the metric from the blocks' layout (:func:`choose_metric`).
AUTO_METRIC = "auto"


def choose_metric(block_map: BlockMap) -> tuple[str, str]:
    """The metric ``auto`` stands for on this model, and why (a sentence for the report).

    ``ablation`` when most removable blocks take rank >= 4 activations (convolutional
    feature maps, NCHW), else ``cosine`` (Sana 1.5; token sequences and vectors).

    The per-token cosine was designed for transformer residual streams, where it is cheap
    (one ORT pass) and ranks blocks well. On CNN feature maps it compares uncentred channel
    vectors per pixel, which per-channel offsets (batch-norm shifts) dominate; there the
    direct measurement (skip each block, compare the final outputs; one extra ORT session
    per block) is worth its cost. Measured on the project's benchmark
    (benchmarks/results/prune.md): on EfficientNet-Lite0, averaged over three photo splits,
    ``ablation`` keeps the most top-1 agreement for 1, 2 and 3 removed blocks, while ``cosine``
    and ``cka`` are at the level of a random choice.
    """
    # A removable block's input has its output's type, which the block map records.
    ranks = [len(b.shape) for b in block_map.blocks if b.removable and b.shape is not None]
    conv = sum(r >= 4 for r in ranks)
    if ranks and 2 * conv > len(ranks):
        return "ablation", f"{conv} of {len(ranks)} removable blocks take rank-4+ feature maps (convolutional): ablation"
    return "cosine", f"{len(ranks) - conv} of {len(ranks)} removable blocks take token/vector activations: cosine"


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """How to choose and verify.

    Attributes:
        metric: the score to rank blocks by; ``auto`` = :func:`choose_metric` (``ablation``
            is allowed; slow).
        select: selection rule name (:data:`SELECTIONS`).
        remove: number of blocks to remove (``lowest``, ``span``, ``segment``, baselines).
        max_drop: fidelity budget; removes one block at a time while the loss stays <= it.
        keep: indices of blocks never to remove.
        holdout: share of calibration batches held back for verification (never scored).
        options: metric options (interval, token ranges, ...).
        latency: how long to time ORT latency of both models; None = do not time.
        seed: seed of the ``random`` baseline.
    """

    metric: str = AUTO_METRIC
    select: str = "lowest"
    remove: int | None = None
    max_drop: float | None = None
    keep: tuple[int, ...] = ()
    holdout: float = 0.25
    options: MetricConfig = field(default_factory=MetricConfig)
    latency: BenchConfig | None = field(default_factory=BenchConfig)
    seed: int = 0


@dataclass(frozen=True)
class PruneResult:
    """The pruned model, its block map and the verification report (JSON-ready dict)."""

    model: onnx.ModelProto
    block_map: BlockMap
    report: dict[str, Any]


def split_batches(batches: Batches, holdout: float) -> tuple[list[Any], list[Any]]:
    """(scoring batches, held-out batches): every k-th batch is held out; both non-empty when n >= 2."""
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout {holdout} must be in [0, 1)", hint="e.g. --holdout 0.25")
    from compress.calib import CalibrationSet, split_calibration

    if isinstance(batches, CalibrationSet):  # stays lazy: batches are read when iterated
        if holdout == 0 or len(batches) < 2:
            return batches, batches  # type: ignore[return-value]
        return split_calibration(batches, holdout=holdout)  # type: ignore[return-value]
    items = list(batches)
    if holdout == 0 or len(items) < 2:
        return items, items
    h = max(1, round(holdout * len(items)))
    held = {math.floor((k + 0.5) * len(items) / h) for k in range(h)}
    return [b for i, b in enumerate(items) if i not in held], [b for i, b in enumerate(items) if i in held]


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, batches: Batches) -> dict[str, Any]:
    """Fidelity of ``candidate`` against ``reference`` on ``batches`` (see :mod:`compress.fidelity`)."""
    ref = make_session(reference, providers=("CPUExecutionProvider",))
    cand = make_session(candidate, providers=("CPUExecutionProvider",))
    names = [o.name for o in reference.graph.output]
    acc = FidelityAccumulator(logits=logit_outputs(reference))
    for i, feed in enumerate(batches):
        acc.update(run_batch(ref, feed, names, batch=i), run_batch(cand, feed, names, batch=i))
    per_output = acc.result()
    summary = {k: worst(per_output, k) for k in ("cosine", "max_abs", "mean_abs", "top1", "kl")}
    logits = summary["top1"] is not None
    loss = 1.0 - (summary["top1"] if logits else summary["cosine"])  # type: ignore[operator]
    return {"outputs": per_output, **summary, "loss": loss, "loss_metric": "1 - top1" if logits else "1 - cosine"}


def time_model(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], config: BenchConfig) -> Timing:
    sess = make_session(model, providers=("CPUExecutionProvider",))
    names = [o.name for o in model.graph.output]
    return measure(lambda: sess.run(names, dict(feed)), config)


def block_times(model: onnx.ModelProto, block_map: BlockMap, feed: Mapping[str, np.ndarray],
                config: BenchConfig) -> dict[int, float]:
    """Median ORT latency (ms) of each removable block run alone (its subgraph cut out with gs)."""
    import onnx_graphsurgeon as gs

    blocks = [b for b in block_map.blocks if b.removable]
    needed = list(dict.fromkeys(t for b in blocks for t in (b.input, *b.side_inputs)))
    index = GraphIndex(model)
    needed = [t for t in needed if t not in index.graph_inputs]
    sess = make_session(add_outputs(model, needed), providers=("CPUExecutionProvider",))
    values = dict(feed)
    if needed:
        values.update(zip(needed, sess.run(needed, dict(feed)), strict=True))
    times: dict[int, float] = {}
    for b in blocks:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        graph = gs.import_onnx(copy)
        tensors = graph.tensors()
        ins = [tensors[t] for t in (b.input, *b.side_inputs)]
        for t in ins:
            t.inputs.clear()
            if t.dtype is None or t.shape is None:
                arr = np.asarray(values[t.name])
                t.to_variable(dtype=arr.dtype, shape=list(arr.shape))
        graph.inputs = ins
        graph.outputs = [tensors[b.output]]
        graph.cleanup().toposort()
        sub = gs.export_onnx(graph, do_type_check=False)
        sub_feed = {t: values[t] for t in (b.input, *b.side_inputs)}
        times[b.index] = time_model(sub, sub_feed, config).median_ms
    return times


def _removal_order(scores: ScoreReport, config: PruneConfig, block_map: BlockMap, count: int) -> list[int]:
    keep = set(config.keep)
    bad = sorted(k for k in keep if not 0 <= k < len(block_map.blocks))
    if bad:
        raise ConfigError(f"--keep {bad[0]}: the model has blocks 0..{len(block_map.blocks) - 1}",
                          hint="see 'compress inspect' for the block indices")
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
           interval: int, calibration: str, random_calibration: bool) -> ScoreReport:
    options = replace(config.options, interval=interval)
    return score_blocks(model, block_map, batches, ScoreConfig(metrics=_metrics_for(config), options=options),
                        calibration=calibration, random_calibration=random_calibration)


def _describe(block: Block, score: float | None) -> dict[str, Any]:
    return {"index": block.index, "name": block.name, "params": block.params, "score": score}


def prune_model(
    model: onnx.ModelProto, block_map: BlockMap, batches: Batches, config: PruneConfig, *,
    calibration: str, random_calibration: bool = False,
) -> PruneResult:
    """Choose blocks by ``config``, remove them and verify the result. Does not modify ``model``.

    ``batches`` are split into scoring and held-out batches (``config.holdout``); scores come
    from the first part, fidelity from the second (the same batches when there is only one).

    Raises:
        ConfigError: inconsistent options; BlockError: more blocks asked for than removable,
        a ``--keep`` index out of range, a graph the checker rejects.
    """
    if (config.remove is None) == (config.max_drop is None) and config.select != "auto":
        raise ConfigError("say how much to prune", hint="pass one of --remove N, --ratio R, --auto or --max-drop X")
    if config.remove is not None and config.remove < 0:
        raise ConfigError(f"--remove {config.remove} must be >= 0")
    requested, why = config.metric, None
    if config.metric == AUTO_METRIC:
        metric, why = choose_metric(block_map)
        config = replace(config, metric=metric)
        logger.debug("metric auto: %s", why)
    score_set, held = split_batches(batches, config.holdout)
    desc = dict(calibration=calibration, random_calibration=random_calibration)
    steps: list[dict[str, Any]] = []
    if config.max_drop is not None:
        pruned, current_map, removed, steps, scores = _prune_to_budget(model, block_map, score_set, held, config, desc)
    else:
        count = config.remove or 0
        interval = count if config.select == "span" and count > 0 else 1
        scores = _score(model, block_map, score_set, config, interval=interval, **desc)
        chosen = _removal_order(scores, config, block_map, count)
        removed = [(block_map.blocks[i], scores.metrics[config.metric]["scores"][i]) for i in chosen]
        pruned = remove_blocks(model, [b for b, _ in removed]) if removed else _copy(model)
        current_map = remaining_blocks(pruned, block_map, chosen)
    fidelity = compare_models(model, pruned, held)
    report: dict[str, Any] = {
        "schema_version": PRUNE_SCHEMA,
        "method": {"metric": config.metric, "select": "budget" if config.max_drop is not None else config.select,
                   "remove": config.remove, "max_drop": config.max_drop, "keep": list(config.keep),
                   "holdout": config.holdout, "interval": config.options.interval,
                   "metric_requested": requested, "metric_choice": why},
        "calibration": {"description": calibration, "random": random_calibration,
                        "scoring_batches": len(score_set), "holdout_batches": len(held),
                        "holdout_is_scoring_data": held is score_set or len(batches) < 2},
        "blocks_before": len(block_map.blocks),
        "blocks_after": len(current_map.blocks),
        "removed": [_describe(b, s) for b, s in removed],
        "scores": scores.to_dict()["metrics"],
        "steps": steps,
        "params": {"before": _params(model), "after": _params(pruned)},
        "size_bytes": {"before": model.ByteSize(), "after": pruned.ByteSize()},
        "fidelity": fidelity,
    }
    if config.latency is not None and held:
        report["latency"] = _latency(model, pruned, block_map, [b for b, _ in removed], next(iter(held)), config.latency)
    return PruneResult(pruned, current_map, report)


def _prune_to_budget(model, block_map, score_set, held, config, desc):  # type: ignore[no-untyped-def]
    """Remove one block at a time while the held-out fidelity loss stays within the budget."""
    assert config.max_drop is not None
    current, current_map = _copy(model), block_map
    removed: list[tuple[Block, float | None]] = []
    steps: list[dict[str, Any]] = []
    first_scores = None
    name_to_original = {b.name: b for b in block_map.blocks}
    keep_names = {block_map.blocks[k].name for k in config.keep if 0 <= k < len(block_map.blocks)}
    while True:
        cands = [b for b in current_map.blocks if b.removable and b.name not in keep_names]
        if not cands:
            break
        scores = _score(current, current_map, score_set, config, interval=1, **desc)
        first_scores = first_scores or scores
        s = scores.metrics[config.metric]["scores"]
        best = min((b for b in cands if s[b.index] is not None), key=lambda b: (s[b.index], b.index), default=None)
        if best is None:
            break
        trial = remove_blocks(current, [best])
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
        first_scores = _score(model, block_map, score_set, config, interval=1, **desc)
    return current, current_map, removed, steps, first_scores


def _latency(model: onnx.ModelProto, pruned: onnx.ModelProto, block_map: BlockMap, removed: Sequence[Block],
             feed: Mapping[str, np.ndarray], config: BenchConfig) -> dict[str, Any]:
    base = time_model(model, feed, config)
    new = time_model(pruned, feed, config)
    per_block = block_times(model, block_map, feed, config) if removed else {}
    removed_ms = sum(per_block.get(b.index, 0.0) for b in removed)
    ideal = base.median_ms / max(base.median_ms - removed_ms, 1e-9) if removed else 1.0
    measured = base.median_ms / new.median_ms
    return {
        "provider": "CPUExecutionProvider",
        "original": base.to_dict(), "pruned": new.to_dict(),
        "speedup_median": measured, "speedup_p90": base.p90_ms / new.p90_ms,
        "block_ms": {str(k): v for k, v in per_block.items()},
        "ideal_speedup": ideal,
        "efficiency": (measured - 1) / (ideal - 1) if ideal > 1.0001 else None,
        "efficiency_ratio": measured / ideal,
    }


def _params(model: onnx.ModelProto) -> int:
    index = GraphIndex(model)
    return index.params_of(index.keys)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def sweep(
    model: onnx.ModelProto, block_map: BlockMap, batches: Batches, config: PruneConfig, counts: Sequence[int], *,
    calibration: str, random_calibration: bool = False,
) -> list[dict[str, Any]]:
    """Prune 0..K blocks with the same rule; one row per count: fidelity and latency."""
    rows = []
    for k in progress(counts, desc="sweep"):
        res = prune_model(model, block_map, batches, replace(config, remove=k, max_drop=None),
                          calibration=calibration, random_calibration=random_calibration)
        lat = res.report.get("latency", {})
        rows.append({"removed": k, "blocks": [b["name"] for b in res.report["removed"]],
                     "loss": res.report["fidelity"]["loss"], "cosine": res.report["fidelity"]["cosine"],
                     "top1": res.report["fidelity"]["top1"], "params": res.report["params"]["after"],
                     "median_ms": lat.get("pruned", {}).get("median_ms"), "speedup": lat.get("speedup_median"),
                     "ideal_speedup": lat.get("ideal_speedup")})
    return rows
