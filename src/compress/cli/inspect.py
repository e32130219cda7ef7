"""``compress inspect``: print the blocks of an ONNX model."""

from __future__ import annotations

import argparse

from compress.blocks import block_rows
from compress.cli import command
from compress.cli._common import add_blocks_argument, load_model_and_blocks, print_json
from compress.onnx_io import check_output_path, write_json
from compress.report import text_table


@command(
    "inspect",
    help="list the repeated blocks of an ONNX model and whether each can be removed",
    description=(
        "List the blocks of an ONNX model: index, module path, node count, parameters, the\n"
        "residual-stream boundary tensors with their shapes, and whether the block can be removed\n"
        "(one stream input and one output of the same shape and dtype).\n\n"
        "example:\n  compress inspect model.onnx\n  compress inspect model.onnx --blocks encoder.layer --json"
    ),
)
class Inspect:
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model")
        add_blocks_argument(parser)
        parser.add_argument("--json", action="store_true", help="print the block map as JSON instead of a table")
        parser.add_argument("--write-blocks", metavar="PATH", help="also write the block map to PATH (JSON)")
        parser.add_argument("--force", action="store_true", help="overwrite --write-blocks if it exists")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        out = check_output_path(args.write_blocks, inputs=[args.model], force=args.force,
                                flag="--write-blocks") if args.write_blocks else None
        model, block_map = load_model_and_blocks(args.model, spec=args.blocks)
        if out is not None:
            write_json(out, block_map.to_dict())
        if args.json:
            print_json(block_map.to_dict())
            return 0
        headers, rows = block_rows(block_map)
        print(text_table(headers, rows))
        n = len(block_map.blocks)
        print(f"\n{n} blocks in {', '.join(block_map.containers)} (found from {block_map.source}); "
              f"{len(block_map.removable)} removable; {len(model.graph.node)} nodes in the graph")
        return 0
