"""``compress prune``: score blocks on calibration data (and, with -o, remove the redundant ones)."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.cli import command
from compress.cli._common import (
    add_blocks_argument,
    add_calib_arguments,
    load_calib_for,
    load_model_and_blocks,
    print_json,
)
from compress.errors import ConfigError
from compress.log import logger
from compress.onnx_io import check_output_path, write_bytes, write_json, write_text
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

examples:
  compress prune model.onnx --calib calib/ --scores-only --report scores.json
  compress prune model.onnx --calib calib/ --scores-only --metric cosine,cka,ablation
  compress prune mmdit.onnx --calib calib/ --scores-only --token-ranges text=0:77,image=77:
"""


def _metrics(spec: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise ConfigError("--metric is empty", hint=f"choose from: {', '.join(metric_names())}")
    return names


@command("prune", help="score blocks on calibration data (--scores-only) and remove redundant ones",
         description=_DESCRIPTION)
class Prune:
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model (never modified)")
        add_blocks_argument(parser)
        add_calib_arguments(parser)
        s = parser.add_argument_group("scoring")
        s.add_argument("--metric", default="cosine", metavar="NAME[,NAME...]",
                       help=f"metric(s) to compute, comma-separated; one of: {', '.join(metric_names())} "
                            "(default: cosine)")
        s.add_argument("--interval", type=int, default=1, metavar="K",
                       help="compare the input of block i with the output of block i+K-1 (default 1)")
        s.add_argument("--token-ranges", metavar="NAME=A:B,...",
                       help="score token ranges separately (per modality), e.g. text=0:77,image=77:")
        s.add_argument("--last-token", action="store_true", help="score only the last token of each sample")
        s.add_argument("--segments", type=int, metavar="K", help="number of CKA segments (default: automatic)")
        s.add_argument("--channel-axis", type=int, metavar="AXIS",
                       help="hidden axis of the activations (default: 1 for NCHW, else the last)")
        o = parser.add_argument_group("output")
        o.add_argument("--scores-only", action="store_true", help="only score the blocks; remove nothing")
        o.add_argument("--report", metavar="PATH.json",
                       help="write the report as JSON, with PATH.md and PATH.png beside it")
        o.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
        o.add_argument("--force", action="store_true", help="overwrite existing outputs")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if not args.scores_only:
            raise ConfigError("block removal is not available yet in this version of compress",
                              hint="pass --scores-only to score the blocks")
        report_path = _check_report(args)
        options = MetricConfig(
            interval=args.interval,
            token_ranges=parse_token_ranges(args.token_ranges) if args.token_ranges else (),
            last_token=args.last_token, segments=args.segments, channel_axis=args.channel_axis,
        )
        config = ScoreConfig(metrics=_metrics(args.metric), options=options)
        model, block_map = load_model_and_blocks(args.model, spec=args.blocks)
        calib = load_calib_for(args, model)
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


def _check_report(args: argparse.Namespace) -> Path | None:
    if not args.report:
        return None
    path = Path(args.report)
    if path.suffix != ".json":
        raise ConfigError(f"--report {args.report}: the report path must end in .json", hint="e.g. --report scores.json")
    for p in (path, path.with_suffix(".md"), path.with_suffix(".png")):
        check_output_path(p, inputs=[args.model], force=args.force, flag="--report")
    return path
