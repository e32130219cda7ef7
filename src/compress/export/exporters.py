"""The exporters (``--exporter dynamo|torchscript``) and the silencing of what they print.

Each exporter is registered in :data:`compress.export.config.EXPORTERS` and has the
signature ``(module, call, config, output_names) -> onnx.ModelProto``: it calls
``torch.onnx.export`` on ``module`` (not modified; the caller sets eval mode), writes the
result into this process's temporary folder (:func:`compress.external.temp_folder`, removed
at exit) and loads it back with its weights left in the files. Its exceptions are
translated by the caller (:func:`compress.export.messages.export_error`).

:func:`quiet` silences torch/onnxscript/transformers (Python and C++ output) and restores
everything it changed on exit: the loggers' levels, the warning filters, ``sys.stdout``/
``sys.stderr`` and file descriptors 1 and 2; :func:`_environ_kept` gives back ``os.environ``
as it was before an export. :func:`_rename_dims` and :func:`_specialized`
relate the exported graph's input dims to the requested dynamic axes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx

from compress import onnx_io
from compress.errors import ConfigError, MissingDependencyError
from compress.export.config import EXPORTERS, DynamicAxis, ExportConfig, _Call

#: Loggers whose warnings the exporters print; raised to ERROR unless verbose.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "transformers")


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence what torch/onnxscript/transformers print while active (Python and C++ output).

    Redirects ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2, ignores warnings
    and raises the exporters' loggers (:data:`_NOISY_LOGGERS`) to ERROR. On exit, an
    exception included, each of those loggers has its level back, the warning filters,
    streams and descriptors are the ones before; no logging handler is added or removed.
    """
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        for name in _NOISY_LOGGERS:
            log = logging.getLogger(name)
            stack.callback(log.setLevel, log.level)
            log.setLevel(logging.ERROR)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(_fd_silenced())
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        yield


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """Give ``os.environ`` back on exit (an exception included) exactly as it was on entry.

    Around the exporters: torch's inductor sets ``TORCHINDUCTOR_CACHE_DIR`` the first time
    it looks up its cache folder, and nothing of an export should outlive it.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


@contextlib.contextmanager
def _fd_silenced() -> Iterator[None]:
    """Point file descriptors 1 and 2 at an anonymous temporary file (C++ prints) while active.

    Both descriptors are restored and their saved duplicates closed on exit, an exception
    included; without real descriptors (embedded interpreters) nothing is redirected.
    """
    saved: list[int] = []
    with contextlib.suppress(OSError):  # no real descriptors (embedded interpreters)
        saved.append(os.dup(1))
        saved.append(os.dup(2))
    if len(saved) < 2:
        for fd in saved:
            os.close(fd)
        yield
        return
    try:
        for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if s is None:
                continue
            with contextlib.suppress(AttributeError, OSError, ValueError):  # closed, a broken pipe: best effort
                s.flush()
        with tempfile.TemporaryFile() as sink:
            try:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


@EXPORTERS.register("dynamo")
def _export_dynamo(module: Any, call: _Call, config: ExportConfig, output_names: Sequence[str]) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)``; module paths land in node metadata."""
    import torch

    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise MissingDependencyError("onnxscript", purpose="the dynamo exporter", extra="export") from None
    dynamic_shapes: Any = None
    if config.dynamic and not isinstance(module, torch.export.ExportedProgram):
        dims = {label: torch.export.Dim(label) for label in dict.fromkeys(d.label for d in config.dynamic)}
        per_input: dict[str, dict[int, Any]] = {}
        for d in config.dynamic:
            per_input.setdefault(d.name, {})[d.axis] = dims[d.label]
        if call.kwargs:
            dynamic_shapes = {n: per_input.get(n) for n in call.kwargs}
        else:
            dynamic_shapes = tuple(per_input.get(n) for n in call.names)
    program = torch.onnx.export(
        module, call.args, None, kwargs=dict(call.kwargs) or None, dynamo=True, opset_version=config.opset,
        input_names=list(call.names) if call.args else None, output_names=list(output_names),
        dynamic_shapes=dynamic_shapes, verbose=False,
    )
    assert program is not None  # None only for dynamo=False
    path = _export_path()
    program.save(str(path), external_data=True)  # streams the weights to path.data; no 2 GB protobuf
    del program
    return onnx_io.load_model(path)


def _export_path() -> Path:
    """A fresh ``model.onnx`` path in this process's temporary folder (removed at exit)."""
    from compress.external import temp_folder

    return Path(tempfile.mkdtemp(prefix="export-", dir=temp_folder())) / "model.onnx"


@EXPORTERS.register("torchscript")
def _export_torchscript(module: Any, call: _Call, config: ExportConfig, output_names: Sequence[str]) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=False)``; module paths land in node names (``/blocks.0/...``)."""
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        raise ConfigError("a saved torch.export program (.pt2) can only be exported with --exporter dynamo",
                          hint="drop --exporter torchscript")
    args, names = call.args, call.names
    if call.kwargs:  # TorchScript traces positional arguments: fill gaps with the defaults
        sig = inspect.signature(module.forward).parameters
        order = list(sig)
        last = max(order.index(n) for n in call.kwargs)
        args = tuple(call.kwargs.get(p, sig[p].default) for p in order[: last + 1])
        names = tuple(p for p in order[: last + 1] if p in call.kwargs)
    axes: dict[str, dict[int, str]] = {}
    for d in config.dynamic:
        axes.setdefault(d.name, {})[d.axis] = d.label
    path = _export_path()  # above 2 GB the TorchScript exporter writes the weights as files beside it
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=config.opset, input_names=list(names),
                      output_names=list(output_names), dynamic_axes=axes or None)
    return onnx_io.load_model(path)


def _specialized(model: onnx.ModelProto, dynamic: Sequence[DynamicAxis]) -> list[str]:
    """One note per requested dynamic axis that the exporter fixed to a size (the model's code needs it)."""
    inputs = {i.name: i for i in model.graph.input}
    notes = []
    for d in dynamic:
        vi = inputs.get(d.name)
        if vi is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        if d.axis < len(dims) and dims[d.axis].HasField("dim_value"):
            notes.append(f"--dynamic {d.name}:{d.axis}: the exporter fixed this axis to {dims[d.axis].dim_value} "
                         "(the model's code needs that size)")
    return notes


def _rename_dims(model: onnx.ModelProto, dynamic: Sequence[DynamicAxis]) -> None:
    """Give dynamic axes their labels where the exporter named them otherwise (``s77`` -> ``batch``).

    Renames the symbol everywhere it appears as a whole dim (inputs, outputs, value_info) of
    ``model``, which must be a model this module owns (it is modified in place).
    """
    inputs = {i.name: i for i in model.graph.input}
    rename: dict[str, str] = {}
    for d in dynamic:
        vi = inputs.get(d.name)
        dims = vi.type.tensor_type.shape.dim if vi is not None else []
        if d.axis < len(dims) and dims[d.axis].dim_param and dims[d.axis].dim_param != d.label:
            rename.setdefault(dims[d.axis].dim_param, d.label)
    if not rename:
        return
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]

