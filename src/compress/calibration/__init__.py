"""Calibration data: ``.npz`` batches keyed by model input name, checked and streamed.

Format (see ``calib/README.md``): a folder of ``.npz`` files, or one ``.npz`` file. Each
file holds one array per model input, named exactly like the input, with the batch
(sample) axis first; all arrays of a file hold the same number of samples. A file is one
batch, or is split into batches of ``batch_size`` samples along axis 0. An input the model
gives no batch axis (Flux's 2-D ``img_ids``/``txt_ids``: a leading dim that is not the batch
dim of the other inputs, see :func:`shared_inputs`) is *shared*: saved with its own shape,
passed whole to every batch, never split.

* :func:`load_calibration` reads only the array headers (names, dtypes, shapes), never
  the data; :func:`iter_batches` streams the data one file at a time.
* :func:`check_calibration` checks names, dtypes, ranks and static dims against a model
  before any work is done. Data is never cast: a dtype mismatch is an error.
* :func:`random_calibration` makes labelled random inputs, only when asked for.
* :func:`split_calibration` holds out batches for verification; :func:`as_data_reader`
  adapts a set to ONNX Runtime's ``CalibrationDataReader`` protocol.
* :func:`text_batches` and :func:`image_batches` turn texts (with a ``tokenizer.json``)
  and image files into batches; the CLI (``compress calib text|images``) writes them.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.errors import CalibrationError, ConfigError, MissingDependencyError
from compress.graph import GraphIndex, TensorType, value_type

#: Largest ``ImageOptions.size`` (pixels) and ``TextOptions.max_length`` (tokens): bounds on what one batch allocates.
MAX_IMAGE_SIDE = 4096
MAX_TEXT_LENGTH = 1 << 16

#: Most batches, and values per batch (all inputs together; 1 GiB of float32), of random calibration data.
MAX_RANDOM_BATCHES = 100_000
MAX_RANDOM_ELEMENTS = 1 << 28

#: File suffixes :func:`find_images` picks up (case-insensitive).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")

#: Values of random integer inputs are drawn from ``[0, high)``; ``high`` is the row count of the
#: embedding table the input indexes (a Gather on an initializer), else this.
DEFAULT_RANDOM_INT_HIGH = 2

_README = "see calib/README.md"


# --------------------------------------------------------------------------------------------
# The set and its parts
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class CalibrationBatch:
    """Samples ``start:stop`` (axis 0) of ``files[file]``."""

    file: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _RandomSpec:
    """How to generate one input: ``kind`` is "normal", "ones", "bool" or "int"."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    high: int = 0


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration data: a list of batches over files, loaded lazily.

    Attributes:
        description: one line for reports, e.g. ``"calib/ (12 files, 96 samples)"``; relative
            names only, never absolute paths. Random data always says ``"random"``.
        files: the files (headers only; no data is held).
        batches: the batches, in order; a file contributes one or more consecutive batches.
        batch_size: samples per batch when files are split, None for one batch per file.
        random: True for generated random inputs (:func:`random_calibration`).

    Iterating a set streams its batches (:func:`iter_batches`); ``len()`` is the batch count.
    """

    description: str
    files: tuple[CalibrationFile, ...]
    batches: tuple[CalibrationBatch, ...]
    batch_size: int | None = None
    random: bool = False
    _generator: tuple[int, tuple[_RandomSpec, ...]] | None = field(default=None, repr=False, compare=False)

    @property
    def samples(self) -> int:
        """Total samples over all batches."""
        return sum(b.size for b in self.batches)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Array names of the first file (the inputs the data feeds)."""
        return tuple(a.name for a in self.files[self.batches[0].file].arrays) if self.batches else ()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self)


# --------------------------------------------------------------------------------------------
# Loading (headers only)
# --------------------------------------------------------------------------------------------


def _unreadable(path: Path, reason: str) -> CalibrationError:
    return CalibrationError(f"{path} is not a readable .npz file: {reason}",
                            hint="re-save it with np.savez(path, **{input_name: array}); " + _README)


#: Largest size ratio of a deflated .npz member to its compressed bytes (deflate's limit is ~1032:1);
#: a member claiming more is refused before anything is allocated.
MAX_DEFLATE_RATIO = 1100
#: Most arrays one calibration file may hold, and most bytes of data (a file is read whole).
MAX_ARRAYS = 10_000
MAX_FILE_BYTES = 4 << 30


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
    else:  # (3, 0): utf-8 headers; numpy has no public reader for them
        shape, _, dtype = np.lib.format._read_array_header(f, version)
    return tuple(int(d) for d in shape), np.dtype(dtype)


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


def _split(files: Sequence[CalibrationFile], batch_size: int | None) -> tuple[CalibrationBatch, ...]:
    out: list[CalibrationBatch] = []
    for i, f in enumerate(files):
        step = batch_size or f.samples
        out.extend(CalibrationBatch(i, s, min(s + step, f.samples)) for s in range(0, f.samples, step))
    return tuple(out)


def _describe(name: str, files: int, samples: int, batches: int, batch_size: int | None) -> str:
    text = f"{name} ({files} file{'s' if files != 1 else ''}, {samples} samples"
    if batch_size is not None:
        text += f", {batches} batches of <= {batch_size}"
    return text + ")"


def load_calibration(path: str | os.PathLike[str], *, batch_size: int | None = None,
                     shared: frozenset[str] | None = None) -> CalibrationSet:
    """Open calibration data: a folder of ``.npz`` files (sorted by name) or one ``.npz`` file.

    Reads only the array headers; the data is read by :func:`iter_batches`. Other files in
    the folder and subfolders are ignored.

    Args:
        path: the folder or file.
        batch_size: split each file into batches of this many samples along axis 0 (the
            last batch of a file may be smaller); None keeps one batch per file.
        shared: inputs without a batch axis (:func:`shared_inputs` of the model); None
            infers them per file (see :func:`read_npz_header`).

    Raises:
        ConfigError: ``batch_size`` is not positive.
        CalibrationError: the path is missing, is not a .npz file or a folder with some, or a
            file is malformed (see :func:`read_npz_header`).
    """
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive number of samples, got {batch_size}",
                          hint="e.g. --batch-size 8, or leave it out for one batch per file")
    p = Path(path)
    hint = "pass a folder of .npz files or one .npz file; " + _README
    if p.is_dir():
        paths = sorted(q for q in p.iterdir() if q.suffix == ".npz" and q.is_file())
        if not paths:
            raise CalibrationError(f"no .npz files in {p}",
                                   hint="save one batch per file with np.savez(path, **{input_name: array}); " + _README)
        display = (p.name or p.resolve().name) + "/"
        files = tuple(read_npz_header(q, name=display + q.name, shared=shared) for q in paths)
    elif p.is_file():
        if p.suffix != ".npz":
            raise CalibrationError(f"{p} is not a .npz file", hint=hint)
        files = (read_npz_header(p, name=p.name, shared=shared),)
        display = p.name
    else:
        raise CalibrationError(f"calibration data not found: {p}", hint=hint)
    batches = _split(files, batch_size)
    desc = _describe(display, len(files), sum(f.samples for f in files), len(batches), batch_size)
    return CalibrationSet(desc, files, batches, batch_size)


# --------------------------------------------------------------------------------------------
# Checking against a model
# --------------------------------------------------------------------------------------------


def model_input_types(model: onnx.ModelProto) -> dict[str, TensorType | None]:
    """Graph inputs (initializers excluded), in order, with their types (None if not a tensor).

    Does not modify ``model``.
    """
    inits = {t.name for t in model.graph.initializer}
    return {vi.name: value_type(vi) for vi in model.graph.input if vi.name not in inits}


def _check_names(f: CalibrationFile, expected: Sequence[str]) -> None:
    have = [a.name for a in f.arrays]
    for name in expected:
        if name not in have:
            raise CalibrationError(f"{f.label()} has no array for model input '{name}'; it has: {', '.join(have)}",
                                   hint=f"the model expects: {', '.join(expected)} (one array per input, named exactly so)")
    for name in have:
        if name not in expected:
            raise CalibrationError(f"{f.label()}: array '{name}' is not an input of the model",
                                   hint=f"model inputs: {', '.join(expected)}; remove the array or rename it to the input it feeds")


def shared_inputs(model: onnx.ModelProto) -> frozenset[str]:
    """Inputs of ``model`` without a batch axis (Flux's 2-D ``img_ids``/``txt_ids``).

    The batch dim is the symbolic leading dim most inputs share, when some input has one
    (then an input with a static or other leading dim is shared); for a model with static
    leading dims only, it is the size that a strict majority of at least two inputs share.
    An input whose leading dim is another one is shared. Empty when the inputs agree or no
    batch dim can be told. Does not modify ``model``.
    """
    leading = {n: t.shape[0] for n, t in model_input_types(model).items() if t is not None and t.shape}
    leading = {n: d for n, d in leading.items() if d is not None}
    symbols = [d for d in leading.values() if isinstance(d, str)]
    if symbols:
        batch: Any = max(dict.fromkeys(symbols), key=symbols.count)  # ties: the first
    else:
        counts: dict[Any, int] = {}
        for d in leading.values():
            counts[d] = counts.get(d, 0) + 1
        ranked = sorted(counts.values(), reverse=True)
        if len(counts) < 2 or ranked[0] < 2 or ranked[0] == ranked[1]:
            return frozenset()
        batch = max(counts, key=lambda k: counts[k])
    return frozenset(n for n, d in leading.items() if d != batch)


def _check_array(f: CalibrationFile, a: ArraySpec, t: TensorType, batch_sizes: set[int], *,
                 batched: bool = True) -> None:
    if a.dtype != t.dtype:
        raise CalibrationError(
            f"{f.label()}: input '{a.name}' has dtype {a.dtype} but the model expects {t.dtype}",
            hint=f"save it with the model's dtype, e.g. {a.name}=array.astype(np.{t.dtype}); calibration data is never cast")
    if t.shape is None:
        return
    model_shape = _shape_str(t.shape)
    if len(a.shape) != len(t.shape):
        raise CalibrationError(
            f"{f.label()}: input '{a.name}' has rank {len(a.shape)} (shape {_shape_str(a.shape)}) "
            f"but the model expects rank {len(t.shape)} ({model_shape})",
            hint="save arrays with the model input's shape, batch axis first")
    if batched and isinstance(t.shape[0], int):
        bad = sorted(b for b in batch_sizes if b != t.shape[0])
        if bad:
            raise CalibrationError(
                f"{f.label()}: input '{a.name}' gives batches of {bad[0]} samples but the model has a static batch "
                f"size of {t.shape[0]} ({model_shape})",
                hint=f"pass --batch-size {t.shape[0]}" if t.shape[0] == 1 else
                     f"pass --batch-size {t.shape[0]} and save a multiple of {t.shape[0]} samples in every file")
    for axis, (got, want) in enumerate(zip(a.shape, t.shape, strict=True)):
        if (axis > 0 or not batched) and isinstance(want, int) and got != want:
            raise CalibrationError(
                f"{f.label()}: input '{a.name}' axis {axis} has size {got} but the model expects {want} ({model_shape})",
                hint="save arrays with the model input's shape, batch axis first")


def check_calibration(calib: CalibrationSet, model: onnx.ModelProto) -> None:
    """Check that every file of ``calib`` fits the inputs of ``model``, from the headers only.

    Checks, per file: one array per model input and no other, equal dtypes (data is never
    cast), equal ranks, static dims (axis 0 against the batch sizes after splitting), and
    that arrays sharing a symbolic dim agree on its size. Arrays a file holds as shared
    (no batch axis) must be inputs the model gives no batch axis (:func:`shared_inputs`),
    checked on axis 0 like any static dim; such an input held with a batch axis may not be
    split. NaN/Inf are found while streaming (:func:`iter_batches`). Does not modify ``model``.

    Raises:
        CalibrationError: naming the file, the input and the fix.
    """
    types = model_input_types(model)
    expected = list(types)
    unbatched = shared_inputs(model)
    used = sorted({b.file for b in calib.batches})
    sizes: dict[int, set[int]] = {}
    for b in calib.batches:
        sizes.setdefault(b.file, set()).add(b.size)
    for i in used:
        f = calib.files[i]
        _check_names(f, expected)
        by_name = {a.name: a for a in f.arrays}
        symbols: dict[str, tuple[str, int]] = {}
        for name in expected:
            t = types[name]
            if t is None:
                continue
            a = by_name[name]
            batched = _check_shared(f, a, t, name in unbatched, calib)
            _check_array(f, a, t, sizes[i], batched=batched)
            for axis, d in enumerate(t.shape or ()):
                if (axis == 0 and batched) or not isinstance(d, str):
                    continue  # the batch axis is checked by batch size; splitting makes it vary
                first = symbols.setdefault(d, (name, a.shape[axis]))
                if first[1] != a.shape[axis]:
                    raise CalibrationError(
                        f"{f.label()}: inputs '{first[0]}' and '{name}' disagree on dim '{d}' ({first[1]} vs {a.shape[axis]})",
                        hint="arrays that share a model dim must have the same size along it")


def _check_shared(f: CalibrationFile, a: ArraySpec, t: TensorType, unbatched: bool, calib: CalibrationSet) -> bool:
    """Whether array ``a`` is split along axis 0; errors when the file and the model disagree."""
    shape = _shape_str(t.shape) if t.shape is not None else "?"
    if a.name in f.shared and not unbatched:
        raise CalibrationError(
            f"{f.label()}: array '{a.name}' has {a.shape[0]} along axis 0 but the file's other arrays hold "
            f"{f.samples} samples, and model input '{a.name}' has a batch axis ({shape})",
            hint="all arrays of one file must hold the same samples along axis 0")
    if unbatched and a.name not in f.shared:
        whole = all(b.start == 0 and b.stop == f.samples for b in calib.batches if calib.files[b.file] is f)
        if not whole:
            raise CalibrationError(
                f"{f.label()}: model input '{a.name}' has no batch axis ({shape}) but the file is split into "
                f"batches along axis 0", hint="drop --batch-size (one batch per file); a shared input is passed whole")
        return True  # passed whole: the file is one batch
    return a.name not in f.shared


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


def _load_file(f: CalibrationFile) -> dict[str, np.ndarray]:
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


def _generate(seed: int, index: int, specs: Sequence[_RandomSpec]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    out: dict[str, np.ndarray] = {}
    for s in specs:
        if s.kind == "ones":
            out[s.name] = np.ones(s.shape, dtype=s.dtype)
        elif s.kind == "bool":
            out[s.name] = rng.integers(0, 2, size=s.shape).astype(bool)
        elif s.kind == "int":
            out[s.name] = rng.integers(0, s.high, size=s.shape).astype(s.dtype)
        else:
            out[s.name] = rng.standard_normal(size=s.shape, dtype=np.float32).astype(s.dtype)
    return out


def iter_batches(calib: CalibrationSet) -> Iterator[dict[str, np.ndarray]]:
    """Yield the batches of ``calib`` as ``{input name: array}``, reading one file at a time.

    A file is read once, when its first batch is due, and dropped after its last; float
    arrays are checked for NaN/Inf when read.

    Raises:
        CalibrationError: a file cannot be read or holds NaN/Inf.
    """
    loaded: tuple[int, dict[str, np.ndarray]] | None = None
    for b in calib.batches:
        if loaded is None or loaded[0] != b.file:
            loaded = None  # drop the previous file before reading the next
            f = calib.files[b.file]
            if calib._generator is not None:
                seed, specs = calib._generator
                arrays = _generate(seed, b.file, specs)
            else:
                arrays = _load_file(f)
            loaded = (b.file, arrays)
        arrays = loaded[1]
        if b.start == 0 and b.stop == calib.files[b.file].samples:
            yield dict(arrays)
        else:
            shared = calib.files[b.file].shared
            yield {k: v if k in shared else v[b.start : b.stop] for k, v in arrays.items()}


class CalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over a :class:`CalibrationSet`.

    ``get_next()`` returns the next batch or None when done (ORT's protocol; ORT's abstract
    class accepts any object with ``get_next``). ``rewind()`` starts over.
    """

    def __init__(self, calib: CalibrationSet) -> None:
        self.calib = calib
        self._it: Iterator[dict[str, np.ndarray]] = iter_batches(calib)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter_batches(self.calib)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch

    def __len__(self) -> int:
        return len(self.calib)


def as_data_reader(calib: CalibrationSet) -> CalibrationReader:
    """A fresh ORT ``CalibrationDataReader`` (``get_next() -> dict | None``) over ``calib``."""
    return CalibrationReader(calib)


# --------------------------------------------------------------------------------------------
# Random data and holdout splits
# --------------------------------------------------------------------------------------------


def _gather_table_rows(index: GraphIndex, name: str) -> int | None:
    rows: list[int] = []
    for key in index.consumers.get(name, []):
        node = index.node_by_key[key]
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] != name:
            continue
        table = index.initializers.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is not None and len(table.dims) > 0:
            rows.append(int(table.dims[axis]))
    return min(rows) if rows else None


def _random_spec(name: str, t: TensorType | None, index: GraphIndex, *, batch_size: int,
                 dims: Mapping[str, int], batched: bool = True) -> _RandomSpec:
    """How to fill input ``name``; ``batched=False`` (no batch axis, :func:`shared_inputs`):
    the model's own shape, axis 0 included (a symbolic axis 0 takes its size from ``dims``)."""
    if t is None or t.shape is None:
        raise CalibrationError(f"random calibration: model input '{name}' has no known shape",
                               hint="give calibration data as .npz files instead; " + _README)
    if not t.shape:
        raise CalibrationError(f"random calibration: model input '{name}' is a scalar; random data needs a batch axis",
                               hint="give calibration data as .npz files instead; " + _README)
    shape: list[int] = []
    for axis, d in enumerate(t.shape):
        if axis == 0 and batched:
            if isinstance(d, int) and d != batch_size:
                raise CalibrationError(
                    f"random calibration: model input '{name}' has a static batch size of {d}, not {batch_size}",
                    hint=f"pass --batch-size {d}")
            shape.append(batch_size)
        elif isinstance(d, int):
            shape.append(d)
        elif isinstance(d, str) and d in dims:
            shape.append(int(dims[d]))
        else:
            what = f"symbolic size '{d}'" if d else "an unknown size"
            example = d or "seq"
            raise CalibrationError(f"random calibration: model input '{name}' axis {axis} has {what}; give its value",
                                   hint=f"set it with dims, e.g. {example}=128")
    try:
        dt: np.dtype | None = np.dtype(t.dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "biuf":
        raise CalibrationError(f"random calibration: model input '{name}' has dtype {t.dtype}; cannot make random data for it",
                               hint="give calibration data as .npz files instead; " + _README)
    if "mask" in name.lower():
        return _RandomSpec(name, dt.name, tuple(shape), "ones")
    if dt.kind == "b":
        return _RandomSpec(name, dt.name, tuple(shape), "bool")
    if dt.kind in "iu":
        high = _gather_table_rows(index, name) or DEFAULT_RANDOM_INT_HIGH
        return _RandomSpec(name, dt.name, tuple(shape), "int", high)
    return _RandomSpec(name, dt.name, tuple(shape), "normal")


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed leading dim shared by every batched graph input (:func:`shared_inputs` excluded), or
    None when one is symbolic, unknown, or they differ. Does not modify ``model``."""
    shared = shared_inputs(model)
    sizes = {t.shape[0] if t is not None and t.shape else None
             for n, t in model_input_types(model).items() if n not in shared}
    size = sizes.pop() if len(sizes) == 1 else None
    return size if isinstance(size, int) and size > 0 else None


def random_calibration(model: onnx.ModelProto, *, batches: int, batch_size: int | None = None,
                       dims: Mapping[str, int] | None = None, seed: int = 0) -> CalibrationSet:
    """Random inputs for ``model``: only for smoke tests, never a silent fallback.

    The set has ``random=True`` and its description starts with "random", so every report
    says so. Batch ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` when it is
    iterated (nothing is held in memory). An input whose model shape has no batch axis
    (:func:`shared_inputs`, the rule real calibration data follows: Flux's 2-D
    ``img_ids``/``txt_ids``) gets the model's own shape, drawn once per batch and passed whole
    (``CalibrationFile.shared``). Float inputs are standard normal; inputs whose name
    contains "mask" are ones; integer inputs are uniform in ``[0, high)``, ``high`` being the
    row count of the embedding table they index (a Gather on an initializer), else
    :data:`DEFAULT_RANDOM_INT_HIGH`; bool inputs are fair coin flips. Does not modify ``model``.

    Args:
        model: the model whose inputs to fill.
        batches: number of batches (>= 1).
        batch_size: samples per batch (>= 1); a static batch dim in the model must equal it.
            None: the model's fixed batch (:func:`static_batch`), else 1.
        dims: sizes of the symbolic dims other than the batch axis, e.g. ``{"seq": 128}``
            (axis 0 of an input without a batch axis included).
        seed: the random seed.

    Raises:
        ConfigError: ``batches``/``batch_size`` not positive, or ``dims`` names an unknown dim.
        CalibrationError: an input has a dim without a value, no shape, or a non-numeric dtype.
    """
    if batch_size is None:
        batch_size = static_batch(model) or 1
    if batches <= 0 or batch_size <= 0:
        raise ConfigError(f"random calibration needs at least one batch of one sample, got {batches} batches of {batch_size}",
                          hint="e.g. --random-calib 4 --random-dims batch=2")
    dims = dict(dims or {})
    types = model_input_types(model)
    shared = shared_inputs(model)
    known = sorted({d for n, t in types.items() if t and t.shape for d in t.shape[0 if n in shared else 1:]
                    if isinstance(d, str)})
    for name in dims:
        if name not in known:
            raise ConfigError(f"random calibration: the model has no symbolic dim '{name}'",
                              hint=f"symbolic dims of its inputs (besides the batch axis): {', '.join(known) or 'none'}")
    if batches > MAX_RANDOM_BATCHES:
        raise ConfigError(f"random calibration: {batches} batches; at most {MAX_RANDOM_BATCHES} are made",
                          hint="random inputs are for smoke tests: e.g. --random-calib 4")
    index = GraphIndex(model)
    specs = tuple(_random_spec(n, t, index, batch_size=batch_size, dims=dims, batched=n not in shared)
                  for n, t in types.items())
    elements = sum(math.prod(s.shape) for s in specs)
    if elements > MAX_RANDOM_ELEMENTS:
        shapes = ", ".join(f"{s.name} {_shape_str(s.shape)}" for s in specs)
        raise ConfigError(f"random calibration: one batch would hold {elements} values ({shapes}); "
                          f"at most {MAX_RANDOM_ELEMENTS} are made",
                          hint="use a smaller batch size or smaller dims (e.g. --random-dims batch=2,seq=128)")
    arrays = tuple(ArraySpec(s.name, s.dtype, s.shape) for s in specs)
    unbatched = frozenset(n for n in shared if n in types)
    files = tuple(CalibrationFile(None, f"random batch {i}", arrays, unbatched) for i in range(batches))
    extra = "".join(f", {k}={v}" for k, v in sorted(dims.items()))
    desc = f"random inputs (seed {seed}, {batches} batches of {batch_size} samples{extra})"
    return CalibrationSet(desc, files, _split(files, None), batch_size, True, (seed, specs))


def split_calibration(calib: CalibrationSet, *, holdout: float) -> tuple[CalibrationSet, CalibrationSet]:
    """Split ``calib`` by batch into (calibration part, held-out part); deterministic.

    ``max(1, round(holdout * n))`` of the ``n`` batches are held out, evenly spaced: batch
    ``floor((k + 0.5) * n / h)`` for ``k < h``. Both parts keep ``random`` and the files.

    Raises:
        ConfigError: ``holdout`` not in (0, 1).
        CalibrationError: fewer than two batches, or nothing would be left to calibrate on.
    """
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout must be a fraction between 0 and 1 (exclusive), got {holdout}",
                          hint="e.g. --holdout 0.25 (a quarter of the batches for verification)")
    n = len(calib.batches)
    h = max(1, round(holdout * n))
    if h >= n:
        raise CalibrationError(f"cannot hold out {h} of {n} batches of {calib.description}: nothing would be left to calibrate on",
                               hint="add files, split them with --batch-size, or hold out less")
    held = {int((k + 0.5) * n / h) for k in range(h)}
    parts = []
    for label, keep in (("calibration part", False), ("held-out part", True)):
        chosen = tuple(b for i, b in enumerate(calib.batches) if (i in held) == keep)
        samples = sum(b.size for b in chosen)
        desc = f"{calib.description}: {label}, {len(chosen)} of {n} batches ({samples} samples)"
        parts.append(CalibrationSet(desc, calib.files, chosen, calib.batch_size, calib.random, calib._generator))
    return parts[0], parts[1]


# --------------------------------------------------------------------------------------------
# Writers: text
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextOptions:
    """Tokenization of calibration texts.

    Attributes:
        max_length: tokens per text at most (special tokens included); longer texts are truncated.
        batch_size: texts per batch (the last batch may be smaller).
        pad_to_max: pad every batch to ``max_length`` instead of to its longest text.
        token_type_ids: also write ``token_type_ids`` (BERT-style models take it).
    """

    max_length: int = 128
    batch_size: int = 8
    pad_to_max: bool = False
    token_type_ids: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.max_length <= MAX_TEXT_LENGTH:
            raise ConfigError(f"--max-length must be between 2 and {MAX_TEXT_LENGTH} tokens, got {self.max_length}",
                              hint="e.g. --max-length 128 (special tokens included)")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be a positive number of samples, got {self.batch_size}",
                              hint="e.g. --batch-size 8")


def split_texts(text: str) -> list[str]:
    """One calibration text per non-empty line of ``text`` (lines are stripped)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a folder holding one.

    Raises:
        MissingDependencyError: the ``tokenizers`` package is not installed.
        ConfigError: no tokenizer.json there, or it cannot be parsed.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingDependencyError("tokenizers", purpose="'compress calib text'", extra="hf") from None
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"tokenizer not found: {file}",
                          hint="pass --tokenizer a tokenizer.json file or a folder holding one (a Hugging Face model folder)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a plain Exception for bad JSON
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{file} is not a valid tokenizer.json: {first}",
                          hint="pass the tokenizer.json saved by a Hugging Face fast tokenizer") from None


def _pad_settings(tok: Any) -> tuple[int, str, int]:
    current = tok.padding
    if current:
        return int(current["pad_id"]), str(current["pad_token"]), int(current["pad_type_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        tid = tok.token_to_id(token)
        if tid is not None:
            return int(tid), token, 0
    return 0, "[PAD]", 0


def text_batches(texts: Sequence[str], *, tokenizer: str | os.PathLike[str],
                 options: TextOptions | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Tokenize ``texts`` into batches of ``input_ids``, ``attention_mask`` (, ``token_type_ids``).

    Texts are truncated to ``max_length`` tokens (special tokens included) and padded on the
    right with the tokenizer's pad token to the longest text of the batch, or to
    ``max_length`` with ``pad_to_max``. All arrays are int64 ``[batch, length]``. The
    tokenizer is loaded (and errors raised) before the first batch is asked for.

    Raises:
        CalibrationError: ``texts`` is empty.
        MissingDependencyError, ConfigError: see :func:`load_tokenizer`.
    """
    opts = options or TextOptions()
    if not texts:
        raise CalibrationError("no texts to tokenize", hint="give one text per non-empty line")
    tok = load_tokenizer(tokenizer)
    pad_id, pad_token, pad_type_id = _pad_settings(tok)
    tok.enable_truncation(max_length=opts.max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token, pad_type_id=pad_type_id,
                       length=opts.max_length if opts.pad_to_max else None)
    texts = list(texts)

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(texts), opts.batch_size):
            enc = tok.encode_batch(texts[start : start + opts.batch_size])
            batch = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                     "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
            if opts.token_type_ids:
                batch["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
            yield batch

    return generate()


# --------------------------------------------------------------------------------------------
# Writers: images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageOptions:
    """Image preprocessing: resize, center crop, normalize.

    The shorter side is resized to ``size`` (bilinear, aspect kept, the longer side rounded),
    then a ``crop`` x ``crop`` square is cut from the center (offsets ``(W - crop) // 2``,
    ``(H - crop) // 2``), then each RGB value becomes ``(pixel / scale - mean[c]) / std[c]``
    in float32. EfficientNet-Lite's ``(rgb - 127) / 128`` is ``scale=1, mean=127, std=128``.

    Attributes:
        size: shorter side after resizing, pixels.
        crop: side of the center crop, pixels (<= size); None means ``size``.
        mean, std: per channel (R, G, B), in units of ``pixel / scale``; one value is used for all.
        scale: pixels (0..255) are divided by this first (255 -> [0, 1]; 1 -> raw).
        layout: "NCHW" or "NHWC".
        input_name: the model input the arrays are saved under.
        batch_size: images per batch (the last batch may be smaller).
    """

    size: int = 224
    crop: int | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 255.0
    layout: str = "NCHW"
    input_name: str = "x"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.size <= MAX_IMAGE_SIDE:
            raise ConfigError(f"--size must be between 1 and {MAX_IMAGE_SIDE} pixels, got {self.size}",
                              hint="e.g. --size 224")
        if self.crop is not None and not 0 < self.crop <= self.size:
            raise ConfigError(f"--crop must be between 1 and --size ({self.size}) pixels, got {self.crop}",
                              hint="e.g. --size 256 --crop 224, or leave --crop out to keep the whole --size")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) not in (1, 3):
                raise ConfigError(f"{flag} takes 1 or 3 comma-separated values (R,G,B), got {len(values)}",
                                  hint=f"e.g. {flag} 0.5 or {flag} 0.485,0.456,0.406")
        for flag, values in (("--mean", self.mean), ("--std", self.std), ("--scale", (self.scale,))):
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise ConfigError(f"{flag} {','.join(map(str, values))}: must be finite numbers (not nan or inf)",
                                  hint=f"e.g. {flag} {'255' if flag == '--scale' else '0.5'}")
        if any(s == 0 for s in self.std) or self.scale == 0:
            raise ConfigError("--std and --scale must be non-zero",
                              hint="e.g. --scale 255 --std 0.229,0.224,0.225 (ImageNet), or --scale 1 --std 128")
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"--layout must be NCHW or NHWC, got {self.layout!r}", hint="e.g. --layout NCHW")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be a positive number of samples, got {self.batch_size}",
                              hint="e.g. --batch-size 8")

    @property
    def crop_size(self) -> int:
        return self.crop if self.crop is not None else self.size


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files (:data:`IMAGE_SUFFIXES`) under ``folder``, recursively, sorted by relative path.

    Raises:
        CalibrationError: ``folder`` is not a folder or holds no images.
    """
    p = Path(folder)
    if not p.is_dir():
        raise CalibrationError(f"image folder not found: {p}", hint="pass a folder of image files")
    found = sorted((q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()),
                   key=lambda q: q.relative_to(p).as_posix())
    if not found:
        raise CalibrationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {p}", hint="pass a folder of image files")
    return found


def preprocess_image(image: Any, options: ImageOptions) -> np.ndarray:
    """One PIL image -> float32 ``[3, crop, crop]`` (NCHW) or ``[crop, crop, 3]`` (NHWC).

    See :class:`ImageOptions` for the formula. Does not modify ``image``.
    """
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    short = min(w, h)
    if short != options.size:
        new = (options.size, max(options.size, round(h * options.size / w))) if w <= h else \
              (max(options.size, round(w * options.size / h)), options.size)
        img = img.resize(new, Image.Resampling.BILINEAR)
    w, h = img.size
    c = options.crop_size
    left, top = (w - c) // 2, (h - c) // 2
    img = img.crop((left, top, left + c, top + c))
    arr = np.asarray(img, dtype=np.float32)
    mean = np.asarray(options.mean, dtype=np.float32)
    std = np.asarray(options.std, dtype=np.float32)
    arr = (arr / np.float32(options.scale) - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1) if options.layout == "NCHW" else arr)


#: Largest image decoded, in pixels (64 megapixels: 192 MB as RGB); checked from the header, before decoding.
MAX_IMAGE_PIXELS = 1 << 26
#: Largest ratio of an image's longer side to its shorter side: resizing the shorter side to
#: ``size`` multiplies the longer one, so a 1 x 20000 strip would become 224 x 4,480,000.
MAX_IMAGE_ASPECT = 20


def _open_image(path: Path, options: ImageOptions) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    hint = "remove or replace the file"
    try:
        with Image.open(path) as img:  # reads the header only: the size is known before any pixel is decoded
            w, h = img.size
            if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
                raise CalibrationError(f"{path}: a {w} x {h} image; at most {MAX_IMAGE_PIXELS} pixels are decoded",
                                       hint="downscale it first, or remove it")
            if max(w, h) > MAX_IMAGE_ASPECT * min(w, h):
                raise CalibrationError(f"{path}: a {w} x {h} image is more than {MAX_IMAGE_ASPECT} times longer "
                                       "than wide; resizing its shorter side would make it huge",
                                       hint="crop it to the part that matters, or remove it")
            img.load()
            return preprocess_image(img, options)
    except Image.DecompressionBombError as exc:  # Pillow's own limit (frames, chunk sizes)
        raise CalibrationError(f"{path} is too large to decode safely: {str(exc)[:200]}", hint=hint) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:  # SyntaxError: some PIL plugins
        raise CalibrationError(f"{path} is not a readable image: {str(exc)[:200]}", hint=hint) from None


def image_batches(paths: Sequence[str | os.PathLike[str]], *,
                  options: ImageOptions | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``{input_name: float32 [B, 3, crop, crop] or [B, crop, crop, 3]}`` from image files.

    Images are read one batch at a time, in the given order (see :func:`preprocess_image`).
    Pillow is imported (and a missing Pillow reported) before the first batch is asked for.

    Raises:
        MissingDependencyError: Pillow is not installed.
        CalibrationError: ``paths`` is empty, or a file is not a readable image.
    """
    opts = options or ImageOptions()
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise MissingDependencyError("Pillow", purpose="'compress calib images'", extra="images") from None
    if not paths:
        raise CalibrationError("no images to preprocess", hint="pass a folder of image files")
    files = [Path(p) for p in paths]

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(files), opts.batch_size):
            chunk = files[start : start + opts.batch_size]
            yield {opts.input_name: np.stack([_open_image(p, opts) for p in chunk])}

    return generate()


def parse_floats(text: str, *, flag: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> floats; ConfigError naming ``flag`` otherwise."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}", hint=f"e.g. {flag} 0.5,0.5,0.5") from None


def summarize_batches(shapes: Sequence[Mapping[str, tuple[str, tuple[int, ...]]]]) -> str:
    """``"input_ids int64 [4..8, 5..16], ..."``: per array, dtype and the range of each dim."""
    if not shapes:
        return "no arrays"
    parts = []
    for name, (dtype, shape) in shapes[0].items():
        dims = []
        for axis in range(len(shape)):
            sizes = [s[name][1][axis] for s in shapes if name in s]
            lo, hi = min(sizes), max(sizes)
            dims.append(str(lo) if lo == hi else f"{lo}..{hi}")
        parts.append(f"{name} {dtype} [{', '.join(dims)}]")
    return ", ".join(parts)


__all__ = [
    "ArraySpec", "CalibrationBatch", "CalibrationFile", "CalibrationReader", "CalibrationSet", "ImageOptions",
    "TextOptions", "as_data_reader", "check_calibration", "find_images", "image_batches", "iter_batches",
    "load_calibration", "load_tokenizer", "model_input_types", "parse_floats", "preprocess_image",
    "random_calibration", "read_npz_header", "split_calibration", "split_texts", "summarize_batches",
    "text_batches",
]
