"""``compress prune``: score blocks on calibration data (and, with -o, remove the redundant ones)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from compress.bench import BenchConfig
from compress.cli import command
from compress.cli._common import (
    add_blocks_argument,
    add_calib_arguments,
    block_map_path,
    load_calib_for,
    load_model_and_blocks,
    print_json,
)
from compress.errors import ConfigError
from compress.log import logger
from compress.onnx_io import check_output_path, save_model, write_bytes, write_json, write_text
from compress.prune import AUTO_METRIC, SELECTIONS, PruneConfig, choose_metric, prune_model, sweep
from compress.prune_report import plot_sweep, prune_markdown, sweep_markdown
from compress.scoring import MetricConfig, metric_names, parse_token_ranges
from compress.scoring.collect import ScoreConfig, score_blocks
from compress.scoring.report import plot_scores, scores_markdown, scores_text

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
  auto           (default) ablation when the blocks take convolutional feature maps
                 (rank 4, NCHW), else cosine; the report says which and why

selection (lowest score = least important; see compress.prune for the exact rules):
  --remove N / --ratio R   the N (or R x blocks) lowest-scoring removable blocks
  --span                   with --remove N: the contiguous run of N blocks with the lowest span score
  --per-segment            with --remove N: SGLP, the least important block of each CKA segment first
  --auto                   from the score distribution: cut at the largest relative gap (k <= n/2)
  --max-drop X             fidelity budget: remove one block at a time, re-score, verify on held-out
                           batches, stop before the loss (1 - top1 for logits, else 1 - cosine) exceeds X

examples:
  compress prune model.onnx --calib calib/ -o pruned.onnx --remove 2 --report prune.json
  compress prune model.onnx --calib calib/ -o pruned.onnx --max-drop 0.02
  compress prune model.onnx --calib calib/ -o pruned.onnx --sweep 0:4 --report sweep.json
  compress prune model.onnx --calib calib/ --scores-only --report scores.json
  compress prune model.onnx --calib calib/ --scores-only --metric cosine,cka,ablation
  compress prune mmdit.onnx --calib calib/ --scores-only --token-ranges text=0:77,image=77:
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
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
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
        s.add_argument("--last-token", action="store_true", help="score only the last token of each sample")
        s.add_argument("--segments", type=int, metavar="K", help="number of CKA segments (default: automatic)")
        s.add_argument("--channel-axis", type=int, metavar="AXIS",
                       help="hidden axis of the activations (default: 1 for NCHW, else the last)")
        sel = parser.add_argument_group("selection (with -o)")
        how = sel.add_mutually_exclusive_group()
        how.add_argument("--remove", type=int, metavar="N", help="remove N blocks")
        how.add_argument("--ratio", type=float, metavar="R", help="remove round(R x number of blocks) blocks")
        how.add_argument("--auto", action="store_true", help="choose how many from the score distribution")
        how.add_argument("--max-drop", type=float, metavar="X", help="fidelity budget (e.g. 0.02)")
        rule = sel.add_mutually_exclusive_group()
        rule.add_argument("--span", action="store_true", help="remove a contiguous span of blocks")
        rule.add_argument("--per-segment", action="store_true", help="one block per CKA segment first (SGLP)")
        rule.add_argument("--select", choices=SELECTIONS.names(), help="selection rule by name (incl. the "
                          "baselines 'last' and 'random')")
        sel.add_argument("--keep", metavar="I,J", help="block indices never to remove")
        sel.add_argument("--holdout", type=float, default=0.25, metavar="F",
                         help="share of calibration batches held back for verification (default 0.25)")
        sel.add_argument("--sweep", metavar="0:K", help="prune 0..K blocks and tabulate fidelity and latency")
        sel.add_argument("--seed", type=int, default=0, help="seed of the 'random' baseline")
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
        if args.scores_only:
            return _scores_only(args)
        return _prune(args)


def _metric_config(args: argparse.Namespace) -> MetricConfig:
    return MetricConfig(
        interval=args.interval,
        token_ranges=parse_token_ranges(args.token_ranges) if args.token_ranges else (),
        last_token=args.last_token, segments=args.segments, channel_axis=args.channel_axis,
    )


def _scores_only(args: argparse.Namespace) -> int:
    report_path = _check_report(args)
    metrics, options = _metrics(args.metric), _metric_config(args)
    model, block_map = load_model_and_blocks(args.model, spec=args.blocks)
    calib = load_calib_for(args, model)
    config = ScoreConfig(metrics=_resolve_auto(metrics, block_map), options=options)
    logger.info("scoring %d blocks on %s", len(block_map.blocks), calib.description)
    report = score_blocks(model, block_map, calib, config, calibration=calib.description,
                          random_calibration=calib.random).to_dict()
    report["model"] = Path(args.model).name
    if report_path is not None:
        write_json(report_path, report)
        write_text(report_path.with_suffix(".md"), scores_markdown(report))
        write_bytes(report_path.with_suffix(".png"), plot_scores(report))
        logger.info("wrote %s (+ .md, .png)", report_path)
    if args.json:
        print_json(report)
    else:
        print(scores_text(report))
    return 0


def _int_list(spec: str | None, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in (spec or "").split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} {spec!r} is not a list of block indices", hint=f"e.g. {flag} 0,5") from None


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
    out = check_output_path(args.output, inputs=[args.model], force=args.force) if args.output else None
    if out is not None and out.suffix != ".onnx":
        raise ConfigError(f"-o {args.output}: the pruned model's name must end in .onnx", hint="e.g. -o pruned.onnx")
    report_path = _check_report(args)
    model, block_map = load_model_and_blocks(args.model, spec=args.blocks)
    calib = load_calib_for(args, model)
    select = args.select or ("span" if args.span else "segment" if args.per_segment else "auto" if args.auto else "lowest")
    remove = args.remove
    if args.ratio is not None:
        if not 0 < args.ratio < 1:
            raise ConfigError(f"--ratio {args.ratio} must be between 0 and 1", hint="e.g. --ratio 0.25")
        remove = round(args.ratio * len(block_map.blocks))
    config = PruneConfig(
        metric=metrics[0], select=select, remove=remove, max_drop=args.max_drop,
        keep=_int_list(args.keep, "--keep"), holdout=args.holdout, options=_metric_config(args), seed=args.seed,
        latency=None if args.no_latency else BenchConfig(duration_s=args.latency_seconds),
    )
    if args.sweep is not None:
        rows = sweep(model, block_map, calib, config, _sweep_range(args.sweep), calibration=calib.description,
                     random_calibration=calib.random)
        report = {"schema_version": 1, "model": Path(args.model).name, "sweep": rows,
                  "calibration": {"description": calib.description, "random": calib.random},
                  "method": {"metric": config.metric, "select": select}}
        if report_path is not None:
            write_json(report_path, report)
            write_text(report_path.with_suffix(".md"), sweep_markdown(report))
            write_bytes(report_path.with_suffix(".png"), plot_sweep(report))
        print_json(report) if args.json else print(sweep_markdown(report))
        return 0
    result = prune_model(model, block_map, calib, config, calibration=calib.description,
                         random_calibration=calib.random)
    report = {"model": Path(args.model).name, "output": out.name if out else None, **result.report}
    assert out is not None
    save_model(result.model, out)
    write_json(block_map_path(out), result.block_map.to_dict())
    if report_path is not None:
        write_json(report_path, report)
        write_text(report_path.with_suffix(".md"), prune_markdown(report))
    if args.json:
        print_json(report)
    else:
        print(prune_markdown(report))
    return 0


def _check_report(args: argparse.Namespace) -> Path | None:
    if not args.report:
        return None
    path = Path(args.report)
    if path.suffix != ".json":
        raise ConfigError(f"--report {args.report}: the report path must end in .json", hint="e.g. --report scores.json")
    outputs = (path, path.with_suffix(".md")) + ((path.with_suffix(".png"),) if args.scores_only or args.sweep else ())
    for p in outputs:
        check_output_path(p, inputs=[args.model], force=args.force, flag="--report")
    return path
