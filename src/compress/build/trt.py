"""TensorRT engine building and timing (TensorRT 10 and 11 Python API), imported lazily.

Precision comes from the ONNX itself: FP16 casts and INT8 Q/DQ are inserted by the
``compress.passes`` ONNX passes, and the network is built **strongly typed**:

- TensorRT >= 11: networks are always strongly typed (``STRONGLY_TYPED`` is deprecated and
  ignored) and ``BuilderFlag`` has no FP16/INT8/BF16/FP8 members; implicit INT8
  calibration (``IInt8Calibrator``) is gone. compress passes no precision flag.
- TensorRT 10: the network is created with ``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
  With ``legacy_precision`` the old weakly typed path is used instead (``BuilderFlag.FP16``,
  plus ``INT8`` for a Q/DQ model: explicit quantization, no calibrator).
- TensorRT < 10: ``EXPLICIT_BATCH`` and the legacy flags.

``SPARSE_WEIGHTS`` is set for 2:4-sparse models; optimization profiles come from
``--shapes``; a timing cache is loaded and saved. The equivalent ``trtexec`` command line
is always produced, also where TensorRT is not installed.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compress.bench import BenchConfig, Timing, summarize
from compress.errors import BuildError, ConfigError, MissingDependencyError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max shapes of one input (``--shapes NAME:MIN/OPT/MAX``, dims joined by 'x')."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    @classmethod
    def parse(cls, spec: str) -> ShapeProfile:
        """``NAME:MIN/OPT/MAX`` (dims joined by ``x``) or ``NAME:SHAPE`` (one shape for all three).

        Raises:
            ConfigError: naming ``--shapes`` and the spec: not that form, a dim that is not an
                integer >= 1, unequal ranks, or MIN <= OPT <= MAX broken in some dim.
        """
        name, sep, rest = spec.rpartition(":")
        parts = rest.split("/")
        if not sep or not name or len(parts) not in (1, 3):
            raise ConfigError(f"--shapes {spec!r} is not NAME:MIN/OPT/MAX", hint="e.g. --shapes input_ids:1x16/8x128/16x128")
        try:
            dims = [tuple(int(d) for d in p.split("x")) for p in parts]
        except ValueError:
            raise ConfigError(f"--shapes {spec!r}: dims must be integers joined by 'x'",
                              hint="e.g. --shapes x:1x3x224x224/8x3x224x224/16x3x224x224") from None
        lo, opt, hi = (dims * 3)[:3] if len(dims) == 1 else dims
        if any(d < 1 for d in (*lo, *opt, *hi)):
            raise ConfigError(f"--shapes {spec!r}: every dim must be at least 1",
                              hint="e.g. --shapes x:1x3x224x224/8x3x224x224/16x3x224x224")
        if not (len(lo) == len(opt) == len(hi)) or any(a > b or b > c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise ConfigError(f"--shapes {spec!r}: need equal ranks and MIN <= OPT <= MAX in every dim",
                              hint="e.g. --shapes x:1x3x224x224/8x3x224x224/16x3x224x224")
        return cls(name, lo, opt, hi)

    def trtexec(self) -> tuple[str, str, str]:
        """The ``--minShapes``/``--optShapes``/``--maxShapes`` values of this input (``name:1x16``)."""
        def f(s: Shape) -> str:
            return f"{self.name}:{'x'.join(map(str, s))}"

        return f(self.min), f(self.opt), f(self.max)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How to build the engine.

    Attributes:
        profiles: one optimization profile made of these input shapes (empty: static model).
        sparse_weights: set ``BuilderFlag.SPARSE_WEIGHTS`` (2:4-sparse weights).
        legacy_precision: TensorRT <= 10 only: ``fp16``/``int8`` builder flags instead of a
            strongly typed network.
        workspace_mib: workspace memory pool limit.
        optimization_level: builder optimization level (0-5; TensorRT default 3).
        timing_cache: serialized timing cache to start from (None: empty).
    """

    profiles: tuple[ShapeProfile, ...] = ()
    sparse_weights: bool = False
    legacy_precision: str | None = None
    workspace_mib: int = 4096
    optimization_level: int | None = None
    timing_cache: bytes | None = None


@dataclass(frozen=True)
class Engine:
    """A serialized engine with what it was built with."""

    plan: bytes
    timing_cache: bytes
    info: dict[str, Any] = field(default_factory=dict)


def import_tensorrt() -> Any:
    """``import tensorrt``; MissingDependencyError naming the extra when it is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("tensorrt", purpose="'compress build --backend trt'", extra="trt") from None
    return trt


def major_version(trt: Any) -> int:
    """The major version of the ``tensorrt`` module ``trt`` (10 for ``10.3.0``)."""
    return int(str(trt.__version__).split(".")[0])


def network_flags(trt: Any, config: EngineConfig) -> int:
    """``create_network`` flags for this TensorRT version (see module docstring)."""
    major = major_version(trt)
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    elif major == 10 and config.legacy_precision is None:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def precision_flags(trt: Any, config: EngineConfig) -> list[Any]:
    """Builder flags for precision: none on a strongly typed network; legacy flags on <= 10."""
    if config.legacy_precision is None:
        return []
    if major_version(trt) >= 11:
        raise ConfigError(
            f"--legacy-precision {config.legacy_precision}: TensorRT {trt.__version__} has no FP16/INT8 builder flags",
            hint="TensorRT 11 takes precision from the ONNX: use --precision fp16|int8 (ONNX passes) instead",
        )
    flags = [trt.BuilderFlag.FP16]
    if config.legacy_precision == "int8":
        flags.append(trt.BuilderFlag.INT8)  # explicit quantization: the model carries Q/DQ
    return flags


def _parser_errors(parser: Any) -> str:
    msgs = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        for attr in ("node_name", "node_operator"):
            fn = getattr(err, attr, None)
            if callable(fn) and fn():
                where += f" {attr.split('_')[1]} {fn()}"
        msgs.append(f"{err.desc()}{' (' + where.strip() + ')' if where else ''}")
    return "; ".join(msgs) or "unknown parser error"


class _Logger:
    """Collects TensorRT log lines so a failed build can be condensed to its errors."""

    def __init__(self, trt: Any) -> None:
        base = trt.ILogger

        class Collector(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)
                self.lines: list[tuple[Any, str]] = []

            def log(self, severity: Any, msg: str) -> None:
                self.lines.append((severity, msg))

        self.impl = Collector()
        self.trt = trt

    def errors(self) -> list[str]:
        bad = {self.trt.ILogger.Severity.ERROR, self.trt.ILogger.Severity.INTERNAL_ERROR}
        return [m for s, m in self.impl.lines if s in bad]


def build_engine(onnx_path: str, config: EngineConfig) -> Engine:
    """Build a serialized engine from the ONNX file at ``onnx_path`` (external data beside it).

    Raises:
        MissingDependencyError: tensorrt is not installed.
        BuildError: the parser or the builder failed; the message names the failing
            node/layer from the parser errors or the builder log.
    """
    trt = import_tensorrt()
    log = _Logger(trt)
    builder = trt.Builder(log.impl)
    if builder is None:
        raise BuildError("TensorRT could not create a builder (no usable CUDA GPU?)", hint="run on a host with an NVIDIA GPU")
    network = builder.create_network(network_flags(trt, config))
    parser = trt.OnnxParser(network, log.impl)
    if not parser.parse_from_file(onnx_path):
        raise BuildError(f"TensorRT cannot parse the model: {_parser_errors(parser)}",
                         hint="check the op with 'polygraphy inspect capability' or export with another opset")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    if config.optimization_level is not None:
        cfg.builder_optimization_level = config.optimization_level
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in precision_flags(trt, config):
        cfg.set_flag(flag)
    if config.sparse_weights:
        cfg.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if config.profiles:
        profile = builder.create_optimization_profile()
        inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for p in config.profiles:
            if p.name not in inputs:
                raise ConfigError(f"--shapes {p.name}: the model has no input {p.name!r}",
                                  hint=f"inputs: {', '.join(sorted(inputs))}")
            profile.set_shape(p.name, p.min, p.opt, p.max)
        cfg.add_optimization_profile(profile)
    cache = cfg.create_timing_cache(config.timing_cache or b"")
    cfg.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, cfg)
    if plan is None:
        errors = log.errors()
        raise BuildError(f"TensorRT engine build failed: {errors[-1] if errors else 'no error logged'}",
                         hint="see the failing layer above; try --legacy-precision off, fewer --shapes, or --precision fp32")
    info = engine_info(trt, bytes(plan))
    info.update({"tensorrt": str(trt.__version__), "strongly_typed": config.legacy_precision is None,
                 "sparse_weights": config.sparse_weights, "legacy_precision": config.legacy_precision})
    return Engine(bytes(plan), bytes(cfg.get_timing_cache().serialize()), info)


def engine_info(trt: Any, plan: bytes) -> dict[str, Any]:
    """I/O tensors and per-layer information of a serialized engine, plus the GPU."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append({"name": name, "mode": str(engine.get_tensor_mode(name)).split(".")[-1].lower(),
                   "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1].lower(),
                   "shape": list(engine.get_tensor_shape(name))})
    layers: Any = None
    try:
        import json

        inspector = engine.create_engine_inspector()
        layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # layer info is best effort (needs DETAILED profiling verbosity)
        layers = None
    return {"io": io, "layers": layers, "gpu": gpu_info(), "size_bytes": len(plan)}


def gpu_info() -> dict[str, Any]:
    """GPU name and compute capability via torch (if installed with CUDA)."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda}


def time_engine(plan: bytes, feed: Mapping[str, np.ndarray], config: BenchConfig) -> Timing:
    """GPU compute time (ms) of one inference per iteration, with CUDA events (torch buffers)."""
    trt = import_tensorrt()
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", purpose="timing a TensorRT engine", extra="export") from None
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    buffers = {}
    for name, value in feed.items():
        buffers[name] = torch.from_numpy(np.ascontiguousarray(value)).cuda()
        context.set_input_shape(name, tuple(value.shape))
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
    for name, t in buffers.items():
        context.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        start.record(stream)
        context.execute_async_v3(stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        return float(start.elapsed_time(end))

    import time

    deadline = time.perf_counter() + config.warmup_s
    once()
    while time.perf_counter() < deadline:
        once()
    samples: list[float] = []
    t0 = time.perf_counter()
    while len(samples) < config.iterations or time.perf_counter() - t0 < config.duration_s:
        samples.append(once())
    return summarize(samples)


def trtexec_command(onnx_name: str, engine_name: str, config: EngineConfig, *, tensorrt_major: int | None,
                    cache_name: str = "timing.cache") -> str:
    """The equivalent trtexec command line (relative file names)."""
    args = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}", f"--timingCacheFile={cache_name}"]
    if config.legacy_precision is None:
        if tensorrt_major is None or tensorrt_major == 10:
            args.append("--stronglyTyped")  # TensorRT 11: always strongly typed, flag not needed
    else:
        args.append("--fp16")
        if config.legacy_precision == "int8":
            args.append("--int8")
    if config.sparse_weights:
        args.append("--sparsity=enable")
    if config.profiles:
        mins, opts, maxs = zip(*(p.trtexec() for p in config.profiles), strict=True)
        args += [f"--minShapes={','.join(mins)}", f"--optShapes={','.join(opts)}", f"--maxShapes={','.join(maxs)}"]
    if config.optimization_level is not None:
        args.append(f"--builderOptimizationLevel={config.optimization_level}")
    args += [f"--memPoolSize=workspace:{config.workspace_mib}M", "--profilingVerbosity=detailed",
             "--exportLayerInfo=layers.json", "--exportTimes=times.json", "--percentile=50,90,95,99"]
    return " ".join(args)


def host_info() -> dict[str, Any]:
    """CPU model and core count (no hostname)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.system()}


def versions(names: Sequence[str] = ("onnx", "onnxruntime", "numpy", "tensorrt", "torch")) -> dict[str, str]:
    """Installed versions of ``names`` (absent packages are left out)."""
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out
