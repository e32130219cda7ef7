"""The ``gradnorm`` metric: SGLP's own block importance, read from the block map.

SGLP (arXiv 2410.14720) ranks the blocks inside each CKA segment by GradNorm, the norm of
the loss gradient with respect to the block's parameters, without fine-tuning. ONNX
Runtime gives no gradients, so the numbers are computed in torch where the module is at
hand (:func:`compress.export.gradnorm.block_gradnorms`: ``compress export --calib``, or
``compress prune --torch-source MODEL``) and stored per block in the block map
(:attr:`compress.blocks.Block.gradnorm`, with the loss in
:attr:`compress.blocks.BlockMap.gradnorm_loss`). This metric runs no ONNX Runtime pass of
its own: its scores are the stored values.

Score of the span ``i .. i + k - 1`` (``interval`` k): ``sqrt(sum_j gradnorm_j^2)``, the
GradNorm of the union of the span's parameters (GradNorm^2 is a sum over parameters, so it
adds over disjoint blocks). Higher = more important, so the block with the smallest
GradNorm is removed first (``lowest``); with ``--per-segment`` the CKA segments come from
``cka`` and the importance inside a segment from this metric (SGLP).

:func:`with_gradnorms` attaches computed values to a block map, :func:`carry_gradnorms`
copies them onto the map of a pruned model (by block name), :func:`gradnorm_status` says
whether a map carries them (for reports). Pure: nothing here runs a model or touches files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar

from compress.blocks import Block, BlockMap
from compress.errors import BlockError
from compress.scoring.base import Accumulator, MetricResult, register_metric

#: The metric name.
GRADNORM = "gradnorm"

#: The hint of the error raised when a block map has no GradNorm.
GRADNORM_HINT = ("GradNorm needs the torch module: export with calibration data (compress export MODEL -o OUT.onnx "
                 "--calib DIR), or pass compress prune --torch-source MODEL")


def missing_gradnorm_error(source: str) -> BlockError:
    """The error for a block map without GradNorm; ``source`` names the map (``net.blocks.json``)."""
    return BlockError(f"{source} has no GradNorm scores (metric gradnorm)", hint=GRADNORM_HINT)


def has_gradnorm(block_map: BlockMap) -> bool:
    """Whether any block of ``block_map`` carries a GradNorm."""
    return any(b.gradnorm is not None for b in block_map.blocks)


def gradnorm_status(block_map: BlockMap) -> str:
    """``absent``, or ``present (LOSS)`` with the map's loss description: for reports."""
    if not has_gradnorm(block_map):
        return "absent"
    return f"present ({block_map.gradnorm_loss or 'loss not recorded'})"


def with_gradnorms(block_map: BlockMap, values: Mapping[str, float], loss: str) -> BlockMap:
    """A copy of ``block_map`` whose blocks carry ``values`` (block name -> GradNorm) and whose loss is ``loss``.

    Blocks not named in ``values`` get None. Does not modify ``block_map``.

    Raises:
        BlockError: a value is negative or not finite, or names no block of the map.
    """
    names = {b.name for b in block_map.blocks}
    for name, v in values.items():
        if name not in names:
            raise BlockError(f"GradNorm of {name!r}: the block map has no such block",
                             hint="compute GradNorm for the block map's own block names")
        if not (math.isfinite(v) and v >= 0):
            raise BlockError(f"GradNorm of block {name} is {v!r}, not a finite number >= 0",
                             hint="check the model and the calibration data for NaN/Inf")
    blocks = tuple(replace(b, gradnorm=None if b.name not in values else float(values[b.name]))
                   for b in block_map.blocks)
    return replace(block_map, blocks=blocks, gradnorm_loss=loss)


def carry_gradnorms(target: BlockMap, source: BlockMap) -> BlockMap:
    """``target`` with the GradNorm of ``source``'s blocks of the same name (the map of a pruned model).

    The values still describe the model ``source`` belongs to (one-shot GradNorm, as in
    SGLP). Returns ``target`` itself when ``source`` has none. Does not modify either map.
    """
    if not has_gradnorm(source):
        return target
    values = {b.name: b.gradnorm for b in source.blocks if b.gradnorm is not None}
    blocks = tuple(replace(b, gradnorm=values.get(b.name)) for b in target.blocks)
    return replace(target, blocks=blocks, gradnorm_loss=source.gradnorm_loss)


@register_metric(GRADNORM)
class GradNormMetric(Accumulator):
    """GradNorm from the block map (``from_block_map``: the collector calls :meth:`score_map`, not ``update``)."""

    from_block_map: ClassVar[bool] = True

    def score_map(self, blocks: Sequence[Block], *, source: str = "the block map",
                  loss: str | None = None) -> MetricResult:
        """Scores of the scored ``blocks`` (in order; one per block of this accumulator) from their ``gradnorm``.

        ``scores[i]`` is the span score ``sqrt(sum of gradnorm^2)`` over blocks
        ``i .. i + interval - 1``; spans that run past the last block are None.

        Raises:
            BlockError: no block carries a GradNorm (naming ``source``), or a block that
                is scored lacks one while others have it.
        """
        if len(blocks) != self.num_blocks:
            raise BlockError(f"{len(blocks)} blocks given; the metric was set up for {self.num_blocks}",
                             hint="pass the scored blocks of the block map")
        if not any(b.gradnorm is not None for b in blocks):
            raise missing_gradnorm_error(source)
        lacking = [b for b in blocks if b.gradnorm is None]
        if lacking:
            b = lacking[0]
            raise BlockError(f"{source}: block {b.index} ({b.name}) has no GradNorm while others do",
                             hint="compute GradNorm again for the whole block map (" + GRADNORM_HINT.split(": ", 1)[1] + ")")
        k = self.config.interval
        g2 = [float(b.gradnorm) ** 2 for b in blocks]  # type: ignore[arg-type]  # none is None (checked)
        scores = tuple(math.sqrt(sum(g2[i:i + k])) if i + k <= len(g2) else None for i in range(len(g2)))
        return MetricResult(self.name, scores, details={"loss": loss, "source": "block map",
                                                        "gradnorm": [b.gradnorm for b in blocks]})

    def result(self) -> MetricResult:
        """Not fed batch by batch: the scores come from :meth:`score_map`.

        Raises:
            BlockError: always.
        """
        raise BlockError("metric gradnorm is read from the block map, not accumulated over batches",
                         hint="score it with compress.scoring.collect.score_blocks (or GradNormMetric.score_map)")
