"""``compress calib``: make calibration data (text, images) and check it against a model."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from compress.calibration import (
    ImageOptions,
    TextOptions,
    check_calibration,
    find_images,
    image_batches,
    iter_batches,
    load_calibration_for,
    parse_floats,
    split_texts,
    summarize_batches,
    text_batches,
)
from compress.cli import command
from compress.config import flag_names
from compress.errors import CalibrationError
from compress.onnx_io import load_model
from compress.outputs import Outputs


def plan_output_folder(path: str | os.PathLike[str], *, force: bool,
                       inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Outputs:
    """The output guard of a batch folder, checked: with ``force`` only a folder of .npz files is replaced."""
    outs = Outputs(force=force)
    for p in inputs:
        outs.add_input(p)
    outs.folder(path, replaceable=lambda e: e.is_file() and e.suffix == ".npz", what=".npz files")
    outs.check()
    return outs


def write_batches(batches: Iterable[dict[str, np.ndarray]], outs: Outputs) -> tuple[int, int, str]:
    """Write ``batch_0000.npz``, ... into the planned folder of ``outs``, all at once; return (files, samples, summary)."""
    shapes: list[dict[str, tuple[str, tuple[int, ...]]]] = []
    samples = 0
    (out,) = outs.paths
    with outs.writing() as stage:
        tmp = stage.path(out)
        for i, batch in enumerate(batches):
            # numpy's stubs type **kwds against savez's keyword-only allow_pickle: bool
            np.savez(tmp / f"batch_{i:04d}.npz", **batch)  # type: ignore[arg-type]
            shapes.append({k: (v.dtype.name, tuple(v.shape)) for k, v in batch.items()})
            samples += next(iter(batch.values())).shape[0]
        if not shapes:
            raise CalibrationError("no batches to write", hint="give at least one sample")
    return len(shapes), samples, summarize_batches(shapes)


def _print_summary(out: Path, result: tuple[int, int, str]) -> None:
    files, samples, summary = result
    print(f"wrote {files} file{'s' if files != 1 else ''} ({samples} sample{'s' if samples != 1 else ''}) to {out}: {summary}")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps the values given before the kind (compress calib -v text ...).
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS, help="less log output")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder to write batch_0000.npz, ... into")
    p.add_argument("--force", action="store_true", help="replace OUTDIR if it holds .npz files")


#: :class:`ImageOptions` list fields whose flag value is read by :func:`parse_floats` (its errors name the flag).
IMAGE_FLOAT_LISTS = ("mean", "std")


def text_options(args: argparse.Namespace) -> TextOptions:
    """The :class:`TextOptions` of parsed ``compress calib text`` flags (absent flags: the field defaults).

    ``token_type_ids`` (default True) has no generated flag; ``--no-token-type-ids`` turns it off.

    Raises:
        ConfigError: a value the options refuse, named by its flag (``--max-length 1``).
    """
    return TextOptions.from_args(args, **({"token_type_ids": False} if getattr(args, "no_token_type_ids", False) else {}))


def image_options(args: argparse.Namespace) -> ImageOptions:
    """The :class:`ImageOptions` of parsed ``compress calib images`` flags (absent flags: the field defaults).

    Raises:
        ConfigError: a value the options refuse or a malformed ``--mean``/``--std``, named by its flag.
    """
    given = vars(args)
    flags = flag_names(ImageOptions)
    lists = {name: parse_floats(given[name], flag=flags[name]) for name in IMAGE_FLOAT_LISTS
             if given.get(name) is not None}
    rest = argparse.Namespace(**{k: v for k, v in given.items() if k not in lists})
    return ImageOptions.from_args(rest, **lists)


def _run_text(args: argparse.Namespace) -> int:
    outs = plan_output_folder(args.output, force=args.force, inputs=[args.textfile, args.tokenizer])
    out = outs.paths[0]
    src = Path(args.textfile)
    if not src.is_file():
        raise CalibrationError(f"text file not found: {src}", hint="pass a UTF-8 text file with one text per line")
    try:
        texts = split_texts(src.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{src} is not UTF-8 text: {exc}", hint="save it as UTF-8") from None
    if not texts:
        raise CalibrationError(f"{src} holds no texts (all lines are empty)", hint="write one text per line")
    opts = text_options(args)
    _print_summary(out, write_batches(text_batches(texts, tokenizer=args.tokenizer, options=opts), outs))
    return 0


def _run_images(args: argparse.Namespace) -> int:
    outs = plan_output_folder(args.output, force=args.force, inputs=[args.imgdir])
    out = outs.paths[0]
    opts = image_options(args)
    batches = image_batches(find_images(args.imgdir), options=opts)
    _print_summary(out, write_batches(batches, outs))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    calib = load_calibration_for(args.data, model, batch_size=args.batch_size)
    check_calibration(calib, model)
    shapes = [{k: (v.dtype.name, tuple(v.shape)) for k, v in b.items()} for b in iter_batches(calib)]
    labels = f"; labels in '{calib.labels_key}' (GradNorm's task loss)" if calib.labels_key else ""
    print(f"ok: {calib.description}, {len(calib)} batches fit {Path(args.model).name}: {summarize_batches(shapes)}"
          f"{labels}")
    return 0


@command(
    "calib",
    help="make calibration data (.npz batches) from texts or images, or check it against a model",
    description=(
        "Calibration data is a folder of .npz files, one array per model input named like the input,\n"
        "batch axis first (see calib/README.md). This command writes such folders and checks them.\n\n"
        "examples:\n"
        "  compress calib text sentences.txt --tokenizer MODEL_DIR -o calib_text\n"
        "  compress calib images photos/ --size 256 --crop 224 -o calib_img\n"
        "  compress calib images photos/ --scale 1 --mean 127 --std 128 --layout NHWC -o calib_lite\n"
        "  compress calib check calib_text --model model.onnx"
    ),
)
class Calib:
    """The ``calib`` subcommand: ``text``, ``images`` and ``check`` sub-subcommands."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the ``text``, ``images`` and ``check`` subparsers (one required) to ``parser``."""
        sub = parser.add_subparsers(dest="calib_command", metavar="KIND", required=True)

        text = sub.add_parser(
            "text", help="tokenize one text per non-empty line into input_ids/attention_mask/token_type_ids",
            description="Tokenize one text per non-empty line of TEXTFILE (int64 arrays, padded on the right).")
        text.add_argument("textfile", metavar="TEXTFILE", help="UTF-8 text, one calibration text per non-empty line")
        text.add_argument("--tokenizer", required=True, metavar="PATH",
                          help="tokenizer.json, or a folder holding one (a Hugging Face model folder)")
        _add_output(text)
        TextOptions.add_arguments(text)
        text.add_argument("--no-token-type-ids", action="store_true", help="do not write token_type_ids")
        _add_verbosity(text)
        text.set_defaults(_calib_run=_run_text)

        img = sub.add_parser(
            "images", help="resize, center-crop and normalize images into float32 batches",
            description=("Resize the shorter side to --size (bilinear), center-crop --crop, then\n"
                         "value = (pixel / scale - mean) / std per RGB channel, float32.\n"
                         "EfficientNet-Lite's (rgb - 127) / 128: --scale 1 --mean 127 --std 128."),
            formatter_class=argparse.RawDescriptionHelpFormatter)
        img.add_argument("imgdir", metavar="IMGDIR", help="folder of images (searched recursively, sorted by path)")
        _add_output(img)
        ImageOptions.add_arguments(img)
        _add_verbosity(img)
        img.set_defaults(_calib_run=_run_images)

        check = sub.add_parser("check", help="check calibration data against a model's inputs and read all of it",
                               description="Check names, dtypes and shapes against MODEL, then read every batch (NaN/Inf).")
        check.add_argument("data", metavar="DATA", help="folder of .npz files, or one .npz file")
        check.add_argument("--model", required=True, metavar="MODEL.onnx", help="the model the data is for")
        check.add_argument("--batch-size", type=int, default=None, metavar="N",
                           help="split each file into batches of N samples (default: one batch per file)")
        _add_verbosity(check)
        check.set_defaults(_calib_run=_run_check)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Run the chosen sub-subcommand; returns its exit code (0 on success)."""
        return int(args._calib_run(args))
