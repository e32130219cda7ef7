"""PyTorch -> ONNX export with a parity check against torch and a block map.

:func:`load_torch_model` turns a ``MODEL`` string into a torch module (and, where the
source provides them, example inputs); :func:`export_model` exports it with the dynamo
(``torch.onnx.export(dynamo=True)``) or TorchScript exporter, checks the result with
``onnx.checker``, runs it in ONNX Runtime (CPU) on the example inputs, compares every
output with torch, and finds the model's blocks. It returns the model, the block map and
an :class:`ExportReport`; it writes no files (the CLI does, through :mod:`compress.onnx_io`).

torch, onnxscript and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress import onnx_io
from compress.blocks import BlockMap, find_blocks, node_module_paths
from compress.errors import BlockError, ConfigError, ExportError, MissingDependencyError, ModelError, TrustError
from compress.log import logger
from compress.registry import Registry

#: Opset used when none is given.
DEFAULT_OPSET = 18
#: Lowest opset the dynamo exporter supports without a lossy down-conversion.
MIN_DYNAMO_OPSET = 18
#: Element types accepted by ``--input NAME:SHAPE:DTYPE``.
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
#: Loggers whose warnings the exporters print; raised to ERROR unless verbose.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "transformers")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([^']+)'"),
    re.compile(r"[Oo]perator '([^']+)'"),
    re.compile(r"No ONNX function found for '?([\w.:]+)"),
)


# --------------------------------------------------------------------------- configs


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
        return {"name": self.name, "axis": self.axis, "label": self.label}


@dataclass(frozen=True)
class ExportConfig:
    """Options of :func:`export_model`.

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

    exporter: str = "dynamo"
    opset: int = DEFAULT_OPSET
    dynamic: tuple[DynamicAxis, ...] = ()
    blocks: str | None = None
    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.9999
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
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "ok": self.ok,
                "max_abs_error": _finite(self.max_abs_error), "max_rel_error": _finite(self.max_rel_error),
                "cosine": _finite(self.cosine)}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` did. Times in seconds; ``params`` counts initializer elements."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "exporter": self.exporter, "opset": self.opset, "versions": dict(self.versions),
            "inputs": [i.to_dict() for i in self.inputs], "outputs": list(self.outputs),
            "dynamic_axes": [d.to_dict() for d in self.dynamic],
            "parity": {"ok": all(p.ok for p in self.parity), "tolerance": dict(self.tolerance),
                       "outputs": [p.to_dict() for p in self.parity]},
            "timings": {"export_s": round(self.export_s, 3), "parity_s": round(self.parity_s, 3)},
            "nodes": self.nodes, "params": self.params, "torch_params": self.torch_params,
            "warnings": list(self.warnings),
        }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# --------------------------------------------------------------------------- lazy imports


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", purpose="'compress export'", extra="export") from None
    return torch


# --------------------------------------------------------------------------- quiet exporter


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence what torch/onnxscript/transformers print while active (Python and C++ output).

    Redirects ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2, ignores warnings
    and raises the exporters' loggers to ERROR; everything is restored on exit.
    """
    if not enabled:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(_fd_silenced())
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _fd_silenced() -> Iterator[None]:
    """Point file descriptors 1 and 2 at an anonymous temporary file (C++ prints)."""
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no real descriptors (embedded interpreters)
        yield
        return
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            s.flush()
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


# --------------------------------------------------------------------------- loading


def _model_kind(spec: str) -> str:
    if spec.startswith("hf:"):
        return "hf"
    if spec.startswith("diffusers:"):
        return "diffusers"
    if spec.endswith(".pt2"):
        return "pt2"
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelError(
            f"MODEL {spec!r} is not package.module:callable, path/to/file.py:callable, hf:PATH, diffusers:PATH or a .pt2 file",
            hint="e.g. 'torchvision.models:resnet18', 'net.py:build', 'hf:./all-MiniLM-L6-v2' or 'model.pt2'",
        )
    return "file" if target.endswith(".py") or "/" in target or os.sep in target else "module"


def model_files(spec: str) -> tuple[Path, ...]:
    """Local files (or folder) that MODEL names: for the output-equals-input check."""
    kind = _model_kind(spec)
    if kind == "hf":
        return (Path(spec[3:]),)
    if kind == "diffusers":
        return (Path(spec.removeprefix("diffusers:")),)
    if kind == "pt2":
        return (Path(spec),)
    if kind == "file":
        return (Path(spec.rpartition(":")[0]),)
    return ()


def load_torch_model(spec: str, *, weights: str | os.PathLike[str] | None = None, verbose: bool = False,
                     trust_code: bool = False) -> TorchModel:
    """Load MODEL: ``package.module:callable``, ``path/to/file.py:callable``, ``hf:PATH``, ``diffusers:PATH`` or ``FILE.pt2``.

    A callable returns an ``nn.Module`` or ``(module, example_inputs)`` with example inputs a
    tuple of tensors or a dict name -> tensor. ``hf:PATH`` loads a local Hugging Face folder
    offline (``HF_HUB_OFFLINE=1`` while loading, restored afterwards) with
    ``transformers.AutoModelForCausalLM`` for causal LMs (output ``logits``) or
    ``transformers.AutoModel`` otherwise, ``use_cache`` off, and provides ``input_ids``,
    ``attention_mask`` (and ``token_type_ids`` where ``forward`` takes them and the config has
    a token-type embedding, ``type_vocab_size``), batch 2 x sequence 16, dynamic on both axes.
    ``diffusers:PATH`` loads a saved diffusers model folder offline, with a plain forward
    (:func:`diffusers_for_export`) and example inputs from its config
    (:func:`diffusers_example_inputs`). ``.pt2`` is a saved ``torch.export`` program; nothing in it
    is unpickled unless ``trust_code`` (see :func:`check_pt2_archive`).

    Exceptions raised by the user's code (importing the module or file, calling the
    callable) are reported as ModelError naming the callable, ``SystemExit`` included
    (so a callable that exits cannot make the command report success); only
    KeyboardInterrupt (Ctrl-C, SIGTERM) passes through.

    Args:
        spec: the MODEL string.
        weights: a state dict file (``torch.save(model.state_dict())``), loaded strictly.
        verbose: let torch/transformers print their own logs.
        trust_code: allow a ``.pt2`` archive with pickled payloads (unpickling runs code).

    Raises:
        ModelError: MODEL cannot be found, imported or called, returns no module, or the
            weights are not a checkpoint or do not fit.
        TrustError: a ``.pt2`` archive holds pickled payloads and ``trust_code`` is false.
    """
    kind = _model_kind(spec)
    _import_torch()
    if kind == "pt2":
        if weights is not None:
            raise ConfigError("--weights cannot be loaded into a saved torch.export program (.pt2)",
                              hint="the program holds its weights; export it again from the module with the weights loaded")
        return _load_pt2(spec, trust_code=trust_code)
    if kind == "hf":
        loaded = _load_hf(spec, verbose=verbose)
    elif kind == "diffusers":
        loaded = _load_diffusers(spec, verbose=verbose)
    else:
        loaded = _load_callable(spec, kind)
    if weights is not None:
        _load_weights(loaded.module, Path(weights))
    return loaded


#: Longest payload config (JSON) or sample-input member of a .pt2 archive that is read for the check.
_PT2_MAX_MEMBER = 64 << 20

_TRUST_HINT = ("unpickling runs code: pass --trust-code only for an archive you made or trust "
               "(or save the program again with plain tensors: torch.export.save)")


def check_pt2_archive(path: Path) -> None:
    """Refuse a ``.pt2`` archive that ``torch.export.load`` would unpickle, without unpickling anything.

    ``torch.export.load`` (``torch/export/pt2_archive/_package.py``,
    ``torch/_export/serde/serialize.py``) calls ``torch.load(weights_only=False)``,
    ``pickle.loads`` or ``torch._C._pickle_load_obj`` on: weights and constants whose
    payload config says ``use_pickle``; custom and opaque objects among the constants;
    legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` files; and the
    example inputs (``data/sample_inputs/<model>.pt``) when ``weights_only=True`` fails
    on them. Compiled AOTInductor code is native code. This function reads the zip's
    directory and payload configs (JSON) and loads the example inputs with
    ``torch.load(weights_only=True)``.

    Raises:
        ModelError: not a zip archive; TrustError: a payload would run code.
    """
    import io
    import json
    import zipfile

    import torch

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path} is not a saved torch.export program (torch.export.load fails with {type(exc).__name__})",
                         hint="write it with torch.export.save(torch.export.export(module, args), 'model.pt2')") from None
    with zf:
        infos = zf.infolist()
        for info in infos:
            parts = info.filename.split("/", 1)
            rel = parts[1] if len(parts) == 2 else parts[0]
            name = rel.rsplit("/", 1)[-1]
            why = None
            if rel.startswith("data/aotinductor/"):
                why = "compiled AOTInductor code"
            elif rel.startswith(("data/weights/", "data/constants/")) and name.endswith(".pt"):
                why = "a pickled (legacy format) weights or constants file"
            elif rel.startswith("data/constants/") and name.startswith(("custom_obj", "opaque_obj")):
                why = "a pickled custom object"
            elif rel.startswith(("data/weights/", "data/constants/")) and name.endswith("_config.json"):
                if info.file_size > _PT2_MAX_MEMBER:
                    why = f"a payload config of {info.file_size} bytes"
                else:
                    try:
                        config = json.loads(zf.read(info).decode("utf-8")).get("config", {})
                        pickled = sorted(k for k, v in config.items() if isinstance(v, dict) and v.get("use_pickle"))
                    except (ValueError, AttributeError, UnicodeDecodeError):
                        raise ModelError(f"{path}: {info.filename} is not a valid payload config",
                                         hint="save the program again with torch.export.save") from None
                    if pickled:
                        why = f"pickled tensors ({', '.join(pickled[:3])})"
            elif rel.startswith("data/sample_inputs/") and info.file_size:
                if info.file_size > _PT2_MAX_MEMBER:
                    why = f"example inputs of {info.file_size} bytes"
                else:
                    try:
                        torch.load(io.BytesIO(zf.read(info)), weights_only=True)
                    except Exception:
                        why = "example inputs that torch.load(weights_only=True) refuses (a pickle of other objects)"
            if why is not None:
                raise TrustError(f"{path}: {info.filename} holds {why}; refusing to load it", hint=_TRUST_HINT)


@contextlib.contextmanager
def _no_unpickling() -> Iterator[None]:
    """While active, ``torch.load`` runs only with ``weights_only=True`` and plain unpickling raises.

    A second line of defence behind :func:`check_pt2_archive` for ``torch.export.load``
    (which falls back to ``weights_only=False``); restored on exit.
    """
    import pickle
    from unittest import mock

    import torch

    real_load = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            raise TrustError("torch.export.load asked to unpickle a payload", hint=_TRUST_HINT)
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TrustError("torch.export.load asked to unpickle an object", hint=_TRUST_HINT)

    with mock.patch.object(torch, "load", safe_load), mock.patch.object(pickle, "loads", refuse), \
            mock.patch.object(torch._C, "_pickle_load_obj", refuse, create=True):
        yield


def _load_pt2(spec: str, *, trust_code: bool = False) -> TorchModel:
    import torch

    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", hint="check the path of the .pt2 file")
    if not trust_code:
        check_pt2_archive(path)
    try:
        with contextlib.nullcontext() if trust_code else _no_unpickling():
            program = torch.export.load(str(path))
    except TrustError as exc:
        raise TrustError(f"{path}: {exc.message}; refusing to load it", hint=exc.hint) from None
    except Exception as exc:
        raise ModelError(f"{path} is not a saved torch.export program (torch.export.load fails with {type(exc).__name__})",
                         hint="write it with torch.export.save(torch.export.export(module, args), 'model.pt2')") from None
    example = None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        example = dict(kwargs) if kwargs and not args else tuple(args)
    return TorchModel(program, example, "pt2", path.name, (), (path,))


#: ``architectures`` suffixes in a Hugging Face config.json that mark a causal (decoder) LM.
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` while active; restore both on exit."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_causal_lm(config: Any) -> bool:
    """Whether a transformers config describes a causal LM (``architectures`` ends in ``ForCausalLM``/``LMHeadModel``)."""
    return any(str(a).endswith(_CAUSAL_LM_SUFFIXES) for a in (getattr(config, "architectures", None) or ()))


def _load_hf(spec: str, *, verbose: bool) -> TorchModel:
    """``hf:FOLDER``: a local transformers folder, loaded offline, exported as a plain forward.

    Causal LMs (config ``architectures`` ``*ForCausalLM`` / ``*LMHeadModel``) load with
    ``AutoModelForCausalLM`` and get a plain ``forward(input_ids, attention_mask)`` returning
    ``{"logits": ...}`` (:func:`plain_forward`: no cache or int arguments for the exporters
    to trace); other models load with ``AutoModel``.
    ``use_cache`` is switched off (no ``DynamicCache`` in the outputs, which the dynamo
    exporter cannot return). The offline environment variables are restored afterwards.
    """
    import torch

    path = Path(spec[3:])
    if not (path / "config.json").is_file():
        what = "Hugging Face model folder not found:" if not path.is_dir() else "no config.json in Hugging Face model folder"
        raise ModelError(f"{what} {path}",
                         hint="hf: takes a local Hugging Face model folder (with config.json); nothing is downloaded")
    with _hub_offline():  # huggingface_hub reads HF_HUB_OFFLINE when first imported
        try:
            import transformers
        except ImportError:
            raise MissingDependencyError("transformers", purpose="hf: models", extra="hf") from None
        try:
            with quiet(not verbose):
                config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
                causal = is_causal_lm(config)
                auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
                module = auto.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ModelError(f"cannot load the Hugging Face model in {path}: {_first_line(exc)}",
                             hint="the folder needs config.json and the weights (model.safetensors or pytorch_model.bin)") from None
    if hasattr(module.config, "use_cache"):
        module.config.use_cache = False  # a plain forward: no key/value cache among the outputs
    module.eval()
    params = inspect.signature(module.forward).parameters
    # GPT-2's forward takes token_type_ids too, but adds their *word* embeddings: only models
    # with a token-type embedding (type_vocab_size, BERT-like) get them.
    typed = "token_type_ids" in params and int(getattr(module.config, "type_vocab_size", 0) or 0) > 0
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if typed else [])
    if causal:  # forward(input_ids, attention_mask[, token_type_ids]) -> {"logits"}: no int/cache arguments traced
        module = plain_forward(module, names, {"use_cache": False, "return_dict": True},
                              lambda out: {"logits": out.logits})
    vocab = int(getattr(module.config, "vocab_size", 1000) or 1000)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, min(vocab, 1000), (2, 16), generator=g, dtype=torch.int64),
        "attention_mask": torch.ones(2, 16, dtype=torch.int64),
        "token_type_ids": torch.zeros(2, 16, dtype=torch.int64),
    }
    example = {n: inputs[n] for n in names}
    dynamic = tuple(DynamicAxis(n, a, label) for n in names for a, label in ((0, "batch"), (1, "sequence")))
    return TorchModel(module, example, "hf", f"hf:{path.resolve().name}", dynamic, (path,))


#: Non-tensor arguments passed to every diffusers model (besides ``return_dict=False``).
_DIFFUSERS_FIXED = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
#: Largest latent side of the derived example inputs (a real model's ``sample_size`` is 64-128).
_DIFFUSERS_MAX_SIDE = 32


def _tensor_params(forward: Any) -> list[str]:
    """Parameters of a diffusers ``forward`` annotated as a (optional) tensor, in order."""
    names = []
    for p in inspect.signature(forward).parameters.values():
        text = str(p.annotation)
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _DIFFUSERS_FIXED or p.name == "return_dict":
            continue
        if "Tensor" in text and not any(w in text for w in ("list", "tuple", "dict", "List", "Tuple", "Dict")):
            names.append(p.name)
    return names


def diffusers_example_inputs(module: Any, *, batch: int = 2, text_tokens: int = 8) -> dict[str, Any]:
    """Example inputs of a diffusers transformer, derived from its config and ``forward``.

    For each tensor parameter of ``forward`` that the config can size (others are left out):

    - ``hidden_states``: ``(batch, in_channels, S, S)`` with ``S = min(sample_size, 32)``
      rounded down to a multiple of ``patch_size``; a model without ``sample_size`` whose
      forward takes ``img_ids`` (Flux) gets packed tokens ``(batch, 16, in_channels)``.
    - ``encoder_hidden_states``: ``(batch, 8, D)``, D = ``joint_attention_dim``,
      ``caption_channels`` or ``cross_attention_dim`` (the first the config has).
    - ``pooled_projections``: ``(batch, pooled_projection_dim)``; ``timestep``: ``(batch,)``
      floats in [0, 1000) ([0, 1) for Flux, which scales by 1000 itself; int64 when the model
      embeds classes); ``class_labels``:
      ``(batch,)`` in [0, num_embeds_ada_norm); ``guidance``: ``(batch,)`` when
      ``guidance_embeds``; ``img_ids``/``txt_ids``: 2-D ``(tokens, 3)`` position ids (no
      batch axis, diffusers' current Flux API).

    Floats come from a generator seeded with 0. Raises ModelError when ``hidden_states``
    cannot be sized (pass ``--input`` then).
    """
    import torch

    cfg = dict(module.config)
    params = getattr(type(module), "export_inputs", None) or _tensor_params(type(module).forward)
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    channels = cfg.get("in_channels")
    if channels is None or "hidden_states" not in params:
        raise ModelError(f"cannot derive example inputs for {type(module).__name__}: its config has no in_channels "
                         "or its forward no hidden_states", hint="pass every input with --input NAME:SHAPE[:DTYPE]")
    tokens = 16
    if cfg.get("sample_size") is None and "img_ids" in params:
        out["hidden_states"] = torch.randn(batch, tokens, channels, generator=g)
    else:
        sample = cfg.get("sample_size") or _DIFFUSERS_MAX_SIDE
        sample = sample[0] if isinstance(sample, list | tuple) else sample
        patch = int(cfg.get("patch_size") or 1)
        side = max(patch, min(int(sample), _DIFFUSERS_MAX_SIDE) // patch * patch)
        out["hidden_states"] = torch.randn(batch, channels, side, side, generator=g)
    text_dim = next((cfg[k] for k in ("joint_attention_dim", "caption_channels", "cross_attention_dim") if cfg.get(k)), None)
    if "encoder_hidden_states" in params and text_dim:
        out["encoder_hidden_states"] = torch.randn(batch, text_tokens, int(text_dim), generator=g)
    if "pooled_projections" in params and cfg.get("pooled_projection_dim"):
        out["pooled_projections"] = torch.randn(batch, int(cfg["pooled_projection_dim"]), generator=g)
    classes = cfg.get("num_embeds_ada_norm") if "class_labels" in params else None
    if "timestep" in params:
        scale = 1.0 if "img_ids" in params else 1000.0  # Flux multiplies its timestep by 1000 itself
        out["timestep"] = (torch.randint(0, 1000, (batch,), generator=g) if classes
                           else torch.rand(batch, generator=g) * scale)
    if classes:
        out["class_labels"] = torch.randint(0, int(classes), (batch,), generator=g)
    if "guidance" in params and cfg.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5)
    if "img_ids" in params and out["hidden_states"].dim() == 3:
        side = int(math.isqrt(tokens))
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        out["img_ids"] = torch.stack([torch.zeros(tokens), rows.flatten().float(), cols.flatten().float()], dim=1)
    if "txt_ids" in params:
        out["txt_ids"] = torch.zeros(text_tokens, 3)
    return out


def plain_forward(module: Any, names: Sequence[str], fixed: Mapping[str, Any], pick: Callable[[Any], Any]) -> Any:
    """Replace ``module``'s class (in place) by a subclass with a plain ``forward(*names)``.

    The new ``forward`` takes ``names`` (all optional, by name or position), calls the
    original with the given ones plus ``fixed`` (non-tensor arguments such as
    ``return_dict=False``) and returns ``pick(output)``. The class keeps its name and module
    paths are unchanged (``transformer_blocks.0``); it lists ``names`` in ``export_inputs``.
    """
    base = type(module)
    original = base.forward
    names = tuple(names)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = dict(zip(names, args, strict=False))  # fewer positional args than names is fine
        bound.update(kwargs)
        return pick(original(self, **{k: v for k, v in bound.items() if v is not None}, **fixed))

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names])
    forward.__doc__ = f"{base.__name__}.forward({', '.join(names)}) with {', '.join(f'{k}=...' for k in fixed)}."
    module.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                                     "export_inputs": names})
    return module


def diffusers_for_export(module: Any) -> Any:
    """Give a diffusers model a plain ``forward``: tensors in by name, the sample tensor out.

    :func:`plain_forward` over the tensor parameters of the original (:func:`_tensor_params`),
    called with ``return_dict=False`` (and ``added_cond_kwargs`` of no extra conditions
    where the model takes it), returning the first element.
    """
    original = type(module).forward
    takes = set(inspect.signature(original).parameters)
    fixed = {**{k: v for k, v in _DIFFUSERS_FIXED.items() if k in takes}, "return_dict": False}
    return plain_forward(module, _tensor_params(original), fixed, lambda out: out[0] if isinstance(out, tuple) else out)


def _load_diffusers(spec: str, *, verbose: bool) -> TorchModel:
    """``diffusers:FOLDER``: a model saved with diffusers' ``save_pretrained`` (config.json with ``_class_name``)."""
    import json

    path = Path(spec.removeprefix("diffusers:"))
    hint = "diffusers: takes a folder written by a diffusers model's save_pretrained (config.json with _class_name)"
    config_path = path / "config.json"
    if not config_path.is_file():
        what = "diffusers model folder not found:" if not path.is_dir() else "no config.json in diffusers model folder"
        raise ModelError(f"{what} {path}", hint=hint)
    try:
        class_name = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, OSError, AttributeError) as exc:
        raise ModelError(f"{config_path.name} in {path.name} is not a JSON object: {_first_line(exc)}", hint=hint) from None
    if not isinstance(class_name, str) or not class_name:
        raise ModelError(f"{config_path.name} in {path.name} has no _class_name", hint=hint)
    with _hub_offline():  # huggingface_hub reads HF_HUB_OFFLINE when first imported
        try:
            import diffusers
        except ImportError:
            raise MissingDependencyError("diffusers", purpose="diffusers: models", extra="diffusers") from None
        cls = getattr(diffusers, class_name, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
            raise ModelError(f"{path.name}: _class_name {class_name!r} is not a diffusers model class "
                             f"(diffusers {diffusers.__version__})", hint=hint)
        try:
            with quiet(not verbose):
                module = cls.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ModelError(f"cannot load the diffusers model in {path.name}: {_first_line(exc)}",
                             hint="the folder needs config.json and the weights "
                                  "(diffusion_pytorch_model.safetensors)") from None
    module = diffusers_for_export(module.eval())
    example = diffusers_example_inputs(module)
    return TorchModel(module, example, "diffusers", f"diffusers:{path.resolve().name}", (), (path,))


def _load_callable(spec: str, kind: str) -> TorchModel:
    import torch

    target, _, attr = spec.rpartition(":")
    if kind == "file":
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}", hint="MODEL is path/to/file.py:callable; check the path")
        mod = _import_file(path)
        name, files = f"{path.name}:{attr}", (path,)
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as exc:
            raise ModelError(f"cannot import module {target!r} (MODEL {spec}): {_first_line(exc)}",
                             hint="install it or put its folder on PYTHONPATH, or pass path/to/file.py:callable") from None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # user code: SystemExit too
            raise ModelError(f"importing {target!r} failed: {_user_exception(exc)}",
                             hint="fix the error in the module") from None
        name, files = spec, ()
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = path.name if kind == "file" else target
            raise ModelError(f"{where} has no attribute {attr!r}",
                             hint="MODEL is module:callable where the callable returns an nn.Module") from None
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        result: Any = obj
    elif callable(obj):
        try:
            result = obj()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # user code: SystemExit too
            raise ModelError(f"calling {attr}() failed: {_user_exception(exc)}",
                             hint="the callable must build the model without arguments") from None
    else:
        raise ModelError(f"{attr} in {name.rpartition(':')[0]} is a {type(obj).__name__}, not a callable",
                         hint="MODEL is module:callable where the callable returns an nn.Module")
    example = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        result, example = result
        example = _check_example_inputs(example, f"{attr}()")
    if not isinstance(result, torch.nn.Module):
        raise ModelError(f"{attr}() returned {type(result).__name__}, not a torch.nn.Module",
                         hint="return an nn.Module, or a tuple (module, example_inputs)")
    return TorchModel(result.eval(), example, kind, name, (), files)


def _import_file(path: Path) -> Any:
    mod_name = "_compress_model_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path}: not a Python file", hint="MODEL is path/to/file.py:callable")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        sys.modules.pop(mod_name, None)
        raise
    except BaseException as exc:  # user code: SystemExit too
        sys.modules.pop(mod_name, None)
        raise ModelError(f"importing {path.name} failed: {_user_exception(exc)}",
                         hint="fix the error in the file") from None
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _check_example_inputs(example: Any, where: str) -> tuple[Any, ...] | dict[str, Any]:
    import torch

    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, Mapping):
        items = dict(example)
        bad = [k for k, v in items.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    elif isinstance(example, tuple | list):
        items = tuple(example)
        bad = [str(i) for i, v in enumerate(items) if not isinstance(v, torch.Tensor)]
    else:
        bad, items = ["?"], ()
    if bad or not items:
        raise ModelError(f"the example inputs of {where} must be a tuple of tensors or a dict name -> tensor "
                         f"(got {type(example).__name__})", hint="return (module, (tensor, ...)) or (module, {'x': tensor})")
    return items


def _load_weights(module: Any, path: Path) -> None:
    import torch

    if not path.is_file():
        raise ModelError(f"weights file not found: {path}", hint="check the --weights path")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsafe is not None:
            raise ModelError(f"--weights {path} holds a {unsafe.group(1)}, which torch.load(weights_only=True) refuses",
                             hint="save only the state dict: torch.save(model.state_dict(), path)") from None
        raise ModelError(f"--weights {path} is not a PyTorch checkpoint (torch.load fails with {type(exc).__name__})",
                         hint="pass a file written by torch.save(model.state_dict(), path)") from None
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), Mapping)), state)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--weights {path} does not hold a state dict (name -> tensor)",
                         hint="pass a file written by torch.save(model.state_dict(), path)")
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = [f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ModelError(f"--weights {path} does not fit the model: {'; '.join(parts)}",
                         hint="the checkpoint must be this model's state_dict (loaded strictly)")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), _first_line(exc))
        raise ModelError(f"--weights {path} does not fit the model: {detail}",
                         hint="the checkpoint must be this model's state_dict (loaded strictly)") from None


def _user_exception(exc: BaseException) -> str:
    """``TYPE: first line`` of an exception raised by user code (``SystemExit(0)`` says it exited)."""
    if isinstance(exc, SystemExit):
        return f"it raised SystemExit({exc.code!r}) (called sys.exit or exit) instead of returning"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return onnx_io.strip_host_paths(text.splitlines()[0]) if text else type(exc).__name__


def make_example_inputs(specs: Sequence[InputSpec], *, seed: int = 0) -> dict[str, Any]:
    """Tensors for ``specs``, name -> tensor, in order.

    Floats are standard normal from a generator seeded with ``seed + position``; int inputs
    whose name contains ``mask`` are ones, ``*ids`` inputs (not ``token_type_ids``) are
    integers in [0, 100), other ints zeros; bools are True.
    """
    torch = _import_torch()
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"--input {dup!r} is given twice", hint="name each input once")
    out: dict[str, Any] = {}
    for i, s in enumerate(specs):
        dtype = getattr(torch, s.dtype)
        g = torch.Generator().manual_seed(seed + i)
        if dtype.is_floating_point:
            out[s.name] = torch.randn(s.shape, generator=g).to(dtype)
        elif dtype == torch.bool or "mask" in s.name:
            out[s.name] = torch.ones(s.shape, dtype=dtype)
        elif s.name.endswith("ids") and "type" not in s.name:
            out[s.name] = torch.randint(0, 100, s.shape, generator=g).to(dtype)
        else:
            out[s.name] = torch.zeros(s.shape, dtype=dtype)
    return out


# --------------------------------------------------------------------------- block containers


def find_block_containers(module: Any) -> list[str]:
    """Block containers of a torch module, found from its module tree.

    The longest ``nn.ModuleList``/``nn.Sequential`` (ties: the first) whose >= 2 children
    all have the same type, plus every other such container with that child type, or with a
    child type the model declares as a repeated block (``_repeated_blocks`` or
    ``_no_split_modules`` of diffusers/transformers models: Flux's double- and single-stream
    blocks), that is not nested in (or around) one already chosen (``layer1``..``layer4`` of
    a ResNet). Returns module paths (``encoder.layer``); empty when there is none.
    """
    torch = _import_torch()
    found: list[tuple[str, type, int]] = []
    for name, m in module.named_modules():
        if not name or not isinstance(m, torch.nn.ModuleList | torch.nn.Sequential):
            continue
        children = list(m.children())
        if len(children) >= 2 and len({type(c) for c in children}) == 1:
            found.append((name, type(children[0]), len(children)))
    if not found:
        return []
    best = max(found, key=lambda f: f[2])  # max keeps the first of equals
    declared = {str(n) for attr in ("_repeated_blocks", "_no_split_modules") for n in (getattr(module, attr, None) or ())}
    chosen = [best[0]]
    for name, cls, _ in found:
        nested = any(name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in chosen)
        if (cls is best[1] or (best[1].__name__ in declared and cls.__name__ in declared)) and not nested:
            chosen.append(name)
    return chosen


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class _Call:
    """How the module is called: positional args, keyword args and the input names."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    names: tuple[str, ...]

    def tensors(self) -> dict[str, Any]:
        return dict(zip(self.names, self.args, strict=True)) if self.args else dict(self.kwargs)


def _forward_params(module: Any) -> list[str] | None:
    """Names of ``forward``'s leading named parameters; None when they cannot be known."""
    torch = _import_torch()
    if isinstance(module, torch.export.ExportedProgram):
        return list(module.graph_signature.user_inputs)
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            break
        names.append(p.name)
    return names


def _bind(module: Any, example_inputs: tuple[Any, ...] | Mapping[str, Any]) -> _Call:
    torch = _import_torch()
    checked = _check_example_inputs(example_inputs, "export_model")
    params = _forward_params(module) or []
    if isinstance(checked, dict):
        names = tuple(checked)
        if all(n in params for n in names) and not isinstance(module, torch.export.ExportedProgram):
            return _Call((), checked, names)
        return _Call(tuple(checked.values()), {}, names)
    names = tuple(params[i] if i < len(params) else f"input_{i}" for i in range(len(checked)))
    return _Call(tuple(checked), {}, names)


def _check_dynamic(dynamic: Sequence[DynamicAxis], call: _Call) -> None:
    tensors = call.tensors()
    for d in dynamic:
        if d.name not in tensors:
            raise ConfigError(f"--dynamic {d.name}:{d.axis}: no input named {d.name!r}; inputs: {', '.join(call.names)}",
                              hint="name an input of the model (see --input)")
        rank = tensors[d.name].dim()
        if d.axis >= rank:
            raise ConfigError(f"--dynamic {d.name}:{d.axis}: input {d.name!r} has {rank} axes",
                              hint=f"use an axis from 0 to {rank - 1}")


def _leaves(obj: Any) -> list[tuple[str, Any]]:
    """Output tensors of torch, with names from their pytree path (``last_hidden_state``, ``output_0``)."""
    import torch
    from torch.utils import _pytree

    flat, _ = _pytree.tree_flatten_with_path(obj)
    out: list[tuple[str, Any]] = []
    for path, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        name = "_".join(parts) if parts else "output"
        if name[:1].isdigit():
            name = "output_" + name
        name = re.sub(r"[^\w.]", "_", name)
        while name in {n for n, _ in out}:
            name += "_"
        out.append((name, leaf))
    return out


EXPORTERS: Registry[Callable[[Any, _Call, ExportConfig, Sequence[str]], onnx.ModelProto]] = Registry(
    "exporter", flag="--exporter")


@EXPORTERS.register("dynamo")
def _export_dynamo(module: Any, call: _Call, config: ExportConfig, output_names: Sequence[str]) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)``; module paths land in node metadata."""
    import torch

    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise MissingDependencyError("onnxscript", purpose="the dynamo exporter", extra="export") from None
    dynamic_shapes: Any = None
    if config.dynamic and not isinstance(module, torch.export.ExportedProgram):
        dims = {label: torch.export.Dim(label) for label in dict.fromkeys(d.label for d in config.dynamic)}
        per_input: dict[str, dict[int, Any]] = {}
        for d in config.dynamic:
            per_input.setdefault(d.name, {})[d.axis] = dims[d.label]
        if call.kwargs:
            dynamic_shapes = {n: per_input.get(n) for n in call.kwargs}
        else:
            dynamic_shapes = tuple(per_input.get(n) for n in call.names)
    program = torch.onnx.export(
        module, call.args, None, kwargs=dict(call.kwargs) or None, dynamo=True, opset_version=config.opset,
        input_names=list(call.names) if call.args else None, output_names=list(output_names),
        dynamic_shapes=dynamic_shapes, verbose=False,
    )
    path = _export_path()
    program.save(str(path), external_data=True)  # streams the weights to path.data; no 2 GB protobuf
    del program
    return onnx_io.load_model(path)


def _export_path() -> Path:
    """A fresh ``model.onnx`` path in this process's temporary folder (removed at exit)."""
    from compress.external import temp_folder

    return Path(tempfile.mkdtemp(prefix="export-", dir=temp_folder())) / "model.onnx"


@EXPORTERS.register("torchscript")
def _export_torchscript(module: Any, call: _Call, config: ExportConfig, output_names: Sequence[str]) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=False)``; module paths land in node names (``/blocks.0/...``)."""
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        raise ConfigError("a saved torch.export program (.pt2) can only be exported with --exporter dynamo",
                          hint="drop --exporter torchscript")
    args, names = call.args, call.names
    if call.kwargs:  # TorchScript traces positional arguments: fill gaps with the defaults
        sig = inspect.signature(module.forward).parameters
        order = list(sig)
        last = max(order.index(n) for n in call.kwargs)
        args = tuple(call.kwargs.get(p, sig[p].default) for p in order[: last + 1])
        names = tuple(p for p in order[: last + 1] if p in call.kwargs)
    axes = {}
    for d in config.dynamic:
        axes.setdefault(d.name, {})[d.axis] = d.label
    path = _export_path()  # above 2 GB the TorchScript exporter writes the weights as files beside it
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=config.opset, input_names=list(names),
                      output_names=list(output_names), dynamic_axes=axes or None)
    return onnx_io.load_model(path)


def export_error(exc: BaseException, config: ExportConfig) -> ExportError:
    """An ExportError for an exception raised by ``torch.onnx.export``, naming the op when it can.

    Only a dynamo failure suggests the other exporter (TorchScript): the two exporters' hints
    never send the user back and forth. A key/value cache among the outputs (``DynamicCache``)
    gets its own hint (``use_cache=False``).
    """
    text = _ANSI.sub("", str(exc))
    op = next((m.group(1) for p in _OP_PATTERNS if (m := p.search(text))), None)
    fallback = "try --exporter torchscript or a newer --opset" if config.exporter == "dynamo" else "try a newer --opset"
    if op is not None:
        return ExportError(
            f"the {config.exporter} exporter cannot convert operator {op} to ONNX (opset {config.opset})",
            hint=f"{fallback}, or replace {op} in the model",
        )
    summary = text.split("## Exception summary", 1)[-1]
    first = next((ln.strip() for ln in summary.splitlines() if ln.strip()), type(exc).__name__)
    first = re.sub(r"^<class '[\w.]+'>: ", "", first)
    if "DynamicCache" in text or "past_key_values" in text:
        hint = ("the model returns a key/value cache: call it with use_cache=False and return_dict=False "
                "(hf:FOLDER does this for you); -v shows the exporter's own log")
    else:
        hint = f"{fallback}; -v shows the exporter's own log"
    return ExportError(f"torch.onnx.export ({config.exporter}) failed: {onnx_io.strip_host_paths(first)[:400]}", hint=hint)


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx_io.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails onnx.checker: {_first_line(exc)}",
                          hint="try the other --exporter or another --opset; nothing was written") from None


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def compare(name: str, got: np.ndarray, want: np.ndarray, config: ExportConfig) -> OutputParity:
    """Compare one ONNX output with torch's (see :class:`OutputParity` for the numbers)."""
    if got.shape != want.shape:
        return OutputParity(name, tuple(want.shape), str(want.dtype), math.inf, math.inf, 0.0, False)
    a = got.astype(np.float64).ravel()
    b = want.astype(np.float64).ravel()
    if a.size == 0:
        return OutputParity(name, tuple(want.shape), str(want.dtype), 0.0, 0.0, 1.0, True)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    same_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(same_nan, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max())
    big = np.abs(b) > config.atol
    max_rel = float((diff[big] / np.abs(b[big])).max()) if big.any() else 0.0
    fa, fb = np.nan_to_num(a, posinf=0.0, neginf=0.0), np.nan_to_num(b, posinf=0.0, neginf=0.0)
    na, nb = float(np.linalg.norm(fa)), float(np.linalg.norm(fb))
    cosine = 1.0 if na == 0 and nb == 0 else (float(fa @ fb / (na * nb)) if na and nb else 0.0)
    ok = bool(np.all(diff <= config.atol + config.rtol * np.abs(np.nan_to_num(b)))) and cosine >= config.min_cosine
    return OutputParity(name, tuple(want.shape), str(want.dtype), max_abs, max_rel, cosine, ok)


def _run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from compress.runtime import make_session

    try:
        sess = make_session(model)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {_first_line(exc)}",
                          hint="try the other --exporter or another --opset; nothing was written") from None
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ExportError(f"the exported model has input {missing[0]!r} that torch was not given",
                          hint="pass every input with --input")
    outputs = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(outputs, {n: feeds[n] for n in names})
    except Exception as exc:
        raise ExportError(f"ONNX Runtime fails on the exported model: {_first_line(exc)}",
                          hint="try the other --exporter or another --opset; nothing was written") from None
    return dict(zip(outputs, values, strict=True))


def _specialized(model: onnx.ModelProto, dynamic: Sequence[DynamicAxis]) -> list[str]:
    inputs = {i.name: i for i in model.graph.input}
    notes = []
    for d in dynamic:
        vi = inputs.get(d.name)
        if vi is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        if d.axis < len(dims) and dims[d.axis].HasField("dim_value"):
            notes.append(f"--dynamic {d.name}:{d.axis}: the exporter fixed this axis to {dims[d.axis].dim_value} "
                         "(the model's code needs that size)")
    return notes


def _rename_dims(model: onnx.ModelProto, dynamic: Sequence[DynamicAxis]) -> None:
    """Give dynamic axes their labels where the exporter named them otherwise (``s77`` -> ``batch``).

    Renames the symbol everywhere it appears as a whole dim (inputs, outputs, value_info) of
    ``model``, which must be a model this module owns (it is modified in place).
    """
    inputs = {i.name: i for i in model.graph.input}
    rename: dict[str, str] = {}
    for d in dynamic:
        vi = inputs.get(d.name)
        dims = vi.type.tensor_type.shape.dim if vi is not None else []
        if d.axis < len(dims) and dims[d.axis].dim_param and dims[d.axis].dim_param != d.label:
            rename.setdefault(dims[d.axis].dim_param, d.label)
    if not rename:
        return
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _versions(exporter: str) -> dict[str, str]:
    import onnxruntime
    import torch

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if exporter == "dynamo":
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    return versions


def _torch_params(module: Any) -> int:
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        return sum(int(module.state_dict[n].numel()) for n in module.graph_signature.parameters if n in module.state_dict)
    return sum(int(p.numel()) for p in module.parameters())


def _block_map(model: onnx.ModelProto, module: Any, config: ExportConfig) -> BlockMap:
    """Blocks of the exported model: --blocks, else containers found in the module tree."""
    import torch

    if config.blocks:
        return find_blocks(model, spec=config.blocks)
    spec = None if isinstance(module, torch.export.ExportedProgram) else ",".join(find_block_containers(module)) or None
    for attempt in dict.fromkeys((spec, None)):
        try:
            found = find_blocks(model, spec=attempt)
        except (BlockError, ImportError) as exc:
            logger.debug("block detection with spec %r failed: %s", attempt, exc)
            continue
        # containers found in the module tree: the paths still come from the graph
        return replace(found, source=node_module_paths(model)[2] or found.source) if attempt else found
    logger.warning("warning: no repeated blocks found in the model; pass --blocks CONTAINER to name them")
    return BlockMap((), "none", ())


def export_model(
    module: Any, example_inputs: tuple[Any, ...] | Mapping[str, Any], config: ExportConfig
) -> tuple[onnx.ModelProto, BlockMap, ExportReport]:
    """Export ``module`` to ONNX, check it against torch, and find its blocks. Writes no files.

    The module runs in eval mode (its training flag is restored afterwards) and is not
    otherwise changed. Inputs passed as a dict go in as keyword arguments when every name
    is a parameter of ``forward``, else positionally in dict order; graph inputs take these
    names (tuple inputs take ``forward``'s parameter names). Outputs are named after torch's
    output structure (``output``, ``output_0``, dict keys). Host paths are stripped from the
    model (:func:`compress.onnx_io.strip_model_paths`).

    Args:
        module: an ``nn.Module`` or ``torch.export.ExportedProgram``.
        example_inputs: tuple of tensors, or dict name -> tensor.
        config: exporter, opset, dynamic axes, block containers, parity tolerances.

    Returns:
        ``(model, block_map, report)``.

    Raises:
        ConfigError: a dynamic axis names no input or axis.
        ExportError: the exporter fails (naming the op when it can), the model fails
            ``onnx.checker`` or ONNX Runtime, or an output differs from torch beyond the
            tolerances (``|onnx - torch| > atol + rtol * |torch|`` anywhere, or cosine < min_cosine).
        BlockError: ``config.blocks`` names no container of the model.
    """
    torch = _import_torch()
    call = _bind(module, example_inputs)
    _check_dynamic(config.dynamic, call)
    is_program = isinstance(module, torch.export.ExportedProgram)
    runner = module.module() if is_program else module
    was_training = None if is_program else module.training
    try:
        if not is_program:
            module.eval()
        try:
            with torch.no_grad():
                reference = _leaves(runner(*call.args, **call.kwargs))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the user's forward: SystemExit too
            raise ModelError(f"running the model on the example inputs failed: {_user_exception(exc)}",
                             hint="check the example inputs (--input NAME:SHAPE[:DTYPE]) against forward's arguments") from None
        if not reference:
            raise ExportError("the model returns no tensors", hint="forward must return a tensor, or a tuple/dict of tensors")
        output_names = [n for n, _ in reference]
        logger.info("exporting with the %s exporter (opset %d)...", config.exporter, config.opset)
        start = time.perf_counter()
        try:
            with quiet(not config.verbose), torch.no_grad():
                raw = EXPORTERS.get(config.exporter)(module, call, config, output_names)
        except (ConfigError, MissingDependencyError, KeyboardInterrupt):
            raise
        except (Exception, SystemExit) as exc:  # SystemExit: the user's forward exited while being traced
            raise export_error(exc, config) from None
        export_s = time.perf_counter() - start
    finally:
        if was_training is not None:
            module.train(was_training)
    model = onnx_io.strip_model_paths(raw)
    graph_outputs = [o.name for o in model.graph.output]
    if len(graph_outputs) != len(reference):
        raise ExportError(f"the exported model has {len(graph_outputs)} outputs but torch returns {len(reference)} tensors",
                          hint="return a tensor or a flat tuple/dict of tensors from forward")
    _rename_dims(model, config.dynamic)
    notes = _specialized(model, config.dynamic)
    for note in notes:
        logger.warning("warning: %s", note)

    logger.info("checking the model and comparing ONNX Runtime with torch...")
    start = time.perf_counter()
    feeds = {n: _to_numpy(t) for n, t in call.tensors().items()}
    _check(model)
    got = _run_ort(model, feeds)
    parity = tuple(compare(n, got[g], _to_numpy(t), config)
                   for g, (n, t) in zip(graph_outputs, reference, strict=True))
    parity_s = time.perf_counter() - start
    bad = next((p for p in parity if not p.ok), None)
    if bad is not None:
        raise ExportError(
            f"ONNX Runtime output {bad.name!r} differs from torch: max abs error {bad.max_abs_error:.3g}, "
            f"max rel error {bad.max_rel_error:.3g}, cosine {bad.cosine:.6f} "
            f"(allowed: atol {config.atol:g} + rtol {config.rtol:g}, cosine >= {config.min_cosine:g})",
            hint="nothing was written; try the other --exporter, or loosen --atol/--rtol/--min-cosine if the "
                 "difference is expected (e.g. float16)",
        )
    block_map = _block_map(model, module, config)
    report = ExportReport(
        exporter=config.exporter, opset=config.opset, versions=_versions(config.exporter),
        inputs=tuple(InputSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in call.tensors().items()),
        outputs=tuple(graph_outputs), dynamic=config.dynamic, parity=parity,
        tolerance={"atol": config.atol, "rtol": config.rtol, "min_cosine": config.min_cosine},
        export_s=export_s, parity_s=parity_s, nodes=len(model.graph.node),
        params=sum(int(np.prod(t.dims)) for t in model.graph.initializer), torch_params=_torch_params(module),
        warnings=tuple(notes),
    )
    return model, block_map, report
