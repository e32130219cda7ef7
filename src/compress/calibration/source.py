"""The calibration set: batches over files, with its description and whether it is random; streaming.

A :class:`CalibrationSet` holds headers only (:class:`~compress.calibration.npz.CalibrationFile`)
and a list of batches (sample ranges of a file along axis 0). :func:`load_calibration`
opens a folder of ``.npz`` files or one file; :func:`iter_batches` streams the data one
file at a time (random sets draw each batch when it is due); :func:`split_calibration`
holds out batches for verification; :class:`CalibrationReader` adapts a set to ONNX
Runtime's ``CalibrationDataReader`` protocol. A set's ``description`` names files relative
to the calibration folder, never by absolute path; random data always says "random".
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from compress.calibration.npz import _README, CalibrationFile, load_file, read_npz_header
from compress.errors import CalibrationError, ConfigError


@dataclass(frozen=True)
class CalibrationBatch:
    """Samples ``start:stop`` (axis 0) of ``files[file]``."""

    file: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """Samples in the batch (``stop - start``)."""
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
        labels_key: the array of every file that holds the samples' labels, not a model
            input (:func:`with_labels`); left out of the batches, read by :func:`iter_labels`.

    Iterating a set streams its batches (:func:`iter_batches`); ``len()`` is the batch count.
    """

    description: str
    files: tuple[CalibrationFile, ...]
    batches: tuple[CalibrationBatch, ...]
    batch_size: int | None = None
    random: bool = False
    _generator: tuple[int, tuple[_RandomSpec, ...]] | None = field(default=None, repr=False, compare=False)
    labels_key: str | None = None

    @property
    def samples(self) -> int:
        """Total samples over all batches."""
        return sum(b.size for b in self.batches)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Array names of the first file (the inputs the data feeds; the labels array left out)."""
        if not self.batches:
            return ()
        return tuple(a.name for a in self.files[self.batches[0].file].arrays if a.name != self.labels_key)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self)


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


#: The array name that holds labels in a calibration file (when the model has no input of that name).
LABELS = "labels"


def with_labels(calib: CalibrationSet, model_inputs: Sequence[str]) -> CalibrationSet:
    """``calib`` reading its files' ``labels`` arrays as labels, if they have them and the model does not take one.

    ``model_inputs``: the model's input names. Every file of the set must then hold a
    ``labels`` array (its axis 0 = the samples, checked with the other arrays when the file
    header is read); GradNorm uses them for the task loss (:func:`iter_labels`), every other
    consumer sees the batches without them. A set without labels is returned unchanged.

    Raises:
        CalibrationError: some files have labels and others not (naming one of each).
    """
    if LABELS in model_inputs or calib.random:
        return calib
    used = sorted({b.file for b in calib.batches})
    have = [i for i in used if any(a.name == LABELS for a in calib.files[i].arrays)]
    if not have:
        return calib
    lacking = [i for i in used if i not in have]
    if lacking:
        raise CalibrationError(
            f"{calib.files[lacking[0]].label()} has no '{LABELS}' array, but {calib.files[have[0]].label()} has one",
            hint=f"give every calibration file a '{LABELS}' array (one label per sample), or none")
    return replace(calib, labels_key=LABELS)


def iter_labels(calib: CalibrationSet) -> Iterator[np.ndarray]:
    """Yield each batch's labels (``labels_key`` array, same sample range as :func:`iter_batches`).

    Raises:
        ConfigError: the set has no labels (``labels_key`` None).
    """
    if calib.labels_key is None:
        raise ConfigError(f"{calib.description} has no labels", hint=f"add a '{LABELS}' array to every calibration file")
    for batch in iter_batches(calib, labels=True):
        yield batch[calib.labels_key]


def iter_batches(calib: CalibrationSet, *, labels: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Yield the batches of ``calib`` as ``{input name: array}``, reading one file at a time.

    A file is read once, when its first batch is due, and dropped after its last; float
    arrays are checked for NaN/Inf when read. The labels array (``calib.labels_key``) is left
    out unless ``labels``.

    Raises:
        CalibrationError: a file cannot be read or holds NaN/Inf.
    """
    drop = None if labels else calib.labels_key
    loaded: tuple[int, dict[str, np.ndarray]] | None = None
    for b in calib.batches:
        if loaded is None or loaded[0] != b.file:
            loaded = None  # drop the previous file before reading the next
            f = calib.files[b.file]
            if calib._generator is not None:
                seed, specs = calib._generator
                arrays = _generate(seed, b.file, specs)
            else:
                arrays = load_file(f)
            loaded = (b.file, arrays)
        arrays = loaded[1]
        if b.start == 0 and b.stop == calib.files[b.file].samples:
            yield {k: v for k, v in arrays.items() if k != drop}
        else:
            shared = calib.files[b.file].shared
            yield {k: v if k in shared else v[b.start : b.stop] for k, v in arrays.items() if k != drop}


class CalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over a :class:`CalibrationSet`.

    ``get_next()`` returns the next batch or None when done (ORT's protocol; ORT's abstract
    class accepts any object with ``get_next``). ``rewind()`` starts over.
    """

    def __init__(self, calib: CalibrationSet) -> None:
        self.calib = calib
        self._it: Iterator[dict[str, np.ndarray]] = iter_batches(calib)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as ``{input name: array}``, or None when all were given."""
        return next(self._it, None)

    def rewind(self) -> None:
        """Start over from the first batch (files are read again)."""
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


def describe(batches: object) -> tuple[str, bool]:
    """(description, random) of calibration data, as the reports give it.

    A :class:`CalibrationSet` carries both; other batches (a list) are ``"N batches"``
    (``"batches"`` when they have no length), not random.
    """
    description = getattr(batches, "description", None)
    if not description:
        try:
            description = f"{len(batches)} batches"  # type: ignore[arg-type]
        except TypeError:
            description = "batches"
    return str(description), bool(getattr(batches, "random", False))


def relabel(batches: Any, like: object) -> Any:
    """``batches`` described as ``like`` (a part of a CalibrationSet named as the whole); others unchanged."""
    if isinstance(batches, CalibrationSet) and isinstance(like, CalibrationSet):
        return replace(batches, description=like.description, random=like.random)
    return batches


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
        parts.append(replace(calib, description=desc, batches=chosen))
    return parts[0], parts[1]


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
