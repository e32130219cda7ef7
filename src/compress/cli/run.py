"""``compress run``: export -> prune -> build -> report from one pipeline config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.cli import command
from compress.cli._common import print_json
from compress.gates import GATE_EXIT_CODES

_DESCRIPTION = f"""\
Run the whole job from one config file (YAML or JSON; format in deploy/README.md):

  export   PyTorch -> ONNX with a parity check and a block map (skipped for an .onnx source)
  calib    calibration batches from .npz files, a text file (tokenized), images, or
           explicitly requested random inputs
  prune    score the blocks and remove the redundant ones, verified on held-out batches
  build    precision/sparsity passes, TensorRT engine or ONNX Runtime, latency reports
  report   gates, summary.json and summary.md (ending in the result table)

Every stage writes into its own folder of OUTDIR (export/, calib/, prune/, build/) with a
stage.json that holds the hash of its inputs: its config section, the sha256 of the files it
reads and of the upstream artifacts, package versions and compress's version. A stage whose
hash is unchanged is not redone ("skipped (unchanged)"), so editing the prune section re-runs
prune and build but not export. Gates are checked on every run without re-running the
benchmark; a failed gate exits with compress build's code: max-latency \
{GATE_EXIT_CODES['max-latency']}, min-speedup {GATE_EXIT_CODES['min-speedup']}, max-regression \
{GATE_EXIT_CODES['max-regression']}, min-fidelity {GATE_EXIT_CODES['min-fidelity']}.

examples:
  compress run deploy/pipelines/minilm.yaml                 # -> out/minilm/
  compress run deploy/pipelines/cnn.yaml -o out/cnn --force
  compress run deploy/pipelines/minilm-trt.yaml -o out/trt  # TensorRT, gates
"""


@command("run", help="export -> prune -> build -> report from one pipeline config; unchanged stages are skipped",
         description=_DESCRIPTION)
class Run:
    """The ``run`` subcommand: the whole pipeline from one config file."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add PIPELINE.yaml, ``-o/--output``, ``--force`` and ``--json`` to ``parser``."""
        parser.add_argument("config", metavar="PIPELINE.yaml",
                            help="the pipeline config (.yaml, .yml or .json); relative paths in it are relative "
                                 "to its folder")
        parser.add_argument("-o", "--output", metavar="OUTDIR",
                            help="output folder, created with its parents; an earlier run's folder is updated in "
                                 "place (default: out/CONFIG_NAME in the current folder, e.g. out/minilm)")
        parser.add_argument("--force", action="store_true", help="re-run every stage, even unchanged ones")
        parser.add_argument("--json", action="store_true", help="print summary.json instead of summary.md")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Run the pipeline and print its summary (markdown, or JSON with ``--json``).

        Returns:
            The pipeline's exit code: 0, or a failed gate's code (each failed gate is also
            reported on stderr).
        """
        from compress.pipeline import load_config, run_pipeline

        config = load_config(args.config)
        out = Path(args.output) if args.output else Path("out") / config.name
        result = run_pipeline(config, out, force=args.force)
        if args.json:
            print_json(result.summary)
        else:
            print(result.markdown)
        for gate in result.gates:
            if not gate.passed:
                print(f"gate failed: {gate.name}: {gate.message}", file=sys.stderr)
        return result.exit_code
