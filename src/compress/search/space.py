"""The ``search`` section of a pipeline config and the candidates it spans.

A candidate is one setting of every axis: blocks removed (``remove``), the selection rule
and healing that choose and repair them, the precision pass and the 2:4 sparsity method.
``remove: 0`` is always part of the space: the precision/sparsity settings are measured
there first, on the unpruned model, and those measurements predict the rest
(:mod:`compress.search.predict`). Nothing here runs a model or touches files.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from compress.build.config import PRECISIONS, SPARSITY_METHODS
from compress.config import SectionReader, StageConfig, option
from compress.prune.select import SELECTIONS
from compress.validate import FieldError, Interval, check_choice, check_number

#: What the search minimizes: median or p99 latency, model size, or ``pareto`` (the front is the answer).
GOALS = ("median", "p99", "size", "pareto")
#: Values of ``search.sparsity``: no sparsity, or a 2:4 method of :data:`compress.build.SPARSITY_METHODS`.
SPARSITY_CHOICES = ("none", *SPARSITY_METHODS)
#: Where candidates run (``search.executor``): Ray when installed, Ray required, or in this process.
EXECUTORS = ("auto", "ray", "serial")
#: Selection rules a search can use (``auto`` chooses the count itself; the search chooses it).
_RULES = tuple(n for n in SELECTIONS.names() if n != "auto")


def _bools(r: SectionReader, key: str) -> tuple[bool, ...]:
    """``heal``: true, false, or a list of them."""
    value = r.data.get(key)
    if value is None:
        return (False,)
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, bool) for v in items):
        raise r.error(key, f"expected true, false or a list of them, got {value!r}", hint=f"e.g. {key}: [false, true]")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True, kw_only=True)
class SearchSection(StageConfig):
    """``search``: the candidate space, the goal and where candidates run.

    Attributes:
        remove: block counts to remove (0 is added: the passes are measured on the unpruned model).
        select: selection rules (:data:`compress.prune.SELECTIONS`, not ``auto``).
        heal: healing off / on (``prune.heal``).
        precision: precision passes (``build.precision``).
        sparsity: ``none`` or 2:4 methods (``build.sparsity_method``).
        goal: :data:`GOALS`; every goal but ``pareto`` picks the best candidate whose measured
            fidelity (``1 - loss`` against the original on held-out batches) is at least
            ``target_fidelity``.
        target_fidelity: in (0, 1].
        margin: a candidate is skipped when its predicted fidelity is below
            ``target_fidelity - margin`` (fidelity units).
        latency_margin: ... or when its predicted goal value exceeds the best measured one by
            more than this share (0.1 = 10 %).
        exhaustive: build and measure every candidate (no prediction; the reference answer).
        executor, workers, ray_address: :data:`EXECUTORS`; CPUs of a local Ray (default: all);
            an existing cluster (default: the ``RAY_ADDRESS`` environment variable). Not hashed:
            where a candidate runs does not change what it is.
    """

    remove: tuple[int, ...] = option((0, 1, 2), minimum=0, flag="", help="block counts to try removing (0 is always tried)")
    select: tuple[str, ...] = option(("lowest",), choices=_RULES, flag="", help="selection rules to try")
    heal: tuple[bool, ...] = option((False,), read=_bools, flag="", help="healing off and/or on: false, true or [false, true]")
    precision: tuple[str, ...] = option(("fp32", "int8"), choices=PRECISIONS, flag="", help="precision passes to try")
    sparsity: tuple[str, ...] = option(("none",), choices=SPARSITY_CHOICES, flag="",
                                       help="none and/or 2:4 methods: magnitude, wanda, sparsegpt")
    goal: str = option("median", choices=GOALS, flag="",
                       help="minimize median or p99 latency or size subject to the target, or pareto: the whole front")
    target_fidelity: float = option(0.99, flag="", help="the winner's output fidelity vs the original (held-out batches)")
    margin: float = option(0.005, minimum=0, flag="", help="skip a candidate predicted below target - margin")
    latency_margin: float = option(0.25, minimum=0, flag="",
                                   help="skip a candidate predicted slower than the best measured one by this share")
    exhaustive: bool = option(False, help="build and measure every candidate (no prediction)")
    executor: str = option("auto", choices=EXECUTORS, hash=False,
                           help="auto: Ray when installed, else one candidate at a time here; ray; serial")
    workers: int | None = option(None, minimum=1, hash=False, metavar="N", help="CPUs of a local Ray (default: all)")
    ray_address: str | None = option(None, hash=False, metavar="ADDRESS",
                                     help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)")

    def __post_init__(self) -> None:
        for name, values, choices in (("select", self.select, _RULES), ("precision", self.precision, PRECISIONS),
                                      ("sparsity", self.sparsity, SPARSITY_CHOICES)):
            if not values:
                raise FieldError("SearchSection", name, values, "must list at least one value", example=choices[0])
            for v in values:
                check_choice("SearchSection", name, v, choices)
        if not self.remove or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.remove):
            raise FieldError("SearchSection", "remove", self.remove, "must list block counts (integers >= 0)",
                             example="[0, 2, 4]")
        check_choice("SearchSection", "goal", self.goal, GOALS)
        check_choice("SearchSection", "executor", self.executor, EXECUTORS)
        check_number("SearchSection", "target_fidelity", self.target_fidelity, within=Interval(0, 1, low_open=True),
                     example="0.99")
        check_number("SearchSection", "margin", self.margin, within=Interval(0, 1), example="0.005")
        check_number("SearchSection", "latency_margin", self.latency_margin, within=Interval(low=0), example="0.1")

    def space(self) -> dict[str, Any]:
        """The axes as the report lists them, with the number of distinct candidates."""
        return {"remove": sorted({0, *self.remove}), "select": list(self.select), "heal": list(self.heal),
                "precision": list(self.precision), "sparsity": list(self.sparsity), "size": len(candidates(self))}


@dataclass(frozen=True)
class Candidate:
    """One point of the space. ``sparsity`` is ``none`` or a 2:4 method."""

    remove: int
    select: str
    heal: bool
    precision: str
    sparsity: str

    @property
    def depth(self) -> str:
        """The pruned model it starts from: ``r0`` (not pruned) or ``r2-lowest[-heal]``; shared by its passes."""
        return "r0" if self.remove == 0 else f"r{self.remove}-{self.select}" + ("-heal" if self.heal else "")

    @property
    def passes(self) -> str:
        """Its precision/sparsity setting: ``fp32``, ``int8``, ``int8-24wanda``, ..."""
        return self.precision + ("" if self.sparsity == "none" else f"-24{self.sparsity}")

    @property
    def name(self) -> str:
        """``DEPTH-PASSES``, unique in a space (``r2-lowest-heal-int8``)."""
        return f"{self.depth}-{self.passes}"

    @property
    def has_passes(self) -> bool:
        """Whether a pass runs (anything but fp32 without sparsity)."""
        return self.precision != "fp32" or self.sparsity != "none"

    def settings(self) -> dict[str, Any]:
        """The axes' values, JSON-ready (``select``/``heal`` are None when nothing is removed)."""
        return {"remove": self.remove, "select": self.select if self.remove else None,
                "heal": self.heal if self.remove else None, "precision": self.precision, "sparsity": self.sparsity}


def candidates(section: SearchSection) -> list[Candidate]:
    """Every distinct candidate of the space, in a fixed order (fewest blocks removed first).

    With ``remove: 0`` the rule and healing do not matter: one depth ``r0`` per pass setting.
    """
    out: dict[str, Candidate] = {}
    for c in _product(section):
        out.setdefault(c.name, c)
    return list(out.values())


def _product(section: SearchSection) -> Iterator[Candidate]:
    passes = list(itertools.product(section.precision, section.sparsity))
    for remove in sorted({0, *section.remove}):
        depths = [(section.select[0], False)] if remove == 0 else list(itertools.product(section.select, section.heal))
        for (select, heal), (precision, sparsity) in itertools.product(depths, passes):
            yield Candidate(remove, select, heal, precision, sparsity)


__all__ = ["EXECUTORS", "GOALS", "SPARSITY_CHOICES", "Candidate", "SearchSection", "candidates"]
