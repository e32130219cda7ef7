"""Score blocks in one ONNX Runtime pass per calibration batch.

Every block boundary (stream input and output of each block) is added as an extra graph
output; one session runs each calibration batch once and the metric accumulators
consume the boundary activations as the batches stream by. Nothing is kept across
batches except the accumulators' running sums.

Multi-stream blocks (an MMDiT's image and text streams, :class:`compress.blocks.Stream`):
each boundary metric also runs once per stream name (``per_stream`` in the result), and a
block's ``scores`` entry is the fusion of its per-stream scores
(:func:`compress.scoring.options.fuse_streams`; default ``max``: a block is as important as
its most changed stream). Single-stream blocks keep their one score. With ``--interval k``
(and the span scores ``--span`` selects on) the same holds per span: stream ``s`` of the
span ``i .. i+k-1`` is scored from block ``i``'s ``s`` input to block ``i+k-1``'s ``s``
output, when every block of the span carries a stream named ``s`` (streams match by name,
as for single blocks); a stream that ends or starts inside the span (SD3's text stream in
its last block) is not scored for that span (None), and a span holding a multi-stream
block gets the fusion of the streams that run through it (None when none does).
``--token-ranges`` is refused on such models: it slices one tensor, while the modalities
live on separate streams. The ``ablation`` metric is different:
it runs one extra session per removable block (the model without that block) and
compares final outputs; it is timed and reported separately.

Padding (:func:`find_token_mask`): when the model has an attention/padding mask input
(``[batch, tokens]``, integer or bool), every token-level metric (cosine, cosine-signed,
angular, CKA, per range, per stream) uses only the real tokens of each activation whose
``[B, T, D]`` token view has the mask's batch and token axes; ``details["tokens"]`` counts
the real tokens, ``details["positions"]`` all of them, and ``config["token_mask_used"]``
says which input was used and how it was chosen.

Sessions come from :func:`compress.runtime.load_session`, bound here as ``make_session``:
that module-level name is what :func:`score` calls (tests and the scoring benchmark
replace it), and with ``run_batch`` (:func:`compress.runtime.run_batch`) it stays
importable from here for the stages that still do. Does not modify the model.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import numpy as np
import onnx

from compress.blocks import Block, MappedModel
from compress.calibration import describe
from compress.errors import BlockError, CalibrationError, ConfigError
from compress.fidelity import logit_outputs
from compress.graph import GraphIndex
from compress.log import logger, progress
from compress.onnx_io import model_digest
from compress.runtime import add_outputs, load_session, run_batch
from compress.scoring.activations import BlockActivations, token_view
from compress.scoring.base import MetricResult, get_metric
from compress.scoring.options import MetricConfig, fuse_streams
from compress.surgery import remove_blocks

SCORES_SCHEMA = 1

_INT_TYPES = {onnx.TensorProto.BOOL, onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
              onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
              onnx.TensorProto.UINT64}


def _mask_like(vi: onnx.ValueInfoProto) -> bool:
    """An integer/bool graph input of rank 2 (or unknown rank)."""
    t = vi.type.tensor_type
    if t.elem_type not in _INT_TYPES:
        return False
    return not t.HasField("shape") or len(t.shape.dim) == 2


def find_token_mask(model: onnx.ModelProto, option: str = "auto") -> tuple[str | None, str]:
    """The model input that holds the padding mask, and how it was chosen (a sentence).

    ``option``: ``none`` -> no mask; a name -> that graph input (it must be an integer or
    bool input of rank 2); ``auto`` -> among the integer/bool rank-2 inputs, one named
    ``attention_mask``, else the first whose name contains ``attention_mask``, else the first
    whose name contains ``mask`` (case-insensitive); None when there is none. Whether its
    dims fit the block tensors is checked on the first batch (:func:`score_blocks`).

    Raises:
        ConfigError: a named input that does not exist or is not an integer/bool ``[batch, tokens]``.
    """
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if option == "none":
        return None, "off (--token-mask none)"
    if option != "auto":
        vi = next((i for i in inputs if i.name == option), None)
        if vi is None:
            raise ConfigError(f"--token-mask {option!r} is not an input of the model (inputs: "
                              f"{', '.join(i.name for i in inputs) or 'none'})",
                              hint="pass one of the model's inputs, auto, or none")
        if not _mask_like(vi):
            raise ConfigError(f"--token-mask {option!r}: the input is not an integer/bool [batch, tokens] tensor",
                              hint="name the attention/padding mask input, or pass --token-mask none")
        return option, f"{option} (--token-mask)"
    cands = [i.name for i in inputs if _mask_like(i) and "mask" in i.name.lower()]
    for rule in (lambda n: n.lower() == "attention_mask", lambda n: "attention_mask" in n.lower(), lambda n: True):
        hit = next((n for n in cands if rule(n)), None)
        if hit is not None:
            return hit, f"{hit} (auto: integer [batch, tokens] input named like a mask)"
    return None, "none (auto: no integer [batch, tokens] input named like a mask)"


def batch_mask(feed: Mapping[str, np.ndarray], name: str | None, *, batch: int) -> np.ndarray | None:
    """The mask of one calibration batch as bool ``[B, T]`` (None without a mask).

    Raises:
        CalibrationError: the batch lacks the mask input or it is not 2-D.
    """
    if name is None:
        return None
    if name not in feed:
        raise CalibrationError(f"calibration batch {batch} has no {name!r} (the token mask)",
                               hint="add it to the calibration data, or pass --token-mask none")
    m = np.asarray(feed[name])
    if m.ndim != 2:
        raise CalibrationError(f"calibration batch {batch}: token mask {name!r} has shape {list(m.shape)}, "
                               "not [batch, tokens]", hint="pass --token-mask none, or the right input")
    return m != 0


def mask_fits(mask: np.ndarray, arrays: Iterable[np.ndarray], channel_axis: int | None) -> bool:
    """Whether ``mask`` ``[B, T]`` matches the batch and token axes of any of ``arrays``."""
    return any(tuple(token_view(a, channel_axis=channel_axis).shape[:2]) == tuple(mask.shape) for a in arrays)


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
    schema_version: int = field(default=SCORES_SCHEMA, init=False)

    def scores(self, metric: str, *, key: str = "scores") -> list[float | None]:
        """Per-block scores of ``metric`` (higher = more important)."""
        if metric not in self.metrics:
            raise ConfigError(f"metric {metric!r} was not computed; computed: {', '.join(self.metrics)}",
                              hint=f"add it to the metrics, e.g. --metric {metric}")
        return list(self.metrics[metric][key])

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (``scores.json``, schema :data:`SCORES_SCHEMA`)."""
        return {
            "schema_version": self.schema_version,
            "model_sha256": self.model_sha256,
            "calibration": {"description": self.calibration, "random": self.random_calibration,
                            "batches": self.batches, "samples": self.samples},
            "blocks": list(self.blocks),
            "metrics": self.metrics,
            "config": self.config,
            "timings_s": self.timings_s,
            "providers": list(self.providers),
        }


class _BoundaryAccumulator(Protocol):
    """An accumulator with ``needs_final`` False: fed one :class:`BlockActivations` per batch."""

    def update(self, acts: BlockActivations) -> None: ...

    def result(self) -> MetricResult: ...


class _BoundaryMetric(Protocol):
    """The class of a ``needs_final`` False metric: ``cls(num_blocks, config)``."""

    def __call__(self, num_blocks: int, config: MetricConfig | None = None, /) -> _BoundaryAccumulator: ...


class _FinalAccumulator(Protocol):
    """An accumulator with ``needs_final`` True: fed the final outputs of the full and ablated model."""

    def update(
        self, block: int, reference: Mapping[str, np.ndarray], ablated: Mapping[str, np.ndarray]) -> None: ...

    def result(self) -> MetricResult: ...


class _FinalMetric(Protocol):
    """The class of a ``needs_final`` True metric: ``cls(num_blocks, config, logits=...)``."""

    def __call__(self, num_blocks: int, config: MetricConfig | None = None, /, *,
                 logits: Collection[str] = ()) -> _FinalAccumulator: ...


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


def score(
    model: MappedModel,
    config: ScoreConfig,
    *,
    data: Iterable[Mapping[str, np.ndarray]],
) -> tuple[MappedModel, ScoreReport]:
    """Score every block of ``model.block_map`` on the batches ``data``: ``(model, report)``.

    The scoring stage (the shape of :mod:`compress.stage`): ``model`` comes back as it was
    (scoring changes no graph) and is not modified.

    Args:
        model: the ONNX model and its blocks (``find_blocks``).
        config: metrics and their options.
        data: calibration feeds (input name -> array with a leading batch axis). Must be
            re-iterable when ``ablation`` is requested (it runs the batches once per block).

    The report describes the data as ``data`` does (:func:`compress.calibration.describe`).
    Metrics read from the block map (``gradnorm``) add no ORT work; when they are the only
    ones, no session is made and the batches are only counted (``providers`` is empty).

    Raises:
        ConfigError: unknown metric; BlockError: no scorable block, NaN/Inf activations, a
        block map without the GradNorm that ``gradnorm`` reads;
        CalibrationError: no batches, or a batch ORT rejects.
    """
    proto, block_map, batches = model.proto, model.block_map, data
    metrics = {name: get_metric(name) for name in config.metrics}  # validates names first
    calibration, random_calibration = describe(batches)
    # Every block with a stream input and one output takes part (spans must not jump over a
    # non-removable block); only removable ones are ablated.
    scored = [b for b in block_map.blocks if b.input is not None and b.output is not None]
    if not any(b.removable for b in scored):
        reasons = "; ".join(f"{b.name}: {b.reason}" for b in block_map.blocks[:3])
        raise BlockError(f"no block can be scored: none is removable ({reasons})",
                         hint="pass --blocks to name the block container, or check 'compress inspect'")
    names = [b.name for b in scored]
    inputs = [b.input for b in scored if b.input is not None]  # every scored block has both
    outputs = [b.output for b in scored if b.output is not None]
    boundary = list(dict.fromkeys(t for b, x, y in zip(scored, inputs, outputs, strict=True)
                                  for t in (x, y, *b.stream_inputs, *b.stream_outputs)))
    streams = _stream_plan(scored, config.options)
    final_names = [o.name for o in proto.graph.output]
    # ``needs_final`` says how a metric is fed (see compress.scoring.base.Accumulator).
    stream = {n: cast(_BoundaryMetric, m) for n, m in metrics.items() if not m.needs_final and not m.from_block_map}
    ablation = {n: cast(_FinalMetric, m) for n, m in metrics.items() if m.needs_final}
    mapped = {n: m for n, m in metrics.items() if m.from_block_map}  # gradnorm: read from the block map

    # Hashed before the session exists: the serialized copy then does not add to the peak memory.
    digest = model_digest(proto)
    mask_name, mask_how = find_token_mask(proto, config.options.token_mask)
    timings: dict[str, float] = {}
    # Before any ORT work: a block map without the values fails at once.
    mapped_results = {name: _expand(cast(Any, metric(len(scored), config.options)).score_map(
        scored, loss=block_map.gradnorm_loss).to_dict(), scored, len(block_map.blocks)) for name, metric in mapped.items()}
    run_ort = bool(stream or ablation)  # only metrics read from the block map: the batches are counted, not run
    t0 = time.perf_counter()
    session = load_session(add_outputs(proto, boundary), providers=config.providers,
                           threads=config.threads) if run_ort else None
    timings["session_s"] = time.perf_counter() - t0
    accs = {n: m(len(scored), config.options) for n, m in stream.items()}
    # One interval-1 accumulator per stream over that stream's (span input, span output) pairs:
    # the pair of span i is scored exactly as a block would be (the primary accumulator runs at
    # the interval itself).
    pair_options = replace(config.options, interval=1)
    stream_accs = {(n, s): m(len(idx), pair_options) for n, m in stream.items()
                   for s, idx in streams.items() if idx}
    k = config.options.interval
    fetch = final_names + [n for n in boundary if n not in final_names]
    references: list[dict[str, np.ndarray]] = []
    counts: list[int] = []
    t0 = time.perf_counter()
    real = positions = 0
    for i, feed in enumerate(progress(batches, desc="scoring", total=_len(batches))):
        if session is None:
            counts.append(_batch_size(feed))
            continue
        values = run_batch(session, feed, fetch, batch=i)
        mask = batch_mask(feed, mask_name, batch=i)
        if i == 0 and mask is not None and not mask_fits(mask, (values[t] for t in boundary), config.options.channel_axis):
            if config.options.token_mask != "auto":
                raise ConfigError(f"--token-mask {mask_name!r} has shape {list(mask.shape)}, which fits no block "
                                  "tensor's [batch, tokens] axes", hint="pass --token-mask none, or the right input")
            mask_how += f"; not applied: its shape {list(mask.shape)} fits no block tensor"
            mask_name, mask = None, None
        if mask is not None:
            real, positions = real + int(mask.sum()), positions + mask.size
        if accs:
            acts = BlockActivations(inputs=[values[x] for x in inputs],
                                    outputs=[values[y] for y in outputs], names=names, mask=mask)
            for acc in accs.values():
                acc.update(acts)
            for (_, s), acc in stream_accs.items():
                acc.update(BlockActivations(inputs=[values[_stream_of(scored[j], s).input] for j in streams[s]],
                                            outputs=[values[_stream_of(scored[j + k - 1], s).output]
                                                     for j in streams[s]],
                                            names=[scored[j].name for j in streams[s]], mask=mask))
        if ablation:
            references.append({n: values[n] for n in final_names})
        counts.append(_batch_size(feed))
        del values
    if not counts:
        raise CalibrationError("the calibration data has no batches", hint="pass --calib with at least one .npz batch")
    timings["scoring_s"] = time.perf_counter() - t0
    results = {n: _expand(acc.result().to_dict(), scored, len(block_map.blocks)) for n, acc in accs.items()}
    for n in list(results) if streams else ():
        per = {s: _expand(stream_accs[n, s].result().to_dict(), [scored[j] for j in idx],
                          len(block_map.blocks))["scores"] if idx else [None] * len(block_map.blocks)
               for s, idx in streams.items()}
        results[n] = _fuse(results[n], per, scored, config.options)
    results.update(mapped_results)

    if ablation:
        t0 = time.perf_counter()
        removable = [j for j, b in enumerate(scored) if b.removable]
        graph_index = GraphIndex(proto)  # one shape inference for every removal
        for name, metric in ablation.items():
            final_acc = metric(len(scored), config.options, logits=logit_outputs(proto))
            for j in progress(removable, desc="ablation"):
                ablated = load_session(remove_blocks(proto, [scored[j]], check=False, index=graph_index),
                                       providers=config.providers, threads=config.threads)
                seen = 0
                for i, feed in enumerate(batches):
                    final_acc.update(j, references[i], _run_ablated(ablated, feed, final_names, scored[j], batch=i))
                    seen += 1
                if seen != len(references):
                    raise ConfigError("ablation needs re-iterable calibration batches (a list or a CalibrationSet)",
                                      hint="pass a list of batches or load_calibration(...), not a generator")
            results[name] = _expand(final_acc.result().to_dict(), scored, len(block_map.blocks))
        timings["ablation_s"] = time.perf_counter() - t0
        logger.info("ablation: %d extra sessions in %.1f s", len(removable), timings["ablation_s"])

    num_batches, samples = _summary(len(counts), counts)
    blocks = tuple({"index": b.index, "name": b.name, "input": b.input, "output": b.output, "params": b.params,
                    "removable": b.removable, "reason": b.reason, "streams": [st.name for st in b.streams]}
                   for b in block_map.blocks)
    return model, ScoreReport(
        model_sha256=digest, calibration=calibration, random_calibration=random_calibration,
        batches=num_batches, samples=samples, blocks=blocks, metrics=results,
        config={"metrics": list(config.metrics), **_options(config.options),
                "token_mask_used": {"input": mask_name, "how": mask_how, "real_tokens": real if mask_name else None,
                                    "positions": positions if mask_name else None}},
        timings_s={k: round(v, 4) for k, v in timings.items()},
        providers=tuple(session.get_providers()) if session is not None else (),
    )


def _run_ablated(session: Any, feed: Mapping[str, np.ndarray], names: Sequence[str], block: Block, *,
                 batch: int) -> dict[str, np.ndarray]:
    """Run the model without ``block`` on a batch the full model already ran.

    Raises:
        BlockError: ONNX Runtime fails: that is the ablated model's failure (naming the block),
            never "the calibration batch does not fit".
    """
    try:
        values = session.run(list(names), dict(feed))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BlockError(f"ablation: ONNX Runtime fails on the model without block {block.index} ({block.name}) "
                         f"on calibration batch {batch} (the full model runs it): {msg}",
                         hint="the block cannot be skipped in this graph; score without ablation (--metric cosine) "
                              "and report the model") from None
    return dict(zip(names, values, strict=True))


def _stream_of(block: Block, name: str) -> Any:
    return next(st for st in block.streams if st.name == name)


def _stream_plan(scored: Sequence[Block], options: MetricConfig) -> dict[str, list[int]]:
    """Stream name -> start positions (in ``scored``) of the spans that all carry that stream.

    Spans are ``options.interval`` blocks long (interval 1: the blocks carrying the stream);
    {} when no block has two streams. Every stream name of the blocks is a key (in first-seen order), with [] when no span carries it.

    Raises:
        ConfigError: token ranges on a model with multi-stream blocks.
    """
    multi = [b for b in scored if len(b.streams) > 1]
    if not multi:
        return {}
    if options.token_ranges:
        b = multi[0]
        raise ConfigError(
            f"--token-ranges slices one tensor, but block {b.index} ({b.name}) has {len(b.streams)} separate streams "
            f"({', '.join(st.name for st in b.streams)})",
            hint="leave --token-ranges out: each stream is scored on its own (per_stream in the report)",
        )
    k = options.interval
    plan: dict[str, list[int]] = {}
    for b in scored:
        for st in b.streams:
            plan.setdefault(st.name, [])
    for j in range(len(scored) - k + 1):
        for name in plan:
            if all(any(st.name == name for st in b.streams) for b in scored[j:j + k]):
                plan[name].append(j)
    return plan


def _fuse(result: dict[str, Any], per_stream: dict[str, list[Any]], scored: Sequence[Block],
          options: MetricConfig) -> dict[str, Any]:
    """``result`` with the ``per_stream`` scores added and the multi-stream spans' scores fused.

    For spans (blocks at interval 1) holding a multi-stream block, ``scores`` becomes the
    fusion of the streams that run through the span. Does not modify ``result``.
    """
    out = dict(result)
    scores = list(result["scores"])
    k = options.interval
    for j in range(len(scored) - k + 1):
        if any(len(b.streams) > 1 for b in scored[j:j + k]):
            i = scored[j].index
            scores[i] = fuse_streams({s: v[i] for s, v in per_stream.items()}, options)
    out["scores"] = scores
    out["per_stream"] = per_stream
    out["stream_fusion"] = options.stream_fusion + (
        " (" + ", ".join(f"{k}={w:g}" for k, w in options.stream_weights) + ")" if options.stream_weights else "")
    return out


def _options(options: MetricConfig) -> dict[str, Any]:
    d = {k: getattr(options, k) for k in options.__dataclass_fields__}
    d["token_ranges"] = [str(r) for r in options.token_ranges]
    d["stream_weights"] = dict(options.stream_weights)
    return d
