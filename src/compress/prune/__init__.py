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

Modules: :mod:`~compress.prune.select` (the rules, :func:`choose_metric`),
:mod:`~compress.prune.config` (:class:`PruneConfig`, :class:`PruneReport`,
:func:`check_blocks`, :func:`split_batches`), :mod:`~compress.prune.cost` (parameters,
latency), :mod:`~compress.prune.heal`, :mod:`~compress.prune.measured`,
:mod:`~compress.prune.stage` (:func:`prune`, the stage), :mod:`~compress.prune.sweep`. The
fidelity of a pruned model is measured by :mod:`compress.fidelity`.
"""

from __future__ import annotations

from compress.fidelity import Batches
from compress.prune.config import (
    PRUNE_SCHEMA,
    CalibrationSplit,
    PruneConfig,
    PruneReport,
    blocks_for_ratio,
    check_blocks,
    split_batches,
)
from compress.prune.cost import block_times, time_model
from compress.prune.heal import Removal, fit_spans, heal_spans, removed_spans
from compress.prune.measured import MeasuredChoice, select_measured
from compress.prune.select import (
    AUTO_METRIC,
    MEASURED,
    MEASURED_METRICS,
    SELECTIONS,
    Candidates,
    Selector,
    choose_metric,
    select_auto,
    select_last,
    select_lowest,
    select_measured_rule,
    select_per_segment,
    select_random,
    select_span,
)
from compress.prune.stage import prune
from compress.prune.sweep import mark_fronts, pareto_front, sweep

__all__ = [
    "AUTO_METRIC",
    "MEASURED",
    "MEASURED_METRICS",
    "PRUNE_SCHEMA",
    "SELECTIONS",
    "Batches",
    "CalibrationSplit",
    "Candidates",
    "MeasuredChoice",
    "PruneConfig",
    "PruneReport",
    "Removal",
    "Selector",
    "block_times",
    "blocks_for_ratio",
    "check_blocks",
    "choose_metric",
    "fit_spans",
    "heal_spans",
    "mark_fronts",
    "pareto_front",
    "prune",
    "removed_spans",
    "select_auto",
    "select_last",
    "select_lowest",
    "select_measured",
    "select_measured_rule",
    "select_per_segment",
    "select_random",
    "select_span",
    "split_batches",
    "sweep",
    "time_model",
]
