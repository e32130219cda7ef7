"""Calibration ``.npz`` files: their headers (names, dtypes, shapes) and their data, one file at a time.

A file holds one array per model input, named exactly like the input, batch (sample)
axis first; an array without a batch axis is *shared* (passed whole to every batch).
:func:`read_npz_header` reads only the zip directory and the ``.npy`` headers, and checks
the declared sizes before anything is allocated (no zip bombs, no lying headers, at most
:data:`MAX_ARRAYS` arrays and :data:`MAX_FILE_BYTES` bytes per file). :func:`load_file`
reads a whole file's data and refuses NaN/Inf in float arrays. Errors are
:class:`~compress.errors.CalibrationError` naming the file and the fix.
"""

from __future__ import annotations

import ast
import math
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import CalibrationError

_README = "see calib/README.md"

#: Largest size ratio of a deflated .npz member to its compressed bytes (deflate's limit is ~1032:1);
#: a member claiming more is refused before anything is allocated.
MAX_DEFLATE_RATIO = 1100
#: Most arrays one calibration file may hold, and most bytes of data (a file is read whole).
MAX_ARRAYS = 10_000
MAX_FILE_BYTES = 4 << 30


@dataclass(frozen=True)
class ArraySpec:
    """Name, numpy dtype name and shape of one array in a calibration file."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CalibrationFile:
    """One ``.npz`` file (or one generated random batch): where it is and what it holds.

    ``path`` is the file as the user named it (None for random batches); ``name`` is its
    short display name (relative to the calibration folder), used in reports. ``shared``
    names the arrays without a batch axis (passed whole to every batch).
    """

    path: Path | None
    name: str
    arrays: tuple[ArraySpec, ...]
    shared: frozenset[str] = frozenset()

    @property
    def samples(self) -> int:
        """Samples in the file (the common leading dim of its batched arrays)."""
        return next(a.shape[0] for a in self.arrays if a.name not in self.shared)

    def label(self) -> str:
        """How errors name the file: its path as given, or its display name."""
        return str(self.path) if self.path is not None else self.name


def _unreadable(path: Path, reason: str) -> CalibrationError:
    return CalibrationError(f"{path} is not a readable .npz file: {reason}",
                            hint="re-save it with np.savez(path, **{input_name: array}); " + _README)


def _check_member(path: Path, info: zipfile.ZipInfo, archive_size: int) -> None:
    """A zip member's declared sizes are possible for this archive (checked before reading it)."""
    name = info.filename
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _unreadable(path, f"member {name!r} uses zip compression method {info.compress_type}; "
                                "only stored and deflated members (np.savez, np.savez_compressed) are read")
    if info.compress_size > archive_size:
        raise _unreadable(path, f"member {name!r} claims {info.compress_size} bytes, more than the whole file "
                                f"({archive_size} bytes)")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise _unreadable(path, f"member {name!r} is stored uncompressed but claims {info.file_size} bytes "
                                f"in {info.compress_size}")
    if info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 4096:
        raise _unreadable(path, f"member {name!r} claims {info.file_size} bytes from {info.compress_size} compressed "
                                f"bytes, more than deflate can produce (a zip bomb?)")


def _check_data_size(path: Path, info: zipfile.ZipInfo, header_end: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The header's shape x itemsize is exactly the member's data: no allocation from a lying header."""
    expected = math.prod(shape) * dtype.itemsize
    have = info.file_size - header_end
    if expected != have:
        raise _unreadable(path, f"array {info.filename[:-4]!r}: its header claims shape {_shape_str(shape)} of "
                                f"{dtype.name} ({expected} bytes), but the file holds {max(have, 0)} bytes of data")


def _read_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # (3, 0): the 2.0 layout with a UTF-8 header; numpy has no public reader for it
        shape, dtype = _read_header_3_0(f)
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _read_header_3_0(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a version 3.0 ``.npy`` header (after the magic): uint32 length, a UTF-8 dict literal.

    Parsed with :func:`ast.literal_eval` (literals only, as numpy does); a header that is
    not such a dict raises ValueError, which the caller reports as a malformed file.
    """
    size = f.read(4)
    if len(size) != 4:
        raise ValueError("truncated .npy header")
    text = f.read(int.from_bytes(size, "little")).decode("utf-8")
    try:
        header = ast.literal_eval(text)
    except (SyntaxError, RecursionError, MemoryError):
        raise ValueError(f"not a .npy header: {text[:80]!r}") from None
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise ValueError(f"not a .npy header: {text[:80]!r}")
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"bad shape in .npy header: {shape!r}")
    try:
        return shape, np.lib.format.descr_to_dtype(header["descr"])
    except TypeError:
        raise ValueError(f"bad dtype in .npy header: {header['descr']!r}") from None


def read_npz_header(path: Path, *, name: str, shared: frozenset[str] | None = None) -> CalibrationFile:
    """Names, dtypes and shapes of the arrays in ``path``, without reading their data.

    ``shared`` names arrays without a batch axis (from the model, :func:`shared_inputs`);
    when it is None and the leading sizes differ, the arrays whose leading size is not the
    one most arrays share (a strict majority of at least two arrays) are taken as shared;
    :func:`check_calibration` then checks that against the model.

    Raises:
        CalibrationError: the file is not a readable .npz, holds no arrays, a non-numeric or
            scalar array, an empty batch, or arrays with different batch sizes.
    """
    specs: list[ArraySpec] = []
    try:
        archive_size, total = path.stat().st_size, 0
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if len(members) > MAX_ARRAYS:
                raise _unreadable(path, f"it holds {len(members)} members (at most {MAX_ARRAYS} arrays are read)")
            for info in members:
                if not info.filename.endswith(".npy"):
                    raise _unreadable(path, f"member {info.filename!r} is not a .npy array")
                _check_member(path, info, archive_size)
                with zf.open(info) as f:
                    shape, dtype = _read_header(f)
                    header_end = f.tell()
                if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
                    raise CalibrationError(
                        f"{path}: array '{info.filename[:-4]}' has dtype {dtype.descr if dtype.fields else dtype}; "
                        "calibration arrays must be numeric or bool",
                        hint="save plain numeric arrays (no objects, strings or structured dtypes)")
                _check_data_size(path, info, header_end, shape, dtype)
                total += math.prod(shape) * dtype.itemsize
                if total > MAX_FILE_BYTES:
                    raise CalibrationError(f"{path}: its arrays hold more than {MAX_FILE_BYTES >> 30} GiB; a calibration "
                                           "file is read whole", hint="split the data into several .npz files")
                specs.append(ArraySpec(info.filename[: -len(".npy")], dtype.name, shape))
    except CalibrationError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as exc:
        raise _unreadable(path, str(exc) or type(exc).__name__) from None
    if not specs:
        raise CalibrationError(f"{path} holds no arrays",
                               hint="save one array per model input: np.savez(path, **{input_name: array})")
    for s in specs:
        kind = np.dtype(s.dtype).kind
        if kind not in "biuf":
            raise CalibrationError(f"{path}: array '{s.name}' has dtype {s.dtype}; calibration arrays must be numeric or bool",
                                   hint="save plain numeric arrays (no objects, strings or structured dtypes)")
        if not s.shape:
            raise CalibrationError(f"{path}: array '{s.name}' is a scalar; calibration arrays need a leading batch axis",
                                   hint="save it with shape [N, ...], e.g. x[None] for a single sample")
    given = shared is not None
    shared = frozenset(n for n in (shared or ()) if n in {s.name for s in specs})
    counts: dict[int, int] = {}
    for s in specs:
        if s.name not in shared:
            counts[s.shape[0]] = counts.get(s.shape[0], 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    if len(counts) > 1 and not given and ranked[0] >= 2 and ranked[0] > ranked[1]:
        batch = max(counts, key=lambda k: counts[k])
        shared = frozenset(s.name for s in specs if s.shape[0] != batch)
    elif len(counts) > 1 or not counts:
        listed = ", ".join(f"{s.name}={s.shape[0]}" for s in specs)
        raise CalibrationError(f"{path}: arrays have different batch sizes (axis 0): {listed}",
                               hint="all arrays of one file must hold the same samples along axis 0")
    first = next(s for s in specs if s.name not in shared)
    if 0 in counts:
        raise CalibrationError(f"{path}: array '{first.name}' has 0 samples (shape {_shape_str(first.shape)})",
                               hint="remove the file or save at least one sample in it")
    return CalibrationFile(path, name, tuple(specs), shared)


def _shape_str(shape: Sequence[object]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) if shape else "scalar"


def load_file(f: CalibrationFile) -> dict[str, np.ndarray]:
    """All arrays of file ``f`` (which has a ``path``), read whole.

    Raises:
        CalibrationError: the file cannot be read, or a float array holds NaN/Inf.
    """
    assert f.path is not None
    try:
        with np.load(f.path, allow_pickle=False) as npz:
            arrays = {a.name: npz[a.name] for a in f.arrays}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as exc:
        raise _unreadable(f.path, str(exc) or type(exc).__name__) from None
    for name, arr in arrays.items():
        if arr.dtype.kind == "f":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise CalibrationError(f"{f.path}: input '{name}' has {bad} NaN/Inf values",
                                       hint="replace or drop those samples; non-finite values make calibration ranges meaningless")
    return arrays
