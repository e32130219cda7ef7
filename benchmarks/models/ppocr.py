"""PP-OCRv4 text recognizer (``rapidocr-onnxruntime`` 1.4.4) on rendered words.

Model: ``rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx`` (Paddle export, opset 12):
input ``x`` of shape ``(N, 3, 48, W)``, output ``(N, W / 8, 6625)`` per-step character
probabilities. Preprocessing as ``rapidocr_onnxruntime.ch_ppocr_rec.TextRecognizer``: resize
to height 48 keeping the aspect ratio (width ``ceil(48 * w / h)``, at most the batch width),
BGR, ``(x / 255 - 0.5) / 0.5``, zero-padded on the right to the batch width (here always
:data:`WIDTH`, so batches stack). Dictionary: the ``character`` entry of the model's metadata
(one character per line), with ``blank`` (index 0, the CTC blank) prepended and ``" "``
appended, as rapidocr's ``CTCLabelDecode`` builds it. Decoding: CTC greedy (argmax per step,
repeats merged, blanks dropped).

Data: :data:`N_WORDS` words drawn (seeded) from the words of ``calib/text/sentences.txt``
plus numbers, each rendered with PIL in one of 8 DejaVu fonts at 14-48 px (drawn per word),
dark text on a white or light background, cropped with a small margin. The first
:data:`N_CALIB` images calibrate (batches of :data:`BATCH`), the rest evaluate. Metrics:
``read_rate``, the share of evaluation words read exactly (spaces at the ends stripped), and
``agreement_with_fp32``, the share read exactly as the FP32 model reads them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
#: Recognizer input height and the fixed batch width (rapidocr's ``rec_img_shape`` [3, 48, 320]).
HEIGHT, WIDTH = 48, 320
N_WORDS, N_CALIB, BATCH = 200, 64, 8
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSansMono.ttf",
         "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerifCondensed.ttf", "DejaVuSans-Oblique.ttf")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
SEED = 0


def model_path() -> Path:
    """Path of the recognizer ONNX file inside the installed ``rapidocr_onnxruntime`` package."""
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent / "models/ch_PP-OCRv4_rec_infer.onnx"


def prepared(model: Any) -> Any:
    """``model`` converted to opset 13 (``onnx.version_converter``) with its Constant-node tensors as initializers.

    The shipped file is opset 12 (no per-channel QuantizeLinear) and holds its weights in
    Constant nodes (which the 2:4 pass does not prune); this is the form a user would export.
    """
    import onnx
    import onnx.version_converter

    out = onnx.version_converter.convert_version(model, 13)
    keep = []
    for node in out.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None or len(node.attribute) != 1:
            keep.append(node)
            continue
        t = onnx.TensorProto()
        t.CopyFrom(value)
        t.name = node.output[0]
        out.graph.initializer.append(t)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def charset(model: Any) -> list[str]:
    """CTC classes of ``model``: ``blank``, the metadata ``character`` lines, then ``" "``."""
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def words(n: int = N_WORDS, seed: int = SEED) -> list[str]:
    """``n`` distinct words (seeded): words of ``calib/text/sentences.txt`` (3+ letters) and numbers."""
    rng = np.random.default_rng(seed)
    text = (ROOT / "calib/text/sentences.txt").read_text()
    pool = sorted({w for w in re.findall(r"[A-Za-z]+", text) if len(w) >= 3})
    picked = [str(w) for w in rng.choice(pool, size=min(len(pool), n - n // 5), replace=False)]
    numbers: list[str] = []
    while len(numbers) < n - len(picked):
        kind = int(rng.integers(3))
        s = (str(int(rng.integers(10, 100000))) if kind == 0 else
             f"{int(rng.integers(0, 100))}.{int(rng.integers(0, 100)):02d}" if kind == 1 else
             f"{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}")
        if s not in numbers:
            numbers.append(s)
    out = picked + numbers
    rng.shuffle(out)
    return out


def render(word: str, rng: np.random.Generator) -> np.ndarray:
    """``word`` as a tight crop (HWC uint8 RGB): random font/size, dark text on a light background."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT_DIR / FONTS[int(rng.integers(len(FONTS)))]), int(rng.integers(14, 49)))
    left, top, right, bottom = font.getbbox(word)
    pad_x, pad_y = int(rng.integers(3, 12)), int(rng.integers(3, 10))
    bg = (255, 255, 255) if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(215, 256, size=3))
    fg = tuple(int(v) for v in rng.integers(0, 60, size=3))
    img = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), bg)
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), word, font=font, fill=fg)
    return np.asarray(img)


def preprocess(img: np.ndarray) -> np.ndarray:
    """One crop (HWC uint8 RGB) -> the normalized ``(3, 48, WIDTH)`` float32 recognizer input."""
    from PIL import Image

    h, w = img.shape[:2]
    new_w = min(WIDTH, math.ceil(HEIGHT * w / h))
    resized = np.asarray(Image.fromarray(img).resize((new_w, HEIGHT), Image.Resampling.BILINEAR), dtype=np.float32)
    x = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    x[:, :, :new_w] = (resized[..., ::-1].transpose(2, 0, 1) / 255 - 0.5) / 0.5  # BGR, as cv2 reads it
    return x


def ctc_greedy(probs: np.ndarray, chars: list[str]) -> list[str]:
    """CTC greedy decoding of ``(N, T, C)`` probabilities: argmax, merge repeats, drop blanks (0)."""
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(chars[i] for i in idx[keep]))
    return out


def read(sess: Any, x: np.ndarray, chars: list[str], batch_size: int = BATCH) -> list[str]:
    """Texts an ONNX Runtime session reads from ``x`` (batches of ``batch_size``), spaces at the ends stripped.

    The crops have margins, which the model sometimes reads as a leading or trailing space.
    """
    name = sess.get_inputs()[0].name
    out: list[str] = []
    for i in range(0, len(x), batch_size):
        out += [t.strip() for t in ctc_greedy(sess.run(None, {name: x[i:i + batch_size]})[0], chars)]
    return out


def data(n: int = N_WORDS, n_calib: int = N_CALIB, seed: int = SEED) -> dict[str, Any]:
    """Rendered words: ``x_calib``/``x_eval`` (N, 3, 48, WIDTH) float32 and ``labels_calib``/``labels_eval``."""
    rng = np.random.default_rng(seed + 1)
    ws = words(n, seed)
    x = np.stack([preprocess(render(w, rng)) for w in ws])
    return {"x_calib": x[:n_calib], "x_eval": x[n_calib:], "labels_calib": ws[:n_calib], "labels_eval": ws[n_calib:]}
