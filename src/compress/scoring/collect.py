"""Score blocks in one ONNX Runtime pass per calibration batch.

Every block boundary (stream input and output of each block) is added as an extra graph
output; one session runs each calibration batch once and the metric accumulators
consume the boundary activations as the batches stream by. Nothing is kept across
batches except the accumulators' running sums. The ``ablation`` metric is different:
it runs one extra session per removable block (the model without that block) and
compares final outputs; it is timed and reported separately.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from compress.blocks import Block, BlockMap
from compress.errors import BlockError, CalibrationError, ConfigError
from compress.fidelity import logit_outputs
from compress.log import logger, progress
from compress.onnx_io import model_digest
from compress.scoring.metrics import BlockActivations, MetricConfig, get_metric
from compress.surgery import add_outputs, remove_blocks

SCORES_SCHEMA = 1


@dataclass(frozen=True)
class ScoreConfig:
    """What to compute.

    Attributes:
        metrics: registered metric names (``compress.scoring.metric_names()``).
        options: options shared by the metrics (interval, token ranges, ...).
        providers: ONNX Runtime execution providers, in order of preference.
        threads: intra-op threads for ONNX Runtime (None = its default).
    """

    metrics: tuple[str, ...] = ("cosine",)
    options: MetricConfig = field(default_factory=MetricConfig)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None


@dataclass(frozen=True)
class ScoreReport:
    """Scores of every block for every metric, with what they were computed on."""

    model_sha256: str
    calibration: str
    random_calibration: bool
    batches: int
    samples: int
    blocks: tuple[dict[str, Any], ...]
    metrics: dict[str, dict[str, Any]]
    config: dict[str, Any]
    timings_s: dict[str, float]
    providers: tuple[str, ...]

    def scores(self, metric: str, *, key: str = "scores") -> list[float | None]:
        """Per-block scores of ``metric`` (higher = more important)."""
        if metric not in self.metrics:
            raise ConfigError(f"metric {metric!r} was not computed; computed: {', '.join(self.metrics)}")
        return list(self.metrics[metric][key])

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCORES_SCHEMA,
            "model_sha256": self.model_sha256,
            "calibration": {"description": self.calibration, "random": self.random_calibration,
                            "batches": self.batches, "samples": self.samples},
            "blocks": list(self.blocks),
            "metrics": self.metrics,
            "config": self.config,
            "timings_s": self.timings_s,
            "providers": list(self.providers),
        }


def make_session(model: onnx.ModelProto, *, providers: Sequence[str], threads: int | None = None) -> Any:
    """An ONNX Runtime session for ``model`` (serialized in memory)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=chosen)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BlockError(f"ONNX Runtime cannot load the model: {msg}",
                         hint="check the model with 'python -m onnx.checker' or 'polygraphy inspect model'") from None


def run_batch(session: Any, feed: Mapping[str, np.ndarray], names: Sequence[str], *, batch: int) -> dict[str, np.ndarray]:
    """Run one batch; CalibrationError naming the batch when ORT rejects the feed."""
    try:
        values = session.run(list(names), dict(feed))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"calibration batch {batch} does not fit the model: {msg}",
                               hint="check the calibration data against the model's inputs ('compress inspect')") from None
    return dict(zip(names, values, strict=True))


def _summary(n: int, sample_counts: list[int]) -> tuple[int, int]:
    return n, int(sum(sample_counts))


def _len(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _batch_size(feed: Mapping[str, np.ndarray]) -> int:
    return int(np.shape(next(iter(feed.values())))[0]) if feed else 0


def _expand(result: dict[str, Any], scored: Sequence[Block], total: int) -> dict[str, Any]:
    """Metric scores over the scored blocks -> scores indexed by block index (None = unscored).

    ``matrix``/``segments`` stay in scored-block positions; ``scored_blocks`` maps them.
    """
    out = dict(result)

    def spread(values: Sequence[Any]) -> list[Any]:
        full: list[Any] = [None] * total
        for b, v in zip(scored, values, strict=True):
            full[b.index] = v
        return full

    out["scores"] = spread(result["scores"])
    if result.get("per_range"):
        out["per_range"] = {k: spread(v) for k, v in result["per_range"].items()}
    out["scored_blocks"] = [b.index for b in scored]
    return out


def score_blocks(
    model: onnx.ModelProto,
    block_map: BlockMap,
    batches: Iterable[Mapping[str, np.ndarray]],
    config: ScoreConfig,
    *,
    calibration: str,
    random_calibration: bool = False,
) -> ScoreReport:
    """Score every block of ``block_map`` on ``batches``. Does not modify ``model``.

    Args:
        model: the ONNX model.
        block_map: its blocks (``find_blocks``).
        batches: calibration feeds (input name -> array with a leading batch axis). Must be
            re-iterable when ``ablation`` is requested (it runs the batches once per block).
        config: metrics and their options.
        calibration: a description of the data for the report (relative names only).
        random_calibration: the data is random; reports say so.

    Raises:
        ConfigError: unknown metric; BlockError: no scorable block, NaN/Inf activations;
        CalibrationError: no batches, or a batch ORT rejects.
    """
    metrics = {name: get_metric(name) for name in config.metrics}  # validates names first
    # Every block with a stream input and one output takes part (spans must not jump over a
    # non-removable block); only removable ones are ablated.
    scored = [b for b in block_map.blocks if b.input is not None and b.output is not None]
    if not any(b.removable for b in scored):
        reasons = "; ".join(f"{b.name}: {b.reason}" for b in block_map.blocks[:3])
        raise BlockError(f"no block can be scored: none is removable ({reasons})",
                         hint="pass --blocks to name the block container, or check 'compress inspect'")
    names = [b.name for b in scored]
    boundary = list(dict.fromkeys(t for b in scored for t in (b.input, b.output)))
    final_names = [o.name for o in model.graph.output]
    stream = {n: m for n, m in metrics.items() if not m.needs_final}
    ablation = {n: m for n, m in metrics.items() if m.needs_final}

    # Hashed before the session exists: the serialized copy then does not add to the peak memory.
    digest = model_digest(model)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    session = make_session(add_outputs(model, boundary), providers=config.providers, threads=config.threads)
    timings["session_s"] = time.perf_counter() - t0
    accs = {n: m(len(scored), config.options) for n, m in stream.items()}
    fetch = final_names + [n for n in boundary if n not in final_names]
    references: list[dict[str, np.ndarray]] = []
    counts: list[int] = []
    t0 = time.perf_counter()
    for i, feed in enumerate(progress(batches, desc="scoring", total=_len(batches))):
        values = run_batch(session, feed, fetch, batch=i)
        if accs:
            acts = BlockActivations(inputs=[values[b.input] for b in scored],
                                    outputs=[values[b.output] for b in scored], names=names)
            for acc in accs.values():
                acc.update(acts)
        if ablation:
            references.append({n: values[n] for n in final_names})
        counts.append(_batch_size(feed))
        del values
    if not counts:
        raise CalibrationError("the calibration data has no batches", hint="pass --calib with at least one .npz batch")
    timings["scoring_s"] = time.perf_counter() - t0
    results = {n: _expand(acc.result().to_dict(), scored, len(block_map.blocks)) for n, acc in accs.items()}

    if ablation:
        t0 = time.perf_counter()
        removable = [j for j, b in enumerate(scored) if b.removable]
        for name, metric in ablation.items():
            acc = metric(len(scored), config.options, logits=logit_outputs(model))
            for j in progress(removable, desc="ablation"):
                ablated = make_session(remove_blocks(model, [scored[j]], check=False),
                                       providers=config.providers, threads=config.threads)
                seen = 0
                for i, feed in enumerate(batches):
                    acc.update(j, references[i], run_batch(ablated, feed, final_names, batch=i))
                    seen += 1
                if seen != len(references):
                    raise ConfigError("ablation needs re-iterable calibration batches (a list or a CalibrationSet)")
            results[name] = _expand(acc.result().to_dict(), scored, len(block_map.blocks))
        timings["ablation_s"] = time.perf_counter() - t0
        logger.info("ablation: %d extra sessions in %.1f s", len(removable), timings["ablation_s"])

    n, samples = _summary(len(counts), counts)
    blocks = tuple({"index": b.index, "name": b.name, "input": b.input, "output": b.output, "params": b.params,
                    "removable": b.removable, "reason": b.reason} for b in block_map.blocks)
    return ScoreReport(
        model_sha256=digest, calibration=calibration, random_calibration=random_calibration,
        batches=n, samples=samples, blocks=blocks, metrics=results,
        config={"metrics": list(config.metrics), **_options(config.options)},
        timings_s={k: round(v, 4) for k, v in timings.items()}, providers=tuple(session.get_providers()),
    )


def _options(options: MetricConfig) -> dict[str, Any]:
    d = {k: getattr(options, k) for k in options.__dataclass_fields__}
    d["token_ranges"] = [str(r) for r in options.token_ranges]
    return d
