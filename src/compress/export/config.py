"""The frozen configs and reports of ``compress export``: inputs, dynamic axes, options, parity, report.

Plain values only: nothing here imports torch or touches files. :class:`ExportConfig`
validates itself against :data:`EXPORTERS`, the registry of exporter functions (the
implementations are registered by :mod:`compress.export.exporters`, which the package
imports). Tolerances are absolute numbers (``atol``), ratios (``rtol``) and a cosine
similarity; times in a report are seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from compress.config import StageConfig, option
from compress.errors import ConfigError
from compress.registry import Registry

#: Opset used when none is given.
DEFAULT_OPSET = 18
#: Lowest opset the dynamo exporter supports without a lossy down-conversion.
MIN_DYNAMO_OPSET = 18
#: Element types accepted by ``--input NAME:SHAPE:DTYPE``.
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


#: ``schema_version`` of ``MODEL.export.json`` (:meth:`ExportReport.to_dict`).
EXPORT_SCHEMA = 1


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape and element type (``--input x:1x3x224x224:float32``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """Parse ``NAME:SHAPE[:DTYPE]``; ConfigError naming the flag value otherwise."""
        hint = "write --input NAME:SHAPE[:DTYPE], e.g. --input x:1x3x224x224:float32"
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ConfigError(f"--input {text!r}: expected NAME:SHAPE[:DTYPE]", hint=hint)
        name, shape_text = parts[0], parts[1]
        dtype = parts[2] if len(parts) == 3 else "float32"
        dims = shape_text.split("x")
        if not shape_text or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ConfigError(f"--input {text!r}: shape {shape_text!r} must be positive integers separated by 'x'", hint=hint)
        if dtype not in DTYPES:
            raise ConfigError(f"--input {text!r}: unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}", hint=hint)
        return cls(name, tuple(int(d) for d in dims), dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"name", "shape" (list), "dtype"}``."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class DynamicAxis:
    """A dynamic axis of an input (``--dynamic x:0=batch``); equal labels mean equal sizes."""

    name: str
    axis: int
    label: str

    @classmethod
    def parse(cls, text: str) -> DynamicAxis:
        """Parse ``NAME:AXIS[=LABEL]`` (LABEL defaults to ``NAME_dimAXIS``)."""
        hint = "write --dynamic NAME:AXIS[=LABEL], e.g. --dynamic x:0=batch"
        name, sep, rest = text.rpartition(":")
        axis_text, _, label = rest.partition("=")
        if not sep or not name or not axis_text.isdigit():
            raise ConfigError(f"--dynamic {text!r}: expected NAME:AXIS[=LABEL]", hint=hint)
        label = label or f"{name}_dim{axis_text}"
        if not label.isidentifier():
            raise ConfigError(f"--dynamic {text!r}: label {label!r} must be a Python identifier", hint=hint)
        return cls(name, int(axis_text), label)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"name", "axis", "label"}``."""
        return {"name": self.name, "axis": self.axis, "label": self.label}


@dataclass(frozen=True)
class ExportConfig(StageConfig):
    """Options of :func:`export`.

    Attributes:
        exporter: ``dynamo`` (torch.export based) or ``torchscript``.
        opset: ONNX opset; at least 18 with dynamo.
        dynamic: dynamic axes of the inputs.
        blocks: block container path(s), comma-separated; None = detect from the module tree.
        atol: absolute tolerance of the parity check.
        rtol: relative tolerance: an element fails when ``|onnx - torch| > atol + rtol * |torch|``.
        min_cosine: lowest cosine similarity between an ONNX output and torch's.
        verbose: let the exporter print its own logs and warnings.
    """

    exporter: str = option("dynamo", choices=lambda: EXPORTERS.names(),
                           help="torch.onnx exporter: dynamo (torch.export based, default) or the legacy torchscript one "
                                "(e.g. --exporter torchscript when dynamo cannot convert an op)")
    opset: int = option(DEFAULT_OPSET, minimum=1, metavar="N",
                        help=f"ONNX opset, at least {MIN_DYNAMO_OPSET} with dynamo (default {DEFAULT_OPSET}; e.g. --opset 20)")
    dynamic: tuple[DynamicAxis, ...] = ()
    blocks: str | None = option(None, metavar="CONTAINER",
                                help="module path of the block container(s), comma-separated (e.g. --blocks "
                                     "encoder.layer or --blocks layer1,layer2); default: the longest ModuleList/"
                                     "Sequential of >= 2 modules of one type, plus containers of the same type")
    atol: float = option(1e-4, minimum=0, metavar="A",
                         help="absolute tolerance of the parity check (default 1e-4; e.g. --atol 1e-3)")
    rtol: float = option(1e-3, minimum=0, metavar="R",
                         help="relative tolerance: an element fails when |onnx - torch| > atol + rtol*|torch| "
                              "(default 1e-3; e.g. --rtol 1e-2)")
    min_cosine: float = option(0.9999, metavar="C",
                               help="lowest cosine similarity of each output with torch's (default 0.9999; "
                                    "e.g. --min-cosine 0.999)")
    verbose: bool = False

    def __post_init__(self) -> None:
        EXPORTERS.get(self.exporter)
        if self.exporter == "dynamo" and self.opset < MIN_DYNAMO_OPSET:
            raise ConfigError(
                f"--opset {self.opset} is below {MIN_DYNAMO_OPSET}, the lowest opset of the dynamo exporter",
                hint=f"use --opset {MIN_DYNAMO_OPSET} or higher (a down-converted model loses its module "
                     "metadata), or --exporter torchscript",
            )
        for flag, value in (("--atol", self.atol), ("--rtol", self.rtol), ("--min-cosine", self.min_cosine)):
            if not math.isfinite(value):  # nan passes every comparison: the parity check would always pass
                raise ConfigError(f"{flag} {value}: must be a finite number (not nan or inf)",
                                  hint="e.g. --atol 1e-4 --rtol 1e-3 --min-cosine 0.9999 (the defaults)")
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError(f"tolerances must be >= 0 (--atol {self.atol}, --rtol {self.rtol})",
                              hint="e.g. --atol 1e-4 --rtol 1e-3 (the defaults)")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"--min-cosine {self.min_cosine} is not in [-1, 1]", hint="e.g. --min-cosine 0.9999 (the default)")


@dataclass(frozen=True)
class TorchModel:
    """A loaded torch model.

    Attributes:
        module: an ``nn.Module`` or a ``torch.export.ExportedProgram`` (``.pt2``).
        example_inputs: inputs the source provides (tuple of tensors, or dict name -> tensor); None if none.
        kind: ``module``, ``file``, ``hf`` or ``pt2``.
        name: the MODEL string without host paths (file and folder names only).
        dynamic: dynamic axes the source suggests (batch and sequence for ``hf:``).
        files: local files read (for the output-equals-input check).
    """

    module: Any
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None
    kind: str
    name: str
    dynamic: tuple[DynamicAxis, ...] = ()
    files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class OutputParity:
    """ONNX Runtime vs torch on one output.

    ``max_rel_error`` is ``max |onnx - torch| / |torch|`` over elements with ``|torch| > atol``
    (0 when there are none); ``cosine`` is the cosine similarity of the flattened outputs
    (1 when both are zero).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form; a non-finite error or cosine (a shape mismatch, a nan) becomes None."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "ok": self.ok,
                "max_abs_error": _finite(self.max_abs_error), "max_rel_error": _finite(self.max_rel_error),
                "cosine": _finite(self.cosine)}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export` did. Times in seconds; ``params`` counts initializer elements."""

    exporter: str
    opset: int
    versions: Mapping[str, str]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    dynamic: tuple[DynamicAxis, ...]
    parity: tuple[OutputParity, ...]
    tolerance: Mapping[str, float]
    export_s: float
    parity_s: float
    nodes: int
    params: int
    torch_params: int
    warnings: tuple[str, ...] = field(default_factory=tuple)
    schema_version: int = field(default=EXPORT_SCHEMA, init=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (``MODEL.export.json``): parity grouped with its tolerances, times rounded to ms."""
        return {
            "schema_version": self.schema_version, "exporter": self.exporter, "opset": self.opset,
            "versions": dict(self.versions),
            "inputs": [i.to_dict() for i in self.inputs], "outputs": list(self.outputs),
            "dynamic_axes": [d.to_dict() for d in self.dynamic],
            "parity": {"ok": all(p.ok for p in self.parity), "tolerance": dict(self.tolerance),
                       "outputs": [p.to_dict() for p in self.parity]},
            "timings": {"export_s": round(self.export_s, 3), "parity_s": round(self.parity_s, 3)},
            "nodes": self.nodes, "params": self.params, "torch_params": self.torch_params,
            "warnings": list(self.warnings),
        }


def _finite(x: float) -> float | None:
    """``x`` as a float, or None when it is nan or infinite (JSON has neither)."""
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class _Call:
    """How the module is called: positional args, keyword args and the input names."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    names: tuple[str, ...]

    def tensors(self) -> dict[str, Any]:
        """Input name -> tensor, in call order."""
        return dict(zip(self.names, self.args, strict=True)) if self.args else dict(self.kwargs)


#: Exporter functions by name (``--exporter``): ``(module, call, config, output_names) -> ModelProto``.
EXPORTERS: Registry[Callable[[Any, _Call, ExportConfig, Sequence[str]], onnx.ModelProto]] = Registry(
    "exporter", flag="--exporter")

