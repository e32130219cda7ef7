"""Stage configs, read from a pipeline section or from command-line flags, both driven by the fields.

A stage config is a frozen dataclass; each field a user can set is declared with
:func:`option`, whose :class:`Option` metadata says how it is written: its help text, its flag
(``--field-name`` unless given), its pipeline key (the field name unless given), its choices
(a tuple, or a callable such as a registry's ``names`` so the choices cannot drift from what
exists), a lower bound, and how a list is written. From that one declaration:

- :func:`read_section` reads a pipeline section (a mapping): unknown keys name the key and
  list the valid ones, every value is type-checked with a message naming
  ``FILE: section.key``, and the config's own ``__post_init__`` checks are reported by key;
- :func:`add_arguments` adds the argparse options (default ``None``: "not given", so the
  dataclass default is the only default), and :func:`from_args` builds the config from the
  parsed namespace, reporting the config's checks by flag.

Defaults exist once, on the dataclass. :class:`SectionReader` is the typed access to one
section (also used for the parts of a pipeline config that are not stage configs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import CompressError, ConfigError
from compress.validate import FieldError, clip, shown

#: Key of :class:`Option` in a dataclass field's metadata.
OPTION = "compress.option"

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Field types :func:`read_section` and :func:`add_arguments` understand (``X | None`` of each too).
KINDS = ("str", "int", "float", "bool", "tuple[str, ...]", "tuple[int, ...]", "tuple[float, ...]", "Path")


@dataclass(frozen=True)
class Option:
    """How a user writes one config field.

    Attributes:
        help: the flag's help text (also the key's documentation).
        flag: the command-line flag; None = ``--`` + the field name in kebab case; ``""`` =
            no flag (pipeline only).
        key: the pipeline key; None = the field name; ``""`` = no key (command line only).
        choices: the valid strings, or a callable returning them (a registry's names).
        metavar: argparse metavar.
        minimum: lower bound checked while reading a pipeline section (the config checks the rest).
        split: a list may be written as one comma-separated string.
        repeat: the flag is repeatable (``--shapes A --shapes B``).
        none_word: a word that means None (``"none"`` for a target that can be turned off).
        parse: called on each string of a list, raising :class:`ConfigError` when it is malformed.
        parse_hint: the hint of that error when it is reported by key.
        read: a custom reader ``(reader, key) -> value`` for a value no kind describes.
        path_kind: for ``Path`` fields: ``"file"`` or ``"folder"`` (must exist).
        hash: whether the value goes into the pipeline's stage hash.
    """

    help: str = ""
    flag: str | None = None
    key: str | None = None
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    metavar: str | None = None
    minimum: float | None = None
    split: bool = False
    repeat: bool = False
    none_word: str | None = None
    parse: Callable[[str], Any] | None = None
    parse_hint: str | None = None
    read: Callable[[SectionReader, str], Any] | None = None
    path_kind: str = "file"
    hash: bool = True

    def choice_list(self) -> tuple[str, ...]:
        """The valid strings (``()`` = any)."""
        c = self.choices() if callable(self.choices) else self.choices
        return tuple(c or ())


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **how: Any) -> Any:
    """A dataclass field with :class:`Option` metadata (``how``: the Option's attributes)."""
    meta = {OPTION: Option(**how), "hash": how.get("hash", True)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def inherit(cls: type, name: str, **changes: Any) -> Any:
    """A field declared like ``cls.name`` (the same :class:`Option` and default), with ``changes`` to the Option.

    For a config that mirrors another's option (a pipeline section beside the stage config
    whose flag it is): the help, the choices, the bound and the default stay in one place.
    """
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    opt = dataclasses.replace(f.metadata[OPTION], **changes)
    meta = {OPTION: opt, "hash": opt.hash}
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=meta)
    return dataclasses.field(default=f.default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """One user-settable field of a config class: the dataclass field, its Option and its kind."""

    name: str
    option: Option
    kind: str
    optional: bool
    default: Any

    @property
    def key(self) -> str:
        """The pipeline key ("" = none)."""
        return self.name if self.option.key is None else self.option.key

    @property
    def flag(self) -> str:
        """The command-line flag ("" = none)."""
        return "--" + self.name.replace("_", "-") if self.option.flag is None else self.option.flag


def _kind(annotation: Any) -> tuple[str, bool]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    base = " | ".join(p for p in parts if p != "None")
    return base, optional


def settings(cls: type) -> list[Setting]:
    """The fields of ``cls`` declared with :func:`option`, in declaration order.

    Raises:
        TypeError: a field's type is not one of :data:`KINDS` and it has no custom ``read``
            (a programming error in the config class, not a user error).
    """
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get(OPTION)
        if opt is None:
            continue
        kind, optional = _kind(f.type)
        if kind not in KINDS and opt.read is None:
            raise TypeError(f"{cls.__name__}.{f.name}: type {f.type} is not one of {KINDS}; give option(read=...)")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(Setting(f.name, opt, kind, optional, default))
    return out


# --------------------------------------------------------------------------- pipeline sections


def type_name(value: Any) -> str:
    """How a parsed value is called in messages (``a mapping``, ``a list``, ``int``)."""
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def unknown_key(source: str, key: Any, valid: Sequence[str], *, noun: str, where: str = "", hint: str) -> ConfigError:
    """A ConfigError for an unknown key or section, listing the valid ones and the closest match."""
    close = difflib.get_close_matches(str(key)[:100], valid, n=1)
    return ConfigError(
        f"{source}: unknown {noun} '{clip(str(key))}'{' ' + where if where else ''}; valid {noun}s: {', '.join(valid)}",
        hint=f"did you mean '{close[0]}'?" if close else hint,
    )


class SectionReader:
    """Typed access to one section of a config file; unknown keys are rejected on construction.

    Every error is a :class:`ConfigError` naming ``SOURCE: section.key``. In every string,
    ``${VAR}`` is replaced by the environment variable ``VAR`` (unset: an error).

    Args:
        data: the section as parsed (None = empty).
        source: the config file, as named in messages.
        section: the section's dotted name (``build``, ``calibration.random``).
        valid: the valid keys.
        hint: the hint of errors that have no better one (where the format is documented).
        resolve: turns a path string into a checked Path: ``(text, where, kind) -> Path``.
    """

    def __init__(self, data: Any, *, source: str, section: str, valid: Sequence[str], hint: str,
                 resolve: Callable[[str, str, str], Path] | None = None) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: section '{section}' must be a mapping (key: value), got {type_name(data)}",
                              hint=hint)
        valid = sorted(valid)
        for key in data:
            if key not in valid:
                raise unknown_key(source, key, valid, noun="key", where=f"in section '{section}'", hint=hint)
        self.data = dict(data)
        self.source, self.section, self.hint = source, section, hint
        self._resolve = resolve

    def given(self, key: str) -> bool:
        """Whether ``key`` is present with a value other than null."""
        return self.data.get(key) is not None

    def error(self, key: str, message: str, *, hint: str | None = None) -> ConfigError:
        """A ConfigError about ``key``: ``SOURCE: section.key: message``."""
        return ConfigError(f"{self.source}: {self.section}.{key}: {clip(message, 1000)}", hint=hint or self.hint)

    def _expand(self, key: str, text: str) -> str:
        def env(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                raise self.error(key, f"environment variable {m.group(1)} is not set",
                                 hint=f"export {m.group(1)}=... before running, or write the value itself")
            return value

        return _ENV.sub(env, text)

    def text(self, key: str, default: str | None = None, *, choices: Sequence[str] = ()) -> str | None:
        """A string (``${VAR}`` expanded), one of ``choices`` when given."""
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {shown(value)}",
                             hint='quote the value in YAML, e.g. sparsity: "2:4"' if isinstance(value, int | float)
                             else f'write a string, e.g. {key}: "..."')
        value = self._expand(key, value)
        if choices and value not in choices:
            raise self.error(key, f"{shown(value)} is not one of {', '.join(choices)}", hint=f"e.g. {key}: {choices[0]}")
        return value

    def integer(self, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        """An integer (booleans refused), at least ``minimum``."""
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {shown(value)}", hint=f"e.g. {key}: {max(minimum or 0, 1)}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}", hint=f"e.g. {key}: {minimum}")
        return value

    def number(self, key: str, default: float | None = None, *, minimum: float | None = None) -> float | None:
        """A finite number (an integer is accepted; ``1e-4`` written without a dot too), at least ``minimum``."""
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {shown(value)}", hint=f"e.g. {key}: {minimum if minimum is not None else 1:g}")
        if not math.isfinite(value):  # YAML .nan / .inf: nan passes every range check, inf never ends
            raise self.error(key, f"must be a finite number, got {value}", hint=f"e.g. {key}: 1")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum:g}, got {value:g}", hint=f"e.g. {key}: {minimum:g}")
        return float(value)

    def flag(self, key: str, default: bool | None) -> bool | None:
        """``true`` or ``false`` (YAML booleans)."""
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {shown(value)}", hint=f"e.g. {key}: true (YAML booleans are unquoted)")
        return value

    def texts(self, key: str, *, split: bool = False) -> tuple[str, ...]:
        """A list of strings (or one string; comma-separated when ``split``); empty items dropped."""
        value = self.data.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise self.error(key, f"expected a list of strings, got {shown(value)}", hint=f'e.g. {key}: ["..."]')
        out = [self._expand(key, v) for v in items]
        if split:
            out = [s.strip() for v in out for s in v.split(",")]
        return tuple(s for s in out if s)

    def numbers(self, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
        """A number or a non-empty list of numbers."""
        value = self.data.get(key)
        if value is None:
            return default
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            raise self.error(key, f"expected a number or a list of numbers, got {shown(value)}", hint=f"e.g. {key}: [0.5, 0.5, 0.5]")
        return tuple(float(v) for v in items)

    def path(self, key: str, *, kind: str) -> Path | None:
        """A path that must exist as ``kind`` (``file``/``folder``), resolved by the reader's ``resolve``."""
        text = self.text(key)
        if text is None:
            return None
        if self._resolve is None:
            return Path(text)
        return self._resolve(text, f"{self.section}.{key}", kind)

    def wrap(self, key: str, exc: CompressError, *, hint: str) -> ConfigError:
        """A library ConfigError about a value of ``key``, located in the config (the flag name dropped)."""
        return self.error(key, re.sub(r"^--[\w-]+ ", "", exc.message), hint=hint)


def _read_value(r: SectionReader, s: Setting) -> Any:
    key, opt = s.key, s.option
    if opt.read is not None:
        return opt.read(r, key)
    if opt.none_word is not None and isinstance(r.data.get(key), str) and r.data[key].lower() == opt.none_word:
        return None
    minimum = opt.minimum
    if s.kind == "str":
        return r.text(key, s.default, choices=opt.choice_list())
    if s.kind == "int":
        return r.integer(key, s.default, minimum=None if minimum is None else int(minimum))
    if s.kind == "float":
        return r.number(key, s.default, minimum=minimum)
    if s.kind == "bool":
        return r.flag(key, s.default)
    if s.kind == "tuple[float, ...]":
        return r.numbers(key, s.default)
    if s.kind == "tuple[int, ...]":
        return _integers(r, key, s.default, minimum)
    if s.kind == "Path":
        return r.path(key, kind=opt.path_kind)
    values = r.texts(key, split=opt.split)
    choices = opt.choice_list()
    for v in values:
        if choices and v not in choices:
            raise r.error(key, f"{shown(v)} is not one of {', '.join(choices)}", hint=f"e.g. {key}: [{choices[0]}]")
        if opt.parse is not None:
            try:
                opt.parse(v)
            except ConfigError as exc:
                raise r.wrap(key, exc, hint=opt.parse_hint or r.hint) from None
    return values or s.default


def _integers(r: SectionReader, key: str, default: tuple[int, ...], minimum: float | None) -> tuple[int, ...]:
    """An integer or a list of integers (booleans refused), each at least ``minimum``."""
    value = r.data.get(key)
    if value is None:
        return default
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              and (minimum is None or v >= minimum) for v in items):
        at_least = "" if minimum is None else f" >= {minimum:g}"
        raise r.error(key, f"expected a list of integers{at_least}, got {shown(value)}", hint=f"e.g. {key}: [0, 5]")
    return tuple(items)


def section_values(cls: type, r: SectionReader) -> dict[str, Any]:
    """The values of ``cls``'s keyed options found in ``r`` (absent keys: the dataclass default)."""
    return {s.name: _read_value(r, s) for s in settings(cls) if s.key}


def section_keys(cls: type) -> list[str]:
    """The pipeline keys of ``cls``."""
    return [s.key for s in settings(cls) if s.key]


def key_errors(cls: type, where: str) -> Callable[[FieldError], ConfigError]:
    """A translator of ``cls``'s :class:`FieldError` into the same error named ``where.key``."""
    keys = {s.name: s.key for s in settings(cls) if s.key}

    def translate(exc: FieldError) -> ConfigError:
        key = keys.get(exc.field, exc.field)
        return exc.as_key(f"{where}.{key}")

    return translate


def read_section(cls: type, data: Any, *, source: str, section: str, hint: str, extra: Sequence[str] = (),
                 resolve: Callable[[str, str, str], Path] | None = None, **fixed: Any) -> Any:
    """A ``cls`` config from one pipeline section.

    Args:
        cls: the config class (its :func:`option` fields are the valid keys).
        data: the section as parsed.
        source: the config file, as named in messages.
        section: the section's name.
        hint: the hint of errors without a better one.
        extra: keys the caller reads itself (valid, not passed to ``cls``).
        resolve: path resolver of :class:`SectionReader`.
        **fixed: field values set by the caller, not by keys.

    Raises:
        ConfigError: an unknown key (naming it and listing the valid ones), a value of the
            wrong type, or a value ``cls`` refuses, named ``SOURCE: section.key``.
    """
    r = SectionReader(data, source=source, section=section, valid=[*section_keys(cls), *extra], hint=hint,
                      resolve=resolve)
    values = section_values(cls, r)
    try:
        return cls(**values, **fixed)
    except FieldError as exc:
        raise key_errors(cls, f"{source}: {section}")(exc) from None


# --------------------------------------------------------------------------- command-line flags


def add_arguments(cls: type, parser: argparse.ArgumentParser | Any, *, skip: Sequence[str] = (),
                  only: Sequence[str] | None = None) -> None:
    """Add one argparse option per flagged field of ``cls`` to ``parser`` (or an argument group).

    Every option defaults to None ("not given"): :func:`from_args` then keeps the dataclass
    default, which is printed in the help as ``(default X)`` unless the help text says it.
    """
    for s in settings(cls):
        if not s.flag or s.name in skip or (only is not None and s.name not in only):
            continue
        opt = s.option
        kw: dict[str, Any] = {"help": opt.help, "dest": s.name, "default": None}
        if opt.metavar:
            kw["metavar"] = opt.metavar
        if s.kind == "bool":
            kw["action"] = "store_true"
        elif s.kind in ("int", "float") and opt.none_word is None:
            kw["type"] = int if s.kind == "int" else float
        if s.kind in ("str", "tuple[str, ...]") and opt.choice_list() and not opt.split:
            kw["choices"] = opt.choice_list()
        if opt.repeat:
            kw["action"] = "append"
        parser.add_argument(s.flag, **kw)


def flag_names(cls: type) -> dict[str, str]:
    """Field name -> flag, for reporting ``cls``'s :class:`FieldError` by flag."""
    return {s.name: s.flag for s in settings(cls) if s.flag}


def _flag_value(s: Setting, value: Any) -> Any:
    opt = s.option
    if opt.none_word is not None and isinstance(value, str):
        if value.lower() == opt.none_word:
            return None
        try:
            return int(value) if s.kind == "int" else float(value)
        except ValueError:
            raise ConfigError(f"{s.flag} {value!r}: not a number",
                              hint=f"e.g. {s.flag} {s.default}, or {s.flag} {opt.none_word}") from None
    if s.kind == "tuple[int, ...]":
        try:
            return tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"{s.flag} {value!r} is not a comma-separated list of integers",
                              hint=f"e.g. {s.flag} 0,5") from None
    if s.kind.startswith("tuple"):
        items = value if isinstance(value, list) else [value]
        if opt.split:
            items = [p.strip() for v in items for p in v.split(",")]
        items = [v for v in items if v != ""]
        for v in items:
            if opt.parse is not None:
                opt.parse(v)
        if s.kind == "tuple[float, ...]":
            try:
                return tuple(float(v) for v in items)
            except ValueError:
                raise ConfigError(f"{s.flag} {value!r} is not a list of numbers", hint=f"e.g. {s.flag} 0.5") from None
        return tuple(items)
    if s.kind == "Path":
        return Path(value)
    return value


def from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """A ``cls`` config from parsed flags (see :func:`add_arguments`); ``fixed``: values set by the caller.

    Raises:
        ConfigError: a value ``cls`` refuses, named by its flag (``--max-fallback 2: must be <= 1``).
    """
    values: dict[str, Any] = {}
    for s in settings(cls):
        if not s.flag or not hasattr(args, s.name):
            continue
        value = getattr(args, s.name)
        if value is None or (s.kind == "bool" and value is False):
            continue
        values[s.name] = _flag_value(s, value)
    values.update(fixed)
    flags = flag_names(cls)
    try:
        return cls(**values)
    except FieldError as exc:
        flag = flags.get(exc.field)
        raise (exc.as_flag(flag) if flag else exc) from None


class StageConfig:
    """Mixin of a stage's config dataclass: its mapping and flag front ends as class methods.

    ``BuildConfig.from_mapping({"precision": "int8"})`` is :func:`read_section`;
    ``BuildConfig.add_arguments(parser)`` / ``BuildConfig.from_args(args)`` are
    :func:`add_arguments` / :func:`from_args`. The mixin holds no fields and no state.
    """

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "config", section: str | None = None) -> Any:
        """The config of a mapping (keys: the option fields); ConfigError naming ``SOURCE: section.key``.

        Raises:
            ConfigError: an unknown key (listing the valid ones), a value of the wrong type,
                or a value the config refuses.
        """
        keys = section_keys(cls)
        return read_section(cls, data, source=source, section=section or cls.__name__,
                            hint=f"valid keys: {', '.join(sorted(keys))}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | Any, **kw: Any) -> None:
        """The config's flags on ``parser`` (see :func:`add_arguments`)."""
        add_arguments(cls, parser, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fixed: Any) -> Any:
        """The config of parsed flags (see :func:`from_args`)."""
        return from_args(cls, args, **fixed)


__all__ = [
    "KINDS", "OPTION", "Option", "SectionReader", "Setting", "StageConfig", "add_arguments", "flag_names", "from_args",
    "inherit", "key_errors", "option", "read_section", "section_keys", "section_values", "settings", "type_name",
    "unknown_key",
]
