"""``compress build`` as a function: passes, engine or ORT session, latency measurement.

:func:`build` is pure apart from the temporary ONNX files TensorRT's parser reads (written
under this process's temporary folder, tensors streamed as external data). It returns data
(:class:`BuildResult`: the built model and the reports of the passes and the benchmark,
``latency`` being ``latency.json`` without gates); the
glue evaluates the gates (:mod:`compress.gates`) and renders and writes the build folder
(:mod:`compress.reports.build`). Models whose weights stay on
disk (:func:`compress.onnx_io.load_model`) are never serialized whole: passes work one
tensor at a time, sessions come from :func:`compress.runtime.load_session`, and
digests are streamed (:func:`compress.onnx_io.model_digest`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.bench import BenchConfig, Timing
from compress.build.config import (
    BACKENDS,
    CALIBRATION_METHODS,
    INT8_ACTIVATIONS,
    PRECISIONS,
    SPARSITIES,
    SPARSITY_METHODS,
    TARGET_EXIT_CODE,
    BuildConfig,
)
from compress.build.latency import LATENCY_SCHEMA, LatencyReport, PassesReport, compare, measurement
from compress.build.trt import Engine, EngineConfig, ShapeProfile, host_info, trtexec_command, versions
from compress.errors import ConfigError
from compress.log import logger
from compress.onnx_io import has_external_data, model_digest, model_nbytes, save_model


def check_profiles(model: onnx.ModelProto, profiles: tuple[ShapeProfile, ...]) -> None:
    """Every profile names a graph input of ``model`` with its rank; FieldError (field ``profiles``) otherwise."""
    from compress.calibration import model_input_types
    from compress.validate import FieldError

    types = model_input_types(model)
    for p in profiles:
        spec = f"{p.name}:{'/'.join('x'.join(map(str, s)) for s in (p.min, p.opt, p.max))}"
        if p.name not in types:
            raise FieldError("BuildConfig", "shapes", spec,
                             f"the model has no input {p.name!r}; its inputs: {', '.join(types) or 'none'}",
                             example=f"{next(iter(types), 'x')}:1x16/8x128/16x128")
        t = types[p.name]
        if t is None or t.shape is None:
            continue
        shape = t.shape
        if len(shape) != len(p.opt):
            raise FieldError("BuildConfig", "shapes", spec,
                             f"input {p.name!r} has rank {len(shape)} ({t.shape_str()}), the profile rank {len(p.opt)}",
                             example=f"{p.name}:{'x'.join(str(x) if isinstance(x, int) else '1' for x in shape)}")
        for axis, d in enumerate(shape):
            if isinstance(d, int) and not p.min[axis] <= d <= p.max[axis]:
                raise FieldError("BuildConfig", "shapes", spec,
                                 f"input {p.name!r} has a static size {d} on axis {axis} ({t.shape_str()})",
                                 example=f"{p.name}:{'x'.join(str(x) if isinstance(x, int) else '1' for x in shape)}")


@dataclass(frozen=True)
class BuiltModel:
    """What the build stage makes: the ONNX model after the passes and, on TensorRT, its engine.

    ``trtexec``: the equivalent trtexec command line; ``external_data``: the input had
    external data, so the written model gets ``model.onnx.data`` too.
    """

    proto: onnx.ModelProto
    engine: Engine | None
    trtexec: str
    external_data: bool = False


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build` returns (data only; :func:`compress.reports.build.render_build` renders it).

    ``model``: the built model (:func:`benchmark`'s); ``passes``: :func:`run_passes`'s report;
    ``latency``: :func:`benchmark`'s report (``latency.json`` without its gates).
    """

    model: BuiltModel
    passes: PassesReport
    latency: LatencyReport


def benchmark_feed(model: onnx.ModelProto, calib: Any, profiles: tuple[ShapeProfile, ...]) -> tuple[dict[str, np.ndarray], bool]:
    """One input batch to time: the first calibration batch, else random data at the OPT shapes."""
    if calib is not None:
        return dict(next(iter(calib))), bool(getattr(calib, "random", False))
    from compress.calibration import model_input_types, random_calibration

    types = model_input_types(model)
    opt = {p.name: p.opt for p in profiles}
    dims: dict[str, int] = {}
    batch = 1
    for name, t in types.items():
        if t is None or t.shape is None:
            continue
        shape = opt.get(name)
        for axis, d in enumerate(t.shape):
            if axis == 0 and isinstance(d, int) and d > 0:
                batch = d  # a static batch size is the one random data must have
            if isinstance(d, str):
                if shape is None:
                    raise ConfigError(f"input {name!r} has a dynamic dim {d!r}: no shape to benchmark",
                                      hint=f"pass --calib DIR or --shapes {name}:MIN/OPT/MAX")
                if axis == 0:
                    batch = shape[0]
                else:
                    dims[d] = shape[axis]
    calib = random_calibration(model, batches=1, batch_size=batch, dims=dims, seed=0)
    return dict(next(iter(calib))), True


@contextlib.contextmanager
def _trt_input(model: onnx.ModelProto, name: str) -> Iterator[Path]:
    """``model`` written for TensorRT's parser (``parse_from_file``), removed on exit.

    ``name`` and ``name.data`` lie in a folder under this process's temporary folder. The
    tensors are streamed one at a time (external data, relative locations); the model is never
    serialized whole, whatever its size (:func:`compress.onnx_io.model_nbytes`). Does not
    modify ``model``.
    """
    from compress.external import temp_folder

    with tempfile.TemporaryDirectory(prefix="build-", dir=temp_folder()) as tmp:
        path = Path(tmp) / name
        save_model(model, path, external_data=True)
        logger.debug("wrote %s for TensorRT (%d bytes with its data)", name, model_nbytes(model))
        yield path


def _time_ort(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], bench: BenchConfig) -> tuple[Timing, str]:
    from compress.bench import measure
    from compress.runtime import load_session

    sess = load_session(model, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    names = [o.name for o in model.graph.output]
    return measure(lambda: sess.run(names, dict(feed)), bench), sess.get_providers()[0]


def resolve_exclude(model: onnx.ModelProto, entries: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, int]]:
    """``(op types, node names, nodes matched per entry)`` of ``--exclude`` entries.

    An entry is, in this order: an op type of the model (``Softmax``); a node name
    (``/head/Gemm``); a module path or pattern matched against each node's module path (the
    block map's source: dynamo ``name_scopes`` metadata or TorchScript names), component by
    component: ``*`` matches one component, ``**`` any number, other ``fnmatch`` wildcards
    work inside a component, and a module excludes its submodules
    (``encoder.layer.*.output.dense``, ``encoder.layer.5``, ``**.attention.**``); else a
    ``fnmatch`` pattern of node names (``/encoder/*/MatMul``).

    Raises:
        ConfigError: an entry matches nothing, naming it and a few module paths of the model.
    """
    import fnmatch

    from compress.blocks import node_module_paths
    from compress.graph import node_keys

    keys = node_keys(model.graph)
    names = {n.name for n in model.graph.node if n.name}
    optypes = {n.op_type for n in model.graph.node}
    paths, _, _ = node_module_paths(model)
    ops: list[str] = []
    nodes: dict[str, None] = {}
    matched: dict[str, int] = {}

    def match(pattern: list[str], path: list[str]) -> bool:
        if not pattern:
            return True  # a module excludes its submodules
        if pattern[0] == "**":
            return any(match(pattern[1:], path[i:]) for i in range(len(path) + 1))
        return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and match(pattern[1:], path[1:])

    for entry in entries:
        looks_like_op = "/" not in entry and "." not in entry and "_" not in entry and entry[:1].isupper()
        if (entry in optypes or looks_like_op) and entry not in names:
            ops.append(entry)
            matched[entry] = sum(1 for n in model.graph.node if n.op_type == entry)
            continue
        if entry in names:
            nodes[entry] = None
            matched[entry] = 1
            continue
        pattern = entry.split(".")
        hits = [k for k in keys if paths.get(k) and match(pattern, paths[k].split("."))]
        if not hits:
            hits = [k for k in keys if fnmatch.fnmatchcase(k, entry)]
        if not hits:
            known = sorted({p for p in paths.values() if p})
            sample = ", ".join(known[:4]) + (", ..." if len(known) > 4 else "")
            raise ConfigError(f"--exclude {entry}: matches no op type, node name or module path of the model",
                              hint=(f"module paths look like: {sample} ('compress inspect' lists the blocks)" if known
                                    else "use node names or op types as 'compress inspect' or Netron show them"))
        for k in hits:
            nodes[k] = None
        matched[entry] = len(hits)
    return tuple(ops), tuple(nodes), matched


def _apply_passes(model: onnx.ModelProto, config: BuildConfig, calib: Any) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Sparsity first (it edits FP32 weights), then the precision pass; each checked against its input.

    Exclusions (``--exclude``) are resolved by :func:`resolve_exclude`. With a fidelity
    target and real calibration data, each pass meets it or raises FidelityTargetError, whose
    report then lists the passes already run and what the failing one tried.
    """
    from compress.passes import Fp16Config, Int8Config, SparsityConfig, get_pass, measure_fidelity
    from compress.passes.accuracy import FidelityTargetError, TargetConfig, fidelity_of
    from compress.passes.base import pass_options

    ops, nodes, matched = resolve_exclude(model, config.exclude)
    measurable = calib is not None and not getattr(calib, "random", False)
    target = (TargetConfig(fidelity=config.target_fidelity, max_fallback=config.max_fallback,
                           ranking=config.fallback_order)
              if config.target_fidelity is not None and measurable else None)
    steps: list[tuple[str, Any, Any]] = []  # (pass, its config, its calibration data)
    if config.sparsity == "2:4":
        steps.append(("sparsity-2:4", SparsityConfig(exclude_nodes=nodes, method=config.sparsity_method, target=target),
                      calib if measurable else None))
    if config.precision == "fp16":
        steps.append(("fp16", Fp16Config(block_ops=ops, block_nodes=nodes), calib))
    elif config.precision == "int8":
        act = config.int8_activations
        if act == "auto":
            act = "int8" if config.backend == "trt" else "uint8"
        steps.append(("int8", Int8Config(method=config.calibration_method, exclude_nodes=nodes, exclude_ops=ops,
                                         activation_type=act, target=target, smoothquant=config.smoothquant), calib))
    reports: list[dict[str, Any]] = []
    current = model
    for name, cfg, data in steps:
        logger.info("pass %s", name)
        try:
            out, report = get_pass(name)(current, cfg, data=data)
        except FidelityTargetError as exc:
            failed = {"name": name, "config": pass_options(cfg, data), "target": exc.report, "error": exc.message}
            raise FidelityTargetError(exc.message, hint=exc.hint,
                                      report={"passes": reports, "failed": failed, "exclude": matched}) from None
        entry = report.to_dict()
        if config.exclude:
            entry["exclude"] = matched
        if calib is not None:
            entry["fidelity"] = measure_fidelity(current, out, calib)
        if target is None and config.target_fidelity is not None:
            entry.setdefault("warnings", []).append(
                "fidelity target not checked: no real calibration data (pass --calib DIR)")
        elif name == "fp16" and target is not None and fidelity_of(entry["fidelity"]) < target.fidelity:
            raise FidelityTargetError(
                f"fp16: fidelity {fidelity_of(entry['fidelity']):.5f} is below the target {target.fidelity}",
                hint="keep the ops it breaks in FP32 (--exclude OP,...) or lower --target-fidelity",
                report={"passes": reports, "failed": entry})
        reports.append(entry)
        current = out
    return current, reports


def run_passes(model: onnx.ModelProto, config: BuildConfig, *, data: Any = None) -> tuple[onnx.ModelProto, PassesReport]:
    """The precision/sparsity passes of ``config`` on ``model``: ``(model after the passes, report)``.

    The passes stage (the shape of :mod:`compress.stage`); ``data``: calibration batches (a
    :class:`~compress.calibration.CalibrationSet`; random ones calibrate but are not measured).
    With fp32 and no sparsity there is no pass and ``model`` itself is returned. Does not
    modify ``model``.

    Raises:
        FidelityTargetError: a pass cannot reach ``config.target_fidelity``.
    """
    runs = config.precision != "fp32" or bool(config.sparsity)
    final, reports = _apply_passes(model, config, data) if runs else (model, [])
    return final, PassesReport(reports, model_digest(model), model_digest(final))


def benchmark(
    model: onnx.ModelProto, config: BuildConfig, *, data: Any = None, baseline: onnx.ModelProto | None = None,
    names: Mapping[str, str | None] | None = None, timing_cache: bytes | None = None,
) -> tuple[BuiltModel, LatencyReport]:
    """Build/time ``model`` (one :func:`run_passes` returned for ``config``) and the baseline: ``(built, report)``.

    The benchmark stage (the shape of :mod:`compress.stage`); does not modify its inputs.
    ``data``: calibration batches (the first one is timed, else random inputs at the OPT
    shapes; with a baseline, the candidate's fidelity against it is measured on them);
    ``names``: ``{"model": ..., "baseline": ...}``, the labels the report gives the two
    models (default ``model.onnx`` / ``baseline.onnx``). The built model is written with
    ``model.onnx.data`` when ``model`` has external data. The TensorRT engine is built with
    ``config``'s sparsity flag.

    Raises:
        ConfigError: uint8 activations for TensorRT, or a dynamic input with no shape to time.
    """
    names = names if names is not None else {"model": "model.onnx", "baseline": "baseline.onnx"}
    check_profiles(model, config.profiles)
    feed, random_inputs = benchmark_feed(model, data, config.profiles)
    engine_cfg = EngineConfig(profiles=config.profiles, sparse_weights=config.sparsity == "2:4",
                              legacy_precision=(config.precision if config.legacy_precision else None),
                              timing_cache=timing_cache)
    engine = None
    major = None
    if config.backend == "trt":
        from compress.build.trt import build_engine, import_tensorrt, major_version, time_engine

        major = major_version(import_tensorrt())
        with _trt_input(model, "model.onnx") as path:
            engine = build_engine(str(path), engine_cfg)
        timing = time_engine(engine.plan, feed, config.bench)
        provider = "TensorRT"
        base_timing = None
        if baseline is not None:
            with _trt_input(baseline, "baseline.onnx") as path:
                base_engine = build_engine(str(path), EngineConfig(profiles=config.profiles))
            base_timing = time_engine(base_engine.plan, feed, config.bench)
    else:
        logger.info("timing %s with ONNX Runtime", names["model"])
        timing, provider = _time_ort(model, feed, config.bench)
        base_timing = _time_ort(baseline, feed, config.bench)[0] if baseline is not None else None
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    digest = model_digest(model)
    candidate = {"model": names["model"], "precision": config.precision, "sparsity": config.sparsity,
                 "sha256": digest, "random_inputs": random_inputs,
                 **measurement(timing.to_dict(), batch=batch)}
    engine_info = None
    environment: dict[str, Any] = {"host": host_info(), "versions": versions()}
    if engine is not None:
        environment["gpu"] = engine.info.get("gpu")
        engine_info = {k: engine.info[k] for k in ("tensorrt", "strongly_typed", "sparse_weights", "legacy_precision",
                                                   "size_bytes")}
    base_entry: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None
    if base_timing is not None:
        base_entry = {"model": names["baseline"], "precision": "fp32", "sparsity": None, "random_inputs": random_inputs,
                      **measurement(base_timing.to_dict(), batch=batch)}
        comparison = compare(candidate, base_entry)
        if data is not None and baseline is not None:
            from compress.fidelity import compare_models

            comparison["fidelity"] = compare_models(baseline, model, data)
    report = LatencyReport(
        backend=config.backend, provider=provider,
        bench={"warmup_s": config.bench.warmup_s, "iterations_min": config.bench.iterations,
               "duration_s": config.bench.duration_s, "input_shapes": {k: list(v.shape) for k, v in feed.items()}},
        candidate=candidate, environment=environment, engine=engine_info, baseline=base_entry, comparison=comparison)
    cmd = trtexec_command("model.onnx", "engine.plan", engine_cfg, tensorrt_major=major)
    built = BuiltModel(model, engine, cmd, external_data=has_external_data(model))
    return built, report


def build(
    model: onnx.ModelProto, config: BuildConfig, *, data: Any = None, baseline: onnx.ModelProto | None = None,
    names: Mapping[str, str | None] | None = None, timing_cache: bytes | None = None,
) -> BuildResult:
    """Run the passes, build/time the candidate (and baseline) and return the reports. Does not modify inputs.

    :func:`run_passes` then :func:`benchmark` (their arguments). The gates are not evaluated
    here (see :func:`compress.gates.evaluate_gates`).

    Raises:
        FieldError: a shape profile that does not fit ``model``'s inputs (before any work).
        ConfigError: uint8 activations for TensorRT, or a dynamic input with no shape to time.
        FidelityTargetError: a pass cannot reach ``config.target_fidelity``.
    """
    check_profiles(model, config.profiles)
    check_backend(config)
    final, passes = run_passes(model, config, data=data)
    built, latency = benchmark(final, config, data=data, baseline=baseline, names=names, timing_cache=timing_cache)
    # written in the input's layout: a pass's new tensors are in memory, the input's were on disk
    return BuildResult(replace(built, external_data=has_external_data(model)), passes, latency)


def check_backend(config: BuildConfig) -> None:
    """Before any work: the config's passes can go to its backend.

    Raises:
        ConfigError: uint8 activations for TensorRT.
    """
    if config.precision == "int8" and config.backend == "trt" and config.int8_activations == "uint8":
        raise ConfigError("--int8-activations uint8 cannot go to TensorRT: its Q/DQ activations must be symmetric "
                          "int8 (zero point 0)",
                          hint="leave --int8-activations at auto (int8 for --backend trt), or use --backend ort")


__all__ = [
    "BACKENDS", "CALIBRATION_METHODS", "INT8_ACTIVATIONS", "LATENCY_SCHEMA", "PRECISIONS", "SPARSITIES",
    "SPARSITY_METHODS", "TARGET_EXIT_CODE", "BuildConfig", "BuildResult", "BuiltModel", "LatencyReport", "PassesReport",
    "benchmark", "benchmark_feed", "build",
    "check_backend", "check_profiles", "compare", "measurement", "resolve_exclude", "run_passes",
]
