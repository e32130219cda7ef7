"""``compress build``: precision/sparsity ONNX passes, a TensorRT engine (or ONNX Runtime), latency reports.

The glue of the build stage: flags -> :class:`~compress.build.BuildConfig` and
:class:`~compress.gates.Gates`, :func:`compress.build.build`, the gates evaluated on its
report, then the folder rendered and written by :mod:`compress.reports.build`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.build.config import ENGINE_OPTIONS, PASS_OPTIONS, TARGET_EXIT_CODE, BuildConfig
from compress.cli import command
from compress.cli._common import add_calib_arguments, flag_errors, load_calib_for, print_json
from compress.config import add_arguments, flag_names, from_args
from compress.errors import ConfigError
from compress.gates import GATE_EXIT_CODES, Gates, check_previous, evaluate_gates
from compress.log import logger
from compress.onnx_io import load_model, read_json
from compress.outputs import Outputs

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
    """``compress build MODEL.onnx -o OUTDIR``: exit code 0, a user error 1, a failed gate 3-6, a missed target 7."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags: passes, calibration data, engine and benchmark, gates, ``--json``."""
        parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model (never modified)")
        parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
        parser.add_argument("--force", action="store_true", help="replace OUTDIR if it holds an earlier build")
        p = parser.add_argument_group("passes")
        add_arguments(BuildConfig, p, only=PASS_OPTIONS)
        add_calib_arguments(parser)
        b = parser.add_argument_group("engine and benchmark")
        add_arguments(BuildConfig, b, only=ENGINE_OPTIONS)
        b.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache to start from")
        b.add_argument("--baseline", metavar="ORIG.onnx",
                       help="also time this model on the same backend; report speedup and fidelity against it")
        g = parser.add_argument_group("gates (a failed gate exits with its own code)")
        add_arguments(Gates, g, only=("max_latency_ms", "min_speedup"))
        g.add_argument("--previous", metavar="latency.json", help="an earlier report to compare with")
        add_arguments(Gates, g, only=("max_regression_pct", "min_fidelity"))
        parser.add_argument("--json", action="store_true", help="print latency.json instead of the Markdown summary")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Build, evaluate the gates, write OUTDIR atomically; print the Markdown (or the JSON) summary.

        Returns:
            0, the exit code of the first failed gate (:data:`GATE_EXIT_CODES`), or
            :data:`~compress.build.TARGET_EXIT_CODE` (then only ``OUTDIR/passes.json`` is written).
        """
        from compress.build import build
        from compress.reports.build import render_build, write_build_files

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
        if args.max_regression_pct is not None and previous is None:
            raise ConfigError("--max-regression needs a previous report", hint="pass --previous latency.json")
        # errors the stage raises about its config (the model's inputs against --shapes, the target)
        flags = {**flag_names(BuildConfig), "TargetConfig.fidelity": "--target-fidelity",
                 "TargetConfig.max_fallback": "--max-fallback"}
        config, gates = _config(args)  # every value is checked before a model is read
        model = load_model(args.model)
        baseline = load_model(args.baseline) if args.baseline else None
        calib = load_calib_for(args, model) if (args.calib or args.random_calib) else None
        if config.precision == "int8" and (calib is None or calib.random):
            raise ConfigError("--precision int8 needs real calibration data", hint="pass --calib DIR")
        timing_cache = Path(args.timing_cache).read_bytes() if args.timing_cache and Path(args.timing_cache).is_file() else None
        from compress.passes.accuracy import FidelityTargetError

        try:
            with flag_errors(flags):
                result = build(model, config, data=calib, baseline=baseline,
                               names={"model": Path(args.model).name,
                                      "baseline": Path(args.baseline).name if args.baseline else None},
                               timing_cache=timing_cache)
                results = evaluate_gates(result.latency.to_dict(), gates, previous=previous)
        except FidelityTargetError as exc:
            from compress.onnx_io import model_digest, write_json

            with outs.writing() as stage:
                write_json(stage.path(out) / "passes.json", {"target_missed": True, "error": exc.message,
                                                 "input_sha256": model_digest(model), **exc.report})
            print(f"error: {exc.message}\nhint: {exc.hint}\nreport: {out / 'passes.json'}", file=sys.stderr)
            return TARGET_EXIT_CODE
        reports = render_build(result, results)
        with outs.writing() as stage:
            write_build_files(stage.path(out), result, reports)
        logger.info("wrote %s", out)
        if args.json:
            print_json(reports.latency)
        else:
            print(reports.markdown)
        failed = [g for g in reports.gates if not g.passed]
        for g in failed:
            print(f"gate failed: {g.name}: {g.message}", file=sys.stderr)
        return failed[0].exit_code if failed else 0


def _config(args: argparse.Namespace) -> tuple[BuildConfig, Gates]:
    """The BuildConfig and the Gates of the flags (a refused value is a ConfigError naming its flag)."""
    return from_args(BuildConfig, args), from_args(Gates, args)
