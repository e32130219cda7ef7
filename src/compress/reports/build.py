"""The files of a build folder: the reports rendered from a :class:`~compress.build.BuildResult`, and their writer.

:func:`render_build` adds the gate results to the build's ``latency.json`` dict and renders
``latency.md``, ``latency.png`` and ``benchmark.json`` from it; :func:`write_build_files`
writes them with the model, ``passes.json``, ``trtexec.sh`` and the engine files. Shared
by ``compress build`` and the pipeline's build stage (which renders with no gates: its
report stage evaluates them). Neither function modifies the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.build import BuildResult
from compress.gates import GateResult, gate_entries
from compress.reports import optional_plot
from compress.reports.latency import benchmark_action_json, latency_markdown, plot_latency


@dataclass(frozen=True)
class BuildReports:
    """What a build folder holds besides the model and engine.

    ``latency``: ``latency.json`` (the build's report, the gate results under ``"gates"``);
    ``markdown``: ``latency.md``; ``plot``: ``latency.png``, None when matplotlib (the
    ``[plot]`` extra) is not installed; ``benchmark``: ``benchmark.json``
    (github-action-benchmark entries); ``gates``: the results rendered.
    """

    latency: dict[str, Any]
    markdown: str
    plot: bytes | None
    benchmark: list[dict[str, Any]]
    gates: tuple[GateResult, ...] = ()


def render_build(result: BuildResult, gates: Sequence[GateResult] = ()) -> BuildReports:
    """The reports of ``result`` with ``gates`` (evaluated by the caller on ``result.latency``) recorded in them.

    A missing matplotlib is a logged note, not an error (the plot is optional).
    """
    latency = {**result.latency.to_dict(), "gates": gate_entries(gates)}
    plot = optional_plot(plot_latency, latency, name="latency.png")
    return BuildReports(latency, latency_markdown(latency), plot, benchmark_action_json(latency), tuple(gates))


def write_build_files(folder: Path, result: BuildResult, reports: BuildReports) -> None:
    """Write the files of a build folder (the CLI and ``compress run`` call this inside an atomic folder).

    The model gets ``model.onnx.data`` when its input had external data; ``engine.plan``,
    ``timing.cache`` and ``engine.json`` are written for a TensorRT build only, ``latency.png``
    only when it was rendered.
    """
    from compress.onnx_io import save_model, write_bytes, write_json, write_text

    built = result.model
    save_model(built.proto, folder / "model.onnx", external_data=built.external_data or None)
    write_json(folder / "passes.json", result.passes.to_dict())
    write_text(folder / "trtexec.sh", "#!/bin/sh\n# Equivalent trtexec build and benchmark of model.onnx\n"
               + built.trtexec + "\n")
    if built.engine is not None:
        write_bytes(folder / "engine.plan", built.engine.plan)
        write_bytes(folder / "timing.cache", built.engine.timing_cache)
        write_json(folder / "engine.json", built.engine.info)
    write_json(folder / "latency.json", reports.latency)
    write_text(folder / "latency.md", reports.markdown)
    if reports.plot is not None:
        write_bytes(folder / "latency.png", reports.plot)
    write_json(folder / "benchmark.json", reports.benchmark)


__all__ = ["BuildReports", "render_build", "write_build_files"]
