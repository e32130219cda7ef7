"""Block-importance scoring: metrics (streaming accumulators) and Fisher segmentation.

See :mod:`compress.scoring.metrics` for the accumulator protocol and the formulas (the
metrics live in :mod:`~compress.scoring.options`, :mod:`~compress.scoring.activations`,
:mod:`~compress.scoring.base`, :mod:`~compress.scoring.tokens`, :mod:`~compress.scoring.cka`
and :mod:`~compress.scoring.ablation`; importing this package registers every metric), and
:mod:`compress.scoring.segment` for the SGLP segmentation. Pure numpy; the collector
(:mod:`compress.scoring.collect`, which runs ONNX Runtime) is not imported here.
"""

from __future__ import annotations

from compress.scoring.metrics import (
    METRICS,
    STREAM_FUSIONS,
    AblationAccumulator,
    Accumulator,
    BlockActivations,
    BoundaryAccumulator,
    MetricConfig,
    MetricResult,
    TokenRange,
    fuse_streams,
    get_metric,
    metric_names,
    minibatch_hsic,
    parse_stream_weights,
    parse_token_ranges,
    register_metric,
    token_view,
)
from compress.scoring.segment import auto_segment_count, fisher_segments, segment_costs, segment_losses

__all__ = [
    "METRICS",
    "STREAM_FUSIONS",
    "AblationAccumulator",
    "Accumulator",
    "BlockActivations",
    "BoundaryAccumulator",
    "MetricConfig",
    "MetricResult",
    "TokenRange",
    "auto_segment_count",
    "fuse_streams",
    "fisher_segments",
    "get_metric",
    "metric_names",
    "minibatch_hsic",
    "parse_stream_weights",
    "parse_token_ranges",
    "register_metric",
    "segment_costs",
    "segment_losses",
    "token_view",
]
