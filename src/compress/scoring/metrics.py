"""Block-importance metrics: streaming accumulators over calibration batches.

Protocol (what a collector does)::

    acc = get_metric("cosine")(num_blocks, MetricConfig(interval=1))
    for batch in calibration:                       # one ORT run per batch
        acc.update(BlockActivations(inputs=[...], outputs=[...]))
    result = acc.result()                           # MetricResult; result.to_dict() is JSON-ready

``inputs[i]`` / ``outputs[i]`` are block ``i``'s residual-stream input and output for the
batch (any float dtype; batch on axis 0). Accumulators keep sums and counts only (O(L^2)
state plus per-batch temporaries), never the activations. The ``ablation`` metric
(``needs_final`` is True) is fed differently: ``acc.update(block, reference, ablated)``
with the model's final outputs with and without block ``block``.

Every score is "higher = more important" (prune the lowest). ``scores[i]`` belongs to the
span that starts at block ``i`` (``interval`` blocks, ``i .. i + interval - 1``); spans that
run past the last block, or whose two ends differ in shape, are not scored (None).

Token view (:func:`token_view`): an activation becomes ``[B, T, D]`` (samples, tokens,
hidden). The hidden axis is ``channel_axis``; by default axis 1 for rank >= 4 (NCHW,
NCDHW: every spatial position is a token) and the last axis otherwise (``[B, T, D]``;
``[B, D]`` has one token per sample). A :class:`TokenRange` slices the token axis (the
flattened spatial axis for NCHW); ``last_token`` keeps token ``T - 1`` of each sample.

Per-token metrics (per token along the hidden axis; sums and means in float64):

- ``cosine`` (Sana 1.5 block importance, abs variant): mean over tokens of ``1 - |cos|``.
- ``cosine-signed`` (ShortGPT Block Influence, ModelOpt Minitron): mean of ``1 - cos``.
- ``angular`` (Gromov et al. 2024): mean of ``arccos(cos) / pi`` in ``[0, 1]``; usually
  with ``last_token=True``.

  Zero vectors: ``cos = 1`` when both are zero, ``cos = 0`` when exactly one is zero.
  Numerics (relative error per token <= ``r`` = 1e-4 for float32 activations, 1e-10 for
  float64): per batch, one squared norm per token of every boundary and one dot product
  per token of every span, read in place in float32 (float32 activations) or float64 (any
  other float dtype), give ``cos`` in float64. Tokens with ``1 - |cos|`` below
  ``sqrt(D) eps / r`` (nearly parallel or anti-parallel, where that loses digits) are
  recomputed from the normalised difference ``|x^ -+ y^|^2`` (``x^ = x/|x|``;
  ``1 - cos = |x^ - y^|^2 / 2``, angle ``2 atan2(|x^ - y^|, |x^ + y^|)``): in float32
  where its error bound allows (``details["refined_tokens"]``), else in float64
  (``details["exact_tokens"]``; also zero vectors and under/overflowing squared norms).
  Nearly identical vectors keep their precision.

``cka``: linear CKA between the ``L + 1`` boundary representations (input of block 0,
output of every block), by the minibatch estimator of Nguyen, Raghu & Kornblith (2021):
the unbiased HSIC of Song et al. (2012) is averaged over minibatches and
``CKA(X, Y) = mean HSIC(X, Y) / sqrt(mean HSIC(X, X) * mean HSIC(Y, Y))``. Rows are
tokens (``B * T``; at most ``max_tokens`` per batch, a fixed-seed random subset) when all
representations have the same number of tokens per sample, else samples with
features flattened (CNN stages of different resolution). Batches with fewer than
``min_rows`` rows are pooled with the next ones. The score is ``1 - CKA(input of block
i, output of block i + interval - 1)``; ``matrix`` holds the (L+1) x (L+1) CKA and
``segments`` the Fisher optimal segmentation of the L block outputs by ``1 - CKA``
(:mod:`compress.scoring.segment`). A representation with non-positive self-HSIC
(constant) has CKA 0 with everything else. Cost per batch: about ``(L+1) n^2 D / 2``
multiply-adds for ``n`` rows (``n <= max_tokens``), i.e. ``n / (24 D)`` of a transformer
forward pass; lower ``max_tokens`` when D is small.

Token ranges (per modality): with ``token_ranges``, every metric is computed separately
on each range (``per_range``) and ``scores`` is the *combined* score: the unweighted
mean of the per-range scores, so a short text range counts as much as a long image
range. For CKA the per-range matrices are averaged the same way. Token ranges are for a
*single* stream that concatenates modalities (Flux's single-stream blocks in older
diffusers); a range must fit the token axis (start and stop within ``-T .. T``), else it
is a ConfigError: a range past the end used to slice a stream silently.

Streams (per modality on separate tensors, e.g. an MMDiT's image and text hidden
states): the collector (:mod:`compress.scoring.collect`) scores each stream with its own
accumulator and fuses the per-stream scores of a block (:func:`fuse_streams`). The
default fusion is ``max``: a block is only as redundant as its *least* redundant stream
(for the per-token metrics: the largest per-stream ``1 - |cos|``), so a block that leaves
the image unchanged but rewrites the text is kept. ``mean`` averages the streams
(optionally weighted by ``stream_weights``, e.g. ``image=3,text=1``).

NaN/Inf in any activation raises :class:`~compress.errors.BlockError` naming the block
and whether its input or output is affected.

Where the code lives (this module re-exports the public names and, by importing them,
registers every metric: ``cosine``, ``cosine-signed``, ``angular``, ``cka``, ``ablation``,
``gradnorm``):

- :mod:`compress.scoring.options`: :class:`MetricConfig`, :class:`TokenRange`, the
  multi-stream fusion (:func:`fuse_streams`);
- :mod:`compress.scoring.activations`: :class:`BlockActivations`, :func:`token_view`,
  :func:`masked_view`;
- :mod:`compress.scoring.base`: the accumulator protocol, :class:`MetricResult` and the
  registry (:func:`register_metric`; a new metric is a module registering its class,
  imported below);
- :mod:`compress.scoring.tokens`: the per-token metrics; :mod:`compress.scoring.cka`:
  CKA; :mod:`compress.scoring.ablation`: ablation; :mod:`compress.scoring.gradnorm`:
  GradNorm (SGLP), read from the block map (computed in torch, no ONNX Runtime pass).
"""

from __future__ import annotations

from compress.scoring.ablation import AblationAccumulator
from compress.scoring.activations import BlockActivations, masked_view, token_view
from compress.scoring.base import (
    METRICS,
    Accumulator,
    BoundaryAccumulator,
    MetricResult,
    get_metric,
    metric_names,
    register_metric,
)
from compress.scoring.cka import CkaAccumulator, minibatch_hsic
from compress.scoring.gradnorm import GradNormMetric
from compress.scoring.options import (
    STREAM_FUSIONS,
    MetricConfig,
    TokenRange,
    fuse_streams,
    parse_stream_weights,
    parse_token_ranges,
)
from compress.scoring.tokens import AngularAccumulator, CosineAccumulator, SignedCosineAccumulator

__all__ = [
    "METRICS",
    "AblationAccumulator",
    "Accumulator",
    "AngularAccumulator",
    "BlockActivations",
    "BoundaryAccumulator",
    "CkaAccumulator",
    "CosineAccumulator",
    "GradNormMetric",
    "MetricConfig",
    "MetricResult",
    "STREAM_FUSIONS",
    "SignedCosineAccumulator",
    "TokenRange",
    "fuse_streams",
    "get_metric",
    "masked_view",
    "metric_names",
    "minibatch_hsic",
    "parse_stream_weights",
    "parse_token_ranges",
    "register_metric",
    "token_view",
]
