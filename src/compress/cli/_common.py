"""Helpers shared by the subcommands: loading a model with its block map, printing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import onnx

from compress.blocks import BlockMap, find_blocks
from compress.onnx_io import load_model, read_json


def block_map_path(model_path: str | Path) -> Path:
    """``MODEL.blocks.json`` beside ``MODEL.onnx``."""
    p = Path(model_path)
    return p.with_name(p.name[: -len(".onnx")] + ".blocks.json") if p.name.endswith(".onnx") else p.with_name(p.name + ".blocks.json")


def add_blocks_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--blocks", metavar="CONTAINER",
        help="module path of the block container(s), comma-separated (e.g. encoder.layer, _blocks, "
             "layer1,layer2); default: MODEL.blocks.json beside the model, else detected from node "
             "metadata, node names, or the graph's repeating residual structure",
    )


def load_model_and_blocks(path: str, *, spec: str | None) -> tuple[onnx.ModelProto, BlockMap]:
    """Load ``path`` and find its blocks (sidecar block map unless ``spec`` is given)."""
    model = load_model(path)
    sidecar = block_map_path(path)
    saved = read_json(sidecar, what="block map") if sidecar.is_file() and not spec else None
    return model, find_blocks(model, spec=spec, block_map=saved)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
