"""The one user-error hierarchy of compress.

Anything a user can fix (a bad path, flag, model or calibration file) raises a
:class:`CompressError` subclass. The CLI catches exactly this type, prints
``error: <message>`` and, when present, ``hint: <hint>`` on stderr and exits 1.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CompressError(Exception):
    """A user-facing error: ``message`` says what is wrong, ``hint`` how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ModelError(CompressError):
    """The model (file, callable, graph) cannot be used as given."""


class ExportError(CompressError):
    """PyTorch -> ONNX export failed or the result does not match torch."""


class CalibrationError(CompressError):
    """Calibration data is missing, malformed or does not fit the model."""


class BlockError(CompressError):
    """Blocks cannot be found, or a block cannot be scored or removed."""


class ConfigError(CompressError):
    """A flag, option or config value is invalid."""


class OutputError(CompressError):
    """An output path cannot be written (exists, missing folder, equals an input)."""


class BuildError(CompressError):
    """An engine build or a precision/sparsity pass failed."""


class MissingDependencyError(CompressError):
    """An optional dependency (torch, tensorrt, ...) is not installed."""

    def __init__(self, package: str, *, purpose: str, extra: str) -> None:
        super().__init__(
            f"{package} is required for {purpose} but is not installed",
            hint=f"pip install 'onnx-compress[{extra}]'",
        )
        self.package = package
