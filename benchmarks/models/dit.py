"""A tiny class-conditional DiT (diffusers ``DiTTransformer2DModel``) with seeded RANDOM weights, judged on its
denoising output's fidelity to the unpruned model.

Model: the ``dit`` family of ``tests/families.py`` (the one ``benchmarks/bench_families.py``
exports: 2 heads x 32, 8x8x4 latent, patch 2 = 16 tokens, 10 classes, adaLN-zero blocks),
with :data:`LAYERS` blocks instead of 6 so that N/4, N/2 and 3N/4 are distinct integers.
Every parameter is drawn from a seeded generator (``families.randomise``): there is no
trained DiT that installs offline, so this is a model of the *function*, not of images.

One denoising step: ``hidden_states`` (the noisy latent, N(0, 1), [B, 4, 8, 8]),
``timestep`` (an integer in [0, 1000)) and ``class_labels`` (an integer in [0, 10)) in,
the predicted noise ([B, 4, 8, 8]; ``out_channels`` = ``in_channels``, no learned
variance) out. Exported with dynamo (opset 18) at a fixed batch of :data:`BATCH`.

Data (all seeded, none shared between the sets):

- calibration: :data:`CALIB_BATCHES` batches of :data:`BATCH` denoising-step inputs (seed
  ``seed`` + 1000); prune_model scores on 75 % of them, measures fidelity on the rest;
- variant ``calib-b``: the same number of batches from seed ``seed`` + 2000;
- evaluation: :data:`EVAL_SAMPLES` other inputs (seed ``seed`` + 3000).

Metric ``noise_cosine``: the mean over the evaluation inputs of the cosine similarity of the
pruned model's predicted noise with the unpruned ONNX model's (1 = the same function).
Also recorded (JSON only): ``noise_rel_error``, the mean relative L2 error
||pruned - unpruned|| / ||unpruned|| (lower is better; it sees changes of scale that the cosine
does not). Because the weights are random, these measure how well pruning preserves the
network's function, not image quality.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from benchmarks.models import Task, Variant, ort_session

LAYERS = 8
BATCH = 8
CALIB_BATCHES = 16
EVAL_SAMPLES = 256
LATENT = (4, 8, 8)
TIMESTEPS = 1000
CLASSES = 10
TESTS = Path(__file__).resolve().parents[2] / "tests"


def denoising_inputs(seed: int, count: int) -> dict[str, np.ndarray]:
    """``count`` seeded denoising-step inputs: N(0, 1) latents, uniform timesteps and class labels."""
    rng = np.random.default_rng(seed)
    return {"hidden_states": rng.standard_normal((count, *LATENT), dtype=np.float32),
            "timestep": rng.integers(0, TIMESTEPS, count).astype(np.int64),
            "class_labels": rng.integers(0, CLASSES, count).astype(np.int64)}


def _batches(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(inputs["timestep"])
    return [{k: v[i:i + BATCH] for k, v in inputs.items()} for i in range(0, n, BATCH)]


def predict(sess: Any, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The predicted noise of every batch, [N, 4 * 8 * 8] float64."""
    out = [sess.run(None, b)[0] for b in batches]
    return np.concatenate(out).reshape(sum(len(b["timestep"]) for b in batches), -1).astype(np.float64)


def build(*, quick: bool = False, seed: int = 0) -> Task:
    """Build the seeded DiT; calibration 16 (quick: 4) batches of 8, evaluation 256 (quick: 64) inputs."""
    import torch

    from compress.export import ExportConfig

    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import families

    fam = families.dit(seed=seed, layers=LAYERS)
    n_batches = 4 if quick else CALIB_BATCHES
    calib = _batches(denoising_inputs(seed + 1000, n_batches * BATCH))
    other = _batches(denoising_inputs(seed + 2000, n_batches * BATCH))
    eval_batches = _batches(denoising_inputs(seed + 3000, 64 if quick else EVAL_SAMPLES))
    example = {k: torch.from_numpy(v) for k, v in calib[0].items()}
    reference: dict[str, np.ndarray] = {}

    def prepare(onnx_model: Any) -> dict[str, Any]:
        ref = predict(ort_session(onnx_model), eval_batches)
        reference["noise"] = ref
        with torch.no_grad():
            torch_out = torch.cat([fam.module(**{k: torch.from_numpy(v) for k, v in b.items()})
                                   for b in eval_batches]).reshape(len(ref), -1).double().numpy()
        cos = (ref * torch_out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(torch_out, axis=1))
        return {"onnx_vs_torch_min_cosine": float(cos.min()),
                "noise_rms": float(np.sqrt((ref**2).mean()))}

    def evaluate(onnx_model: Any) -> dict[str, float]:
        got = predict(ort_session(onnx_model), eval_batches)
        if "noise" not in reference:
            raise RuntimeError("dit: prepare() (the unpruned model's predictions) must run before evaluate()")
        ref = reference["noise"]
        norm_ref = np.linalg.norm(ref, axis=1)
        cos = (got * ref).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * norm_ref, 1e-30)
        rel = np.linalg.norm(got - ref, axis=1) / np.maximum(norm_ref, 1e-30)
        return {"noise_cosine": float(cos.mean()), "noise_rel_error": float(rel.mean())}

    desc = (f"seeded denoising-step inputs (N(0, 1) latents {list(LATENT)}, timesteps in [0, {TIMESTEPS}), "
            f"class labels in [0, {CLASSES}))")
    return Task(
        name="dit",
        title=(f"DiTTransformer2DModel, tiny config ({LAYERS} blocks, 2 heads x 32, 16 tokens), seeded RANDOM weights; "
               "metric = fidelity of the predicted noise to the unpruned model (a measure of the function, not of "
               "image quality)"),
        module=fam.module,
        example_inputs=example,
        export_config=ExportConfig(exporter="dynamo", opset=18),
        calibration=calib,
        calibration_desc=f"{desc}: {n_batches} batches of {BATCH} (seed {seed + 1000})",
        metric="noise_cosine",
        evaluate=evaluate,
        prepare=prepare,
        variants=(Variant("calib-b", "other seeded denoising-step inputs as calibration", other,
                          f"{desc}: {n_batches} batches of {BATCH} (seed {seed + 2000})"),),
        info={"model": f"diffusers DiTTransformer2DModel, tests/families.py `dit` config with num_layers={LAYERS}, "
                       f"families.randomise(seed={seed}) (random weights: no trained DiT installs offline)",
              "data": (f"no real data: {len(eval_batches) * BATCH} seeded evaluation inputs (seed {seed + 3000}); "
                       "noise_cosine = mean cosine of the pruned vs the unpruned ONNX model's predicted noise, "
                       "noise_rel_error = mean relative L2 error (JSON only); random weights, so this is the fidelity "
                       "of the function, not image quality"),
              "resolution": "continuous (mean cosine over the evaluation inputs)",
              "evaluation_inputs": len(eval_batches) * BATCH, "layers": LAYERS, "batch": BATCH},
    )
