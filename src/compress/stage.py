"""The shape every stage has: ``stage(model, config, *, data=None) -> (model, report)``.

- ``model``: what the stage works on (an ONNX model, or for export the torch module); it is
  never modified. The stages that need the blocks take and return a
  :class:`compress.blocks.MappedModel` (the ONNX model with its block map).
- ``config``: the stage's frozen config (validated when made; see :mod:`compress.config`).
- ``data``: calibration batches (an iterable of feeds, usually a
  :class:`compress.calibration.CalibrationSet`), or for export the example inputs.
- The report is a dataclass that satisfies :class:`Report`: ``schema_version`` and
  ``to_dict()`` (the JSON the CLI and ``compress run`` write, plain types only).

The stages: :func:`compress.export.export`, :func:`compress.scoring.score`,
:func:`compress.prune.prune`, :func:`compress.build.run_passes` and
:func:`compress.build.benchmark`. None touches files (TensorRT's temporary parser input
aside); the glue (``cli/``, ``pipeline/``) renders reports (``reports/``) and writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Report(Protocol):
    """A stage's report: a dataclass with a ``schema_version`` and a JSON form."""

    @property
    def schema_version(self) -> int:
        """The version of ``to_dict()``'s layout (raised when a key changes meaning or goes away)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report (plain types only); includes ``schema_version``."""
        ...


def set_fields(report: Any, names: Sequence[str]) -> dict[str, Any]:
    """The attributes ``names`` of ``report`` that are not None, in that order: a report's optional parts."""
    return {n: v for n in names if (v := getattr(report, n)) is not None}


__all__ = ["Report", "set_fields"]
