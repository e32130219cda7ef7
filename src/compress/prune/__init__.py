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
- ``measured`` (:func:`select_measured`, ``--measured``): evaluates the candidate sets of the
  rules above by every metric of one scoring pass (and healed, with ``--heal``) on the
  held-out batches and keeps the best measured one (opt-in until the pruning benchmark has
  measured it on the real models; ``lowest`` stays the default). ``lowest`` by the metric
  is its first candidate and is displaced only by a strictly better one, so the choice is
  never worse there than ``lowest``; it costs one more scoring pass (span scores) and one
  pruned-model pass over the held-out batches per distinct candidate set (tenths of a
  second on the test models; with ``--heal`` each set is also healed);
- ``last`` and ``random``: baselines (drop the last ``count`` removable blocks; a seeded
  random choice), for benchmarks.

The metric defaults to ``auto`` (:func:`choose_metric`): ``ablation`` for convolutional blocks
(rank-4 NCHW feature maps), ``cosine`` otherwise (token sequences ``[B, T, D]``, vectors).

``--max-drop X`` is a fidelity budget: remove one block at a time (lowest score), re-score
the pruned model, verify it on calibration batches held back from scoring, and stop
before the fidelity loss exceeds ``X`` (iterative, like SLEB). The fidelity loss is
``1 - top1`` agreement with the original for logits outputs and ``1 - cosine`` otherwise
(worst output).

``--heal`` (:func:`heal_spans`): each removed contiguous span is replaced by one closed-form
linear map per stream (:mod:`compress.scoring.heal`), fitted on the scoring batches (real
tokens only). Spans are tried one at a time on the held-out batches; a span keeps its map
only when the held-out fidelity improves, so a healed model is never worse there than the
plain pruned one. The fit needs one ORT pass over the scoring batches of the original
model, after the selection: the removed spans (and so the sums to keep) are known only
once the scores are.

Padding: ``options.token_mask`` (``--token-mask``) names the model's padding-mask input
(``auto`` finds it); scores and healing fits then use only the real tokens.

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
from compress.fidelity import FidelityAccumulator, fidelity_loss, logit_outputs, worst
from compress.graph import GraphIndex
from compress.log import logger, progress
from compress.onnx_io import model_nbytes
from compress.registry import Registry
from compress.scoring import MetricConfig
from compress.scoring.collect import (
    ScoreConfig,
    ScoreReport,
    batch_mask,
    find_token_mask,
    make_session,
    mask_fits,
    run_batch,
    score_blocks,
)
from compress.scoring.heal import RIDGE_GRID, LinearFit, LinearMap
from compress.scoring.metrics import masked_view
from compress.surgery import HealMap, add_outputs, check_model, remove_blocks, verify_removal

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


#: The rule that measures its candidates (:func:`select_measured`); it needs the model, so :func:`prune_model` runs it.
MEASURED = "measured"

#: Metrics whose candidates ``measured`` tries (all from one ORT pass; ``cka`` also gives the segments).
MEASURED_METRICS = ("cosine", "cosine-signed", "angular", "cka")


@SELECTIONS.register(MEASURED)
def select_measured_rule(c: Candidates) -> list[int]:
    """Registered name only: ``measured`` evaluates pruned models, which :func:`prune_model` does."""
    raise BlockError("selection 'measured' evaluates pruned models on held-out batches: it needs the model",
                     hint="call prune_model (or compress prune --select measured), not the rule on scores alone")


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
        heal_ridge: relative ridge strength of the healing fit (>= 0; ``--heal-ridge``); None
            (default) = per span, the best held-out fidelity over :data:`RIDGE_GRID`.
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
    heal: bool = False
    heal_ridge: float | None = None

    def __post_init__(self) -> None:
        """Checks every field once (the CLI and ``compress run`` share it); blocks are checked by :func:`check_blocks`."""
        from compress.scoring import metric_names
        from compress.validate import FieldError, check_choice, check_int, check_number

        check_choice("PruneConfig", "metric", self.metric, [*metric_names(), AUTO_METRIC])
        check_choice("PruneConfig", "select", self.select, SELECTIONS.names())
        check_int("PruneConfig", "remove", self.remove, low=0, example="2", optional=True)
        check_number("PruneConfig", "max_drop", self.max_drop, low=0, high=1, example="0.02", optional=True)
        check_number("PruneConfig", "holdout", self.holdout, low=0, high=1, high_open=True, example="0.25")
        check_int("PruneConfig", "seed", self.seed, example="0")
        if not isinstance(self.heal, bool):
            raise FieldError("PruneConfig", "heal", self.heal, "must be true or false", example="true")
        check_number("PruneConfig", "heal_ridge", self.heal_ridge, low=0, example="1e-2", optional=True)
        if not isinstance(self.keep, tuple) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                       for k in self.keep):
            raise FieldError("PruneConfig", "keep", self.keep, "must be block indices (integers >= 0)", example="0,5")


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
    from compress.calibration import CalibrationSet, split_calibration

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
    """Fidelity of ``candidate`` against ``reference`` on ``batches`` (see :mod:`compress.fidelity`).

    The two models never have a session at the same time (the reference's outputs on
    ``batches`` are kept instead), so the peak memory is one model's, not two.
    """
    return HeldOut(reference, batches).fidelity(candidate)


class HeldOut:
    """The reference model's outputs on the held-out batches, computed once; :meth:`fidelity` scores candidates.

    ``HeldOut(model, held).fidelity(candidate)`` equals ``compare_models(model, candidate,
    held)`` with one ORT session per candidate and none for the reference. The outputs are
    kept in memory (the held-out share of the calibration data).
    """

    def __init__(self, reference: onnx.ModelProto, batches: Batches) -> None:
        self.batches = batches
        self.names = [o.name for o in reference.graph.output]
        self.logits = logit_outputs(reference)
        ref = make_session(reference, providers=("CPUExecutionProvider",))
        self.outputs = [run_batch(ref, feed, self.names, batch=i) for i, feed in enumerate(batches)]

    def fidelity(self, candidate: onnx.ModelProto) -> dict[str, Any]:
        """Fidelity of ``candidate`` against the reference (the dict of :func:`compare_models`)."""
        cand = make_session(candidate, providers=("CPUExecutionProvider",))
        acc = FidelityAccumulator(logits=self.logits)
        for i, feed in enumerate(self.batches):
            acc.update(self.outputs[i], run_batch(cand, feed, self.names, batch=i))
        return _fidelity_summary(acc)


def _fidelity_summary(acc: FidelityAccumulator) -> dict[str, Any]:
    per_output = acc.result()
    summary = {k: worst(per_output, k) for k in ("cosine", "max_abs", "mean_abs", "top1", "kl", "agreement")}
    loss, how = fidelity_loss(summary)
    return {"outputs": per_output, **summary, "loss": loss, "loss_metric": how}


def time_model(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], config: BenchConfig) -> Timing:
    sess = make_session(model, providers=("CPUExecutionProvider",))
    names = [o.name for o in model.graph.output]
    return measure(lambda: sess.run(names, dict(feed)), config)


def block_times(model: onnx.ModelProto, block_map: BlockMap, feed: Mapping[str, np.ndarray],
                config: BenchConfig) -> dict[int, float]:
    """Median ORT latency (ms) of each removable block run alone (its subgraph cut out with gs)."""
    import onnx_graphsurgeon as gs

    blocks = [b for b in block_map.blocks if b.removable]
    needed = list(dict.fromkeys(t for b in blocks for t in _block_inputs(b)))
    index = GraphIndex(model)
    needed = [t for t in needed if t not in index.graph_inputs]
    sess = make_session(add_outputs(model, needed), providers=("CPUExecutionProvider",))
    values = dict(feed)
    if needed:
        values.update(zip(needed, sess.run(needed, dict(feed)), strict=True))
    del sess  # one session at a time: each holds (or maps) the weights it runs
    times: dict[int, float] = {}
    for b in blocks:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        graph = gs.import_onnx(copy)
        tensors = graph.tensors()
        ins = [tensors[t] for t in _block_inputs(b)]
        for t in ins:
            t.inputs.clear()
            if t.dtype is None or t.shape is None:
                arr = np.asarray(values[t.name])
                t.to_variable(dtype=arr.dtype, shape=list(arr.shape))
        graph.inputs = ins
        graph.outputs = [tensors[t] for t in b.stream_outputs]
        graph.cleanup().toposort()
        sub = gs.export_onnx(graph, do_type_check=False)
        sub_feed = {t: values[t] for t in _block_inputs(b)}
        times[b.index] = time_model(sub, sub_feed, config).median_ms
    return times


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


def _block_inputs(b: Block) -> list[str]:
    """Every tensor block ``b`` reads from outside: its stream inputs, then its side inputs."""
    return list(dict.fromkeys([*b.stream_inputs, *b.side_inputs]))


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
           interval: int, calibration: str, random_calibration: bool) -> ScoreReport:
    options = replace(config.options, interval=interval)
    return score_blocks(model, block_map, batches, ScoreConfig(metrics=_metrics_for(config), options=options),
                        calibration=calibration, random_calibration=random_calibration)


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
                    config: PruneConfig, count: int, *, calibration: str,
                    random_calibration: bool = False) -> MeasuredChoice:
    """Choose ``count`` blocks by measured fidelity: try a few candidate sets, keep the best on ``held``.

    Candidates (deduplicated; each set is evaluated once and lists every rule that gives it):
    ``lowest`` by ``config.metric`` (the default rule, always the first candidate) and by
    each of :data:`MEASURED_METRICS`; ``segment`` (SGLP, the CKA segments) by each; ``span``
    (the best contiguous run) by each token metric, from a second scoring pass with
    ``interval = count`` (``count == 1``: the single-block scores). With ``config.heal``, each
    candidate is also healed (:func:`heal_spans`; the fits of every candidate's spans come
    from one ORT pass) and the healed model is a candidate of its own.

    The held-out reference outputs are computed once (:class:`HeldOut`); each candidate costs
    one ORT session and one pass over the held-out batches (plus the ridge trials when
    healing). A candidate displaces the current best only when its fidelity is strictly
    better (:func:`_better`), so the choice is never worse on ``held`` than the default rule.
    """
    import time

    t0 = time.perf_counter()
    desc = dict(calibration=calibration, random_calibration=random_calibration)
    metrics = tuple(dict.fromkeys([config.metric, *MEASURED_METRICS]))
    extra_notes: list[str] = []
    try:
        single = score_blocks(model, block_map, score_set,
                              ScoreConfig(metrics=metrics, options=replace(config.options, interval=1)), **desc)
    except (BlockError, ConfigError) as exc:  # an extra metric does not apply here: the default rule's alone
        if len(metrics) == 1:
            raise
        extra_notes.append(f"the candidate metrics {', '.join(metrics[1:])} were not scored: {exc.message}")
        metrics = (config.metric,)
        single = score_blocks(model, block_map, score_set,
                              ScoreConfig(metrics=metrics, options=replace(config.options, interval=1)), **desc)
    span = None
    token = tuple(m for m in metrics if m not in ("cka", "ablation"))
    if count > 1 and token:
        try:
            span = score_blocks(model, block_map, score_set,
                                ScoreConfig(metrics=token, options=replace(config.options, interval=count)), **desc)
        except (BlockError, ConfigError) as exc:
            extra_notes.append(f"no span candidates: {exc.message}")
    sets, notes = _candidate_sets(config, block_map, count, single, span)
    notes = extra_notes + notes
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
            healed, hfid, hrep = heal_spans(model, plain, blocks, score_set, held, config, fid,
                                            evaluate=reference.fidelity, fits=(fits, mask_used))
            options[0] = (False, plain, fid, hrep)
            if hrep["healed_spans"]:
                options.append((True, healed, hfid, hrep))
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
    check_blocks(config, block_map)
    requested, why = config.metric, None
    if config.metric == AUTO_METRIC:
        metric, why = choose_metric(block_map)
        config = replace(config, metric=metric)
        logger.debug("metric auto: %s", why)
    score_set, held = split_batches(batches, config.holdout)
    desc = dict(calibration=calibration, random_calibration=random_calibration)
    steps: list[dict[str, Any]] = []
    measured: MeasuredChoice | None = None
    if config.max_drop is not None:
        pruned, current_map, removed, steps, scores = _prune_to_budget(model, block_map, score_set, held, config, desc)
    elif config.select == MEASURED:
        measured = select_measured(model, block_map, score_set, held, config, config.remove or 0, **desc)
        scores, chosen = measured.scores, measured.blocks
        removed = [(block_map.blocks[i], scores.metrics[config.metric]["scores"][i]) for i in chosen]
        pruned = measured.model
        current_map = remaining_blocks(measured.plain, block_map, chosen)
    else:
        count = config.remove or 0
        interval = count if config.select == "span" and count > 0 else 1
        scores = _score(model, block_map, score_set, config, interval=interval, **desc)
        chosen = _removal_order(scores, config, block_map, count)
        removed = [(block_map.blocks[i], scores.metrics[config.metric]["scores"][i]) for i in chosen]
        pruned = remove_blocks(model, [b for b, _ in removed]) if removed else _copy(model)
        if removed and held:  # the guard's last check: ORT output shapes and dtypes are unchanged
            verify_removal(model, pruned, next(iter(held)), blocks=[b for b, _ in removed])
        current_map = remaining_blocks(pruned, block_map, chosen)
    heal_report = None
    if measured is not None:
        fidelity, heal_report = measured.fidelity, measured.heal
    else:
        fidelity = compare_models(model, pruned, held)
    if config.heal and removed and measured is None:
        pruned, fidelity, heal_report = heal_spans(model, pruned, [b for b, _ in removed], score_set, held, config,
                                                   fidelity)
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
        "size_bytes": {"before": model_nbytes(model), "after": model_nbytes(pruned)},
        "fidelity": fidelity,
    }
    if measured is not None:
        report["measured"] = measured.report
    if config.heal:
        report["method"]["heal"] = True
        report["heal"] = heal_report or {"spans": [], "note": "no block was removed"}
    if config.latency is not None and held:
        report["latency"] = _latency(model, pruned, block_map, [b for b, _ in removed], next(iter(held)), config.latency)
    return PruneResult(pruned, current_map, report)


def removed_spans(removed: Sequence[Block]) -> list[list[Block]]:
    """The removed blocks as maximal runs of consecutive block indices, in order."""
    spans: list[list[Block]] = []
    for b in sorted(removed, key=lambda b: b.index):
        if spans and spans[-1][-1].index == b.index - 1:
            spans[-1].append(b)
        else:
            spans.append([b])
    return spans


def _rows(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Token rows ``[N, d]`` of an activation with the hidden axis last (real tokens only under ``mask``)."""
    v, _ = masked_view(a, mask, channel_axis=-1)
    return v.reshape(-1, v.shape[-1])


def fit_spans(model: onnx.ModelProto, spans: Sequence[Sequence[Block]], batches: Batches, *,
              token_mask: str = "auto") -> tuple[list[list[LinearFit | str]], str | None]:
    """Healing sums for every stream of every span, from one ORT pass of ``model`` over ``batches``.

    Returns, per span and stream (the first block's streams), a :class:`LinearFit` or the
    reason the stream cannot be healed, and the token mask input used (None = every position).
    """
    mask_name, _ = find_token_mask(model, token_mask)
    index = GraphIndex(model)
    plan: list[list[tuple[str, str] | str]] = []
    for span in spans:
        first, last = span[0], span[-1]
        row: list[tuple[str, str] | str] = []
        for st in first.streams:
            out = next((o for o in last.streams if o.name == st.name), None)
            t = index.type_of(st.input)
            if out is None or len(last.streams) != len(first.streams):
                row.append(f"stream {st.name} does not run through the whole span")
            elif t is not None and t.shape is not None and len(t.shape) >= 4:
                row.append(f"stream {st.name} is a rank-{len(t.shape)} feature map (channels not last): not healed")
            else:
                row.append((st.input, out.output))
        plan.append(row)
    names = list(dict.fromkeys(n for row in plan for e in row if isinstance(e, tuple) for n in e))
    fits: list[list[LinearFit | str]] = [[e if isinstance(e, str) else "" for e in row] for row in plan]
    if not names:
        return fits, None
    session = make_session(add_outputs(model, names), providers=("CPUExecutionProvider",))
    used = mask_name
    for i, feed in enumerate(batches):
        values = run_batch(session, feed, names, batch=i)
        mask = batch_mask(feed, used, batch=i)
        if i == 0 and mask is not None and not mask_fits(mask, values.values(), None):
            used, mask = None, None
        for r, row in enumerate(plan):
            for k, e in enumerate(row):
                if isinstance(e, str):
                    continue
                x, y = _rows(values[e[0]], mask), _rows(values[e[1]], mask)
                if not isinstance(fits[r][k], LinearFit):
                    fits[r][k] = LinearFit(x.shape[1], y.shape[1])
                fits[r][k].update(x, y)  # type: ignore[union-attr]
    return fits, used


def _better(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Fidelity ``a`` is strictly better than ``b``: a lower loss, or the same loss and a higher cosine."""
    if a["loss"] < b["loss"] - 1e-12:
        return True
    ca, cb = a.get("cosine"), b.get("cosine")
    return abs(a["loss"] - b["loss"]) <= 1e-12 and ca is not None and cb is not None and ca > cb + 1e-9


def heal_spans(model: onnx.ModelProto, pruned: onnx.ModelProto, removed: Sequence[Block], score_set: Batches,
               held: Batches, config: PruneConfig, fidelity: Mapping[str, Any], *,
               evaluate: Callable[[onnx.ModelProto], dict[str, Any]] | None = None,
               fits: tuple[list[list[LinearFit | str]], str | None] | None = None,
               ) -> tuple[onnx.ModelProto, dict[str, Any], dict[str, Any]]:
    """Heal the removed spans of ``pruned`` where that improves the held-out fidelity.

    Fits the maps on ``score_set`` (:func:`fit_spans`), then tries the spans in order: a
    span's maps are solved for each ridge strength (``config.heal_ridge``, or every value of
    :data:`RIDGE_GRID`), the one with the best held-out fidelity is taken, and the span keeps
    it when the model with it (and the maps kept so far) has a better held-out fidelity than
    without (:func:`_better`); each trial passes the surgery guard,
    ``onnx.checker`` and :func:`verify_removal`. Returns the model to write (``pruned``
    itself when no span helps), its fidelity, and the ``heal`` report section.

    ``evaluate`` (default :func:`compare_models` against ``model`` on ``held``; e.g.
    :meth:`HeldOut.fidelity`) scores a trial; ``fits`` are the :func:`fit_spans` result for
    these spans when already computed (the ``measured`` rule fits every candidate's spans in
    one pass).
    """
    spans = removed_spans(removed)
    fits, mask_used = fits if fits is not None else fit_spans(model, spans, score_set,
                                                             token_mask=config.options.token_mask)
    evaluate = evaluate or (lambda m: compare_models(model, m, held))
    maps: dict[tuple[int, int], HealMap] = {}
    current, current_fid = pruned, dict(fidelity)
    rows: list[dict[str, Any]] = []
    index = GraphIndex(model)
    ridges = (config.heal_ridge,) if config.heal_ridge is not None else RIDGE_GRID
    for span, span_fits in zip(spans, fits, strict=True):
        last = span[-1]
        row: dict[str, Any] = {"blocks": [b.name for b in span], "first": span[0].index, "last": last.index,
                               "accepted": False, "loss_without": current_fid["loss"],
                               "cosine_without": current_fid["cosine"], "ridges": []}
        best: tuple[dict[str, Any], Any, dict[tuple[int, int], HealMap], list[dict[str, Any]]] | None = None
        for ridge in ridges:
            streams: list[dict[str, Any]] = []
            trial_maps = dict(maps)
            for k, fit in enumerate(span_fits):
                st = span[0].streams[k]
                entry: dict[str, Any] = {"stream": st.name, "input": st.input, "output": last.streams[k].output}
                if isinstance(fit, LinearFit) and fit.rows:
                    m: LinearMap = fit.solve(ridge)
                    entry.update(tokens=m.rows, residual=m.residual, skip_residual=m.skip_residual, ridge=m.ridge)
                    out_k = next(j for j, o in enumerate(last.streams) if o.name == st.name)
                    trial_maps[last.index, out_k] = (st.input, m.weight, m.bias)
                else:
                    entry["skipped"] = fit or "no token to fit on"
                streams.append(entry)
            if len(trial_maps) == len(maps):
                row["streams"] = streams
                break
            trial = remove_blocks(model, removed, check=False, index=index, heal=trial_maps)
            check_model(trial)
            verify_removal(model, trial, next(iter(held)), blocks=removed)
            fid = evaluate(trial)
            row["ridges"].append({"ridge": ridge, "loss": fid["loss"], "cosine": fid["cosine"]})
            if best is None or _better(fid, best[0]):
                best = (fid, trial, trial_maps, streams)
        if best is None:
            row["note"] = "no stream of this span can be healed"
        else:
            fid, trial, trial_maps, streams = best
            row.update(streams=streams, ridge=streams[0].get("ridge"), loss_with=fid["loss"], cosine_with=fid["cosine"])
            if _better(fid, current_fid):
                row["accepted"] = True
                maps, current, current_fid = trial_maps, trial, fid
            else:
                row["note"] = "healing does not improve the held-out fidelity here: this span stays plainly removed"
        rows.append(row)
        logger.info("heal %s: %s", row["blocks"], "kept" if row["accepted"] else row.get("note"))
    report = {"ridge": config.heal_ridge if config.heal_ridge is not None else "auto", "ridge_grid": list(ridges),
              "token_mask": mask_used, "fit_batches": len(score_set),
              "fit_pass": "one ORT pass of the original model over the scoring batches, after the selection",
              "spans": rows, "healed_spans": sum(r["accepted"] for r in rows),
              "fidelity_without": dict(fidelity), "fidelity_with": current_fid}
    return current, current_fid, report


def _prune_to_budget(model, block_map, score_set, held, config, desc):  # type: ignore[no-untyped-def]
    """Remove one block at a time while the held-out fidelity loss stays within the budget."""
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
        scores = _score(current, current_map, score_set, config, interval=1, **desc)
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
        first_scores = _score(model, block_map, score_set, config, interval=1, **desc)
    return current, current_map, removed, steps, first_scores


def _latency(model: onnx.ModelProto, pruned: onnx.ModelProto, block_map: BlockMap, removed: Sequence[Block],
             feed: Mapping[str, np.ndarray], config: BenchConfig) -> dict[str, Any]:
    base = time_model(model, feed, config)
    new = time_model(pruned, feed, config)
    per_block = block_times(model, block_map, feed, config) if removed else {}
    removed_ms = sum(per_block.get(b.index, 0.0) for b in removed)
    # The ideal is undefined when the removed blocks, each timed alone, take at least the whole
    # model's time (per-call overhead dominates tiny models): reported as None, not as a huge ratio.
    ideal: float | None = 1.0
    if removed:
        ideal = base.median_ms / (base.median_ms - removed_ms) if removed_ms < base.median_ms else None
    measured = base.median_ms / new.median_ms
    return {
        "provider": "CPUExecutionProvider",
        "original": base.to_dict(), "pruned": new.to_dict(),
        "speedup_median": measured, "speedup_p90": base.p90_ms / new.p90_ms,
        "block_ms": {str(k): v for k, v in per_block.items()},
        "ideal_speedup": ideal,
        "efficiency": (measured - 1) / (ideal - 1) if ideal is not None and ideal > 1.0001 else None,
        "efficiency_ratio": measured / ideal if ideal is not None else None,
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
    """Prune 0..K blocks with the same rule; one row per count: fidelity and latency.

    With the rule ``measured`` each row also lists every candidate it tried
    (with ``--heal``, healed ones too) with its held-out fidelity and parameters, and
    :func:`mark_fronts` marks the Pareto fronts (loss vs latency over the rows, loss vs
    parameters over every candidate).

    Raises:
        FieldError: a count above the removable blocks (checked before any work).
    """
    check_blocks(replace(config, remove=None, max_drop=None), block_map, counts=counts)
    rows = []
    for k in progress(counts, desc="sweep"):
        res = prune_model(model, block_map, batches, replace(config, remove=k, max_drop=None),
                          calibration=calibration, random_calibration=random_calibration)
        lat = res.report.get("latency", {})
        table = res.report.get("measured", {}).get("candidates", [])
        chosen = next((c for c in table if c["chosen"]), None)
        rows.append({"removed": k, "blocks": [b["name"] for b in res.report["removed"]],
                     "rule": ", ".join(chosen["rules"]) if chosen else config.select,
                     "healed": bool(res.report.get("heal", {}).get("healed_spans")),
                     "candidates": [{key: c[key] for key in ("rules", "blocks", "healed", "loss", "cosine", "params",
                                                              "chosen")} for c in table],
                     "loss": res.report["fidelity"]["loss"], "cosine": res.report["fidelity"]["cosine"],
                     "top1": res.report["fidelity"]["top1"], "params": res.report["params"]["after"],
                     "median_ms": lat.get("pruned", {}).get("median_ms"), "speedup": lat.get("speedup_median"),
                     "ideal_speedup": lat.get("ideal_speedup")})
    mark_fronts(rows)
    return rows


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the points no other point dominates; both coordinates are costs (lower is better).

    ``p`` dominates ``q`` when ``p <= q`` in both coordinates and ``p < q`` in one. A point
    with a None (or NaN) coordinate is never on the front; equal points are all on it.
    Returned in order of the first coordinate, then the second, then the index.
    """
    ok = [i for i, (a, b) in enumerate(points)
          if a is not None and b is not None and not math.isnan(a) and not math.isnan(b)]
    front: list[int] = []
    best = math.inf
    prev: tuple[float, float] | None = None
    for i in sorted(ok, key=lambda i: (points[i][0], points[i][1], i)):
        p = (float(points[i][0]), float(points[i][1]))  # type: ignore[arg-type]
        if p == prev or p[1] < best:  # a tie with the last front point, or better in the second coordinate
            front.append(i)
            best, prev = min(best, p[1]), p
    return front


def mark_fronts(rows: list[dict[str, Any]]) -> None:
    """Mark the sweep's Pareto fronts in place: fidelity loss against latency, and against parameters.

    ``row["front"]``: the count's chosen model is on the (median ms, loss) front of the
    rows (False for every row without a latency). ``candidate["front"]``: the candidate is
    on the (params, loss) front of every candidate of every count (with the rule
    ``measured``; otherwise each row is its own one candidate, marked in ``row["params_front"]``).
    """
    on = set(pareto_front([(r.get("median_ms"), r["loss"]) for r in rows]))
    points = [(i, j, c) for i, r in enumerate(rows) for j, c in enumerate(r.get("candidates") or [])]
    if points:
        by_params = set(pareto_front([(c["params"], c["loss"]) for _, _, c in points]))
        for n, (_, _, c) in enumerate(points):
            c["front"] = n in by_params
    params_on = set(pareto_front([(r["params"], r["loss"]) for r in rows]))
    for i, r in enumerate(rows):
        r["front"] = i in on
        r["params_front"] = i in params_on
