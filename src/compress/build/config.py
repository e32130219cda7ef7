"""The ``build`` stage's config: one declaration per option, read by ``compress build`` and ``compress run``.

Every field is declared with :func:`compress.config.option`: its flag (``--precision``) and
its pipeline key (``build.precision``) are generated from it, and its default exists only
here. Values are in the units the user writes (``warmup_ms`` in milliseconds, ``duration``
in seconds); :attr:`BuildConfig.bench` and :attr:`BuildConfig.profiles` are the derived
values the stage runs on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from compress.bench import BenchConfig
from compress.build.trt import ShapeProfile
from compress.config import StageConfig, option
from compress.passes.accuracy import RANKINGS
from compress.validate import FieldError, Interval, check_choice, check_number

#: Valid values of the :class:`BuildConfig` fields with a fixed set of names.
PRECISIONS = ("fp32", "fp16", "int8")
SPARSITIES = ("2:4",)
BACKENDS = ("ort", "trt")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_ACTIVATIONS = ("auto", "int8", "uint8")
SPARSITY_METHODS = ("magnitude", "wanda", "sparsegpt")
#: Exit code of ``compress build`` when a pass cannot reach its fidelity target (the gates use 3-6).
TARGET_EXIT_CODE = 7

#: Benchmark fields of :class:`BuildConfig` -> (BenchConfig field, example in the user's units).
_BENCH_FIELDS = {"warmup_s": ("warmup_ms", "200"), "iterations": ("iterations", "10"), "duration_s": ("duration", "1")}

#: The groups of ``compress build --help``: field names in the order they are listed.
PASS_OPTIONS = ("precision", "sparsity", "calibration_method", "int8_activations", "exclude", "target_fidelity",
                "max_fallback", "fallback_order", "sparsity_method", "smoothquant")
ENGINE_OPTIONS = ("backend", "shapes", "legacy_precision", "warmup_ms", "iterations", "duration")


@dataclass(frozen=True, kw_only=True)
class BuildConfig(StageConfig):
    """What ``compress build`` does: passes, backend and benchmark (``compress build --help`` lists them).

    ``target_fidelity``: every precision/sparsity pass must keep ``1 - loss`` (output cosine,
    or top-1 agreement for logits) against its input at or above this on held-out calibration
    batches; int8 and 2:4 repair themselves (nodes kept float / layers kept dense, at most
    ``max_fallback`` of them), fp16 is only checked. A miss raises
    :class:`~compress.passes.accuracy.FidelityTargetError` (exit code :data:`TARGET_EXIT_CODE`).
    None turns the target off. Without real calibration data nothing can be measured: the
    2:4 magnitude pass then runs unchecked, with a warning in its report.

    Raises:
        FieldError: naming the field; a name field lists its valid values (:data:`PRECISIONS`, ...).
    """

    precision: str = option("fp32", choices=PRECISIONS, help="precision pass applied to the ONNX (default fp32: none)")
    sparsity: str | None = option(None, choices=SPARSITIES, help="2:4 structured sparsity of MatMul/Gemm/Conv weights")
    calibration_method: str = option("minmax", choices=CALIBRATION_METHODS,
                                     help="INT8 activation calibration (default minmax)")
    int8_activations: str = option(
        "auto", choices=INT8_ACTIVATIONS,
        help="INT8 activation type: int8 = symmetric (TensorRT), uint8 = asymmetric (ONNX Runtime CPU's fast U8S8 "
             "kernels); auto (default): int8 for --backend trt, uint8 for ort")
    exclude: tuple[str, ...] = option(
        (), split=True, metavar="NAME|OP|MODULE,...",
        help="keep out of the passes: op types, node names, or module paths and patterns ('*' = one component, "
             "'**' = any; a module covers its submodules), e.g. Softmax,/head/Gemm,encoder.layer.*.output.dense")
    target_fidelity: float | None = option(
        0.99, none_word="none", metavar="F|none",
        help="each pass keeps output cosine (top-1 agreement for logits) vs its input >= F on held-out calibration "
             f"batches, repairing itself or failing with exit code {TARGET_EXIT_CODE} (default 0.99; 'none': off)")
    max_fallback: float = option(0.5, minimum=0, metavar="SHARE",
                                 help="at most this share of the int8 nodes / 2:4 layers kept float / dense for the "
                                      "target (default 0.5)")
    fallback_order: str = option(
        "auto", choices=RANKINGS,
        help="which nodes the target keeps float / dense first: local (each node's own error, one ORT pass), "
             "output (the final output's loss with that node alone changed, one run per node), auto (default): "
             "local, then output if local misses the target")
    sparsity_method: str = option(
        "magnitude", choices=SPARSITY_METHODS,
        help="how 2:4 picks the weights: magnitude (no data), wanda (|w| x input activation norm), sparsegpt "
             "(one-shot OBS with weight compensation, dampening chosen per layer on held-out batches); the last two "
             "need --calib and leave padding tokens out (the model's attention mask input, found by name)")
    smoothquant: float | None = option(
        None, minimum=0, metavar="ALPHA",
        help="SmoothQuant before int8: migrate activation outliers into the weights with strength ALPHA in [0, 1] "
             "(e.g. 0.5); folded into LayerNorm/MatMul where exact")
    backend: str = option("ort", choices=BACKENDS,
                          help="ort: ONNX Runtime (CPU here); trt: build a TensorRT engine (needs compress[trt] and a GPU)")
    shapes: tuple[str, ...] = option(
        (), repeat=True, parse=ShapeProfile.parse, metavar="NAME:MIN/OPT/MAX",
        parse_hint='write NAME:MIN/OPT/MAX, e.g. shapes: ["input_ids:1x16/8x128/16x128"]',
        help="optimization profile of an input (dims joined by 'x'); the OPT shape is benchmarked; repeatable, "
             "e.g. --shapes input_ids:1x16/8x128/16x128")
    legacy_precision: bool = option(
        False, help="TensorRT <= 10 only: use the FP16/INT8 builder flags instead of a strongly typed network")
    warmup_ms: float = option(200.0, minimum=0, help="warm-up time (default 200 ms, as trtexec)")
    iterations: int = option(10, minimum=1, help="at least this many timed runs (default 10)")
    duration: float = option(3.0, minimum=0, help="and at least this many seconds (default 3)")

    def __post_init__(self) -> None:
        check_number("BuildConfig", "target_fidelity", self.target_fidelity, within=Interval(0, 1, low_open=True),
                     example="0.99", optional=True)
        check_number("BuildConfig", "max_fallback", self.max_fallback, within=Interval(0, 1), example="0.5")
        check_number("BuildConfig", "smoothquant", self.smoothquant, within=Interval(0, 1), example="0.5",
                     optional=True)
        check_choice("BuildConfig", "sparsity_method", self.sparsity_method, SPARSITY_METHODS)
        check_choice("BuildConfig", "fallback_order", self.fallback_order, RANKINGS)
        check_choice("BuildConfig", "precision", self.precision, PRECISIONS)
        check_choice("BuildConfig", "sparsity", self.sparsity, SPARSITIES, optional=True)
        check_choice("BuildConfig", "backend", self.backend, BACKENDS)
        check_choice("BuildConfig", "calibration_method", self.calibration_method, CALIBRATION_METHODS)
        check_choice("BuildConfig", "int8_activations", self.int8_activations, INT8_ACTIVATIONS)
        names = [p.name for p in self.profiles]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise FieldError("BuildConfig", "shapes", dup, "names this input twice; give one MIN/OPT/MAX per input",
                             example=f"{dup}:1x16/8x128/16x128")
        check_number("BuildConfig", "warmup_ms", self.warmup_ms, example="200")
        check_number("BuildConfig", "duration", self.duration, example="1")
        _ = self.bench  # the benchmark's own range checks, now, reported by this config's field names

    @functools.cached_property
    def profiles(self) -> tuple[ShapeProfile, ...]:
        """The parsed ``shapes``: one TensorRT optimization profile per input (parsed once)."""
        return tuple(ShapeProfile.parse(s) for s in self.shapes)

    @property
    def bench(self) -> BenchConfig:
        """The benchmark's :class:`~compress.bench.BenchConfig` (seconds).

        Raises:
            FieldError: a benchmark value out of range, named by this config's field
                (``warmup_ms``), with the value as given.
        """
        try:
            return BenchConfig(warmup_s=self.warmup_ms / 1000.0, iterations=self.iterations, duration_s=self.duration)
        except FieldError as exc:
            name, example = _BENCH_FIELDS.get(exc.field, (exc.field, exc.example))
            raise FieldError("BuildConfig", name, getattr(self, name, exc.value), exc.problem, example=example) from None
