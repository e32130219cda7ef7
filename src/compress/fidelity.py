"""How closely a candidate model's outputs follow a reference model's, on the same inputs.

Per output tensor, over all samples (leading axis = batch):

- ``cosine``: mean over samples of the cosine between the flattened outputs;
- ``max_abs`` / ``mean_abs``: largest and mean absolute difference;
- for logits outputs (:func:`logit_outputs`): ``top1`` (share of positions whose argmax
  agrees) and ``kl`` (mean KL(softmax(ref) || softmax(candidate)) along the last axis, in
  nats);
- for integer and bool outputs (class indices from an ArgMax, masks, token ids): only
  ``agreement``, the share of elements that are exactly equal, and ``mismatches``. A cosine
  or an absolute error of class indices means nothing (class 3 is not "close" to class 4).

Statistics are accumulated batch by batch (:class:`FidelityAccumulator`), so no output
of all batches is held in memory.

:func:`compare_models` and :class:`HeldOut` run both models with ONNX Runtime
(:mod:`compress.runtime`, CPU) on the same batches and summarise the statistics: the worst
value of each over outputs and the fidelity loss (:func:`fidelity_loss`). They never modify
the models; a model ORT cannot load is a :class:`~compress.errors.BlockError`, a batch it
rejects a :class:`~compress.errors.CalibrationError` naming the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from compress.runtime import load_session, run_batch

Batches = Sequence[Mapping[str, np.ndarray]]

#: Ops whose output can be class scores (a linear classifier head).
_HEAD_OPS = {"Gemm", "MatMul", "Add", "Conv"}


def logit_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """Graph outputs that are logits: named ``*logit*``, or rank 2/3 float made by a linear head.

    An output computed by LayerNormalization, Tanh, Softmax, ... (embeddings, pooled
    features, probabilities) is not logits, whatever its shape.
    """
    from compress.graph import GraphIndex

    index = GraphIndex(model)
    found = set()
    for name in index.graph_outputs:
        t = index.type_of(name)
        key = index.producer.get(name)
        node = index.node_by_key[key] if key else None
        while node is not None and node.op_type == "Identity":
            key = index.producer.get(node.input[0])
            node = index.node_by_key[key] if key else None
        rank_ok = t is not None and t.shape is not None and len(t.shape) in (2, 3) and t.dtype.startswith("float")
        if "logit" in name.lower() or (rank_ok and node is not None and node.op_type in _HEAD_OPS):
            found.add(name)
    return frozenset(found)


def _log_softmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    m = a.max(axis=-1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis=-1, keepdims=True))


@dataclass
class _Sums:
    samples: int = 0
    cos: float = 0.0
    abs_sum: float = 0.0
    elements: int = 0
    max_abs: float = 0.0
    positions: int = 0
    top1: float = 0.0
    kl: float = 0.0
    logits: bool = False
    exact: bool = False
    equal: int = 0


@dataclass
class FidelityAccumulator:
    """Running fidelity statistics per output name; ``logits`` names the logits outputs."""

    logits: frozenset[str] = frozenset()
    sums: dict[str, _Sums] = field(default_factory=dict)

    def update(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        """Add one batch: ``reference`` and ``candidate`` map each output name to its array (batch axis first).

        Every name of ``reference`` must be in ``candidate``; integer and bool outputs count
        exact agreement, float outputs cosine, absolute errors (and top-1, KL for logits).
        """
        for name, ref in reference.items():
            raw_r, raw_c = np.asarray(ref), np.asarray(candidate[name])
            exact = raw_r.dtype.kind in "biu" or raw_c.dtype.kind in "biu"
            s = self.sums.setdefault(name, _Sums(logits=not exact and name in self.logits and raw_r.ndim > 0
                                                 and raw_r.shape[-1] >= 2, exact=exact))
            b = raw_r.shape[0] if raw_r.ndim else 1
            if s.exact:
                s.samples += b
                s.elements += raw_r.size
                s.equal += int(np.count_nonzero(raw_r == raw_c)) if raw_r.shape == raw_c.shape else 0
                continue
            r = raw_r.astype(np.float64)
            c = raw_c.astype(np.float64)
            rf, cf = r.reshape(b, -1), c.reshape(b, -1)
            nr, nc = np.linalg.norm(rf, axis=1), np.linalg.norm(cf, axis=1)
            dots = (rf * cf).sum(axis=1)
            both_zero = (nr == 0) & (nc == 0)
            cos = np.where(both_zero, 1.0, dots / np.maximum(nr * nc, 1e-300))
            s.samples += b
            s.cos += float(cos.sum())
            d = np.abs(r - c)
            s.abs_sum += float(d.sum())
            s.elements += d.size
            s.max_abs = max(s.max_abs, float(d.max()) if d.size else 0.0)
            if s.logits:
                lr, lc = _log_softmax(r), _log_softmax(c)
                n = int(np.prod(r.shape[:-1]))
                s.positions += n
                s.top1 += float((r.argmax(-1) == c.argmax(-1)).sum())
                s.kl += float((np.exp(lr) * (lr - lc)).sum())

    def result(self) -> dict[str, dict[str, Any]]:
        """Per output: cosine, max_abs, mean_abs (+ top1, kl for logits); agreement for integer outputs."""
        out: dict[str, dict[str, Any]] = {}
        for name, s in self.sums.items():
            if s.exact:
                out[name] = {"agreement": s.equal / max(s.elements, 1), "mismatches": s.elements - s.equal,
                             "samples": s.samples, "exact": True}
                continue
            d: dict[str, Any] = {"cosine": s.cos / max(s.samples, 1), "max_abs": s.max_abs,
                                 "mean_abs": s.abs_sum / max(s.elements, 1), "samples": s.samples}
            if s.logits:
                d["top1"] = s.top1 / max(s.positions, 1)
                d["kl"] = s.kl / max(s.positions, 1)
            out[name] = d
        return out


def worst(result: Mapping[str, Mapping[str, Any]], key: str) -> float | None:
    """The worst value of ``key`` over outputs (lowest cosine/top1, highest errors/kl); None if absent."""
    values = [v[key] for v in result.values() if key in v]
    if not values:
        return None
    return min(values) if key in ("cosine", "top1", "agreement") else max(values)


def fidelity_loss(summary: Mapping[str, float | None]) -> tuple[float, str]:
    """The fidelity loss of a summary (worst values over outputs) and how it was computed.

    ``1 - top1`` over the logits outputs, ``1 - cosine`` over the other float outputs
    (``cosine_non_logits`` when the summary has both kinds; without that key, ``cosine``
    counts only when there are no logits), ``1 - agreement`` over integer outputs; the loss
    is the largest of those that apply. A model with a class head and a box head is thus
    judged on both: its boxes cannot break unseen behind agreeing classes.
    """
    parts: list[tuple[float, str]] = []
    if summary.get("top1") is not None:
        parts.append((1.0 - float(summary["top1"]), "1 - top1"))  # type: ignore[arg-type]
        if summary.get("cosine_non_logits") is not None:
            parts.append((1.0 - float(summary["cosine_non_logits"]), "1 - cosine"))  # type: ignore[arg-type]
    elif summary.get("cosine") is not None:
        parts.append((1.0 - float(summary["cosine"]), "1 - cosine"))  # type: ignore[arg-type]
    if summary.get("agreement") is not None:
        parts.append((1.0 - float(summary["agreement"]), "1 - agreement"))  # type: ignore[arg-type]
    if not parts:
        return 0.0, "none (no outputs)"
    loss, _ = max(parts, key=lambda p: p[0])
    return loss, f"max({', '.join(name for _, name in parts)})" if len(parts) > 1 else parts[0][1]


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, batches: Batches) -> dict[str, Any]:
    """Fidelity of ``candidate`` against ``reference`` on ``batches`` (see the module docstring).

    The two models never have a session at the same time (the reference's outputs on
    ``batches`` are kept instead), so the peak memory is one model's, not two. Does not
    modify either model.

    Returns:
        A dict: ``outputs`` (the statistics per output, :meth:`FidelityAccumulator.result`);
        the worst value over outputs of ``cosine``, ``max_abs``, ``mean_abs``, ``top1``,
        ``kl`` and ``agreement`` (None where no output has it); ``loss`` and
        ``loss_metric`` (:func:`fidelity_loss`).

    Raises:
        BlockError: ORT cannot load a model. CalibrationError: ORT rejects a batch.
    """
    return HeldOut(reference, batches).fidelity(candidate)


class HeldOut:
    """The reference model's outputs on the held-out batches, computed once; :meth:`fidelity` scores candidates.

    ``HeldOut(model, held).fidelity(candidate)`` equals ``compare_models(model, candidate,
    held)`` with one ORT session per candidate and none for the reference. The outputs are
    kept in memory (the held-out share of the calibration data).
    """

    def __init__(self, reference: onnx.ModelProto, batches: Batches) -> None:
        self.batches = batches
        self.names = [o.name for o in reference.graph.output]
        self.logits = logit_outputs(reference)
        ref = load_session(reference, providers=("CPUExecutionProvider",))
        self.outputs = [run_batch(ref, feed, self.names, batch=i) for i, feed in enumerate(batches)]

    def fidelity(self, candidate: onnx.ModelProto) -> dict[str, Any]:
        """Fidelity of ``candidate`` against the reference (the dict of :func:`compare_models`)."""
        cand = load_session(candidate, providers=("CPUExecutionProvider",))
        acc = FidelityAccumulator(logits=self.logits)
        for i, feed in enumerate(self.batches):
            acc.update(self.outputs[i], run_batch(cand, feed, self.names, batch=i))
        return _fidelity_summary(acc)


def _fidelity_summary(acc: FidelityAccumulator) -> dict[str, Any]:
    per_output = acc.result()
    summary = {k: worst(per_output, k) for k in ("cosine", "max_abs", "mean_abs", "top1", "kl", "agreement")}
    if summary["top1"] is not None:  # logits beside other float outputs: those count by their cosine
        summary["cosine_non_logits"] = worst({n: o for n, o in per_output.items() if "top1" not in o}, "cosine")
    loss, how = fidelity_loss(summary)
    return {"outputs": per_output, **summary, "loss": loss, "loss_metric": how}
