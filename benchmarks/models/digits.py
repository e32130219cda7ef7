"""A 6-block residual MLP trained on scikit-learn's ``load_digits`` (1,797 real 8x8 digits).

Split: stratified 75/25 train/test (``random_state=seed``). Metric: test accuracy of the
ONNX model (ONNX Runtime). Calibration: training images only (never test images).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from benchmarks.models import Task, image_classifier_data, set_seed

WIDTH = 128
DEPTH = 6
CALIB_SAMPLES = 256
CALIB_BATCH = 32


def make_model(*, width: int = WIDTH, depth: int = DEPTH, inputs: int = 64, classes: int = 10) -> Any:
    """``stem`` Linear -> ``blocks.0..depth-1`` (pre-norm MLP, x + f(x)) -> LayerNorm -> ``head``."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, 2 * width)
            self.fc2 = nn.Linear(2 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))

    class ResidualMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(inputs, width)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h))

    return ResidualMLP()


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); pixels scaled to [0, 1] (float32)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return x_tr, y_tr, x_te, y_te


def train(x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int) -> Any:
    """Adam (lr 2e-3, cosine decay), batch 64, cross-entropy; fixed seed, single thread for determinism."""
    import torch

    set_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        steps_per_epoch = (len(x) + 63) // 64
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=g)
            for i in range(0, len(xt), 64):
                idx = perm[i:i + 64]
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def build(*, quick: bool = False, seed: int = 0) -> Task:
    """Train the MLP and describe the task (calibration: the first 256 shuffled training images; variant: the next 256)."""
    import torch

    from compress.export import DynamicAxis, ExportConfig

    x_tr, y_tr, x_te, y_te = load_data(seed)
    epochs = 10 if quick else 60
    start = time.perf_counter()
    model = train(x_tr, y_tr, epochs=epochs, seed=seed)
    train_s = time.perf_counter() - start
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    data = image_classifier_data(x_tr, x_te, y_te, dataset="load_digits", seed=seed, samples=CALIB_SAMPLES,
                                 batch=CALIB_BATCH)

    return Task(
        name="digits",
        title=f"residual MLP ({DEPTH} blocks, width {WIDTH}) trained on scikit-learn load_digits",
        module=model,
        example_inputs=(torch.from_numpy(x_te[:CALIB_BATCH]),),
        export_config=ExportConfig(exporter="dynamo", opset=18, dynamic=(DynamicAxis("x", 0, "batch"),)),
        calibration=data["calibration"],
        calibration_desc=data["calibration_desc"],
        metric="accuracy",
        evaluate=data["evaluate"],
        variants=(data["variant"],),
        info={"data": "sklearn.datasets.load_digits (stratified 75/25 split)", "train_samples": len(x_tr),
              "test_samples": len(x_te), "epochs": epochs, "train_s": round(train_s, 2),
              "torch_test_accuracy": torch_acc, "calibration_samples": CALIB_SAMPLES},
    )
