"""Calibration batches from image files: resize, center crop, normalize (float32, NCHW or NHWC).

:func:`find_images` lists the files, :func:`image_batches` yields ``{input_name: array}``
one batch at a time; ``compress calib images`` writes them as ``.npz`` files. An image's
size is checked from its header before it is decoded (:data:`MAX_IMAGE_PIXELS`,
:data:`MAX_IMAGE_ASPECT`). Pillow is needed (the ``images`` extra) and imported only when
used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.config import StageConfig, option
from compress.errors import CalibrationError, ConfigError, MissingDependencyError

#: Largest ``ImageOptions.size`` (pixels): a bound on what one batch allocates.
MAX_IMAGE_SIDE = 4096

#: File suffixes :func:`find_images` picks up (case-insensitive).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
#: Valid values of :attr:`ImageOptions.layout`.
LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True, kw_only=True)
class ImageOptions(StageConfig):
    """Image preprocessing: resize, center crop, normalize; the fields are the flags of ``compress calib images``.

    The shorter side is resized to ``size`` (bilinear, aspect kept, the longer side rounded),
    then a ``crop`` x ``crop`` square is cut from the center (offsets ``(W - crop) // 2``,
    ``(H - crop) // 2``), then each RGB value becomes ``(pixel / scale - mean[c]) / std[c]``
    in float32. EfficientNet-Lite's ``(rgb - 127) / 128`` is ``scale=1, mean=127, std=128``.

    Attributes:
        size: shorter side after resizing, pixels.
        crop: side of the center crop, pixels (<= size); None means ``size``.
        mean, std: per channel (R, G, B), in units of ``pixel / scale``; one value is used for all.
        scale: pixels (0..255) are divided by this first (255 -> [0, 1]; 1 -> raw).
        layout: "NCHW" or "NHWC".
        input_name: the model input the arrays are saved under.
        batch_size: images per batch (the last batch may be smaller).

    Raises:
        ConfigError: a value out of range or malformed, named by its flag (``--size``, ``--mean``, ...).
    """

    size: int = option(224, minimum=1, metavar="PX", help="shorter side after resizing (default: 224)")
    crop: int | None = option(None, minimum=1, metavar="PX", help="center crop side (default: --size)")
    mean: tuple[float, ...] = option(
        (0.485, 0.456, 0.406), split=True, metavar="R,G,B",
        help="subtracted after dividing by --scale; one value for all channels or three (default: ImageNet)")
    std: tuple[float, ...] = option((0.229, 0.224, 0.225), split=True, metavar="R,G,B",
                                    help="divisor after subtracting --mean (default: ImageNet)")
    scale: float = option(
        255.0, help="pixels (0-255) are divided by this first: 255 gives [0, 1], 1 keeps raw values (default: 255)")
    layout: str = option("NCHW", choices=LAYOUTS, help="array layout (default: NCHW)")
    input_name: str = option("x", metavar="NAME", help="model input name to save under (default: x)")
    batch_size: int = option(8, minimum=1, metavar="N", help="images per file (default: 8)")

    def __post_init__(self) -> None:
        if not 0 < self.size <= MAX_IMAGE_SIDE:
            raise ConfigError(f"--size must be between 1 and {MAX_IMAGE_SIDE} pixels, got {self.size}",
                              hint="e.g. --size 224")
        if self.crop is not None and not 0 < self.crop <= self.size:
            raise ConfigError(f"--crop must be between 1 and --size ({self.size}) pixels, got {self.crop}",
                              hint="e.g. --size 256 --crop 224, or leave --crop out to keep the whole --size")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) not in (1, 3):
                raise ConfigError(f"{flag} takes 1 or 3 comma-separated values (R,G,B), got {len(values)}",
                                  hint=f"e.g. {flag} 0.5 or {flag} 0.485,0.456,0.406")
        for flag, values in (("--mean", self.mean), ("--std", self.std), ("--scale", (self.scale,))):
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise ConfigError(f"{flag} {','.join(map(str, values))}: must be finite numbers (not nan or inf)",
                                  hint=f"e.g. {flag} {'255' if flag == '--scale' else '0.5'}")
        if any(s == 0 for s in self.std) or self.scale == 0:
            raise ConfigError("--std and --scale must be non-zero",
                              hint="e.g. --scale 255 --std 0.229,0.224,0.225 (ImageNet), or --scale 1 --std 128")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout must be NCHW or NHWC, got {self.layout!r}", hint="e.g. --layout NCHW")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be a positive number of samples, got {self.batch_size}",
                              hint="e.g. --batch-size 8")

    @property
    def crop_size(self) -> int:
        """Side of the center crop in pixels: ``crop``, or ``size`` when ``crop`` is None."""
        return self.crop if self.crop is not None else self.size


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files (:data:`IMAGE_SUFFIXES`) under ``folder``, recursively, sorted by relative path.

    Raises:
        CalibrationError: ``folder`` is not a folder or holds no images.
    """
    p = Path(folder)
    if not p.is_dir():
        raise CalibrationError(f"image folder not found: {p}", hint="pass a folder of image files")
    found = sorted((q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()),
                   key=lambda q: q.relative_to(p).as_posix())
    if not found:
        raise CalibrationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {p}", hint="pass a folder of image files")
    return found


def preprocess_image(image: Any, options: ImageOptions) -> np.ndarray:
    """One PIL image -> float32 ``[3, crop, crop]`` (NCHW) or ``[crop, crop, 3]`` (NHWC).

    See :class:`ImageOptions` for the formula. Does not modify ``image``.
    """
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    short = min(w, h)
    if short != options.size:
        new = (options.size, max(options.size, round(h * options.size / w))) if w <= h else \
              (max(options.size, round(w * options.size / h)), options.size)
        img = img.resize(new, Image.Resampling.BILINEAR)
    w, h = img.size
    c = options.crop_size
    left, top = (w - c) // 2, (h - c) // 2
    img = img.crop((left, top, left + c, top + c))
    arr = np.asarray(img, dtype=np.float32)
    mean = np.asarray(options.mean, dtype=np.float32)
    std = np.asarray(options.std, dtype=np.float32)
    arr = (arr / np.float32(options.scale) - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1) if options.layout == "NCHW" else arr)


#: Largest image decoded, in pixels (64 megapixels: 192 MB as RGB); checked from the header, before decoding.
MAX_IMAGE_PIXELS = 1 << 26
#: Largest ratio of an image's longer side to its shorter side: resizing the shorter side to
#: ``size`` multiplies the longer one, so a 1 x 20000 strip would become 224 x 4,480,000.
MAX_IMAGE_ASPECT = 20


def _open_image(path: Path, options: ImageOptions) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    hint = "remove or replace the file"
    try:
        with Image.open(path) as img:  # reads the header only: the size is known before any pixel is decoded
            w, h = img.size
            if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
                raise CalibrationError(f"{path}: a {w} x {h} image; at most {MAX_IMAGE_PIXELS} pixels are decoded",
                                       hint="downscale it first, or remove it")
            if max(w, h) > MAX_IMAGE_ASPECT * min(w, h):
                raise CalibrationError(f"{path}: a {w} x {h} image is more than {MAX_IMAGE_ASPECT} times longer "
                                       "than wide; resizing its shorter side would make it huge",
                                       hint="crop it to the part that matters, or remove it")
            img.load()
            return preprocess_image(img, options)
    except Image.DecompressionBombError as exc:  # Pillow's own limit (frames, chunk sizes)
        raise CalibrationError(f"{path} is too large to decode safely: {str(exc)[:200]}", hint=hint) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:  # SyntaxError: some PIL plugins
        raise CalibrationError(f"{path} is not a readable image: {str(exc)[:200]}", hint=hint) from None


def image_batches(paths: Sequence[str | os.PathLike[str]], *,
                  options: ImageOptions | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``{input_name: float32 [B, 3, crop, crop] or [B, crop, crop, 3]}`` from image files.

    Images are read one batch at a time, in the given order (see :func:`preprocess_image`).
    Pillow is imported (and a missing Pillow reported) before the first batch is asked for.

    Raises:
        MissingDependencyError: Pillow is not installed.
        CalibrationError: ``paths`` is empty, or a file is not a readable image.
    """
    opts = options or ImageOptions()
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise MissingDependencyError("Pillow", purpose="'compress calib images'", extra="images") from None
    if not paths:
        raise CalibrationError("no images to preprocess", hint="pass a folder of image files")
    files = [Path(p) for p in paths]

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(files), opts.batch_size):
            chunk = files[start : start + opts.batch_size]
            yield {opts.input_name: np.stack([_open_image(p, opts) for p in chunk])}

    return generate()


def parse_floats(text: str, *, flag: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> floats; ConfigError naming ``flag`` otherwise."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}", hint=f"e.g. {flag} 0.5,0.5,0.5") from None
