"""PyTorch -> ONNX export with a parity check against torch and a block map.

:func:`load_torch_model` turns a ``MODEL`` string into a torch module (and, where the
source provides them, example inputs); :func:`export` exports it with the dynamo
(``torch.onnx.export(dynamo=True)``) or TorchScript exporter, checks the result with
``onnx.checker``, runs it in ONNX Runtime (CPU) on the example inputs, compares every
output with torch, and finds the model's blocks. It returns the model with its block map
(a :class:`~compress.blocks.MappedModel`) and an :class:`ExportReport`; it writes no files (the
CLI does, through :mod:`compress.onnx_io`).

Submodules: :mod:`~compress.export.config` (configs and reports), :mod:`~compress.export.loaders`
(MODEL strings, ``.pt2`` safety, weights), :mod:`~compress.export.hf` (transformers and
diffusers folders), :mod:`~compress.export.exporters` (the exporters, :func:`quiet`),
:mod:`~compress.export.parity` (ONNX Runtime vs torch), :mod:`~compress.export.containers`
(block containers), :mod:`~compress.export.messages` (exception text),
:mod:`~compress.export.gradnorm` (each block's GradNorm in torch, SGLP's importance, for the
block map: ``compress export --calib``). This module holds
:func:`export` (the stage) and re-exports the public names.

torch, onnxscript and transformers are imported inside the functions that use them. The
library leaves the process as it found it: environment variables, logger levels, warning
filters, the working directory and file descriptors 1 and 2 are restored.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from compress import onnx_io
from compress.blocks import MappedModel
from compress.errors import ConfigError, ExportError, MissingDependencyError, ModelError
from compress.export.config import (
    DEFAULT_OPSET,
    DTYPES,
    EXPORTERS,
    MIN_DYNAMO_OPSET,
    DynamicAxis,
    ExportConfig,
    ExportReport,
    InputSpec,
    OutputParity,
    TorchModel,
    _Call,
)
from compress.export.containers import _block_map, find_block_containers
from compress.export.exporters import _environ_kept, _rename_dims, _specialized, quiet
from compress.export.gradnorm import GradNormResult, Hutchinson, ModuleIO, block_gradnorms
from compress.export.gradnorm import output_leaves as _leaves
from compress.export.hf import diffusers_example_inputs, diffusers_for_export, is_causal_lm, plain_forward
from compress.export.loaders import (
    _check_example_inputs,
    check_pt2_archive,
    load_torch_model,
    make_example_inputs,
    model_files,
)
from compress.export.messages import _import_torch, _user_exception, export_error
from compress.export.parity import _to_numpy, check_parity, compare
from compress.log import logger

__all__ = [
    "DEFAULT_OPSET",
    "DTYPES",
    "EXPORTERS",
    "MIN_DYNAMO_OPSET",
    "DynamicAxis",
    "ExportConfig",
    "ExportReport",
    "GradNormResult",
    "Hutchinson",
    "InputSpec",
    "ModuleIO",
    "OutputParity",
    "TorchModel",
    "block_gradnorms",
    "check_parity",
    "check_pt2_archive",
    "compare",
    "diffusers_example_inputs",
    "diffusers_for_export",
    "export_error",
    "export",
    "find_block_containers",
    "is_causal_lm",
    "load_torch_model",
    "make_example_inputs",
    "model_files",
    "plain_forward",
    "quiet",
]


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
    """How to call ``module`` on ``example_inputs``: by keyword when every dict key is a ``forward`` parameter."""
    torch = _import_torch()
    checked = _check_example_inputs(example_inputs, "export")
    params = _forward_params(module) or []
    if isinstance(checked, dict):
        names = tuple(checked)
        if all(n in params for n in names) and not isinstance(module, torch.export.ExportedProgram):
            return _Call((), checked, names)
        return _Call(tuple(checked.values()), {}, names)
    names = tuple(params[i] if i < len(params) else f"input_{i}" for i in range(len(checked)))
    return _Call(tuple(checked), {}, names)


def _check_dynamic(dynamic: Sequence[DynamicAxis], call: _Call) -> None:
    """ConfigError for a dynamic axis that names no input, or an axis the input does not have."""
    tensors = call.tensors()
    for d in dynamic:
        if d.name not in tensors:
            raise ConfigError(f"--dynamic {d.name}:{d.axis}: no input named {d.name!r}; inputs: {', '.join(call.names)}",
                              hint="name an input of the model (see --input)")
        rank = tensors[d.name].dim()
        if d.axis >= rank:
            raise ConfigError(f"--dynamic {d.name}:{d.axis}: input {d.name!r} has {rank} axes",
                              hint=f"use an axis from 0 to {rank - 1}")


def _versions(exporter: str) -> dict[str, str]:
    """Versions of torch, onnx, onnxruntime (and onnxscript with dynamo) for the report."""
    import onnxruntime
    import torch

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if exporter == "dynamo":
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    return versions


def _torch_params(module: Any) -> int:
    """Number of parameter elements of the torch module or program."""
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        return sum(int(module.state_dict[n].numel()) for n in module.graph_signature.parameters if n in module.state_dict)
    return sum(int(p.numel()) for p in module.parameters())



def export(
    model: Any, config: ExportConfig, *, data: tuple[Any, ...] | Mapping[str, Any],
) -> tuple[MappedModel, ExportReport]:
    """Export ``module`` to ONNX, check it against torch, and find its blocks. Writes no files.

    The module runs in eval mode (its training flag is restored afterwards) and is not
    otherwise changed. Inputs passed as a dict go in as keyword arguments when every name
    is a parameter of ``forward``, else positionally in dict order; graph inputs take these
    names (tuple inputs take ``forward``'s parameter names). Outputs are named after torch's
    output structure (``output``, ``output_0``, dict keys). Host paths are stripped from the
    model (:func:`compress.onnx_io.strip_model_paths`). The process is left as it was found:
    ``os.environ``, the exporters' logger levels, warning filters and descriptors 1 and 2.

    Args:
        model: the torch model, an ``nn.Module`` or ``torch.export.ExportedProgram``.
        config: exporter, opset, dynamic axes, block containers, parity tolerances.
        data: the example inputs: a tuple of tensors, or a dict name -> tensor.

    Returns:
        ``(model with its block map, report)``: the export stage (the shape of :mod:`compress.stage`).

    Raises:
        ConfigError: a dynamic axis names no input or axis.
        ExportError: the exporter fails (naming the op when it can), the model fails
            ``onnx.checker`` or ONNX Runtime, or an output differs from torch beyond the
            tolerances (``|onnx - torch| > atol + rtol * |torch|`` anywhere, or cosine < min_cosine).
        BlockError: ``config.blocks`` names no container of the model.
    """
    torch, module = _import_torch(), model
    call = _bind(module, data)
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
        exporter = EXPORTERS.get(config.exporter)
        with _environ_kept(), quiet(not config.verbose), torch.no_grad():
            try:
                raw = exporter(module, call, config, output_names)
            except (ConfigError, MissingDependencyError, KeyboardInterrupt):
                raise
            except (Exception, SystemExit) as exc:  # translates torch.onnx.export's errors; SystemExit: the user's forward exited while traced
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
    parity = check_parity(model, feeds, reference, graph_outputs, config)
    parity_s = time.perf_counter() - start
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
    return MappedModel(model, block_map), report
