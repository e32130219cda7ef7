"""``compress build``: precision/sparsity ONNX passes, a TensorRT engine (or ONNX Runtime), latency reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from compress.bench import BenchConfig
from compress.build import TARGET_EXIT_CODE
from compress.cli import command
from compress.cli._common import add_calib_arguments, flag_errors, load_calib_for, print_json
from compress.errors import ConfigError
from compress.log import logger
from compress.onnx_io import load_model, read_json
from compress.outputs import Outputs
from compress.reports.latency import GATE_EXIT_CODES, Gates, check_previous

_DESCRIPTION = f"""\
Turn an ONNX model into a deployable artifact and measure it:

  1. precision and sparsity as ONNX -> ONNX passes, each checked against its input on the
     calibration data: --sparsity 2:4 (keep the 2 largest of every 4 weights along the input
     dim), --precision fp16 (FP32 kept where FP16 is unsafe) or int8 (explicit Q/DQ from the
     calibration data, ORT static quantization, symmetric, per-channel weights);
  2. --backend trt: a TensorRT engine from the ONNX (strongly typed: precision comes from the
     ONNX; TensorRT 11 has no FP16/INT8 builder flags), or --backend ort: ONNX Runtime;
  3. a latency benchmark (trtexec's statistics: nearest-rank p50/p90/p95/p99, CoV) and
     reports for CI: latency.json, latency.md, latency.png, benchmark.json
     (github-action-benchmark), plus trtexec.sh with the equivalent trtexec command.

Gates fail the command with their own exit code: max-latency {GATE_EXIT_CODES['max-latency']}, \
min-speedup {GATE_EXIT_CODES['min-speedup']}, max-regression {GATE_EXIT_CODES['max-regression']}, \
min-fidelity {GATE_EXIT_CODES['min-fidelity']}. A pass that cannot reach its fidelity target
(--target-fidelity, default 0.99 with --calib) exits with code {TARGET_EXIT_CODE} and writes only
OUTDIR/passes.json: what it tried (per-node local errors, the fidelity and latency of every
fallback step); no model is written.

int8 and 2:4 meet the target by themselves: they rank their nodes by local error (each
node's output with only its own inputs quantized / its weight pruned, measured with ONNX
Runtime on held-out calibration batches) and keep the worst float / dense until the
fidelity holds, at most --max-fallback of them (the kept nodes are listed in passes.json).

examples:
  compress build pruned.onnx -o build/ --precision int8 --calib calib/ --backend ort --baseline model.onnx
  compress build model.onnx -o build/ --precision fp16 --backend trt --shapes input_ids:1x16/8x128/16x128
  compress build model.onnx -o build/ --backend ort --previous last/latency.json --max-regression 5
"""

#: Files a build folder may hold; --force replaces only such a folder.
BUILD_FILES = {"model.onnx", "model.onnx.data", "engine.plan", "engine.json", "timing.cache", "trtexec.sh",
               "passes.json", "latency.json", "latency.md", "latency.png", "benchmark.json"}


@command("build", help="FP16/INT8/2:4 passes, TensorRT engine or ORT, latency reports and CI gates",
         description=_DESCRIPTION)
class Build:
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model (never modified)")
        parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
        parser.add_argument("--force", action="store_true", help="replace OUTDIR if it holds an earlier build")
        p = parser.add_argument_group("passes")
        p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                       help="precision pass applied to the ONNX (default fp32: none)")
        p.add_argument("--sparsity", choices=("2:4",), help="2:4 structured sparsity of MatMul/Gemm/Conv weights")
        p.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                       help="INT8 activation calibration (default minmax)")
        p.add_argument("--int8-activations", choices=("auto", "int8", "uint8"), default="auto",
                       help="INT8 activation type: int8 = symmetric (TensorRT), uint8 = asymmetric (ONNX Runtime "
                            "CPU's fast U8S8 kernels); auto (default): int8 for --backend trt, uint8 for ort")
        p.add_argument("--exclude", metavar="NAME|OP|MODULE,...",
                       help="keep out of the passes: op types, node names, or module paths and patterns "
                            "('*' = one component, '**' = any; a module covers its submodules), "
                            "e.g. Softmax,/head/Gemm,encoder.layer.*.output.dense")
        p.add_argument("--target-fidelity", metavar="F|none", default="0.99",
                       help="each pass keeps output cosine (top-1 agreement for logits) vs its input >= F on "
                            "held-out calibration batches, repairing itself or failing with exit code "
                            f"{TARGET_EXIT_CODE} (default 0.99; 'none': off)")
        p.add_argument("--max-fallback", type=float, default=0.5, metavar="SHARE",
                       help="at most this share of the int8 nodes / 2:4 layers kept float / dense for the target "
                            "(default 0.5)")
        p.add_argument("--sparsity-method", choices=("magnitude", "wanda", "sparsegpt"), default="magnitude",
                       help="how 2:4 picks the weights: magnitude (no data), wanda (|w| x input activation norm), "
                            "sparsegpt (one-shot OBS with weight compensation); the last two need --calib")
        p.add_argument("--smoothquant", type=float, metavar="ALPHA",
                       help="SmoothQuant before int8: migrate activation outliers into the weights with strength "
                            "ALPHA in [0, 1] (e.g. 0.5); folded into LayerNorm/MatMul where exact")
        add_calib_arguments(parser)
        b = parser.add_argument_group("engine and benchmark")
        b.add_argument("--backend", choices=("ort", "trt"), default="ort",
                       help="ort: ONNX Runtime (CPU here); trt: build a TensorRT engine (needs compress[trt] and a GPU)")
        b.add_argument("--shapes", action="append", default=[], metavar="NAME:MIN/OPT/MAX",
                       help="optimization profile of an input (dims joined by 'x'); the OPT shape is benchmarked; "
                            "repeatable, e.g. --shapes input_ids:1x16/8x128/16x128")
        b.add_argument("--legacy-precision", action="store_true",
                       help="TensorRT <= 10 only: use the FP16/INT8 builder flags instead of a strongly typed network")
        b.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache to start from")
        b.add_argument("--warmup-ms", type=float, default=200.0, help="warm-up time (default 200 ms, as trtexec)")
        b.add_argument("--iterations", type=int, default=10, help="at least this many timed runs (default 10)")
        b.add_argument("--duration", type=float, default=3.0, help="and at least this many seconds (default 3)")
        b.add_argument("--baseline", metavar="ORIG.onnx",
                       help="also time this model on the same backend; report speedup and fidelity against it")
        g = parser.add_argument_group("gates (a failed gate exits with its own code)")
        g.add_argument("--max-latency-ms", type=float, metavar="X", help="fail if the median latency exceeds X ms")
        g.add_argument("--min-speedup", type=float, metavar="S", help="fail if the speedup over --baseline is below S")
        g.add_argument("--previous", metavar="latency.json", help="an earlier report to compare with")
        g.add_argument("--max-regression", type=float, metavar="PCT",
                       help="fail if the median is more than PCT%% slower than --previous")
        g.add_argument("--min-fidelity", type=float, metavar="F",
                       help="fail if the output cosine against --baseline is below F (needs --calib)")
        parser.add_argument("--json", action="store_true", help="print latency.json instead of the Markdown summary")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from compress.build import build, write_build_files

        outs = Outputs(force=args.force)
        for m in (args.model, args.baseline):
            outs.add_model_input(m)
        for p in (args.calib, args.previous, args.timing_cache):
            outs.add_input(p)
        out = outs.folder(args.output, what="an earlier build's files",
                          replaceable=lambda e: e.is_file() and e.name in BUILD_FILES)
        outs.check()
        previous = None
        if args.previous:
            previous = check_previous(read_json(args.previous, what="latency report"), source=args.previous)
        if args.max_regression is not None and previous is None:
            raise ConfigError("--max-regression needs a previous report", hint="pass --previous latency.json")
        flags = {"warmup_s": ("--warmup-ms", args.warmup_ms, "200"), "iterations": "--iterations", "duration_s": "--duration",
                 "max_latency_ms": "--max-latency-ms", "min_speedup": "--min-speedup",
                 "max_regression_pct": "--max-regression", "min_fidelity": "--min-fidelity", "profiles": "--shapes",
                 "precision": "--precision", "backend": "--backend", "sparsity": "--sparsity",
                 "target_fidelity": "--target-fidelity", "max_fallback": "--max-fallback", "smoothquant": "--smoothquant",
                 "TargetConfig.fidelity": "--target-fidelity", "TargetConfig.max_fallback": "--max-fallback"}
        with flag_errors(flags):  # every number is checked before a model is read
            config = _config(args)
        model = load_model(args.model)
        baseline = load_model(args.baseline) if args.baseline else None
        calib = load_calib_for(args, model) if (args.calib or args.random_calib) else None
        if config.precision == "int8" and (calib is None or calib.random):
            raise ConfigError("--precision int8 needs real calibration data", hint="pass --calib DIR")
        timing_cache = Path(args.timing_cache).read_bytes() if args.timing_cache and Path(args.timing_cache).is_file() else None
        from compress.passes.accuracy import FidelityTargetError

        try:
            with flag_errors(flags):
                result = build(model, config, calib=calib, baseline=baseline, previous=previous,
                               names={"model": Path(args.model).name,
                                      "baseline": Path(args.baseline).name if args.baseline else None},
                               timing_cache=timing_cache)
        except FidelityTargetError as exc:
            from compress.onnx_io import model_digest, write_json

            with outs.writing() as stage:
                write_json(stage.path(out) / "passes.json", {"target_missed": True, "error": exc.message,
                                                 "input_sha256": model_digest(model), **exc.report})
            print(f"error: {exc.message}\nhint: {exc.hint}\nreport: {out / 'passes.json'}", file=sys.stderr)
            return TARGET_EXIT_CODE
        with outs.writing() as stage:
            write_build_files(stage.path(out), result)
        logger.info("wrote %s", out)
        if args.json:
            print_json(result.latency)
        else:
            print(result.markdown)
        failed = [g for g in result.gates if not g.passed]
        for g in failed:
            print(f"gate failed: {g.name}: {g.message}", file=sys.stderr)
        return failed[0].exit_code if failed else 0


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not a number", hint=f"e.g. {flag} 0.99, or {flag} none") from None


def _config(args: argparse.Namespace) -> Any:
    """The BuildConfig of the flags (FieldError naming a field; :func:`flag_errors` names the flag)."""
    from compress.build import BuildConfig
    from compress.build.trt import ShapeProfile

    target = None if args.target_fidelity.strip().lower() == "none" else _number("--target-fidelity", args.target_fidelity)
    return BuildConfig(
        target_fidelity=target, max_fallback=args.max_fallback, sparsity_method=args.sparsity_method,
        smoothquant=args.smoothquant,
        precision=args.precision, sparsity=args.sparsity, backend=args.backend,
        calibration_method=args.calibration_method, int8_activations=args.int8_activations,
        exclude=tuple(x.strip() for x in (args.exclude or "").split(",") if x.strip()),
        profiles=tuple(ShapeProfile.parse(s) for s in args.shapes),
        legacy_precision=args.legacy_precision,
        bench=BenchConfig(warmup_s=args.warmup_ms / 1000.0, iterations=args.iterations, duration_s=args.duration),
        gates=Gates(max_latency_ms=args.max_latency_ms, min_speedup=args.min_speedup,
                    max_regression_pct=args.max_regression, min_fidelity=args.min_fidelity),
    )
