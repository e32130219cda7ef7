"""A 6-block residual CNN trained on Fashion-MNIST (Debian ``dataset-fashion-mnist``).

Data: the IDX files under ``/usr/share/datasets/fashion-mnist`` (60k train / 10k test,
28x28 gray). Install with ``apt-get update && apt-get install -y dataset-fashion-mnist``.
Metric: accuracy on the 10k test images (ONNX Runtime). Calibration: training images only.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchmarks.models import Task, image_classifier_data, set_seed

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CHANNELS = 16
DEPTH = 6
CALIB_SAMPLES = 256
CALIB_BATCH = 32


def read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST format) file, gzip-compressed, as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 [N, 1, 28, 28] in [0, 1], int64 labels."""
    files = {k: DATA_DIR / f"{k}-ubyte.gz" for k in ("train-images-idx3", "train-labels-idx1",
                                                      "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({missing[0]}); run "
                                "'apt-get update && apt-get install -y dataset-fashion-mnist' or set FASHION_MNIST_DIR")

    def images(key: str) -> np.ndarray:
        return (read_idx(files[key]).astype(np.float32) / 255.0)[:, None]

    return (images("train-images-idx3"), read_idx(files["train-labels-idx1"]).astype(np.int64),
            images("t10k-images-idx3"), read_idx(files["t10k-labels-idx1"]).astype(np.int64))


def make_model(*, channels: int = CHANNELS, depth: int = DEPTH, classes: int = 10) -> Any:
    """Conv stem + max-pool (14x14) -> ``blocks.0..depth-1`` (relu(x + BN(conv(relu(BN(conv(x))))))) -> pool -> ``head``."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    class ResidualCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                      nn.ReLU(), nn.MaxPool2d(2))
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.head = nn.Linear(channels, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            for block in self.blocks:
                h = block(h)
            return self.head(h.mean(dim=(2, 3)))

    return ResidualCNN()


def train(x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, batch: int = 128) -> Any:
    """AdamW (lr 3e-3, one-cycle), batch 128, random horizontal flips; fixed seed."""
    import torch

    set_seed(seed)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            xb = xt[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def build(*, quick: bool = False, seed: int = 0) -> Task:
    """Train the CNN (3 epochs on 60k images; quick: 1 epoch on 10k, 2k test images) and describe the task."""
    import torch

    from compress.export import DynamicAxis, ExportConfig

    x_tr, y_tr, x_te, y_te = load_data()
    if quick:
        x_tr, y_tr, x_te, y_te = x_tr[:10000], y_tr[:10000], x_te[:2000], y_te[:2000]
    epochs = 1 if quick else 3
    start = time.perf_counter()
    model = train(x_tr, y_tr, epochs=epochs, seed=seed)
    train_s = time.perf_counter() - start
    with torch.no_grad():
        torch_acc = float(np.mean([(model(torch.from_numpy(x_te[i:i + 1000])).argmax(1).numpy() == y_te[i:i + 1000]).mean()
                                   for i in range(0, len(x_te), 1000)]))
    data = image_classifier_data(x_tr, x_te, y_te, dataset="Fashion-MNIST", seed=seed, samples=CALIB_SAMPLES,
                                 batch=CALIB_BATCH, eval_batch=500)

    return Task(
        name="fashion",
        title=f"residual CNN ({DEPTH} blocks, {CHANNELS} channels at 14x14) trained on Fashion-MNIST",
        module=model,
        example_inputs=(torch.from_numpy(x_te[:CALIB_BATCH]),),
        export_config=ExportConfig(exporter="dynamo", opset=18, dynamic=(DynamicAxis("x", 0, "batch"),)),
        calibration=data["calibration"],
        calibration_desc=data["calibration_desc"],
        metric="accuracy",
        evaluate=data["evaluate"],
        variants=(data["variant"],),
        info={"data": f"Debian dataset-fashion-mnist ({DATA_DIR})", "train_samples": len(x_tr),
              "test_samples": len(x_te), "epochs": epochs, "train_s": round(train_s, 2),
              "torch_test_accuracy": torch_acc, "calibration_samples": CALIB_SAMPLES},
    )
