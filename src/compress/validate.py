"""Validation of config values, shared by every stage's frozen config.

A config dataclass checks its fields once, in ``__post_init__``, with the helpers here;
a bad value raises :class:`FieldError` (a :class:`~compress.errors.ConfigError`) that
names the config and the field (``PruneConfig.max_drop = -0.1: must be >= 0``). Front
ends rename the field: the CLI reports the flag (:meth:`FieldError.as_flag`, ``--max-drop
-0.1: must be >= 0``) and ``compress run`` the config key, so both share one rule.

Numbers must be finite (nan and inf are refused everywhere: ``nan < x`` is always False,
so a nan slips past every range check, and an infinite duration never ends). Every value
that drives a loop or an allocation has an upper bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from compress.errors import CompressError, ConfigError

#: Longest a timed phase (warm-up, measurement) may be asked to run, in seconds.
MAX_SECONDS = 3600.0


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) and (not value or any(c.isspace() for c in value)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


class FieldError(ConfigError):
    """A config field holds an invalid value.

    Attributes:
        owner: the config class (``PruneConfig``).
        field: the field name (``max_drop``).
        value: the value given.
        problem: what is wrong, without the field's name (``must be >= 0``).
        example: a valid value, for the hint (``0.02``); None = no example.
        advice: a hint that fits every front end, used instead of the example.
    """

    def __init__(self, owner: str, field: str, value: Any, problem: str, *, example: str | None = None,
                 advice: str | None = None) -> None:
        self.owner, self.field, self.value, self.problem = owner, field, value, problem
        self.example, self.advice = example, advice
        hint = advice or (f"e.g. {field}={example}" if example is not None else f"see the documentation of {owner}")
        super().__init__(f"{owner}.{field} = {_show(value)}: {problem}", hint=hint)

    def as_flag(self, flag: str, value: Any = None, example: str | None = None) -> ConfigError:
        """The same error named by a command-line flag (``value``, ``example``: in the flag's units, when they differ)."""
        shown = _show(self.value if value is None else value)
        example = example if example is not None else self.example
        hint = self.advice or (f"e.g. {flag} {example}" if example is not None else f"see 'compress COMMAND --help' for {flag}")
        return ConfigError(f"{flag} {shown}: {self.problem}", hint=hint)

    def as_key(self, where: str, value: Any = None, example: str | None = None) -> ConfigError:
        """The same error named by a config key (``where``: ``pipeline.yaml: build.warmup_ms``)."""
        example = example if example is not None else self.example
        key = where.rsplit(" ", 1)[-1].rsplit(".", 1)[-1]
        hint = self.advice or (f"e.g. {key}: {example}" if example is not None else "see deploy/README.md")
        return ConfigError(f"{where} = {_show(self.value if value is None else value)}: {self.problem}", hint=hint)


@dataclass(frozen=True)
class Interval:
    """The range a number may take: ``[low, high]``, either end open or absent.

    ``low``/``high``: the bounds (None = unbounded on that side); ``low_open``/``high_open``:
    the bound itself is excluded (``> low`` instead of ``>= low``). ``Interval()`` admits
    every number. A plain value: the bounds are not checked against each other.

    Attributes:
        low: the lower bound, or None.
        high: the upper bound, or None.
        low_open: ``low`` itself is outside the interval.
        high_open: ``high`` itself is outside the interval.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` (a number, nan excluded by the caller) lies within the bounds."""
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return not (below or above)

    def describe(self) -> str:
        """``must be >= 0 and <= 1`` (the bounds that exist, the lower one first)."""
        parts = ([f"{'>' if self.low_open else '>='} {_num(self.low)}"] if self.low is not None else []) + \
                ([f"{'<' if self.high_open else '<='} {_num(self.high)}"] if self.high is not None else [])
        return "must be " + " and ".join(parts)


#: Every number (no bound).
ANY = Interval()


def check_number(owner: str, field: str, value: Any, *, within: Interval = ANY, example: str | None = None,
                 optional: bool = False) -> None:
    """``value`` is a finite real number (bool refused) within the interval ``within``.

    ``optional``: None is accepted (the option is off).
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(owner, field, value, "must be a number", example=example)
    if not math.isfinite(value):
        raise FieldError(owner, field, value, "must be a finite number (not nan or inf)", example=example)
    if not within.contains(value):
        raise FieldError(owner, field, value, within.describe(), example=example)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def check_int(owner: str, field: str, value: Any, *, within: Interval = ANY, example: str | None = None,
              optional: bool = False) -> None:
    """``value`` is an integer (bool refused) within the interval ``within``; None accepted when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(owner, field, value, "must be an integer", example=example)
    if not within.contains(value):
        raise FieldError(owner, field, value, within.describe(), example=example)


def check_choice(owner: str, field: str, value: Any, choices: Collection[str], *, optional: bool = False) -> None:
    """``value`` is one of ``choices`` (the error lists them)."""
    if value is None and optional:
        return
    if value not in choices:
        listed = ", ".join(str(c) for c in choices)
        raise FieldError(owner, field, value, f"is not one of: {listed}", example=next(iter(choices), None))


def as_flags(exc: FieldError, flags: Mapping[str, str | tuple[Any, ...]]) -> ConfigError:
    """``exc`` named by its flag when ``flags`` maps its field.

    An entry is ``flag``, or ``(flag, value as typed[, example])`` where the front end
    converts the value (``--warmup-ms 200`` -> ``warmup_s=0.2``).
    """
    entry = flags.get(exc.field)
    if entry is None:
        return exc
    flag, *rest = entry if isinstance(entry, tuple) else (entry,)
    return exc.as_flag(flag, *rest)


# --------------------------------------------------------------------------- parsed documents

#: Deepest nesting a parsed config or report may have (the formats compress reads need < 10).
MAX_DEPTH = 64
#: Most values (scalars, lists, mappings; shared YAML nodes counted at every use) in one document.
MAX_NODES = 200_000
#: Longest a value may be when quoted in an error message.
MAX_SHOWN = 120
#: Nesting refused before parsing: the parsers recurse, so how deep they get would depend on the
#: interpreter's recursion limit (what else ran in the process), not on the file.
MAX_PARSE_DEPTH = 256

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON ``text`` (brackets inside strings skipped); no parse, no recursion."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = deepest = 0
    for c in brackets:
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def yaml_depth(text: str, loader: Any) -> int:
    """The deepest sequence/mapping nesting of YAML ``text``, from ``loader``'s event stream (no composing, no recursion)."""
    import yaml

    depth = deepest = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            deepest = max(deepest, depth)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return deepest


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters (with "..." and the full length) for error messages."""
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for an error message, never longer than ``limit`` (nor costlier to build)."""
    if isinstance(value, list | tuple | dict) and _too_big(value, limit):
        kind = {list: "a list", tuple: "a list", dict: "a mapping"}[type(value)]
        return f"{kind} of {len(value)} items"
    return clip(repr(value), limit)


def _too_big(value: Any, limit: int) -> bool:
    """Whether ``value`` has more than ``limit`` nested items (counted without building its repr)."""
    stack, count = [value], 0
    while stack:
        v = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return False


def check_document(data: Any, *, source: str, error: type[CompressError] = ConfigError, max_depth: int = MAX_DEPTH,
                   max_nodes: int = MAX_NODES) -> None:
    """A parsed JSON/YAML document is plain data of bounded size: depth, item count, string keys.

    Walks iteratively (no recursion), counting shared objects at every use, so nested YAML
    anchors ("billion laughs") are refused before anything expands them.

    Raises:
        ``error`` (a ConfigError subclass) naming ``source`` and the path to the offending value.
    """
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    count = 0
    while stack:
        value, depth, where = stack.pop()
        count += 1
        if count > max_nodes:
            raise error(f"{source}: more than {max_nodes} values (nested aliases expand to too many)",
                        hint="write the config out plainly; anchors and aliases may not multiply it")
        if depth > max_depth:
            raise error(f"{source}: nested deeper than {max_depth} levels at {clip(where or 'the top', 200)}",
                        hint="a compress config or report is a few levels deep; check the file")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise error(f"{source}: key {shown(k)} at {clip(where or 'the top', 200)} is not a string",
                                hint="keys are names: write them as plain words")
                stack.append((v, depth + 1, f"{where}.{k}" if where else k))
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))
