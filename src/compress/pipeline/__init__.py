"""``compress run``: export -> calibration -> prune -> build -> report, from one config file.

The package, by what a reader looks for:

- :mod:`compress.pipeline.config` -- the config: sections, their keys and checks
  (``build`` and ``gates`` are the stage configs themselves); :func:`load_config`;
- :mod:`compress.pipeline.parse` -- YAML/JSON text to plain data, bounded and strict;
- :mod:`compress.pipeline.cache` -- stage records and input hashes (what makes a re-run skip
  unchanged stages);
- :mod:`compress.pipeline.stages` -- each stage: its hash inputs and its work, calling the
  same library function as its command;
- this module -- the output folder and :func:`run_pipeline`; the index is rendered by
  :mod:`compress.reports.summary`.

Every stage writes into its own folder of the output folder (``export/``, ``calib/``,
``prune/``, ``build/``), replaced atomically, with a ``stage.json`` holding the stage's input
hash. A stage whose hash is unchanged and whose recorded outputs are all present is not
redone ("skipped (unchanged)"). The report stage always runs: it evaluates the gates on
``build/latency.json`` (a changed gate never re-runs a benchmark) and writes the index.
Models and data are read with :mod:`compress.onnx_io` / :mod:`compress.calibration` and
written only through :mod:`compress.onnx_io`; no report holds an absolute path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress import __version__
from compress.errors import ConfigError
from compress.gates import GateResult, evaluate_gates
from compress.log import logger
from compress.onnx_io import load_model, read_json, write_json, write_text
from compress.pipeline.cache import STAGE_SCHEMA, Digests, Run, StageRun, fingerprint, hash_json
from compress.pipeline.config import (
    SECTIONS,
    BuildSection,
    CalibrationSection,
    GatesSection,
    ModelSection,
    ModelSource,
    PipelineConfig,
    PruneSection,
    RandomSection,
    load_config,
)
from compress.pipeline.parse import parse_config_text
from compress.pipeline.stages import build_stage, calib_stage, export_stage, prune_stage
from compress.reports.summary import SUMMARY_SCHEMA, summarize, summary_markdown

#: Stage folders, in the order they run.
STAGES = ("export", "calib", "prune", "build")
#: Files the report stage writes into the output folder.
INDEX_FILES = ("summary.json", "summary.md")


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of :func:`run_pipeline`: stages, gates, and the index written to the output folder."""

    stages: tuple[StageRun, ...]
    gates: tuple[GateResult, ...]
    summary: dict[str, Any]
    markdown: str

    @property
    def exit_code(self) -> int:
        """0, or the exit code of the first failed gate (:data:`compress.gates.GATE_EXIT_CODES`)."""
        failed = [g for g in self.gates if not g.passed]
        return failed[0].exit_code if failed else 0


def _pipeline_entry(entry: Path) -> bool:
    """Whether ``entry`` of an output folder belongs to an earlier ``compress run``."""
    if entry.name in INDEX_FILES:
        return entry.is_file()
    if entry.name in STAGES:
        return entry.is_dir() and (entry / "stage.json").is_file()
    return entry.name.startswith(".") and entry.name[1:].split(".")[0] in STAGES  # leftovers of atomic folders


def prepare_output(out: str | os.PathLike[str], config: PipelineConfig, *,
                   replaceable: Callable[[Path], bool] | None = None, what: str = "an earlier 'compress run' output") -> Path:
    """Check the output folder before any work, then create it (with its parents).

    It may be missing, empty, or an earlier ``compress run`` output (which is updated in
    place: unchanged stages are kept; ``replaceable`` tells such entries, default
    :func:`_pipeline_entry`). No input of the config may lie inside it.

    Raises:
        OutputError: it is a file, or holds other files; ConfigError: an input lies inside it.
    """
    from compress.outputs import Outputs

    path = Path(out)
    root = path.resolve()
    for where, p in _input_paths(config):
        if p.resolve() == root or root in p.resolve().parents:
            raise ConfigError(f"{config.source}: {where} is inside the output folder {path}",
                              hint="choose another -o; stage folders are replaced when a stage runs")
    outs = Outputs(inputs=[config.source] if config.source else (), force=True)
    outs.folder(path, replaceable=replaceable or _pipeline_entry, what=what, create_parents=True)
    outs.check()  # a folder (not a file, FIFO, ...), only an earlier run's entries, a writable parent
    path.mkdir(parents=True, exist_ok=True)
    return path


def _input_paths(config: PipelineConfig) -> list[tuple[str, Path]]:
    c = config.calibration
    items = [("model.source", config.model.source.path), ("model.weights", config.model.weights),
             ("calibration.npz", c.npz), ("calibration.text", c.text), ("calibration.images", c.images),
             ("calibration.tokenizer", c.tokenizer)]  # gates.previous is read before any stage runs
    return [(w, p) for w, p in items if p is not None]


def read_previous(config: PipelineConfig) -> Mapping[str, Any] | None:
    from compress.gates import check_previous

    path = config.gates.previous
    if path is None:
        return None
    return check_previous(read_json(path, what="latency report"), source=f"gates.previous ({path.name})")


def check_dependencies(config: PipelineConfig) -> None:
    """Fail before any work when a package a later stage needs is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the plots are optional: a note, not a failure
        logger.warning("note: matplotlib is not installed: the stages write no plots (pip install 'onnx-compress[plot]')")
    if config.build.backend == "trt":
        from compress.build.trt import import_tensorrt

        import_tensorrt()


def run_pipeline(config: PipelineConfig, out: str | os.PathLike[str], *, force: bool = False) -> PipelineResult:
    """Run the pipeline into ``out``: export, calibration, prune, build, then the report.

    Stages whose input hash is unchanged are skipped (all of them run with ``force``).
    ``gates.previous`` is read first, so it may be the ``latency.json`` of this output folder.

    Returns:
        The stages' outcomes, the gate results and the index (also written to
        ``out/summary.json`` and ``out/summary.md``).

    Raises:
        CompressError: from any stage (the stage folder it was writing is left as it was).
    """
    from compress.outputs import locked_folder

    check_dependencies(config)
    path = prepare_output(out, config)
    with locked_folder(path):  # a second run into the same folder fails instead of mixing stages
        return _run_locked(config, path, force)


def _run_locked(config: PipelineConfig, path: Path, force: bool) -> PipelineResult:
    previous = read_previous(config)
    run = Run(config, path, force, Digests())
    export_run, original = export_stage(run)
    model = load_model(original.path)
    calib_run, calib = calib_stage(run, original, model)
    del model
    candidate = original
    if config.prune is not None:
        prune_run, candidate = prune_stage(run, original, calib, calib_run.hash)
    else:
        prune_run = StageRun("prune", "not configured")
    build_run = build_stage(run, candidate, original, calib, calib_run.hash)
    stages = (export_run, calib_run, prune_run, build_run)
    return _report(run, stages, calib, previous)


def _report(run: Run, stages: tuple[StageRun, ...], calib: Any, previous: Mapping[str, Any] | None) -> PipelineResult:
    """Evaluate the gates on ``build/latency.json`` and write the index (``summary.json``, ``summary.md``)."""
    out, config = run.out, run.config
    latency = read_json(out / "build" / "latency.json", what="latency report")
    prune = read_json(out / "prune" / "prune.json", what="prune report") if config.prune is not None else None
    export = read_json(out / "export" / "export.json", what="export report") if config.model.source.kind != "onnx" else None
    gates = tuple(evaluate_gates(latency, config.gates, previous=previous))
    summary = summarize(version=__version__, config={"file": config.file, "name": config.name,
                                                     "model": config.model.source.written, "sections": config.raw},
                        stages=stages,
                        reports={"latency": latency, "prune": prune, "export": export}, calib=calib, gates=gates)
    markdown = summary_markdown(summary)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", markdown)
    return PipelineResult(stages, gates, summary, markdown)


__all__ = [
    "INDEX_FILES", "SECTIONS", "STAGES", "STAGE_SCHEMA", "SUMMARY_SCHEMA", "BuildSection", "CalibrationSection",
    "GatesSection", "ModelSection", "ModelSource", "PipelineConfig", "PipelineResult", "PruneSection", "RandomSection",
    "StageRun", "fingerprint", "hash_json", "load_config", "parse_config_text", "prepare_output", "run_pipeline",
    "summary_markdown",
]
