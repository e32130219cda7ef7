"""Exception text for ``compress export``: the one place a foreign or user exception becomes our message.

:func:`export_error` turns an exception of ``torch.onnx.export`` into an ExportError that
names the unconvertible operator when it can; :func:`_first_line` and
:func:`_user_exception` give the first line of any exception with ANSI colours and host
paths removed; :func:`_import_torch` turns a missing torch into a MissingDependencyError.
Pure functions: they inspect exceptions and raise nothing but the documented error.
"""

from __future__ import annotations

import re
from typing import Any

from compress import onnx_io
from compress.errors import ExportError, MissingDependencyError
from compress.export.config import ExportConfig

#: ANSI colour codes (torch colours its error reports).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Where an exporter's error text names the operator it cannot convert.
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([^']+)'"),
    re.compile(r"[Oo]perator '([^']+)'"),
    re.compile(r"No ONNX function found for '?([\w.:]+)"),
)


def _import_torch() -> Any:
    """The ``torch`` module; MissingDependencyError (extra ``export``) when it is not installed."""
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", purpose="'compress export'", extra="export") from None
    return torch


def _user_exception(exc: BaseException) -> str:
    """``TYPE: first line`` of an exception raised by user code (``SystemExit(0)`` says it exited)."""
    if isinstance(exc, SystemExit):
        return f"it raised SystemExit({exc.code!r}) (called sys.exit or exit) instead of returning"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s text without ANSI codes or host paths (its type name when empty)."""
    text = _ANSI.sub("", str(exc)).strip()
    return onnx_io.strip_host_paths(text.splitlines()[0]) if text else type(exc).__name__


def export_error(exc: BaseException, config: ExportConfig) -> ExportError:
    """An ExportError for an exception raised by ``torch.onnx.export``, naming the op when it can.

    Only a dynamo failure suggests the other exporter (TorchScript): the two exporters' hints
    never send the user back and forth. A key/value cache among the outputs (``DynamicCache``)
    gets its own hint (``use_cache=False``).
    """
    text = _ANSI.sub("", str(exc))
    op = next((m.group(1) for p in _OP_PATTERNS if (m := p.search(text))), None)
    fallback = "try --exporter torchscript or a newer --opset" if config.exporter == "dynamo" else "try a newer --opset"
    if op is not None:
        return ExportError(
            f"the {config.exporter} exporter cannot convert operator {op} to ONNX (opset {config.opset})",
            hint=f"{fallback}, or replace {op} in the model",
        )
    summary = text.split("## Exception summary", 1)[-1]
    first = next((ln.strip() for ln in summary.splitlines() if ln.strip()), type(exc).__name__)
    first = re.sub(r"^<class '[\w.]+'>: ", "", first)
    if "DynamicCache" in text or "past_key_values" in text:
        hint = ("the model returns a key/value cache: call it with use_cache=False and return_dict=False "
                "(hf:FOLDER does this for you); -v shows the exporter's own log")
    else:
        hint = f"{fallback}; -v shows the exporter's own log"
    return ExportError(f"torch.onnx.export ({config.exporter}) failed: {onnx_io.strip_host_paths(first)[:400]}", hint=hint)

