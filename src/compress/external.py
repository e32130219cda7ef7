"""Tensor data that stays in files: references, one-tensor reads, spills and streamed writes.

The graph is what compress edits; the bytes of large tensors stay where they are. In
memory, a tensor with external data is a ``TensorProto`` without data whose
``external_data`` holds ``location`` (the **absolute, resolved** path of the data file --
an in-memory convention only, never written to an output), ``offset`` and ``length``
(bytes). :func:`resolve_external` establishes that form when a model is loaded, after
checking every reference (see its docstring); :func:`read_array` reads one tensor;
:func:`array_tensor` turns a new array into a tensor (embedded below
:data:`INLINE_MAX_BYTES`, else appended to this process's spill file); :func:`write_data`
streams only the tensors the graph references into ``OUT.onnx.data``;
:func:`tensors_digest` hashes the data tensor by tensor in 1 MiB chunks.

Nothing here holds more than one tensor's bytes in memory at a time. The spill file lives
in a per-process temporary folder (under ``$COMPRESS_TMPDIR`` when set, else the system
temporary folder) that is removed when the process exits.

One module of ~690 lines on purpose: the reference form, its checks, the lazy reader that
creates references (:func:`read_graph_lazily`) and the writers that consume them share one
contract (absolute locations in memory only, offsets, 64 KiB alignment, the spill file);
split, that contract would be spread over files that must change together.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import ModelError

#: Tensors of fewer bytes are kept embedded in the graph (onnx's own ``size_threshold``).
INLINE_MAX_BYTES = 1024

#: Tensors of at least this many bytes start at a multiple of :data:`PAGE_BYTES` in a data
#: file, so ONNX Runtime can memory-map them (it maps external initializers on CPU when the
#: offset is a multiple of the allocation granularity: 4 KiB pages on Linux, 64 KiB on Windows,
#: which its own writer uses).
ALIGN_MIN_BYTES = 64 << 10
PAGE_BYTES = 64 << 10

#: Bytes copied per read when streaming a tensor from one file to another or into a hash.
CHUNK_BYTES = 1 << 20

#: Element types whose stored bytes are the numpy array's bytes (read without a copy into protobuf).
_DIRECT_TYPES = {
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL,
}


@dataclass(frozen=True)
class DataRef:
    """Where one tensor's bytes are: ``length`` bytes at ``offset`` of the file ``path`` (absolute)."""

    path: Path
    offset: int
    length: int


# ---------------------------------------------------------------------- walking tensors


def graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every TensorProto of ``graph`` and its subgraphs: initializers, then node attribute tensors.

    Yields the protos themselves (editing one edits the graph).
    """
    stack = [graph]
    while stack:
        g = stack.pop()
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def model_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: main graph (and subgraphs), then function bodies."""
    yield from graph_tensors(model.graph)
    for f in model.functions:
        for node in f.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def is_external(t: TensorProto) -> bool:
    """Whether ``t`` keeps its data in a file."""
    return t.data_location == TensorProto.EXTERNAL


def data_ref(t: TensorProto) -> DataRef | None:
    """The resolved reference of an external tensor (None when its data is embedded).

    Only valid on models loaded by :func:`compress.onnx_io.load_model` or built by compress
    (whose locations are absolute); raises ValueError on a relative location, which means a
    model did not go through :func:`resolve_external` (a bug, not bad input).
    """
    if not is_external(t):
        return None
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if not os.path.isabs(loc):
        raise ValueError(f"tensor {t.name!r}: external location {loc!r} was not resolved (load the model with load_model)")
    return DataRef(Path(loc), int(info.get("offset", 0)), int(info["length"]))


#: ``external_data`` key marking a reference to bytes embedded in an input ``.onnx`` file
#: (see :func:`read_graph_lazily`); in memory only: every writer rewrites the entries.
EMBEDDED_KEY = "compress.embedded"


def _set_ref(t: TensorProto, location: str, offset: int, length: int, *, embedded: bool = False) -> None:
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset)), ("length", str(length))]
    if embedded:
        entries.append((EMBEDDED_KEY, "1"))
    for key, value in entries:
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def is_embedded_ref(t: TensorProto) -> bool:
    """Whether ``t`` refers to bytes embedded in an input ``.onnx`` file (not an external data file)."""
    return is_external(t) and any(e.key == EMBEDDED_KEY for e in t.external_data)


def stored_nbytes(t: TensorProto) -> int | None:
    """Bytes the tensor's type and shape need in ``raw_data`` form; None for strings and unknown types."""
    n = math.prod(t.dims)
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4) or t.data_type == getattr(TensorProto, "FLOAT4E2M1", -1):
        return (n + 1) // 2
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # onnx.helper: no numpy dtype for this element type (its error type varies by version)
        return None


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of data ``t`` holds (external length, ``raw_data``, or its typed fields)."""
    ref_len = next((int(e.value) for e in t.external_data if e.key == "length"), None) if is_external(t) else None
    if ref_len is not None:
        return ref_len
    if t.raw_data:
        return len(t.raw_data)
    return stored_nbytes(t) or 0


# ---------------------------------------------------------------------- resolving references


def _bad(source: str, t: TensorProto, loc: str, why: str, hint: str) -> ModelError:
    return ModelError(f"{source}: tensor {t.name!r} has its data in {loc!r}, which {why}", hint=hint)


def resolve_external(model: onnx.ModelProto, folder: Path, *, source: str) -> int:
    """In place: check every external reference of ``model`` (read from ``folder``) and make it absolute.

    A reference is refused (ModelError naming the tensor and the location) when its
    location is missing, absolute, leaves ``folder`` (``..``, a symlink whose target lies
    outside), is not a regular file, or is missing; when ``offset``/``length`` are not
    non-negative integers, the range ends past the end of the file (a truncated data file),
    or the length differs from what the tensor's type and shape need. Nothing outside
    ``folder`` is opened. Returns the number of external tensors.
    """
    real_folder = folder.resolve()
    sizes: dict[str, int] = {}
    hint = "keep the model's .onnx.data file(s) beside it, complete and unmodified (re-export or re-save the model)"
    count = 0
    for t in model_tensors(model):
        if not is_external(t) or is_embedded_ref(t):
            continue
        count += 1
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc:
            raise _bad(source, t, loc, "is empty: the tensor names no data file", hint)
        if "\x00" in loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            raise _bad(source, t, loc, "is an absolute path: external data must be a relative path inside the model's folder",
                       "re-save the model with relative external data locations")
        real = (real_folder / loc).resolve()
        if real != real_folder and real_folder not in real.parents:
            raise _bad(source, t, loc, f"leaves the model's folder {folder} ('..' or a symlink out); compress reads nothing outside it",
                       "move the data file into the model's folder and re-save the model with relative locations")
        key = str(real)
        if key not in sizes:
            if not real.exists():
                raise _bad(source, t, loc, "does not exist", hint)
            if not real.is_file():
                raise _bad(source, t, loc, "is not a regular file", hint)
            sizes[key] = real.stat().st_size
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else sizes[key] - offset
        except ValueError:
            raise _bad(source, t, loc, f"is given with a malformed offset/length ({info.get('offset')!r}, {info.get('length')!r})",
                       hint) from None
        if offset < 0 or length < 0:
            raise _bad(source, t, loc, f"is given with a negative offset/length ({offset}, {length})", hint)
        if offset + length > sizes[key]:
            raise _bad(source, t, loc, f"is truncated: the tensor needs bytes {offset}..{offset + length} but the file has {sizes[key]}",
                       hint)
        need = stored_nbytes(t)
        if need is not None and need != length:
            raise _bad(source, t, loc, f"holds {length} bytes for it, but its type and shape {list(t.dims)} need {need}", hint)
        _set_ref(t, key, offset, length)
    return count


# ---------------------------------------------------------------------- embedded weights, read lazily


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield number, wire, first, first, pos
            continue
        if wire == 1:
            value, pos = pos, pos + 8
        elif wire == 2:
            length, value = _varint(buf, pos)
            pos = value + length
        elif wire == 5:
            value, pos = pos, pos + 4
        else:  # groups (3, 4) are not used by ONNX
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past its message")
        yield number, wire, first, value, pos


_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def read_graph_lazily(path: Path) -> onnx.ModelProto | None:
    """Parse the ONNX file ``path`` without copying the ``raw_data`` of its initializers.

    The file is memory-mapped and its protobuf wire format walked: every main-graph
    initializer whose ``raw_data`` has at least :data:`INLINE_MAX_BYTES` becomes a reference
    (absolute path of ``path`` itself, the byte offset of that ``raw_data``, its length;
    marked :data:`EMBEDDED_KEY`), so sessions and writes read the weights straight from the
    model file and only the graph is parsed. Returns None when the file has a shape this
    reader does not handle (no graph or several graph fields, a malformed field); the caller
    then parses it with ``onnx.load``.
    """
    import mmap

    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):
            return None
    buf = memoryview(mm)
    try:
        model_rest = bytearray()
        graphs: list[tuple[int, int]] = []
        for number, wire, first, value, end in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire == 2:
                graphs.append((value, end))
            else:
                model_rest += buf[first:end]
        if len(graphs) != 1:
            return None
        graph_rest = bytearray()
        tensors: list[TensorProto] = []
        real = str(path.resolve())
        for number, wire, first, value, end in _fields(buf, *graphs[0]):
            if number != _GRAPH_INITIALIZER or wire != 2:
                graph_rest += buf[first:end]
                continue
            tensor_rest = bytearray()
            raw: tuple[int, int] | None = None
            for t_number, t_wire, t_first, t_value, t_end in _fields(buf, value, end):
                if t_number == _TENSOR_RAW_DATA and t_wire == 2 and t_end - t_value >= INLINE_MAX_BYTES:
                    raw = (t_value, t_end - t_value)
                else:
                    tensor_rest += buf[t_first:t_end]
            t = TensorProto.FromString(bytes(tensor_rest))
            if raw is not None and stored_nbytes(t) not in (None, raw[1]):
                return None  # raw_data that does not fit the type and shape: onnx.load + ORT report it
            if raw is not None and not is_external(t):
                _set_ref(t, real, raw[0], raw[1], embedded=True)
            elif raw is not None:  # raw_data and external at once: leave it to onnx.load to refuse
                return None
            tensors.append(t)
        graph = onnx.GraphProto.FromString(bytes(graph_rest))
        graph.initializer.extend(tensors)
        model = onnx.ModelProto.FromString(bytes(model_rest))
        model.graph.CopyFrom(graph)
        return model
    except Exception:  # malformed wire data: onnx.load reports it in its own words
        return None
    finally:
        buf.release()
        mm.close()


# ---------------------------------------------------------------------- reading


def read_bytes(ref: DataRef, *, name: str = "?") -> bytes:
    """The ``length`` bytes of ``ref``; ModelError when the file was truncated since it was checked."""
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.length)
    if len(data) != ref.length:
        raise ModelError(f"tensor {name!r}: its data file {ref.path.name} ends early ({len(data)} of {ref.length} bytes)",
                         hint="the data file changed while compress was reading it; re-run on a complete copy")
    return data


def read_array(t: TensorProto) -> np.ndarray:
    """The value of ``t`` as a new numpy array (its bytes read from the data file when external).

    Does not modify ``t``. Holds one tensor in memory.
    """
    ref = data_ref(t)
    if ref is None:
        return numpy_helper.to_array(t)
    data = read_bytes(ref, name=t.name)
    if t.data_type in _DIRECT_TYPES:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        return np.frombuffer(data, dtype=dtype).reshape(tuple(t.dims)).copy()
    tmp = TensorProto()
    tmp.CopyFrom(t)
    del tmp.external_data[:]
    tmp.data_location = TensorProto.DEFAULT
    tmp.raw_data = data
    return numpy_helper.to_array(tmp)


def map_array(t: TensorProto) -> np.ndarray | None:
    """A read-only memory map of an external tensor (None when embedded or of a type numpy cannot map)."""
    ref = data_ref(t)
    if ref is None or t.data_type not in _DIRECT_TYPES:
        return None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(t.dims)
    if ref.length == 0:
        return np.zeros(shape, dtype)
    return np.memmap(ref.path, dtype=dtype, mode="r", offset=ref.offset, shape=shape)


# ---------------------------------------------------------------------- the spill file


class _Spill:
    """This process's temporary folder and append-only data file for new tensors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._file: BinaryIO | None = None
        self._size = 0
        self._pid = -1

    def folder(self) -> Path:
        with self._lock:
            return self._folder_locked()

    def _folder_locked(self) -> Path:
        if self._dir is None or self._pid != os.getpid():  # a forked child gets its own folder
            base = os.environ.get("COMPRESS_TMPDIR") or None
            self._dir = Path(tempfile.mkdtemp(prefix="compress-", dir=base)).resolve()
            self._pid = os.getpid()
            self._file, self._size = None, 0
            atexit.register(shutil.rmtree, str(self._dir), True)
        return self._dir

    def append(self, array: np.ndarray) -> DataRef:
        with self._lock:
            folder = self._folder_locked()
            if self._file is None:
                self._file = open(folder / "spill.data", "ab")  # noqa: SIM115 - kept open for the process
            f = self._file
            offset = self._size
            if array.nbytes >= ALIGN_MIN_BYTES and offset % PAGE_BYTES:
                pad = PAGE_BYTES - offset % PAGE_BYTES
                f.write(b"\0" * pad)
                offset += pad
            f.write(np.ascontiguousarray(array).data.cast("B"))  # .data is memoryview(array)
            f.flush()
            self._size = offset + array.nbytes
            return DataRef(folder / "spill.data", offset, array.nbytes)


_SPILL = _Spill()


def temp_folder() -> Path:
    """This process's temporary folder (created on first use, removed at exit)."""
    return _SPILL.folder()


def in_temp_folder(path: Path) -> bool:
    """Whether ``path`` lies in this process's temporary folder (a spilled or staged tensor)."""
    return _SPILL._dir is not None and (path == _SPILL._dir or _SPILL._dir in path.parents)


def array_tensor(array: np.ndarray, name: str) -> TensorProto:
    """A TensorProto named ``name`` holding ``array``; does not keep a reference to ``array``.

    Embedded below :data:`INLINE_MAX_BYTES`, else appended to the spill file and referenced
    (the array's bytes are written once, not copied into protobuf).
    """
    arr = np.asarray(array)
    if arr.nbytes < INLINE_MAX_BYTES or arr.dtype.kind in "OUS" or arr.dtype.byteorder == ">":
        return numpy_helper.from_array(arr, name=name)
    t = TensorProto()
    t.name = name
    t.dims.extend(arr.shape)
    t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
    ref = _SPILL.append(arr)
    _set_ref(t, str(ref.path), ref.offset, ref.length)
    return t


def externalize(model: onnx.ModelProto, *, min_bytes: int = INLINE_MAX_BYTES) -> int:
    """In place: move every embedded ``raw_data`` tensor of at least ``min_bytes`` to the spill file.

    Used for large models stored without external data, so sessions and writes read from a
    file instead of serializing the weights. Returns the bytes moved.
    """
    moved = 0
    for t in model_tensors(model):
        if is_external(t) or len(t.raw_data) < min_bytes:
            continue
        arr = np.frombuffer(t.raw_data, dtype=np.uint8)
        ref = _SPILL.append(arr)
        t.ClearField("raw_data")
        _set_ref(t, str(ref.path), ref.offset, ref.length)
        moved += ref.length
    return moved


# ---------------------------------------------------------------------- writing and hashing


def _chunks(ref: DataRef) -> Iterator[bytes]:
    """The bytes of ``ref`` in pieces of at most :data:`CHUNK_BYTES`; ModelError if the file ends early."""
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        left = ref.length
        while left:
            chunk = f.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise ModelError(f"data file {ref.path.name} ends early while reading a tensor",
                                 hint="the data file changed while compress was reading it; re-run on a complete copy")
            yield chunk
            left -= len(chunk)


def _copy_range(src: DataRef, dst: object) -> None:
    for chunk in _chunks(src):
        dst.write(chunk)  # type: ignore[attr-defined]


def write_data(model: onnx.ModelProto, data_path: Path) -> None:
    """In place on ``model`` (a copy the caller owns): stream its tensors' data into ``data_path``.

    Every external tensor, and every embedded ``raw_data`` tensor of at least
    :data:`INLINE_MAX_BYTES`, is written once (tensors sharing one reference share the
    bytes), tensors of at least :data:`ALIGN_MIN_BYTES` page-aligned; their references
    become ``location = data_path.name`` (relative). Only tensors the model holds are written.
    """
    written: dict[DataRef, int] = {}
    with open(data_path, "wb") as f:
        pos = 0
        for t in model_tensors(model):
            ref = data_ref(t)
            if ref is None and len(t.raw_data) < INLINE_MAX_BYTES:
                continue
            length = ref.length if ref is not None else len(t.raw_data)
            if ref is not None and ref in written:
                _set_ref(t, data_path.name, written[ref], length)
                continue
            if length >= ALIGN_MIN_BYTES and pos % PAGE_BYTES:
                pad = PAGE_BYTES - pos % PAGE_BYTES
                f.write(b"\0" * pad)
                pos += pad
            if ref is not None:
                _copy_range(ref, f)
                written[ref] = pos
            else:
                f.write(t.raw_data)
                t.ClearField("raw_data")
            _set_ref(t, data_path.name, pos, length)
            pos += length


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_head(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _encode_varint(number << 3 | 2) + _encode_varint(length)


def write_embedded(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path`` as one ``.onnx`` file with all tensor data embedded, streamed.

    The protobuf is assembled field by field: main-graph initializers that are references
    get their ``raw_data`` field copied from the data file in 1 MiB chunks (the bytes are
    never all in memory); other external tensors (Constant attributes, subgraphs) are read
    into the graph. Protobuf accepts fields in any order, so ``onnx.load`` of the result
    equals the model with its data embedded. The caller keeps the total under protobuf's
    2 GB limit. Does not modify ``model``.
    """
    view = onnx.ModelProto()
    view.CopyFrom(model)
    graph = view.graph
    inits = list(graph.initializer)
    top = {id(t) for t in inits}
    for t in model_tensors(view):
        if id(t) not in top and (ref := data_ref(t)) is not None:
            data = read_bytes(ref, name=t.name)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = data
    parts: list[tuple[bytes, DataRef | None]] = []
    for t in inits:
        ref = data_ref(t)
        if ref is not None:
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            body = t.SerializeToString()
            raw_head = _field_head(_TENSOR_RAW_DATA, ref.length)
            parts.append((_field_head(_GRAPH_INITIALIZER, len(body) + len(raw_head) + ref.length) + body + raw_head, ref))
        else:
            body = t.SerializeToString()
            parts.append((_field_head(_GRAPH_INITIALIZER, len(body)) + body, None))
    del graph.initializer[:]
    graph_rest = graph.SerializeToString()
    graph_len = len(graph_rest) + sum(len(head) + (ref.length if ref is not None else 0) for head, ref in parts)
    view.ClearField("graph")
    with open(path, "wb") as f:
        f.write(view.SerializeToString())
        f.write(_field_head(_MODEL_GRAPH, graph_len))
        f.write(graph_rest)
        for head, ref in parts:
            f.write(head)
            if ref is not None:
                _copy_range(ref, f)


def embedded_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every tensor's data embedded; does not modify ``model``.

    For tools that read tensors with ``numpy_helper`` (Polygraphy, ``onnx.reference``).
    Holds all weights: small models only.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    embed_data(out)
    return out


def embed_data(model: onnx.ModelProto) -> None:
    """In place on ``model`` (a copy the caller owns): read every external tensor's bytes into ``raw_data``."""
    for t in model_tensors(model):
        ref = data_ref(t)
        if ref is not None:
            data = read_bytes(ref, name=t.name)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = data


def external_bytes(model: onnx.ModelProto) -> tuple[int, bool]:
    """(bytes of tensor data the model holds, whether any of it is external input data).

    The flag is True when some tensor's data lies in an external data file outside the
    temporary folder, i.e. the input had external data.
    """
    total, outside = 0, False
    for t in model_tensors(model):
        total += tensor_nbytes(t)
        ref = data_ref(t)
        if ref is not None and not in_temp_folder(ref.path) and not is_embedded_ref(t):
            outside = True
    return total, outside


_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def _ref_sha256(ref: DataRef) -> str:
    st = ref.path.stat()
    key = (str(ref.path), ref.offset, ref.length, st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        for chunk in _chunks(ref):
            h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def tensors_digest(model: onnx.ModelProto) -> str:
    """sha256 (hex) of the model with each tensor's bytes replaced by their own sha256.

    The graph is serialized deterministically after every external tensor, and every
    embedded ``raw_data`` tensor, is replaced by a reference holding only the sha256 of its bytes (streamed from the data file in 1 MiB
    chunks). So the digest depends on the graph and the tensor values, not on where the
    bytes are stored (embedded, or at which offset of which file). Does not modify ``model``.
    """
    view = onnx.ModelProto()
    view.CopyFrom(model)
    for t in model_tensors(view):
        ref = data_ref(t)
        if ref is not None:
            digest = _ref_sha256(ref)
        elif t.raw_data:
            digest = hashlib.sha256(t.raw_data).hexdigest()
            t.ClearField("raw_data")
        else:
            continue
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "sha256", digest
    return hashlib.sha256(view.SerializeToString(deterministic=True)).hexdigest()


@contextlib.contextmanager
def checker_view(model: onnx.ModelProto) -> Iterator[Path]:
    """A file holding ``model``'s graph for ``onnx.checker.check_model(path)``; removed on exit.

    External tensors point at one empty placeholder file beside it (the checker reads types,
    shapes and locations, not the bytes).
    """
    view = onnx.ModelProto()
    view.CopyFrom(model)
    for t in model_tensors(view):
        ref = data_ref(t)
        if ref is not None:
            _set_ref(t, "placeholder.data", ref.offset, ref.length)
    folder = Path(tempfile.mkdtemp(prefix="check-", dir=temp_folder()))
    try:
        (folder / "placeholder.data").touch()
        onnx.save_model(view, str(folder / "model.onnx"))
        yield folder / "model.onnx"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
