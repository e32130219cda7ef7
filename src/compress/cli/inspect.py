"""``compress inspect``: print the blocks of an ONNX model."""

from __future__ import annotations

import argparse

from compress.blocks import block_rows
from compress.cli import command
from compress.cli._common import add_blocks_argument, load_model_and_blocks, print_json
from compress.onnx_io import write_json
from compress.outputs import Outputs
from compress.reports import text_table


@command(
    "inspect",
    help="list the repeated blocks of an ONNX model and whether each can be removed",
    description=(
        "List the blocks of an ONNX model: index, module path, node count, parameters, the\n"
        "residual-stream boundary tensors with their shapes (one stream per transformer layer; two,\n"
        "image and text, for MMDiT / Flux joint blocks), and whether the block can be removed (every\n"
        "tensor leaving it replaces a stream input of the same shape and dtype, and it passes the\n"
        "structural check on the graph), or why not.\n\n"
        "example:\n  compress inspect model.onnx\n  compress inspect model.onnx --blocks encoder.layer --json"
    ),
)
class Inspect:
    """The ``inspect`` subcommand: print (or write) the block map of an ONNX model."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add MODEL, ``--blocks``, ``--json``, ``--write-blocks`` and ``--force`` to ``parser``."""
        parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model")
        add_blocks_argument(parser)
        parser.add_argument("--json", action="store_true", help="print the block map as JSON instead of a table")
        parser.add_argument("--write-blocks", metavar="PATH", help="also write the block map to PATH (JSON)")
        parser.add_argument("--force", action="store_true", help="overwrite --write-blocks if it exists")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Print the block table (or JSON) and write ``--write-blocks``; returns 0.

        Does not modify the model file.
        """
        outs = Outputs(force=args.force)
        outs.add_model_input(args.model)
        out = outs.file(args.write_blocks, flag="--write-blocks") if args.write_blocks else None
        outs.check()
        model, block_map = load_model_and_blocks(args.model, spec=args.blocks)
        if out is not None:
            with outs.writing() as stage:
                write_json(stage.path(out), block_map.to_dict())
        if args.json:
            print_json(block_map.to_dict())
            return 0
        headers, rows = block_rows(block_map)
        print(text_table(headers, rows))
        n = len(block_map.blocks)
        print(f"\n{n} blocks in {', '.join(block_map.containers)} (found from {block_map.source}); "
              f"{len(block_map.removable)} removable; {len(model.graph.node)} nodes in the graph")
        return 0
