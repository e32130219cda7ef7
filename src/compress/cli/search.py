"""``compress search``: the fastest model that meets a fidelity target, searched over depth x precision x sparsity."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from compress.cli import command
from compress.cli._common import print_json

_DESCRIPTION = """\
Search a pipeline config's `search:` section (format in deploy/README.md): every combination of
blocks removed, selection rule, healing, precision pass and 2:4 method is a candidate; the search
returns the fastest (goal median or p99), the smallest (size), or the Pareto front (pareto) of
those whose output fidelity against the original (held-out calibration batches) meets the target.

Cheap before expensive: each pruned model and each pass on the unpruned model is measured once;
the other candidates are predicted from those measurements, and only those that can still meet
the target and beat the best one measured are built and timed (search.md says why each other
one was skipped). Every candidate's stages are content-hashed under OUTDIR/search/, so a re-run
or a resumed, interrupted search redoes nothing finished.

Candidates run as Ray tasks when Ray is installed (pip install 'onnx-compress[ray]'): a local Ray
by default, or a cluster (--ray-address / RAY_ADDRESS). Latency is measured one candidate per
device at a time. The winner goes to OUTDIR/best/ (model, latency.json against the original,
trtexec.sh) and the config's gates are checked on it. Exit codes: 0; 3-6 a failed gate; 7 no
candidate meets the target.

examples:
  compress search deploy/pipelines/search-minilm.yaml              # -> out/search-minilm/
  compress search deploy/pipelines/search-minilm.yaml --workers 2  # a local Ray with 2 CPUs
  compress search my.yaml --ray-address ray://head:10001 -o /shared/out/my
  compress search my.yaml --executor serial --exhaustive            # every candidate, in this process
"""


@command("search", help="the fastest model meeting a fidelity target: depth x precision x sparsity, on Ray",
         description=_DESCRIPTION)
class Search:
    """The ``search`` subcommand."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add PIPELINE.yaml, ``-o``, ``--force``, ``--json`` and the executor flags (they override the config's)."""
        parser.add_argument("config", metavar="PIPELINE.yaml",
                            help="a pipeline config with a search section; relative paths are relative to its folder")
        parser.add_argument("-o", "--output", metavar="OUTDIR",
                            help="output folder (default: out/CONFIG_NAME); an earlier search's folder is updated "
                                 "in place and its finished candidates are not redone")
        parser.add_argument("--force", action="store_true", help="redo every stage, even finished ones")
        parser.add_argument("--json", action="store_true", help="print search.json instead of the summary")
        parser.add_argument("--executor", choices=("auto", "ray", "serial"),
                            help="auto (default): Ray when installed, else one candidate at a time here")
        parser.add_argument("--workers", type=int, metavar="N", help="CPUs of a local Ray (default: all)")
        parser.add_argument("--ray-address", metavar="ADDRESS",
                            help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)")
        parser.add_argument("--exhaustive", action="store_true", default=None,
                            help="build and time every candidate (no prediction)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Run the search and print its summary; returns :attr:`compress.search.SearchResult.exit_code`."""
        from compress.reports.search import search_text
        from compress.search import load_search_config, run_search
        from compress.validate import FieldError

        config = load_search_config(args.config)
        given = {k: v for k, v in (("executor", args.executor), ("workers", args.workers),
                                   ("ray_address", args.ray_address), ("exhaustive", args.exhaustive)) if v is not None}
        try:
            config = replace(config, search=replace(config.search, **given))
        except FieldError as exc:
            raise exc.as_key(f"--{exc.field.replace('_', '-')}") from None
        out = Path(args.output) if args.output else Path("out") / config.pipeline.name
        result = run_search(config, out, force=args.force)
        if args.json:
            print_json(result.report)
        else:
            print(search_text(result.report))
        for gate in result.gates:
            if not gate.passed:
                print(f"gate failed: {gate.name}: {gate.message}", file=sys.stderr)
        if result.exit_code == 7:
            print(f"no candidate meets the target fidelity {config.search.target_fidelity:g} "
                  f"(see {out / 'search.md'})", file=sys.stderr)
        return result.exit_code
