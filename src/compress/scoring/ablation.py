"""The ``ablation`` metric: how far the final outputs move when one block is skipped.

Fed differently from the boundary metrics (``needs_final``): the collector runs the model
without each removable block and calls ``update(block, reference, ablated)`` with the final
outputs of both runs (:func:`compress.scoring.collect.score_blocks`). Importing this module
registers the metric. The outputs are read, never modified.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import ClassVar

import numpy as np

from compress.errors import BlockError, CalibrationError
from compress.scoring.base import Accumulator, MetricResult, register_metric
from compress.scoring.options import MetricConfig
from compress.scoring.tokens import _pair_terms


def _per_sample(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)


def _log_softmax(a: np.ndarray) -> np.ndarray:
    shifted = a - a.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@register_metric("ablation")
class AblationAccumulator(Accumulator):
    """How far the model's final outputs move when one block is skipped.

    Per block and float output, over all calibration batches:

    - ``cosine_distance``: mean over samples of ``1 - cos`` of the flattened sample
      (zero-vector rule as the per-token metrics);
    - ``mae``: mean absolute error over all elements;
    - outputs named in ``logits`` only: ``kl`` = mean over positions of
      ``KL(softmax(reference) || softmax(ablated))`` along the last axis (nats), and
      ``top1_agreement`` = fraction of positions whose argmax is unchanged.

    Which outputs are logits is the caller's decision (``score_blocks`` passes
    :func:`compress.fidelity.logit_outputs`, decided from the graph): a shape rule would
    take a ``[B, T, D]`` embedding for ``[B, T, V]`` logits and score it with a softmax.

    Score of a block: the mean ``kl`` over its logits outputs when there is one, else the
    mean ``cosine_distance`` over its float outputs. Non-float outputs are skipped. If an
    ablated output has NaN/Inf the block is essential: its score is ``inf`` (None in JSON,
    with ``details["nonfinite"]`` listing it).
    """

    needs_final: ClassVar[bool] = True

    def __init__(
        self, num_blocks: int, config: MetricConfig | None = None, *, logits: Collection[str] = ()
    ) -> None:
        super().__init__(num_blocks, config)
        self.logits = frozenset(logits)
        self.stats: dict[int, dict[str, dict[str, float]]] = {}
        self.nonfinite: set[int] = set()

    def update(self, block: int, reference: Mapping[str, np.ndarray], ablated: Mapping[str, np.ndarray]) -> None:
        """Add one batch: final outputs of the full model and of the model without ``block``."""
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.num_blocks:
            raise BlockError(
                f"ablation block index {block!r} is outside 0..{self.num_blocks - 1}", hint="pass the block's position"
            )
        block = int(block)
        per_output = self.stats.setdefault(block, {})
        for name, ref in reference.items():
            ref = np.asarray(ref)
            if name not in ablated or np.shape(ablated[name]) != ref.shape:
                got = "missing" if name not in ablated else f"shape {list(np.shape(ablated[name]))}"
                raise BlockError(
                    f"output {name!r} of the model without block {block} is {got}; the full model gives "
                    f"shape {list(ref.shape)}",
                    hint="block removal must keep the model's outputs; check that the block is removable",
                )
            if not np.issubdtype(ref.dtype, np.floating):
                continue
            abl = np.asarray(ablated[name])
            if not np.isfinite(ref).all():
                raise BlockError(
                    f"model output {name!r} contains NaN or Inf (reference run for block {block})",
                    hint="the model overflows on this calibration data; check its inputs",
                )
            if not np.isfinite(abl).all():
                self.nonfinite.add(block)
                continue
            s = per_output.setdefault(name, dict.fromkeys(("cos_sum", "samples", "abs_sum", "elements"), 0.0))
            x, y = _per_sample(ref), _per_sample(abl)
            d2, _, zx, zy = _pair_terms(x, y)
            s["cos_sum"] += float(np.where(zx & zy, 0.0, np.where(zx | zy, 1.0, 0.5 * d2)).sum())
            s["samples"] += x.shape[0]
            s["abs_sum"] += float(np.abs(x - y).sum())
            s["elements"] += x.size
            if name in self.logits and ref.ndim >= 1 and ref.shape[-1] >= 2:
                lp = _log_softmax(ref.astype(np.float64))
                lq = _log_softmax(abl.astype(np.float64))
                kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
                s["kl_sum"] = s.get("kl_sum", 0.0) + float(kl.sum())
                s["top1_sum"] = s.get("top1_sum", 0.0) + float((ref.argmax(-1) == abl.argmax(-1)).sum())
                s["positions"] = s.get("positions", 0.0) + kl.size

    def result(self) -> MetricResult:
        """Per-block score (KL for logits, else 1 - cosine) and per-output details."""
        if not self.stats:
            raise CalibrationError("metric 'ablation' received no ablated run", hint="pass at least one block")
        scores: list[float | None] = [None] * self.num_blocks
        outputs: dict[str, dict[str, dict[str, float]]] = {}
        for block, per_output in sorted(self.stats.items()):
            table = {}
            for name, s in per_output.items():
                row = {"cosine_distance": s["cos_sum"] / s["samples"], "mae": s["abs_sum"] / s["elements"]}
                if "positions" in s:
                    row["kl"] = s["kl_sum"] / s["positions"]
                    row["top1_agreement"] = s["top1_sum"] / s["positions"]
                table[name] = row
            outputs[str(block)] = table
            kls = [r["kl"] for r in table.values() if "kl" in r]
            if block in self.nonfinite:
                scores[block] = math.inf
            elif kls:
                scores[block] = float(np.mean(kls))
            elif table:
                scores[block] = float(np.mean([r["cosine_distance"] for r in table.values()]))
        details = {"outputs": outputs, "nonfinite": sorted(self.nonfinite)}
        return MetricResult(self.name, tuple(scores), details=details)
