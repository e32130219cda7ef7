"""Helpers shared by the subcommands: loading a model with its block map, printing."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Mapping
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
    if saved is not None:
        from compress.blocks.mapfile import check_block_map

        check_block_map(saved, source=str(sidecar))
    return model, find_blocks(model, spec=spec, block_map=saved)


@contextlib.contextmanager
def flag_errors(flags: Mapping[str, str | tuple[str, Any]]) -> Iterator[None]:
    """Report a config :class:`~compress.validate.FieldError` by its flag instead of its field.

    ``flags`` maps a field name (or ``Owner.field``) to its flag, or to ``(flag, value as
    typed)`` where the CLI converts the value (``--warmup-ms`` -> ``warmup_s``).
    """
    from compress.validate import FieldError, as_flags

    try:
        yield
    except FieldError as exc:
        key = f"{exc.owner}.{exc.field}"
        raise as_flags(exc, {exc.field: flags[key]} if key in flags else flags) from None


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def add_calib_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("calibration data")
    g.add_argument("--calib", metavar="PATH",
                   help="a folder of .npz files or one .npz (keys = model input names, leading axis = batch); "
                        "make one with 'compress calib text|images'")
    g.add_argument("--batch-size", type=int, metavar="N", help="split each .npz file into batches of N samples")
    g.add_argument("--random-calib", type=int, metavar="BATCHES",
                   help="use this many batches of random inputs instead of --calib (labelled RANDOM in every report)")
    g.add_argument("--random-dims", metavar="DIM=N,...",
                   help="values of symbolic dims for --random-calib, e.g. batch=4,seq=128")


def _parse_dims(spec: str | None) -> dict[str, int]:
    from compress.errors import ConfigError

    dims: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise ConfigError(f"--random-dims {spec!r}: {item!r} is not DIM=N", hint="e.g. --random-dims batch=4,seq=128")
        dims[name] = int(value)
    return dims


def load_calib_for(args: argparse.Namespace, model: onnx.ModelProto) -> Any:
    """The CalibrationSet chosen by ``--calib`` / ``--random-calib``, checked against ``model``."""
    from compress.calibration import check_calibration, load_calibration_for, random_calibration
    from compress.errors import ConfigError

    if args.calib and args.random_calib:
        raise ConfigError("--calib and --random-calib are exclusive", hint="pass one of them")
    if args.random_calib:
        dims = _parse_dims(args.random_dims)
        # axis 0 is the batch axis whatever its name; None: the model's fixed batch, else 1
        batch = dims.pop("batch", args.batch_size)
        calib = random_calibration(model, batches=args.random_calib, batch_size=batch, dims=dims, seed=0)
    elif args.calib:
        calib = load_calibration_for(args.calib, model, batch_size=args.batch_size)
    else:
        raise ConfigError("calibration data is required", hint="pass --calib DIR (or --random-calib N for a smoke test)")
    check_calibration(calib, model)
    return calib
