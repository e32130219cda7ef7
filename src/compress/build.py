"""``compress build`` as a function: passes, engine or ORT session, latency, reports, gates.

:func:`build` is pure apart from the temporary ONNX file TensorRT's parser reads; the
CLI writes the results (:class:`BuildResult`) into the output folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.bench import BenchConfig, Timing
from compress.errors import ConfigError
from compress.latency import (
    LATENCY_SCHEMA,
    GateResult,
    Gates,
    benchmark_action_json,
    compare,
    evaluate_gates,
    latency_markdown,
    measurement,
    plot_latency,
)
from compress.log import logger
from compress.onnx_io import model_digest, save_model
from compress.trt import Engine, EngineConfig, ShapeProfile, host_info, trtexec_command, versions


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What ``compress build`` does (see ``compress build --help``).

    ``int8_activations``: activation type of the int8 pass: ``"int8"`` (symmetric, the form
    TensorRT needs), ``"uint8"`` (asymmetric, ONNX Runtime CPU's fast U8S8 kernels) or
    ``"auto"``: int8 for ``backend="trt"``, uint8 for ``backend="ort"``.
    """

    precision: str = "fp32"
    sparsity: str | None = None
    backend: str = "ort"
    calibration_method: str = "minmax"
    int8_activations: str = "auto"
    exclude: tuple[str, ...] = ()
    profiles: tuple[ShapeProfile, ...] = ()
    legacy_precision: bool = False
    bench: BenchConfig = field(default_factory=BenchConfig)
    gates: Gates = field(default_factory=Gates)


@dataclass(frozen=True)
class BuildResult:
    model: onnx.ModelProto
    passes: dict[str, Any]
    engine: Engine | None
    latency: dict[str, Any]
    markdown: str
    plot: bytes
    benchmark: list[dict[str, Any]]
    trtexec: str
    gates: list[GateResult]


def benchmark_feed(model: onnx.ModelProto, calib: Any, profiles: tuple[ShapeProfile, ...]) -> tuple[dict[str, np.ndarray], bool]:
    """One input batch to time: the first calibration batch, else random data at the OPT shapes."""
    if calib is not None:
        return dict(next(iter(calib))), bool(calib.random)
    from compress.calib import model_input_types, random_calibration

    types = model_input_types(model)
    opt = {p.name: p.opt for p in profiles}
    dims: dict[str, int] = {}
    batch = 1
    for name, t in types.items():
        if t is None or t.shape is None:
            continue
        shape = opt.get(name)
        for axis, d in enumerate(t.shape):
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


def _time_ort(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], bench: BenchConfig) -> tuple[Timing, str]:
    from compress.bench import measure
    from compress.scoring.collect import make_session

    sess = make_session(model, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    names = [o.name for o in model.graph.output]
    return measure(lambda: sess.run(names, dict(feed)), bench), sess.get_providers()[0]


def _apply_passes(model: onnx.ModelProto, config: BuildConfig, calib: Any) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Sparsity first (it edits FP32 weights), then the precision pass; each checked against its input.

    Exclusions (``--exclude``) that look like op types (no '/' and capitalised) exclude op
    types, the others node names.
    """
    from compress.passes import Fp16Config, Int8Config, SparsityConfig, get_pass, measure_fidelity

    ops = tuple(x for x in config.exclude if "/" not in x and x[:1].isupper() and "_" not in x)
    nodes = tuple(x for x in config.exclude if x not in ops)
    steps: list[tuple[str, Any]] = []
    if config.sparsity == "2:4":
        steps.append(("sparsity-2:4", SparsityConfig(exclude_nodes=nodes)))
    if config.precision == "fp16":
        steps.append(("fp16", Fp16Config(block_ops=ops, block_nodes=nodes, calibration=calib)))
    elif config.precision == "int8":
        act = config.int8_activations
        if act == "auto":
            act = "int8" if config.backend == "trt" else "uint8"
        steps.append(("int8", Int8Config(calibration=calib, method=config.calibration_method,
                                         exclude_nodes=nodes, exclude_ops=ops, activation_type=act)))
    reports = []
    current = model
    for name, cfg in steps:
        logger.info("pass %s", name)
        out, report = get_pass(name).run(current, cfg)
        entry = report.to_dict()
        if calib is not None:
            entry["fidelity"] = measure_fidelity(current, out, calib)
        reports.append(entry)
        current = out
    return current, reports


def build(
    model: onnx.ModelProto, config: BuildConfig, *, calib: Any = None, baseline: onnx.ModelProto | None = None,
    previous: Mapping[str, Any] | None = None, names: Mapping[str, str | None], timing_cache: bytes | None = None,
) -> BuildResult:
    """Run the passes, build/time the candidate (and baseline), evaluate the gates. Does not modify inputs."""
    if config.precision == "int8" and config.backend == "trt" and config.int8_activations == "uint8":
        raise ConfigError("--int8-activations uint8 cannot go to TensorRT: its Q/DQ activations must be symmetric "
                          "int8 (zero point 0)",
                          hint="leave --int8-activations at auto (int8 for --backend trt), or use --backend ort")
    final, pass_reports = _apply_passes(model, config, calib) if (config.precision != "fp32" or config.sparsity) else (model, [])
    feed, random_inputs = benchmark_feed(final, calib, config.profiles)
    engine_cfg = EngineConfig(profiles=config.profiles, sparse_weights=config.sparsity == "2:4",
                              legacy_precision=(config.precision if config.legacy_precision else None),
                              timing_cache=timing_cache)
    engine = None
    major = None
    if config.backend == "trt":
        from compress.trt import build_engine, import_tensorrt, major_version, time_engine

        major = major_version(import_tensorrt())
        with tempfile.TemporaryDirectory(prefix="compress-build-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(final, path)
            engine = build_engine(str(path), engine_cfg)
        timing = time_engine(engine.plan, feed, config.bench)
        provider = "TensorRT"
        base_timing = None
        if baseline is not None:
            with tempfile.TemporaryDirectory(prefix="compress-build-") as tmp:
                path = Path(tmp) / "baseline.onnx"
                save_model(baseline, path)
                base_engine = build_engine(str(path), EngineConfig(profiles=config.profiles))
            base_timing = time_engine(base_engine.plan, feed, config.bench)
    else:
        logger.info("timing %s with ONNX Runtime", names["model"])
        timing, provider = _time_ort(final, feed, config.bench)
        base_timing = _time_ort(baseline, feed, config.bench)[0] if baseline is not None else None
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    candidate = {"model": names["model"], "precision": config.precision, "sparsity": config.sparsity,
                 "sha256": model_digest(final), "random_inputs": random_inputs,
                 **measurement(timing.to_dict(), batch=batch)}
    report: dict[str, Any] = {
        "schema_version": LATENCY_SCHEMA, "backend": config.backend, "provider": provider,
        "percentile_method": "nearest rank, as trtexec (float32 index arithmetic)",
        "bench": {"warmup_s": config.bench.warmup_s, "iterations_min": config.bench.iterations,
                  "duration_s": config.bench.duration_s, "input_shapes": {k: list(v.shape) for k, v in feed.items()}},
        "candidate": candidate,
        "environment": {"host": host_info(), "versions": versions()},
    }
    if engine is not None:
        report["environment"]["gpu"] = engine.info.get("gpu")
        report["engine"] = {k: engine.info[k] for k in ("tensorrt", "strongly_typed", "sparse_weights", "legacy_precision", "size_bytes")}
    if base_timing is not None:
        report["baseline"] = {"model": names["baseline"], "precision": "fp32", "sparsity": None, "random_inputs": random_inputs,
                              **measurement(base_timing.to_dict(), batch=batch)}
        report["comparison"] = compare(candidate, report["baseline"])
        if calib is not None and baseline is not None:
            from compress.prune import compare_models

            report["comparison"]["fidelity"] = compare_models(baseline, final, calib)
    gates = evaluate_gates(report, config.gates, previous=previous)
    report["gates"] = [{"name": g.name, "passed": g.passed, "value": g.value, "limit": g.limit, "message": g.message}
                       for g in gates]
    cmd = trtexec_command("model.onnx", "engine.plan", engine_cfg, tensorrt_major=major)
    passes = {"passes": pass_reports, "input_sha256": model_digest(model), "output_sha256": candidate["sha256"]}
    return BuildResult(final, passes, engine, report, latency_markdown(report), plot_latency(report),
                       benchmark_action_json(report), cmd, gates)


def write_build_files(folder: Path, result: BuildResult) -> None:
    """Write the files of a build folder (the CLI and ``compress run`` call this inside an atomic folder)."""
    from compress.onnx_io import write_bytes, write_json, write_text

    save_model(result.model, folder / "model.onnx")
    write_json(folder / "passes.json", result.passes)
    write_text(folder / "trtexec.sh", "#!/bin/sh\n# Equivalent trtexec build and benchmark of model.onnx\n"
               + result.trtexec + "\n")
    if result.engine is not None:
        write_bytes(folder / "engine.plan", result.engine.plan)
        write_bytes(folder / "timing.cache", result.engine.timing_cache)
        write_json(folder / "engine.json", result.engine.info)
    write_json(folder / "latency.json", result.latency)
    write_text(folder / "latency.md", result.markdown)
    write_bytes(folder / "latency.png", result.plot)
    write_json(folder / "benchmark.json", result.benchmark)
