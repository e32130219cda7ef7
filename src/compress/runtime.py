"""ONNX Runtime sessions over models whose weights stay in their files.

A session is made from the graph alone: the serialized ``ModelProto`` without tensor data
(kilobytes to a few megabytes), with ONNX Runtime told where the data lives. External
tensors of the folder holding most of the model's bytes (the input's data file, or this
process's spill file) keep their references, made relative to that folder, which is
passed as ``session.model_external_initializers_file_folder_path``; ONNX Runtime
memory-maps or reads them itself. Tensors in any other folder (e.g. weights a pass
rewrote, beside the untouched ones of the input) are handed over as memory-mapped
``OrtValue``\\ s through ``SessionOptions.add_external_initializers``. No weight bytes are
serialized or copied by compress.

``import compress.runtime`` does not import onnxruntime; :func:`make_session` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from compress import external


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
