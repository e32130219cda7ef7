"""All file I/O of models and reports: loading, atomic saving, path hygiene.

Stages in compress take and return ``onnx.ModelProto``; only this module and the
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
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx

from compress.errors import ModelError, OutputError

#: Models above this many bytes of tensor data are saved with an external data file.
EXTERNAL_DATA_THRESHOLD = 1 << 30

#: Node metadata keys written by the dynamo exporter that hold host paths.
_PATH_METADATA_KEYS = ("pkg.torch.onnx.stack_trace",)
_ABS_PATH = re.compile(r"(?:[A-Za-z]:\\|/)(?:[^\s\"',:()]+[/\\])+([^\s\"',:()/\\]+)")


def load_model(path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from ``path``; ModelError naming the file if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file not found: {p}", hint="check the path")
    try:
        return onnx.load(str(p), load_external_data=load_external_data)
    except Exception as exc:  # onnx raises DecodeError, FileNotFoundError (data file), ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{p} is not a readable ONNX model: {first}",
            hint="pass an .onnx file (with its .onnx.data file beside it, if it has one)",
        ) from None


def check_output_path(
    path: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    force: bool = False,
    flag: str = "-o",
) -> Path:
    """Validate an output path before any work is done; return it as a Path.

    Raises OutputError when the folder does not exist, the path equals one of
    ``inputs``, or the file exists and ``force`` is false.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder does not exist: {parent}", hint=f"create it or choose another {flag}")
    for src in inputs:
        if out.resolve() == Path(src).resolve():
            raise OutputError(f"output {out} is the input file", hint=f"choose another {flag}; inputs are never overwritten")
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists", hint="pass --force to overwrite it")
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


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                total += len(attr.t.raw_data)
    return total


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> list[Path]:
    """Write ``model`` atomically to ``path``; return the files written.

    With ``external_data`` None, tensor data goes to ``<name>.data`` beside the
    model when it exceeds :data:`EXTERNAL_DATA_THRESHOLD` (protobuf's 2 GB limit).
    Does not modify ``model``. Paths are checked by the caller
    (:func:`check_output_path`).
    """
    out = Path(path)
    if external_data is None:
        external_data = _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        with _atomic_path(out) as tmp:
            onnx.save_model(model, str(tmp))
        return [out]
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent or ".") as tmpdir:
        tmp_model = Path(tmpdir) / out.name
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        written = [out]
        if (Path(tmpdir) / data_name).exists():
            os.replace(Path(tmpdir) / data_name, out.parent / data_name)
            written.append(out.parent / data_name)
        os.replace(tmp_model, out)
    return written


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


def read_json(path: str | os.PathLike[str], *, what: str = "JSON file") -> Any:
    """Read a JSON file; ModelError naming the file when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{p} is not a valid {what}: {exc}") from None


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
    """sha256 (hex) of the model's deterministic serialization, tensor data included."""
    h = hashlib.sha256()
    h.update(model.SerializeToString(deterministic=True))
    return h.hexdigest()


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
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder does not exist: {parent}", hint=f"create it or choose another {flag}")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a folder", hint=f"choose another {flag}")
        entries = sorted(out.iterdir())
        if entries and not force:
            raise OutputError(f"output folder {out} is not empty", hint=f"pass --force to replace it, or choose another {flag}")
        others = [e.name for e in entries if not replaceable(e)]
        if others:
            raise OutputError(f"output folder {out} holds files other than {what} ({others[0]}); refusing to replace it",
                              hint=f"choose another {flag}, or empty the folder yourself")
    return out


def _fresh_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new folder with the user's default permissions (mkdtemp would make it private)."""
    for _ in range(100):
        p = parent / f"{prefix}{uuid.uuid4().hex[:8]}{suffix}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise OutputError(f"cannot create a temporary folder in {parent}")


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (which may exist).

    On an error the temporary folder is removed and ``out`` is left as it was.
    """
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
