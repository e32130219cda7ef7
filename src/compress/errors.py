"""The one user-error hierarchy of compress.

Anything a user can fix (a bad path, flag, model or calibration file) raises a
:class:`CompressError` subclass. The CLI catches exactly this type, prints
``error: <message>`` and ``hint: <hint>`` on stderr and exits 1. Every error carries a
hint: ``hint`` is a required, non-empty argument (``tests/test_hostile_outputs.py`` also
scans ``src/`` for raises without one). Anything else reaching the CLI is a bug in
compress: it is reported as ``error: internal error (a bug in compress): ...`` with exit
code 2, and its traceback is printed only with ``-v``.
"""

from __future__ import annotations


class CompressError(Exception):
    """A user-facing error: ``message`` says what is wrong, ``hint`` how to fix it.

    Both are required and non-empty; a message names the file, tensor, node or flag at
    fault, and a hint says what to do (an example value, a flag to pass, a file to fix).
    """

    def __init__(self, message: str, *, hint: str) -> None:
        if not isinstance(hint, str) or not hint.strip():
            raise TypeError(f"{type(self).__name__}({message!r}) needs a non-empty hint")
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})"


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
    """An output path cannot be written (exists, missing folder, equals an input, not a regular file)."""


class TrustError(ModelError):
    """An input would run code (a pickled payload) and ``--trust-code`` was not given."""


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
