r"""ONNX Runtime sessions over models whose weights stay in their files; running one batch.

A session is made from the graph alone: the serialized ``ModelProto`` without tensor data
(kilobytes to a few megabytes), with ONNX Runtime told where the data lives. External
tensors of the folder holding most of the model's bytes (the input's data file, or this
process's spill file) keep their references, made relative to that folder, which is
passed as ``session.model_external_initializers_file_folder_path``; ONNX Runtime
memory-maps or reads them itself. Tensors in any other folder (e.g. weights a pass
rewrote, beside the untouched ones of the input) are handed over as memory-mapped
``OrtValue``\ s through ``SessionOptions.add_external_initializers``. No weight bytes are
serialized or copied by compress.

:func:`make_session` lets ONNX Runtime's exceptions through; :func:`load_session` (what the
stages use) turns a model ONNX Runtime cannot load into a BlockError, and
:func:`run_batch` a batch it rejects into a CalibrationError naming the batch. This
module imports nothing of compress but :mod:`compress.errors` and :mod:`compress.external`
(:mod:`compress.graph` runs ONNX Runtime through it). ``import compress.runtime`` does not
import onnxruntime; making a session does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress import external
from compress.errors import BlockError, CalibrationError


def session_view(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None, list[tuple[str, Any]]]:
    """What :func:`make_session` hands to ONNX Runtime: (graph, data folder, external initializers).

    ``graph`` is a copy of ``model`` whose external tensors in ``data folder`` (the folder
    holding most external bytes; None when nothing is external) have locations relative
    to it; every other external tensor is a main-graph initializer returned as
    ``(name, read-only memory map)``, or, when it cannot be one (a Constant attribute, a
    subgraph initializer, a type numpy cannot map), is embedded in ``graph`` (read once).
    Does not modify ``model``.
    """
    per_folder: dict[Path, int] = {}
    for t in external.model_tensors(model):
        ref = external.data_ref(t)
        if ref is not None:
            per_folder[ref.path.parent] = per_folder.get(ref.path.parent, 0) + ref.length
    view = onnx.ModelProto()
    view.CopyFrom(model)
    if not per_folder:
        return view, None, []
    folder = max(per_folder, key=lambda k: (per_folder[k], str(k)))
    top_level = {id(t) for t in view.graph.initializer}
    mapped: list[tuple[str, Any]] = []
    keep: list[onnx.TensorProto] = []
    for t in external.model_tensors(view):
        ref = external.data_ref(t)
        if ref is None:
            continue
        if ref.path.parent == folder:
            external._set_ref(t, os.path.relpath(ref.path, folder), ref.offset, ref.length)
            continue
        arr = external.map_array(t) if id(t) in top_level else None
        if arr is None:
            data = external.read_bytes(ref, name=t.name)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
        else:
            mapped.append((t.name, arr))
            keep.append(t)
    for t in keep:  # ORT replaces these declarations by the OrtValues; the stale location is never read
        external._set_ref(t, "external-initializer", 0, external.stored_nbytes(t) or 0)
    return view, folder, mapped


#: Intra-op threads of sessions made without ``threads`` (None: ONNX Runtime's default, every core); see :func:`default_threads`.
_DEFAULT_THREADS: int | None = None


@contextlib.contextmanager
def default_threads(threads: int | None) -> Iterator[None]:
    """Within the block, sessions made without ``threads`` use ``threads`` intra-op threads (None: every core).

    For work that shares a machine with other work, e.g. a search task holding 1 of a node's
    CPUs. The previous value is restored on exit.
    """
    global _DEFAULT_THREADS
    before = _DEFAULT_THREADS
    _DEFAULT_THREADS = threads
    try:
        yield
    finally:
        _DEFAULT_THREADS = before


def make_session(model: onnx.ModelProto, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, options: Any = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model`` (see the module docstring).

    ``providers`` are filtered to those ONNX Runtime offers (CPU when none is left);
    ``options`` is an ``ort.SessionOptions`` to start from (a new one when None; it is
    modified). Exceptions of ONNX Runtime propagate. Does not modify ``model``.
    """
    import onnxruntime as ort

    view, folder, mapped = session_view(model)
    opts = options if options is not None else ort.SessionOptions()
    if options is None:
        opts.log_severity_level = 3
    threads = threads or _DEFAULT_THREADS
    if threads:
        opts.intra_op_num_threads = threads
    if folder is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    values = []
    if mapped:
        values = [ort.OrtValue.ortvalue_from_numpy(arr) for _, arr in mapped]
        opts.add_external_initializers([name for name, _ in mapped], values)
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    session = ort.InferenceSession(view.SerializeToString(), opts, providers=chosen)
    session._compress_keepalive = (opts, values, mapped)  # the OrtValues must outlive the session
    return session


def _first_line(exc: Exception) -> str:
    """The first line of an exception's text, or its type name when it has none."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_session(model: onnx.ModelProto, *, providers: Sequence[str], threads: int | None = None) -> Any:
    """:func:`make_session` for ``model``, with a model ONNX Runtime cannot load as a user error.

    Does not modify ``model``.

    Raises:
        BlockError: ONNX Runtime cannot load the model (its first message line, with a hint
            to check the model).
    """
    try:
        return make_session(model, providers=providers, threads=threads)
    except Exception as exc:
        raise BlockError(f"ONNX Runtime cannot load the model: {_first_line(exc)}",
                         hint="check the model with 'python -m onnx.checker' or 'polygraphy inspect model'") from None


def run_batch(session: Any, feed: Mapping[str, np.ndarray], names: Sequence[str], *, batch: int) -> dict[str, np.ndarray]:
    """Run calibration batch number ``batch`` through ``session``: output name -> value for ``names``.

    Raises:
        CalibrationError: ONNX Runtime rejects the feed (naming the batch).
    """
    try:
        values = session.run(list(names), dict(feed))
    except Exception as exc:
        raise CalibrationError(f"calibration batch {batch} does not fit the model: {_first_line(exc)}",
                               hint="check the calibration data against the model's inputs ('compress inspect')") from None
    return dict(zip(names, values, strict=True))
