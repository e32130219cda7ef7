"""Sweeps: prune 0..K blocks with one rule, one row per count, and the Pareto fronts over the rows.

:func:`sweep` runs :func:`~compress.prune.stage.prune` once per count; each row holds
the held-out fidelity, parameters and ORT latency (ms) of that count's model (and, with the
rule ``measured``, every candidate tried). :func:`pareto_front` and :func:`mark_fronts`
mark the models no other one beats in both loss and cost. Models are never modified;
nothing touches files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from compress.blocks import MappedModel
from compress.fidelity import Batches
from compress.log import progress
from compress.prune.config import PruneConfig, check_blocks
from compress.prune.stage import prune


def sweep(model: MappedModel, config: PruneConfig, *, data: Batches, counts: Sequence[int]) -> list[dict[str, Any]]:
    """Prune 0..K blocks with the same rule; one row per count: fidelity and latency.

    With the rule ``measured`` each row also lists every candidate it tried
    (with ``--heal``, healed ones too) with its held-out fidelity and parameters, and
    :func:`mark_fronts` marks the Pareto fronts (loss vs latency over the rows, loss vs
    parameters over every candidate).

    Does not modify ``model``.

    Raises:
        FieldError: a count above the removable blocks (checked before any work).
    """
    check_blocks(replace(config, remove=None, max_drop=None), model.block_map, counts=counts)
    rows = []
    for k in progress(counts, desc="sweep"):
        _, report = prune(model, replace(config, remove=k, max_drop=None), data=data)
        lat = report.latency or {}
        table = (report.measured or {}).get("candidates", [])
        chosen = next((c for c in table if c["chosen"]), None)
        rows.append({"removed": k, "blocks": [b["name"] for b in report.removed],
                     "rule": ", ".join(chosen["rules"]) if chosen else config.select,
                     "healed": bool((report.heal or {}).get("healed_spans")),
                     "candidates": [{key: c[key] for key in ("rules", "blocks", "healed", "loss", "cosine", "params",
                                                              "chosen")} for c in table],
                     "loss": report.fidelity["loss"], "cosine": report.fidelity["cosine"],
                     "top1": report.fidelity["top1"], "params": report.params["after"],
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
