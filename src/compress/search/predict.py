"""Cheap predictions of a candidate's fidelity, latency and size, and the rules that skip candidates.

What is measured first (:func:`compress.search.run_search`):

- each pruned model's held-out fidelity loss ``L_d`` and size (the prune stage), and the
  share ``s_d`` of the original's ONNX Runtime CPU time its removed blocks take, each run
  alone (:func:`compress.prune.cost.block_times` over the whole model's time);
- each precision/sparsity setting ``p`` on the unpruned model: its fidelity loss ``L_p``,
  median/p99 latency and size (candidates ``r0-p``), against the original's (``r0-fp32``).

A candidate ``(d, p)`` is then predicted as

- fidelity ``1 - (L_d + L_p)`` (losses add: small, independent errors);
- latency ``t_p * (1 - s_d)`` for the median and the p99 alike (removing blocks saves their
  share of the time, on any backend; the pass's own speedup applies to the rest), at least
  5 % of ``t_p``;
- size ``size_d * size_p / size_0``.

Pure functions over numbers; nothing runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from compress.search.space import Candidate, SearchSection

#: The measure each goal minimizes (``pareto``: latency against fidelity).
GOAL_FIELD = {"median": "median_ms", "p99": "p99_ms", "size": "size_bytes", "pareto": "median_ms"}


@dataclass(frozen=True)
class Numbers:
    """A candidate's fidelity (``1 - loss``), median and p99 latency (ms) and size (bytes); None = unknown."""

    fidelity: float | None = None
    median_ms: float | None = None
    p99_ms: float | None = None
    size_bytes: float | None = None

    def goal(self, goal: str) -> float | None:
        """The value ``goal`` minimizes (:data:`GOAL_FIELD`)."""
        value: float | None = getattr(self, GOAL_FIELD[goal])
        return value


@dataclass(frozen=True)
class Depth:
    """What was measured of one pruned model: held-out loss, size (bytes), and the share of the time its removed blocks took."""

    loss: float
    size_bytes: float
    removed_share: float | None


def predict(candidate: Candidate, *, depth: Depth, reference: Numbers, original: Numbers) -> Numbers:
    """The predicted numbers of ``candidate`` (see the module docstring).

    Args:
        candidate: the candidate.
        depth: its pruned model's measurements (``r0``: loss 0, the original's size, share 0).
        reference: ``r0-PASSES`` measured (the same passes on the unpruned model).
        original: ``r0-fp32`` measured (the original model).
    """
    fidelity = None if reference.fidelity is None else 1.0 - (depth.loss + (1.0 - reference.fidelity))
    keep = None if depth.removed_share is None else max(1.0 - depth.removed_share, 0.05)
    median = None if keep is None or reference.median_ms is None else reference.median_ms * keep
    p99 = None if keep is None or reference.p99_ms is None else reference.p99_ms * keep
    size = (None if reference.size_bytes is None or not original.size_bytes
            else depth.size_bytes * reference.size_bytes / original.size_bytes)
    return Numbers(fidelity, median, p99, size)


def skip_reason(predicted: Numbers, rule: SearchSection, *, best: tuple[str, float] | None,
                measured: Sequence[tuple[str, Numbers]] = ()) -> str | None:
    """Why a candidate predicted as ``predicted`` need not be built, or None (build it).

    ``rule``: the search section; its ``goal``, ``target_fidelity`` (``target`` below),
    ``margin`` and ``latency_margin`` decide. For every goal but ``pareto``: its predicted fidelity is below ``target - margin``, or its
    predicted goal value exceeds ``best`` (the best measured candidate that meets the target:
    name, value) by more than ``latency_margin``. For ``pareto``: a measured candidate is
    faster by more than ``latency_margin`` and better in fidelity by more than ``margin``
    (it dominates the prediction with room to spare).
    """
    goal, target, margin, latency_margin = rule.goal, rule.target_fidelity, rule.margin, rule.latency_margin
    if goal == "pareto":
        if predicted.median_ms is None or predicted.fidelity is None:
            return None
        for name, m in measured:
            if (m.median_ms is not None and m.fidelity is not None
                    and m.median_ms * (1 + latency_margin) <= predicted.median_ms
                    and m.fidelity >= predicted.fidelity + margin):
                return (f"dominated by {name} (measured {m.median_ms:.4g} ms, fidelity {m.fidelity:.5f}; predicted "
                        f"{predicted.median_ms:.4g} ms, {predicted.fidelity:.5f})")
        return None
    if predicted.fidelity is not None and predicted.fidelity < target - margin:
        return f"predicted fidelity {predicted.fidelity:.5f} < target {target:g} - margin {margin:g}"
    value = predicted.goal(goal)
    if best is not None and value is not None and value > best[1] * (1 + latency_margin):
        unit = "bytes" if goal == "size" else "ms"
        return (f"predicted {GOAL_FIELD[goal]} {value:.4g} {unit} > best measured {best[1]:.4g} {unit} "
                f"({best[0]}) + {latency_margin:.0%}")
    return None


def best_measured(measured: Mapping[str, Numbers], *, goal: str, target: float) -> tuple[str, float] | None:
    """The measured candidate with the lowest goal value among those whose fidelity meets ``target``.

    Ties go to the name first in sorted order (deterministic); ``pareto`` minimizes the median.
    """
    ok = [(v, name) for name, m in measured.items()
          if m.fidelity is not None and m.fidelity >= target and (v := m.goal(goal)) is not None]
    if not ok:
        return None
    value, name = min(ok)
    return name, value


def order_key(predicted: Numbers, goal: str, name: str) -> tuple[float, float, str]:
    """Build order: lowest predicted goal value first, then the higher predicted fidelity, then the name."""
    value = predicted.goal(goal)
    return (float("inf") if value is None else value,
            -(predicted.fidelity if predicted.fidelity is not None else 0.0), name)


__all__ = ["GOAL_FIELD", "Depth", "Numbers", "best_measured", "order_key", "predict", "skip_reason"]
