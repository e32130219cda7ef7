"""All file I/O of models and reports: loading, atomic saving, path hygiene.

Stages in compress take and return ``onnx.ModelProto``: the graph, whose large tensors
are references into data files (see :mod:`compress.external`); only this module and the
CLI touch the file system. Every write is atomic: the file is written into a
temporary name in the destination folder and renamed into place, so an error
never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx

from compress import external
from compress.errors import ModelError

#: Models above this many bytes of tensor data are saved with an external data file.
EXTERNAL_DATA_THRESHOLD = 1 << 30

#: Node metadata keys written by the dynamo exporter that hold host paths.
_PATH_METADATA_KEYS = ("pkg.torch.onnx.stack_trace",)
_ABS_PATH = re.compile(r"(?:[A-Za-z]:\\|/)(?:[^\s\"',:()]+[/\\])+([^\s\"',:()/\\]+)")


#: A model file of at least this many bytes is parsed without copying its initializers
#: embedded ``raw_data`` (``external.read_graph_lazily``): they become references into the
#: ``.onnx`` file itself, read by ONNX Runtime and by writers from there.
LAZY_MIN_BYTES = 64 << 20
def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load the graph of an ONNX model from ``path``; its external data stays in its files.

    External tensors become references (absolute location, offset, length; see
    :mod:`compress.external`) after every reference is checked: a missing or truncated data
    file, or a location that is absolute or leaves the model's folder, is a ModelError
    naming the tensor and the location. Embedded tensors stay embedded, except in a file of
    at least :data:`LAZY_MIN_BYTES`: there the initializers' ``raw_data`` stay in the file too
    (references to their offsets in it; only the graph is parsed).

    Besides unreadable files, refuses what would otherwise surface later as a confusing
    error (see :func:`check_model_graph`): an empty file or a model without a graph, an op
    that no ONNX opset defines, and a graph with a cycle.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file not found: {p}", hint="check the path")
    if p.stat().st_size == 0:
        raise ModelError(f"{p} is empty (0 bytes): not an ONNX model", hint="pass an .onnx file; re-export it if it was cut short")
    lazy = external.read_graph_lazily(p) if p.stat().st_size >= LAZY_MIN_BYTES else None
    try:
        model = lazy if lazy is not None else onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{p} is not a readable ONNX model: {first[:300]}",
            hint="pass an .onnx file (with its .onnx.data file beside it, if it has one)",
        ) from None
    check_model_graph(model, source=str(p))
    external.resolve_external(model, p.parent, source=str(p))
    if lazy is None and sum(len(t.raw_data) for t in external.model_tensors(model)) > LAZY_MIN_BYTES:
        external.externalize(model)  # a file the lazy reader did not take: its weights go to the spill file
        slim = onnx.ModelProto()  # drop the parsed copy of the weights
        slim.CopyFrom(model)
        model = slim
    return model


#: Op domains whose ops :func:`check_model_graph` looks up in ``onnx.defs`` (others are left to ONNX Runtime).
_ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def check_model_graph(model: onnx.ModelProto, *, source: str) -> None:
    """The main graph is a usable ONNX graph: it has nodes and outputs, known ops, no cycle.

    Ops of the ONNX domains must exist in ``onnx.defs`` (or as a function of the model);
    ops of other domains (``com.microsoft``, ...) are left to ONNX Runtime. The cycle
    check is Kahn's algorithm over the main graph (subgraphs read outer tensors; they are
    treated as reads of their node).

    Raises:
        ModelError: naming ``source``, the op and domain, or a node on the cycle.
    """
    g = model.graph
    if not model.HasField("graph") or (not g.node and not g.output):
        raise ModelError(f"{source} holds no graph: not an ONNX model (or an empty one)",
                         hint="pass an ONNX model file (e.g. written by 'compress export' or torch.onnx.export)")
    if not g.output:
        raise ModelError(f"{source}: the graph has no outputs", hint="an ONNX model must list its graph outputs")
    local = {(f.domain, f.name) for f in model.functions}
    for node in g.node:
        if node.domain in _ONNX_DOMAINS and (node.domain, node.op_type) not in local \
                and not onnx.defs.has(node.op_type, "" if node.domain == "ai.onnx" else node.domain):
            raise ModelError(
                f"{source}: node {node.name or '(unnamed)'!r} uses op {node.op_type!r} in domain "
                f"{node.domain or 'ai.onnx'!r}, which no ONNX opset defines (ONNX Runtime cannot run it)",
                hint="re-export the model with standard ops, or fix the op type")
    producer: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for t in node.output:
            if t:
                producer[t] = i
    deps: list[set[int]] = []
    for node in g.node:
        reads = set(node.input)
        for a in node.attribute:  # subgraphs (If/Loop/Scan) read outer tensors by name
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                reads.update(t for n in sub.node for t in n.input)
        deps.append({producer[t] for t in reads if t in producer})
    users: list[list[int]] = [[] for _ in g.node]
    waiting = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if seen < len(g.node):
        cur, visited = next(i for i, n in enumerate(waiting) if n > 0), set()
        while cur not in visited:  # every stuck node reads a stuck node: walk back until one repeats
            visited.add(cur)
            cur = next(j for j in deps[cur] if waiting[j] > 0)
        node = g.node[cur]
        raise ModelError(f"{source}: the graph has a cycle at node {node.name or '(unnamed)'!r} ({node.op_type})",
                         hint="an ONNX graph must be acyclic; re-export the model or fix the edges")


def check_output_path(
    path: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    force: bool = False,
    flag: str = "-o",
) -> Path:
    """Validate one output file before any work is done; return it as a Path.

    A shortcut for :class:`compress.outputs.Outputs` with one planned file (all its
    checks: inputs by path and inode, existing and non-regular files, writable folder).
    Commands plan all their outputs in one ``Outputs`` and publish through it.
    """
    from compress.outputs import Outputs

    outs = Outputs(inputs=inputs, force=force)
    out = outs.file(path, flag=flag)
    outs.check()
    return out


@contextlib.contextmanager
def _atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> list[Path]:
    """Write ``model`` atomically to ``path``; return the files written.

    With ``external_data`` True, tensor data (tensors of at least
    ``external.INLINE_MAX_BYTES``) is streamed, one tensor at a time, into
    ``<name>.data`` beside the model, with relative locations; with False, the one
    ``.onnx`` file is streamed the same way (``external.write_embedded``). Either way only
    tensors the model holds are written. With None, external data is written when the
    model has data in a file other than this process's temporary ones (the input had
    external data) or holds more than :data:`EXTERNAL_DATA_THRESHOLD` bytes of tensors.
    Both files appear together or neither does. Does not modify ``model``.
    Paths are checked by the caller (:class:`compress.outputs.Outputs`).
    """
    out = Path(path)
    total, outside = external.external_bytes(model)
    if external_data is None:
        external_data = outside or total > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent or ".") as tmpdir:
        tmp_model, tmp_data = Path(tmpdir) / out.name, Path(tmpdir) / data_name
        if external_data:
            copy = onnx.ModelProto()  # write_data rewrites the references of the copy
            copy.CopyFrom(model)
            external.write_data(copy, tmp_data)
            onnx.save_model(copy, str(tmp_model))
        else:
            external.write_embedded(model, tmp_model)  # streamed, and copies the graph itself
        mode = 0o666 & ~_umask()
        written = [out]
        if tmp_data.exists() and tmp_data.stat().st_size > 0:
            os.chmod(tmp_data, mode)
            os.replace(tmp_data, out.parent / data_name)
            written.append(out.parent / data_name)
        os.chmod(tmp_model, mode)
        os.replace(tmp_model, out)
    return written


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` reads tensor data from a file other than this process's temporary ones.

    True when it was loaded from a model with external data; its outputs then get external
    data too.
    """
    return external.external_bytes(model)[1]


def check_model(model: onnx.ModelProto, *, full_check: bool = True) -> None:
    """``onnx.checker.check_model`` on ``model`` of any size (onnx's exceptions propagate).

    A model with external tensors is checked from a file holding its graph (see
    ``external.checker_view``); the bytes are not read. Does not modify ``model``.
    """
    if any(external.is_external(t) for t in external.model_tensors(model)):
        with external.checker_view(model) as view:
            onnx.checker.check_model(str(view), full_check=full_check)
    else:
        onnx.checker.check_model(model, full_check=full_check)


def model_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the model as written: the graph's protobuf plus its external tensor data."""
    return model.ByteSize() + sum(ref.length for t in external.model_tensors(model)
                                  if (ref := external.data_ref(t)) is not None)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    out = Path(path)
    with _atomic_path(out) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    return out


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` atomically."""
    out = Path(path)
    with _atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` atomically."""
    out = Path(path)
    with _atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return out


#: Largest JSON file :func:`read_json` reads (block maps of very large models stay far below it).
MAX_JSON_BYTES = 256 << 20


def read_json(path: str | os.PathLike[str], *, what: str = "JSON file") -> Any:
    """Read a JSON file; ModelError naming the file when it is missing, malformed or unbounded.

    At most :data:`MAX_JSON_BYTES`, nested at most :data:`compress.validate.MAX_PARSE_DEPTH` deep
    (checked without recursion, before parsing); values are not otherwise checked (the caller does).
    """
    from compress.validate import MAX_DEPTH, MAX_PARSE_DEPTH, check_document, clip, json_depth

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what} not found: {p}", hint="check the path")
    hint = f"fix or remove the file (a {what} is UTF-8 JSON written by compress)"
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelError(f"{p} is not a valid {what}: {size} bytes, more than the {MAX_JSON_BYTES} read", hint=hint)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{p} is not a valid {what}: {clip(str(exc), 300)}", hint=hint) from None
    # Refused before parsing (json_depth never undercounts), so the parser never reaches the
    # process's recursion limit and the answer does not depend on it.
    if json_depth(text) > MAX_PARSE_DEPTH:
        raise ModelError(f"{p} is not a valid {what}: nested too deeply", hint=hint)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{p} is not a valid {what}: {clip(str(exc), 300)}", hint=hint) from None
    check_document(data, source=f"{p} ({what})", error=ModelError, max_depth=MAX_DEPTH,
                   max_nodes=1 << 62)
    return data


def strip_host_paths(text: str) -> str:
    """Replace absolute file paths in ``text`` by their last component."""
    return _ABS_PATH.sub(lambda m: m.group(1), text)


def strip_model_paths(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without host paths: stack traces dropped, doc strings scrubbed.

    Does not modify ``model``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graphs = [out.graph] + [f for f in out.functions]
    for g in graphs:
        nodes = g.node
        for node in nodes:
            keep = [(p.key, strip_host_paths(p.value)) for p in node.metadata_props if p.key not in _PATH_METADATA_KEYS]
            del node.metadata_props[:]
            for key, value in keep:
                node.metadata_props.add(key=key, value=value)
            if node.doc_string:
                node.doc_string = strip_host_paths(node.doc_string)
    if out.graph.doc_string:
        out.graph.doc_string = strip_host_paths(out.graph.doc_string)
    if out.doc_string:
        out.doc_string = strip_host_paths(out.doc_string)
    for prop in out.metadata_props:
        prop.value = strip_host_paths(prop.value)
    return out


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 (hex) of the graph and the tensor values, independent of where the bytes are stored.

    See ``external.tensors_digest``: the deterministic serialization of the graph with each
    tensor's data replaced by the sha256 of its bytes, streamed from the data files in
    1 MiB chunks (never the whole model in memory).
    """
    return external.tensors_digest(model)


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_folder(
    path: str | os.PathLike[str], *, force: bool, replaceable: Callable[[Path], bool], what: str, flag: str = "-o"
) -> Path:
    """Validate an output folder before any work: its parent exists; it is missing, empty, or ``force``.

    With ``force`` only a folder whose every entry satisfies ``replaceable`` may be replaced
    (``what`` names such entries in the error), so a mistyped path never deletes other files.
    A shortcut for :class:`compress.outputs.Outputs` with one planned folder.
    """
    from compress.outputs import Outputs

    outs = Outputs(force=force)
    out = outs.folder(path, flag=flag, replaceable=replaceable, what=what)
    outs.check()
    return out


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (which may exist).

    On an error the temporary folder is removed and ``out`` is left as it was.
    """
    from compress.outputs import _fresh_dir

    parent = out.parent if str(out.parent) else Path(".")
    tmp = _fresh_dir(parent, f".{out.name}.", ".tmp")
    try:
        yield tmp
        old = None
        if out.exists():
            old = _fresh_dir(parent, f".{out.name}.", ".old")
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
