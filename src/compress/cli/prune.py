"""``compress prune``: score blocks on calibration data (and, with -o, remove the redundant ones)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from compress.bench import BenchConfig
from compress.blocks import MappedModel
from compress.cli import command
from compress.cli._common import (
    add_blocks_argument,
    add_calib_arguments,
    block_map_path,
    flag_errors,
    load_calib_for,
    load_model_and_blocks,
    print_json,
)
from compress.config import add_arguments, flag_names, from_args
from compress.errors import ConfigError
from compress.log import logger
from compress.onnx_io import write_json, write_text
from compress.outputs import Outputs
from compress.prune import (
    AUTO_METRIC,
    SELECTIONS,
    PruneConfig,
    blocks_for_ratio,
    check_blocks,
    choose_metric,
    prune,
    split_batches,
    sweep,
)
from compress.reports import write_plot
from compress.reports.prune import plot_sweep, prune_markdown, sweep_markdown, write_prune_files
from compress.reports.scoring import plot_scores, scores_markdown, scores_text
from compress.scoring import STREAM_FUSIONS, MetricConfig, metric_names, parse_stream_weights, parse_token_ranges
from compress.scoring.collect import ScoreConfig, score

_DESCRIPTION = """\
Score every block of an ONNX model on calibration data, in one ONNX Runtime pass per batch
(all block boundaries are added as extra graph outputs), and report which blocks the model
can best live without.

metrics (higher = more important):
  cosine         mean over tokens of 1 - |cos(x_in, x_out)| along the hidden dim (Sana 1.5)
  cosine-signed  mean of 1 - cos (ShortGPT block influence, Minitron)
  angular        mean of arccos(cos)/pi over spans of --interval blocks (Gromov et al.)
  cka            linear CKA between block outputs + Fisher optimal segmentation (SGLP)
  ablation       skip each block and measure how far the final outputs move (1 extra
                 ONNX Runtime session per block; slower, the direct check)
  gradnorm       SGLP's GradNorm: the norm of the loss gradient over the block's parameters,
                 computed in torch (no ONNX Runtime pass): read from MODEL.blocks.json
                 ('compress export --calib') or computed with --torch-source MODEL; with
                 --per-segment: CKA segments, GradNorm inside each segment (SGLP)
  auto           (default) ablation when the blocks take convolutional feature maps
                 (rank 4, NCHW), else cosine; the report says which and why

selection (lowest score = least important; see compress.prune for the exact rules):
  --remove N / --ratio R   remove N (or R x blocks) blocks: by default the N lowest-scoring removable
                           blocks (--select lowest) unless a rule below is given
  --span                   with --remove N: the contiguous run of N blocks with the lowest span score
  --per-segment            with --remove N: SGLP, the least important block of each CKA segment first
  --measured               with --remove N: evaluate the candidate sets of lowest/span/per-segment by
                           cosine, cosine-signed, angular and CKA (and healed, with --heal) on the held-out
                           batches; keep the best measured one (the lowest-score set is one of them)
  --auto                   from the score distribution: cut at the largest relative gap (k <= n/2)
  --max-drop X             fidelity budget: remove one block at a time, re-score, verify on held-out
                           batches, stop before the loss (1 - top1 for logits, else 1 - cosine) exceeds X

examples:
  compress prune model.onnx --calib calib/ -o pruned.onnx --remove 2 --report prune.json
  compress prune model.onnx --calib calib/ -o pruned.onnx --max-drop 0.02
  compress prune model.onnx --calib calib/ -o pruned.onnx --remove 4 --span --heal
  compress prune model.onnx --calib calib/ -o pruned.onnx --sweep 0:4 --report sweep.json
  compress prune model.onnx --calib calib/ --scores-only --report scores.json
  compress prune model.onnx --calib calib/ --scores-only --metric cosine,cka,ablation
  compress prune model.onnx --calib calib/ -o pruned.onnx --remove 2 --metric gradnorm --per-segment --torch-source net.py:build
  compress prune sd3.onnx --calib calib/ --scores-only --stream-fusion mean --stream-weights hidden_states=3
  compress prune flux-old.onnx --calib calib/ --scores-only --token-ranges text=0:512,image=512:

padding: with a mask input ([batch, tokens], e.g. attention_mask; --token-mask), every token-level
metric uses only the real tokens (details.tokens counts them, details.positions all positions).

healing (--heal): each removed contiguous span is replaced by T = argmin ||[X 1] T - Y||^2 +
lambda ||W - I||^2 (X, Y: the span's input and output stream on the scoring batches, real tokens
only), inserted as MatMul + Add (on NCHW feature maps: per pixel over the channels, a 1x1 Conv);
a span keeps it only when the held-out fidelity improves. The map fits the calibration data: it can
lower a task on other data (benchmarks/results/prune-depth.md), so calibrate on what you deploy on.

multi-stream blocks (MMDiT: image and text hidden states on separate tensors) are scored per
stream; a block's score is the max of its per-stream scores (it is only as redundant as its
least redundant stream), or their (weighted) mean with --stream-fusion mean. --token-ranges is
for one tensor that concatenates modalities, and every range must fit it.
"""


def _metrics(spec: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise ConfigError("--metric is empty", hint=f"choose from: {', '.join(metric_names())}, {AUTO_METRIC}")
    return names


def _resolve_auto(names: tuple[str, ...], block_map: Any) -> tuple[str, ...]:
    if AUTO_METRIC not in names:
        return names
    metric, why = choose_metric(block_map)
    logger.info("metric auto: %s", why)
    return tuple(dict.fromkeys(metric if n == AUTO_METRIC else n for n in names))


@command("prune", help="score blocks on calibration data and remove the redundant ones, verified",
         description=_DESCRIPTION)
class Prune:
    """``compress prune``: its flags and its run (scores only, a sweep, or one pruned model)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the model, block, calibration, scoring, selection and output flags to ``parser``."""
        parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model (never modified)")
        add_blocks_argument(parser)
        add_calib_arguments(parser)
        s = parser.add_argument_group("scoring")
        s.add_argument("--metric", default=AUTO_METRIC, metavar="NAME[,NAME...]",
                       help=f"metric(s) to compute, comma-separated; one of: {', '.join(metric_names())}, or "
                            f"{AUTO_METRIC} (default): ablation for convolutional (rank-4, NCHW) blocks, else cosine")
        s.add_argument("--interval", type=int, default=1, metavar="K",
                       help="compare the input of block i with the output of block i+K-1 (default 1)")
        s.add_argument("--token-ranges", metavar="NAME=A:B,...",
                       help="score token ranges separately (per modality), e.g. text=0:77,image=77:")
        s.add_argument("--stream-fusion", choices=STREAM_FUSIONS, default="max",
                       help="how per-stream scores of a multi-stream block combine: max (default: the least "
                            "redundant stream decides) or mean")
        s.add_argument("--stream-weights", metavar="NAME=W,...",
                       help="with --stream-fusion mean: stream weights, e.g. hidden_states=3,encoder_hidden_states=1")
        s.add_argument("--last-token", action="store_true", help="score only the last token of each sample")
        s.add_argument("--segments", type=int, metavar="K", help="number of CKA segments (default: automatic)")
        s.add_argument("--channel-axis", type=int, metavar="AXIS",
                       help="hidden axis of the activations (default: 1 for NCHW, else the last)")
        s.add_argument("--torch-source", metavar="MODEL",
                       help="the torch model the ONNX model was exported from (MODEL as for 'compress export', e.g. "
                            "--torch-source net.py:build or hf:./minilm): each block's GradNorm is computed in torch on "
                            "the scoring calibration batches before selection, for --metric gradnorm (otherwise it is "
                            "read from MODEL.blocks.json, written by 'compress export --calib')")
        s.add_argument("--trust-code", action="store_true",
                       help="allow a --torch-source .pt2 archive with pickled payloads (unpickling runs code: only "
                            "for archives you made or trust; as in 'compress export')")
        s.add_argument("--token-mask", default="auto", metavar="INPUT",
                       help="the padding-mask input ([batch, tokens], nonzero = real token): scores and healing "
                            "use real tokens only; auto (default) finds an integer input named like "
                            "attention_mask, none uses every position")
        sel = parser.add_argument_group("selection (with -o)")
        how = sel.add_mutually_exclusive_group()
        add_arguments(PruneConfig, how, only=("remove",))
        how.add_argument("--ratio", type=float, metavar="R", help="remove round(R x number of blocks) blocks")
        how.add_argument("--auto", action="store_true", help="choose how many from the score distribution")
        add_arguments(PruneConfig, how, only=("max_drop",))
        rule = sel.add_mutually_exclusive_group()
        rule.add_argument("--span", action="store_true", help="remove a contiguous span of blocks")
        rule.add_argument("--per-segment", action="store_true", help="one block per CKA segment first (SGLP)")
        rule.add_argument("--measured", action="store_true",
                          help="with --remove N: try the candidate sets of every rule and metric (with and without "
                               "--heal) on the held-out batches and keep the best measured one")
        rule.add_argument("--select", choices=SELECTIONS.names(), help="selection rule by name (incl. the "
                          "baselines 'last' and 'random')")
        add_arguments(PruneConfig, sel, only=("keep", "holdout"))
        sel.add_argument("--sweep", metavar="0:K", help="prune 0..K blocks and tabulate fidelity and latency; with --measured "
                              "every candidate (healed too, with --heal) is listed, and the plot marks the Pareto "
                              "fronts of loss against latency and parameters")
        add_arguments(PruneConfig, sel, only=("seed", "heal", "heal_ridge"))
        sel.add_argument("--no-latency", action="store_true", help="do not time ONNX Runtime latency")
        sel.add_argument("--latency-seconds", type=float, default=1.0, metavar="S",
                         help="time each model for at least S seconds (default 1)")
        o = parser.add_argument_group("output")
        o.add_argument("-o", "--output", metavar="PRUNED.onnx",
                       help="write the pruned model here (and PRUNED.blocks.json beside it)")
        o.add_argument("--scores-only", action="store_true", help="only score the blocks; remove nothing")
        o.add_argument("--report", metavar="PATH.json",
                       help="write the report as JSON, with PATH.md and PATH.png beside it")
        o.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
        o.add_argument("--force", action="store_true", help="overwrite existing outputs")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Score (``--scores-only``) or prune; returns the exit code (0). User errors raise ``CompressError``."""
        if args.scores_only:
            return _scores_only(args)
        return _prune(args)


def _metric_config(args: argparse.Namespace) -> MetricConfig:
    return MetricConfig(
        interval=args.interval,
        token_ranges=parse_token_ranges(args.token_ranges) if args.token_ranges else (),
        last_token=args.last_token, segments=args.segments, channel_axis=args.channel_axis,
        stream_fusion=args.stream_fusion,
        stream_weights=parse_stream_weights(args.stream_weights) if args.stream_weights else (),
        token_mask=args.token_mask,
    )


def _scores_only(args: argparse.Namespace) -> int:
    outs = _outputs(args)
    report_path = _plan_report(args, outs)
    outs.check()
    metrics, options = _metrics(args.metric), _metric_config(args)
    model, block_map = load_model_and_blocks(args.model, spec=args.blocks)
    _check_gradnorm(args, metrics, block_map)  # auto never stands for gradnorm
    calib = load_calib_for(args, model)
    block_map = _torch_gradnorm(args, model, block_map, calib)
    config = ScoreConfig(metrics=_resolve_auto(metrics, block_map), options=options)
    logger.info("scoring %d blocks on %s", len(block_map.blocks), calib.description)
    report = score(MappedModel(model, block_map), config, data=calib)[1].to_dict()
    report["model"] = Path(args.model).name
    if report_path is not None:
        with outs.writing() as stage:
            write_json(stage.path(report_path), report)
            write_text(stage.path(report_path.with_suffix(".md")), scores_markdown(report))
            write_plot(stage.path(report_path.with_suffix(".png")), plot_scores, report)
        logger.info("wrote %s (+ .md)", report_path)
    if args.json:
        print_json(report)
    else:
        print(scores_text(report))
    return 0


def _sweep_range(spec: str) -> list[int]:
    a, sep, b = spec.partition(":")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit() or int(a) > int(b):
        raise ConfigError(f"--sweep {spec!r} is not A:B with A <= B", hint="e.g. --sweep 0:4")
    return list(range(int(a), int(b) + 1))


def _prune(args: argparse.Namespace) -> int:
    if args.sweep is None and not args.output:
        raise ConfigError("no output model", hint="pass -o PRUNED.onnx (or --scores-only / --sweep)")
    metrics = _metrics(args.metric)
    if len(metrics) != 1:
        raise ConfigError(f"--metric {args.metric}: pruning ranks blocks by one metric",
                          hint="pass a single metric, e.g. --metric cosine (or leave --metric out: auto)")
    if args.sweep is None and args.remove is None and args.ratio is None and not args.auto and args.max_drop is None:
        raise ConfigError("say how much to prune", hint="pass one of --remove N, --ratio R, --auto or --max-drop X")
    if args.output and not args.output.endswith(".onnx"):
        raise ConfigError(f"-o {args.output}: the pruned model's name must end in .onnx", hint="e.g. -o pruned.onnx")
    outs = _outputs(args)
    out = outs.file(args.output, model=True) if args.output and args.sweep is None else None
    blocks_out = outs.file(block_map_path(out)) if out is not None else None
    report_path = _plan_report(args, outs)
    outs.check()
    select = args.select or ("span" if args.span else "segment" if args.per_segment else "measured" if args.measured else "auto" if args.auto else "lowest")
    if args.ratio is not None and not 0 < args.ratio < 1:  # also refuses nan and inf
        raise ConfigError(f"--ratio {args.ratio} must be between 0 and 1", hint="e.g. --ratio 0.25")
    flags = _prune_flags(args)
    counts = _sweep_range(args.sweep) if args.sweep is not None else []
    with flag_errors(flags):  # every number is checked before the model is read
        latency = None if args.no_latency else BenchConfig(duration_s=args.latency_seconds)
        config = from_args(PruneConfig, args, metric=metrics[0], select=select, options=_metric_config(args),
                           latency=latency)
    model, block_map = load_model_and_blocks(args.model, spec=args.blocks)
    if args.ratio is not None:
        config = replace(config, remove=blocks_for_ratio(args.ratio, block_map))
    with flag_errors(flags):
        check_blocks(config, block_map, counts=counts)
    _check_gradnorm(args, (config.metric,), block_map)
    calib = load_calib_for(args, model)
    if args.torch_source:  # on the scoring batches only: the held-out ones verify
        block_map = _torch_gradnorm(args, model, block_map, split_batches(calib, config.holdout)[0])
    if args.sweep is not None:
        with flag_errors(flags):
            rows = sweep(MappedModel(model, block_map), config, data=calib, counts=counts)
        report = {"schema_version": 1, "model": Path(args.model).name, "sweep": rows,
                  "calibration": {"description": calib.description, "random": calib.random},
                  "method": {"metric": config.metric, "select": select}}
        if report_path is not None:
            with outs.writing() as stage:
                write_json(stage.path(report_path), report)
                write_text(stage.path(report_path.with_suffix(".md")), sweep_markdown(report))
                write_plot(stage.path(report_path.with_suffix(".png")), plot_sweep, report)
        print_json(report) if args.json else print(sweep_markdown(report))
        return 0
    with flag_errors(flags):
        pruned, pruned_report = prune(MappedModel(model, block_map), config, data=calib)
    report = {"model": Path(args.model).name, "output": out.name if out else None, **pruned_report.to_dict()}
    assert out is not None
    assert blocks_out is not None
    with outs.writing() as stage:
        write_prune_files(pruned, report, model=stage.path(out), blocks=stage.path(blocks_out),
                          report_json=stage.path(report_path) if report_path is not None else None)
    if args.json:
        print_json(report)
    else:
        print(prune_markdown(report))
    return 0


def _check_gradnorm(args: argparse.Namespace, metrics: tuple[str, ...], block_map: Any) -> None:
    """Before the calibration data is read: metric gradnorm needs GradNorm in the block map or --torch-source.

    Raises:
        BlockError: naming the block map (``MODEL.blocks.json``) and how to get GradNorm.
    """
    from compress.scoring.gradnorm import GRADNORM, has_gradnorm, missing_gradnorm_error

    if GRADNORM not in metrics or args.torch_source or has_gradnorm(block_map):
        return
    sidecar = block_map_path(args.model)
    raise missing_gradnorm_error(sidecar.name if sidecar.is_file() and not args.blocks
                                 else f"the block map of {Path(args.model).name}")


def _torch_gradnorm(args: argparse.Namespace, model: Any, block_map: Any, batches: Any) -> Any:
    """With --torch-source: ``block_map`` with each block's GradNorm on ``batches`` (else ``block_map`` as is)."""
    if not args.torch_source:
        return block_map
    from compress.export import load_torch_model
    from compress.export.gradnorm import block_map_with_gradnorms

    logger.info("loading %s for GradNorm...", args.torch_source)
    loaded = load_torch_model(args.torch_source, verbose=args.verbose > 0, trust_code=args.trust_code)
    return block_map_with_gradnorms(loaded.module, model, block_map, batches)[0]


def _prune_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flag of each PruneConfig / BenchConfig field, for error messages (the generated ones from the fields)."""
    return {**flag_names(PruneConfig), "metric": "--metric", "select": "--select", "duration_s": "--latency-seconds",
            "remove": ("--sweep", args.sweep) if args.sweep is not None else
                      ("--ratio", args.ratio) if args.ratio is not None else "--remove"}


def _outputs(args: argparse.Namespace) -> Outputs:
    """The output guard of this run: the model (its block map, external data) and --calib are inputs."""
    outs = Outputs(force=args.force)
    outs.add_model_input(args.model)
    outs.add_input(args.calib)
    if args.torch_source:
        from compress.export import model_files

        for f in model_files(args.torch_source):
            outs.add_input(f)
    return outs


def _plan_report(args: argparse.Namespace, outs: Outputs) -> Path | None:
    """Plan --report PATH.json with PATH.md (and PATH.png for scores and sweeps) beside it."""
    if not args.report:
        return None
    path = Path(args.report)
    if path.suffix != ".json":
        raise ConfigError(f"--report {args.report}: the report path must end in .json", hint="e.g. --report scores.json")
    outs.file(path, flag="--report")
    outs.file(path.with_suffix(".md"), flag="--report")
    if args.scores_only or args.sweep is not None:
        outs.file(path.with_suffix(".png"), flag="--report")
    return path
