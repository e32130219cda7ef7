"""Stage records and input hashes: what lets ``compress run`` skip a stage whose inputs did not change.

Every stage writes into its own folder of the output folder, replaced atomically, with a
``stage.json`` (schema :data:`STAGE_SCHEMA`) holding the stage's **input hash**: sha256 over
its config (paths replaced by the sha256 of the files they name, fields marked
``hash: False`` left out), the sha256 of the upstream artifacts it reads, the versions of the
packages it runs on, and compress's version and source digest. A stage whose hash is
unchanged and whose recorded outputs are all present (with their sizes) is not redone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from compress import __version__
from compress.errors import ModelError
from compress.log import logger
from compress.onnx_io import atomic_folder, file_digest, read_json, write_json
from compress.pipeline.config import PipelineConfig

#: Version of the ``stage.json`` layout.
STAGE_SCHEMA = 1


def hash_json(obj: Any) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class Digests:
    """sha256 of files and folders, each computed once per run."""

    def __init__(self) -> None:
        self._cache: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        """sha256 of ``path``: a file's bytes, or a folder's sorted (relative path, file sha256) list."""
        key = path.resolve()
        if key not in self._cache:
            if key.is_dir():
                files = sorted(p for p in key.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
                self._cache[key] = hash_json([[p.relative_to(key).as_posix(), file_digest(p)] for p in files])
            else:
                self._cache[key] = file_digest(key)
        return self._cache[key]


def fingerprint(obj: Any, digest: Callable[[Path], str]) -> Any:
    """``obj`` (a section) as JSON-ready data for hashing: paths become the sha256 of what they name.

    Fields marked ``metadata={"hash": False}`` are left out.
    """
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: fingerprint(getattr(obj, f.name), digest) for f in fields(obj) if f.metadata.get("hash", True)}
    if isinstance(obj, Path):
        return {"sha256": digest(obj)}
    if isinstance(obj, tuple | list):
        return [fingerprint(v, digest) for v in obj]
    return obj


@functools.lru_cache(maxsize=1)
def compress_source_digest() -> str:
    """sha256 over compress's own source files, so a changed compress re-runs every stage.

    The version string alone would not change in a development checkout. Computed once per process.
    """
    root = Path(__file__).resolve().parent.parent
    return hash_json([[p.relative_to(root).as_posix(), file_digest(p)] for p in sorted(root.rglob("*.py"))])


def versions(*names: str) -> dict[str, str | None]:
    """The version and source digest of compress, and the installed version of each distribution in ``names`` (None: absent)."""
    out: dict[str, str | None] = {"compress": __version__, "compress_source": compress_source_digest()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def module_versions(target: str) -> dict[str, str | None]:
    """Versions of the distributions that provide ``target``'s top-level package (no import)."""
    top = target.split(".")[0]
    try:
        dists = metadata.packages_distributions().get(top, [])
    except Exception:  # pragma: no cover - broken metadata of some other package
        dists = []
    return versions(*sorted(set(dists)))



@dataclass(frozen=True)
class StageRun:
    """What one stage did in this run.

    Attributes:
        name: ``export``, ``calib``, ``prune``, ``build``.
        status: ``ran``, ``skipped (unchanged)``, ``skipped (ONNX source)`` or ``not configured``.
        seconds: wall time when it ran, else None.
        outputs: its files, relative to the output folder.
        hash: its input hash (None when it has no folder).
    """

    name: str
    status: str
    seconds: float | None = None
    outputs: tuple[str, ...] = ()
    hash: str | None = None


@dataclass(frozen=True)
class Artifact:
    """A model a stage produced (or the ONNX source): its file, block map and content digest."""

    path: Path
    blocks: Path | None
    digest: str


@dataclass(frozen=True)
class Run:
    """One ``compress run``: the config, the output folder, ``--force``, and the digest cache."""

    config: PipelineConfig
    out: Path
    force: bool
    digest: Digests


def blocks_path(model_path: Path) -> Path:
    """``MODEL.blocks.json`` beside ``MODEL.onnx``."""
    name = model_path.name
    return model_path.with_name((name[: -len(".onnx")] if name.endswith(".onnx") else name) + ".blocks.json")


def _read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / "stage.json"
    if not path.is_file():
        return None
    try:
        record = read_json(path, what="stage record")
    except ModelError:
        return None
    return record if isinstance(record, dict) and record.get("schema_version") == STAGE_SCHEMA else None


def _outputs_present(folder: Path, record: Mapping[str, Any]) -> bool:
    outputs = record.get("outputs")
    if not isinstance(outputs, dict):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == info.get("bytes")
               for name, info in outputs.items())


def run_stage(run: Run, name: str, inputs: Mapping[str, Any], work: Callable[[Path], None]) -> StageRun:
    """Run ``work(tmp_folder)`` unless ``name``'s recorded input hash equals the hash of ``inputs``.

    ``work`` writes the stage's files into a temporary folder that replaces ``OUT/name``
    when it returns (with ``stage.json``: the hash, the inputs and every output's sha256).
    """
    key = hash_json({"stage": name, **inputs})
    folder = run.out / name
    record = _read_record(folder)
    if not run.force and record is not None and record.get("hash") == key and _outputs_present(folder, record):
        logger.info("%s: skipped (unchanged)", name)
        return StageRun(name, "skipped (unchanged)", None, _listing(name, record), key)
    logger.info("%s: running", name)
    start = time.perf_counter()
    with atomic_folder(folder) as tmp:
        work(tmp)
        seconds = time.perf_counter() - start
        outputs = {p.name: {"sha256": file_digest(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"schema_version": STAGE_SCHEMA, "stage": name, "hash": key, "inputs": dict(inputs),
                  "outputs": outputs, "seconds": round(seconds, 3)}
        write_json(tmp / "stage.json", record)
    logger.info("%s: done in %.1f s", name, seconds)
    return StageRun(name, "ran", seconds, _listing(name, record), key)


def _listing(name: str, record: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(f"{name}/{f}" for f in sorted(record.get("outputs") or {})) + (f"{name}/stage.json",)


def stage_artifact(run: Run, name: str) -> Artifact:
    """The model stage ``name`` wrote (``OUT/name/model.onnx``), with the digest of its recorded files."""
    folder = run.out / name
    record = _read_record(folder)
    assert record is not None  # written by _run_stage
    outs = record["outputs"]
    digest = hash_json({k: outs[k]["sha256"] for k in ("model.onnx", "model.onnx.data", "model.blocks.json") if k in outs})
    return Artifact(folder / "model.onnx", folder / "model.blocks.json", digest)

