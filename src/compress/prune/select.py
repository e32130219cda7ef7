"""Selection rules: from the per-block scores of one metric, the blocks to remove.

Each rule of :data:`SELECTIONS` takes :class:`Candidates` (scores, the removable blocks,
how many to remove) and returns the block indices to remove, sorted; lowest score = least
important. The rules are pure functions of their argument: no model, no ORT session. The
rule ``measured`` is registered here by name only; it evaluates pruned models, which
:func:`compress.prune.measured.select_measured` does. :func:`choose_metric` is what the
metric ``auto`` stands for on a block map.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from compress.blocks import BlockMap
from compress.errors import BlockError
from compress.registry import Registry


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
    """The ``count`` scored removable blocks with the lowest scores (ties: lower index first).

    Raises:
        BlockError: fewer scored removable blocks than ``count``.
    """
    ranked = _ranked(c)
    _need(c, len(ranked))
    return sorted(ranked[: c.count])


@SELECTIONS.register("span")
def select_span(c: Candidates) -> list[int]:
    """The contiguous run of ``count`` removable blocks whose span score is lowest.

    ``scores[i]`` must be span scores (interval = count): input of i vs output of i+count-1.

    Raises:
        BlockError: no run of ``count`` contiguous removable, scored blocks.
    """
    spans = [i for i, s in enumerate(c.scores) if s is not None and all(j in c.removable for j in range(i, i + c.count))]
    if not spans:
        raise BlockError(f"no run of {c.count} contiguous removable blocks", hint="ask for a shorter --span")
    best = min(spans, key=lambda i: (c.scores[i], i))
    return list(range(best, best + c.count))


@SELECTIONS.register("segment")
def select_per_segment(c: Candidates) -> list[int]:
    """SGLP: blocks of one CKA segment are redundant with each other, so each segment keeps one.

    ``scores`` rank the blocks inside the segments: any metric; SGLP's own is ``gradnorm``
    (``--metric gradnorm --per-segment``: segments from ``cka``, importance from GradNorm).

    Round by round, the least important spare block of every segment (segments ordered by
    that block's score) is taken. A segment's spare blocks are its removable ones, except
    the most important of them when the segment has no other block to represent it: a
    one-block segment is a representation of its own and is emptied only when the spare
    blocks of all segments are not enough (then representatives go, lowest score first).

    Raises:
        BlockError: no segments (not scored with ``cka``), or fewer removable blocks than ``count``.
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
    """The blocks below the largest relative score jump ``log(s[k] / s[k-1])``, ``1 <= k <= n/2``.

    ``count`` is ignored: how many follows from the sorted removable scores (scale-free,
    no fixed threshold). Fewer than two scored removable blocks: nothing is removed.
    """
    ranked = _ranked(c)
    if len(ranked) < 2:
        return []
    s = [max(float(c.scores[i]), 1e-12) for i in ranked]  # type: ignore[arg-type]
    limit = max(1, len(s) // 2)
    k = max(range(1, limit + 1), key=lambda k: (math.log(s[k] / s[k - 1]) if k < len(s) else -math.inf, -k))
    return sorted(ranked[:k])


#: The rule that measures its candidates (:func:`~compress.prune.measured.select_measured`); it needs the model,
#: so :func:`~compress.prune.prune_model` runs it.
MEASURED = "measured"

#: Metrics whose candidates ``measured`` tries (all from one ORT pass; ``cka`` also gives the segments).
MEASURED_METRICS = ("cosine", "cosine-signed", "angular", "cka")


@SELECTIONS.register(MEASURED)
def select_measured_rule(c: Candidates) -> list[int]:
    """Registered name only: ``measured`` evaluates pruned models, which :func:`~compress.prune.prune_model` does.

    Raises:
        BlockError: always (the scores alone are not enough).
    """
    raise BlockError("selection 'measured' evaluates pruned models on held-out batches: it needs the model",
                     hint="call prune_model (or compress prune --select measured), not the rule on scores alone")


@SELECTIONS.register("last")
def select_last(c: Candidates) -> list[int]:
    """Baseline: the last ``count`` removable blocks (scores are ignored).

    Raises:
        BlockError: fewer removable blocks than ``count``.
    """
    ranked = sorted(c.removable)
    _need(c, len(ranked))
    return ranked[len(ranked) - c.count:] if c.count else []


@SELECTIONS.register("random")
def select_random(c: Candidates) -> list[int]:
    """Baseline: ``count`` removable blocks drawn with ``random.Random(seed)`` (scores are ignored).

    Raises:
        BlockError: fewer removable blocks than ``count``.
    """
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
