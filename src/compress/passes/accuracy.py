"""Fidelity targets for the precision/sparsity passes: measure, rank by local error, repair.

A pass with a target (``target_fidelity`` F) must deliver a model whose fidelity against the
pass's input, measured on **held-out** calibration batches (not the ones it calibrated on),
is at least F -- and on the calibration batches too (more samples; :func:`search_fallback`). Fidelity is ``1 - loss`` as :func:`compress.fidelity.compare_models` defines it:
the output cosine, or top-1 agreement for logits outputs (as the prune stage measures).

The repair has two parts:

1. **Local error per node, in one ONNX Runtime pass** (:func:`local_errors`): the float
   (reference) model gets, for every candidate node, a duplicate of that node whose inputs
   are the pass's version of them (its Q/DQ copies of the *float* activations and weights,
   or its pruned weight); the original and the duplicate outputs are extra graph outputs.
   The relative error ``||y_q - y||^2 / ||y||^2`` of each node is thus its own error, not the
   error accumulated upstream, and all nodes are measured in one run over the batches.
2. **A fallback search** (:func:`search_fallback`): nodes are ranked by local error; the
   ``k`` worst are kept float (dense) for ``k = 0, 1, 2, 4, ...`` until the target holds,
   then ``k`` is bisected down to the smallest count that still meets it. Every evaluated
   step is reported: the nodes kept, the fidelity and loss, and the latency on ONNX Runtime
   CPU (the cost of the fallback). If even ``max_fallback`` of the nodes kept float do not
   reach the target, :class:`FidelityTargetError` carries the report of what was tried.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from compress.errors import BuildError
from compress.log import logger
from compress.passes.base import Batch, FidelityProbe, copy_model, describe_batches, measure_fidelity, toposort
from compress.passes.qdq import restore_float_inputs, restore_float_weights

#: Default fidelity target of the int8 pass in ``compress build`` (output cosine / top-1 agreement).
DEFAULT_TARGET = 0.99
#: Orders of the fallback search (:attr:`TargetConfig.ranking`).
RANKINGS = ("auto", "local", "output")


class FidelityTargetError(BuildError):
    """A pass could not reach its fidelity target; ``report`` is what it tried (JSON-ready)."""

    def __init__(self, message: str, *, hint: str, report: Mapping[str, Any]) -> None:
        super().__init__(message, hint=hint)
        self.report = dict(report)


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """How a pass meets a fidelity target.

    Attributes:
        fidelity: required ``1 - loss`` against the pass's input on the held-out batches.
        holdout: share of the calibration batches held out for measuring (at least one;
            with a single batch it is used for both, with a warning).
        max_fallback: at most this share of the candidate nodes may be kept float/dense.
        time_steps: time every evaluated step on ONNX Runtime CPU (the latency cost).
        ranking: the order in which nodes are kept out of the pass (:func:`search_fallback`):
            ``auto`` local error, then output sensitivity if that misses; ``local``; ``output``.
    """

    fidelity: float = DEFAULT_TARGET
    holdout: float = 0.25
    max_fallback: float = 0.5
    time_steps: bool = True
    ranking: str = "auto"

    def __post_init__(self) -> None:
        from compress.validate import Interval, check_choice, check_number

        check_choice("TargetConfig", "ranking", self.ranking, RANKINGS)

        check_number("TargetConfig", "fidelity", self.fidelity, within=Interval(0, 1, low_open=True), example="0.99")
        check_number("TargetConfig", "holdout", self.holdout, within=Interval(0, 1, low_open=True, high_open=True),
                     example="0.25")
        check_number("TargetConfig", "max_fallback", self.max_fallback, within=Interval(0, 1), example="0.5")


def split_holdout(batches: Any, share: float) -> tuple[Any, Any, bool]:
    """``(fit, held, shared)``: the last ``ceil(share * n)`` batches are held out (at least 1).

    A :class:`~compress.calibration.CalibrationSet` is split into two sets (no data is read); any
    other batch sequence into two lists. With one batch, ``fit`` and ``held`` are the same
    and ``shared`` is True.
    """
    from compress.calibration import CalibrationSet

    if isinstance(batches, CalibrationSet):
        n = len(batches)
        if n < 2:
            return batches, batches, True
        k = min(n - 1, max(1, math.ceil(share * n)))
        fit = dataclasses.replace(batches, batches=batches.batches[: n - k],
                                  description=f"{batches.description}, batches 0-{n - k - 1}")
        held = dataclasses.replace(batches, batches=batches.batches[n - k:],
                                   description=f"{batches.description}, batches {n - k}-{n - 1} (held out)")
        return fit, held, False
    items = list(batches)
    if len(items) < 2:
        return items, items, True
    k = min(len(items) - 1, max(1, math.ceil(share * len(items))))
    return items[: len(items) - k], items[len(items) - k:], False


def fidelity_of(result: Mapping[str, Any]) -> float:
    """``1 - loss`` of a :func:`measure_fidelity` result."""
    return 1.0 - float(result["loss"])


@dataclass(frozen=True)
class FidelityCheck:
    """Where a pass's candidates are measured: against ``reference`` (the pass's input) on ``held``.

    ``also``: the calibration batches, measured too wherever ``held`` meets the target (the
    lower fidelity counts; None: only ``held``). Both must be iterable more than once
    (lists or a :class:`~compress.calibration.CalibrationSet`); the first ``held`` batch is
    the one timed for the latency cost of a fallback.
    """

    reference: onnx.ModelProto
    held: Any
    also: Any = None


@dataclass(frozen=True)
class Fallback:
    """The nodes a fallback search may keep out of a pass, and how to build the model with some kept.

    ``ranking``: the candidate nodes, the first to keep out first (e.g. by local error, worst
    first, as ``ranked_by`` says); ``make(kept)``: the pass's model with the nodes ``kept``
    left as in the reference. ``what`` names the pass in logs and errors, ``unit`` says what
    keeping a node out means ("kept float", "kept dense").
    """

    ranking: Sequence[str]
    make: Callable[[Sequence[str]], onnx.ModelProto]
    what: str
    unit: str = "kept float"
    ranked_by: str = "local error"


# --------------------------------------------------------------------------------------------
# Local error of each node, one ORT pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """The pass's version of one node's inputs, to be evaluated on float activations.

    ``nodes`` and ``initializers`` are added to the float model (Q/DQ copies, a pruned
    weight; their names must be new there), ``inputs`` replace the node's inputs.
    """

    inputs: tuple[str, ...]
    nodes: tuple[onnx.NodeProto, ...] = ()
    initializers: tuple[onnx.TensorProto, ...] = ()


def local_errors(reference: onnx.ModelProto, variants: Mapping[str, Variant], batches: Sequence[Batch],
                 *, chunk: int = 48) -> dict[str, dict[str, float]]:
    """Per node of ``variants``: its output error when only its own inputs are changed.

    ``reference`` is the float model (node names unique); for each node a duplicate
    reading ``Variant.inputs`` is added and both first outputs become graph outputs;
    ``chunk`` nodes are measured per ONNX Runtime session (one run over ``batches`` each).
    Returns ``{node: {"rel_error": sum ||y'-y||^2 / sum ||y||^2, "cosine": mean cosine}}``.
    Does not modify ``reference``.
    """
    from compress.runtime import load_session, run_batch

    by_name = {n.name: n for n in reference.graph.node}
    missing = [k for k in variants if k not in by_name]
    if missing:
        raise BuildError(f"local error: node(s) {', '.join(missing[:3])} not in the reference model",
                         hint="this is a bug in the pass: the variants must name nodes of the float model")
    names = list(variants)
    out: dict[str, dict[str, float]] = {}
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        model = copy_model(reference)
        graph = model.graph
        pairs: list[tuple[str, str, str]] = []
        added = {t.name for t in graph.initializer}
        for k, name in enumerate(part):
            node, var = by_name[name], variants[name]
            graph.initializer.extend(t for t in var.initializers if t.name not in added)
            added.update(t.name for t in var.initializers)
            graph.node.extend(var.nodes)
            dup = onnx.NodeProto()
            dup.CopyFrom(node)
            dup.name = f"{name}__local{k}"
            del dup.input[:]
            dup.input.extend(var.inputs)
            outs = [f"{o}__local{k}" if o else "" for o in node.output]
            del dup.output[:]
            dup.output.extend(outs)
            graph.node.append(dup)
            pairs.append((name, node.output[0], outs[0]))
        existing = {o.name for o in graph.output}
        for _, a, b in pairs:
            for t in (a, b):
                if t not in existing:
                    graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
                    existing.add(t)
        toposort(graph)
        sess = load_session(model, providers=("CPUExecutionProvider",))
        wanted = list(dict.fromkeys(t for _, a, b in pairs for t in (a, b)))
        sums = {name: [0.0, 0.0, 0.0, 0] for name, _, _ in pairs}  # diff^2, ref^2, cos sum, samples
        for i, feed in enumerate(batches):
            values = run_batch(sess, feed, wanted, batch=i)
            for name, a, b in pairs:
                y = np.asarray(values[a], dtype=np.float64)
                q = np.asarray(values[b], dtype=np.float64)
                s = sums[name]
                s[0] += float(((q - y) ** 2).sum())
                s[1] += float((y ** 2).sum())
                rows = y.shape[0] if y.ndim > 1 else 1
                yf, qf = y.reshape(rows, -1), q.reshape(rows, -1)
                ny, nq = np.linalg.norm(yf, axis=1), np.linalg.norm(qf, axis=1)
                cos = np.where((ny == 0) & (nq == 0), 1.0, (yf * qf).sum(1) / np.maximum(ny * nq, 1e-300))
                s[2] += float(cos.sum())
                s[3] += rows
        for name, s in sums.items():
            out[name] = {"rel_error": s[0] / s[1] if s[1] > 0 else (0.0 if s[0] == 0 else math.inf),
                         "cosine": s[2] / max(s[3], 1)}
    return out


def qdq_variants(qdq: onnx.ModelProto, reference: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, Variant]:
    """For each quantized node of ``qdq``: its Q/DQ input chains, to run on ``reference``'s float tensors.

    The chains (``QuantizeLinear -> DequantizeLinear`` on an activation or a weight, or a
    ``DequantizeLinear`` of a stored int8 weight) are copied with new names; a chain's
    float input keeps its name (the same tensor exists in ``reference``); initializers that
    ``reference`` lacks (scales, zero points, int8 weights) are copied. Nodes without a
    Q/DQ input are left out.
    """
    producer = {o: n for n in qdq.graph.node for o in n.output}
    by_name = {n.name: n for n in qdq.graph.node}
    qinits = {t.name: t for t in qdq.graph.initializer}
    have = {t.name for t in reference.graph.initializer}
    out: dict[str, Variant] = {}
    for k, name in enumerate(nodes):
        node = by_name.get(name)
        if node is None:
            continue
        new_nodes: list[onnx.NodeProto] = []
        inits: dict[str, onnx.TensorProto] = {}
        inputs: list[str] = []
        changed = False
        for j, x in enumerate(node.input):
            dq = producer.get(x)
            if dq is None or dq.op_type != "DequantizeLinear":
                inputs.append(x)
                continue
            chain = [dq]
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                chain.insert(0, q)
            renamed: dict[str, str] = {}
            for c, src in enumerate(chain):
                copy = onnx.NodeProto()
                copy.CopyFrom(src)
                copy.name = f"{name}__lq{k}_{j}_{c}"
                for i, t in enumerate(copy.input):
                    if t in renamed:
                        copy.input[i] = renamed[t]
                    elif t in qinits and t not in have:
                        inits[t] = qinits[t]
                del copy.output[:]
                new = f"{src.output[0]}__lq{k}_{j}"
                renamed[src.output[0]] = new
                copy.output.append(new)
                new_nodes.append(copy)
            inputs.append(renamed[dq.output[0]])
            changed = True
        if changed:
            out[name] = Variant(tuple(inputs), tuple(new_nodes), tuple(inits.values()))
    return out


# --------------------------------------------------------------------------------------------
# Fallback search
# --------------------------------------------------------------------------------------------


def _latency_ms(model: onnx.ModelProto, feed: Batch) -> float:
    from compress.bench import BenchConfig, measure
    from compress.runtime import load_session

    sess = load_session(model, providers=("CPUExecutionProvider",))
    names = [o.name for o in model.graph.output]
    return measure(lambda: sess.run(names, dict(feed)), BenchConfig(warmup_s=0.05, iterations=5, duration_s=0.3)).median_ms


def output_sensitivity(ranking: Sequence[str], make: Callable[[Sequence[str]], onnx.ModelProto],
                       probe: FidelityProbe, *, what: str) -> dict[str, dict[str, Any]]:
    """Per node of ``ranking``: the final-output fidelity when it alone is changed by the pass.

    ``make(kept)`` is :func:`search_fallback`'s; node ``n``'s model is
    ``make(ranking without n)`` (every other node left as in the reference), measured by
    ``probe`` (one ORT session and run over its batches per node). Unlike the local error,
    this includes how much the network downstream amplifies the node's error. Returns
    ``{node: {"cosine", "loss", "loss_metric"[, "kl"]}}``.
    """
    from compress.log import progress

    out: dict[str, dict[str, Any]] = {}
    for name in progress(list(ranking), desc=f"{what} sensitivity"):
        fid = probe(make([n for n in ranking if n != name]))
        out[name] = {"cosine": float(fid["cosine"]), "loss": float(fid["loss"]), "loss_metric": fid["loss_metric"]}
        if fid.get("kl") is not None:
            out[name]["kl"] = float(fid["kl"])
    return out


def by_sensitivity(sensitivity: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Nodes, most damaging first: lowest output cosine, then highest loss, then name."""
    return sorted(sensitivity, key=lambda n: (sensitivity[n]["cosine"], -sensitivity[n]["loss"], n))


def search_fallback(fallback: Fallback, check: FidelityCheck,
                    config: TargetConfig) -> tuple[onnx.ModelProto, list[str], dict[str, Any]]:
    """Keep the fewest of ``fallback.ranking``'s first nodes out of the pass so that the target holds.

    Each candidate ``fallback.make(kept)`` is measured against ``check.reference`` on
    ``check.held``, and where it meets the target there also on ``check.also`` (the
    calibration batches; None: not): its fidelity is the lower of the two. A target met on a dozen held-out samples alone is noise (all-MiniLM
    int8: 0.990 on its 12 held-out sentences, 0.981 on the pipeline's); the calibration
    batches add samples, and a node choice that only suits the held-out ones fails there.
    Steps: ``k = 0``, then
    doubling up to ``max_fallback * len(ranking)``, then bisection between the last miss and
    the first hit (the order is assumed to be monotone enough; every evaluated ``k``
    is reported). Returns ``(model, kept, report)``.

    The order: ``ranking`` (by ``ranked_by``, e.g. local error: cheap, one ORT pass, blind to
    what the network downstream does with a node's error). ``config.ranking`` ``"auto"``: if
    that order misses the target, each node's :func:`output_sensitivity` is measured (one
    run over ``held`` per node) and the search is repeated in that order; ``"output"``: that
    order from the start; ``"local"``: ``ranking`` only. EfficientNet-Lite0 int8: every
    node's local error is below 1e-3 while quantizing one of them alone moves 2-8 % of the
    top-1 answers; by local error the target failed at 0.975 with 25 of 50 nodes float, by
    output sensitivity it held. The report's ``searches`` lists each order tried.

    Raises:
        FidelityTargetError: not met even at the largest allowed ``k`` (report attached).
    """
    ranking, make, what, unit = list(fallback.ranking), fallback.make, fallback.what, fallback.unit
    reference, held, also = check.reference, check.held, check.also
    held = held if hasattr(held, "__len__") else list(held)  # measured at every step: iterable more than once
    feed = next(iter(held), None) if config.time_steps else None
    limit = int(math.floor(config.max_fallback * len(ranking) + 1e-9))
    probe = FidelityProbe(reference, held)
    also_probe: list[FidelityProbe] = []
    report: dict[str, Any] = {"target": config.fidelity, "max_fallback": limit, "candidates": len(ranking),
                              "loss_metric": None}
    if also is not None:
        also = also if hasattr(also, "__len__") else list(also)
        report["also_measured_on"] = describe_batches(also)
    cache: dict[tuple[str, ...], tuple[dict[str, Any], onnx.ModelProto]] = {}

    def evaluate(order: Sequence[str], k: int) -> tuple[dict[str, Any], onnx.ModelProto]:
        key = tuple(sorted(order[:k]))
        if key in cache:
            step, model = cache[key]
            return {**step, "nodes": list(order[:k])}, model
        model = make(order[:k])
        fid = probe(model)
        value = fidelity_of(fid)
        samples = min((o.get("samples", 0) for o in fid.get("outputs", {}).values()), default=0)
        report["held_out_samples"] = samples
        extra: dict[str, Any] = {}
        if also is not None and value >= config.fidelity:
            if not also_probe:
                also_probe.append(FidelityProbe(reference, also))
            fid_also = also_probe[0](model)
            extra = {"fidelity_held_out": value, "fidelity_calibration": fidelity_of(fid_also)}
            if fidelity_of(fid_also) < value:
                value, fid = fidelity_of(fid_also), fid_also
        step = {"kept": k, "nodes": list(order[:k]), "fidelity": value, "loss": fid["loss"],
                "loss_metric": fid["loss_metric"], "cosine": fid["cosine"], "met": value >= config.fidelity, **extra}
        if fid.get("top1") is not None:
            step["top1"] = fid["top1"]
        if feed is not None:
            step["latency_ms"] = _latency_ms(model, feed)
        logger.info("%s: %d %s -> fidelity %.5f (target %.4f)", what, k, unit, value, config.fidelity)
        cache[key] = (step, model)
        return step, model

    def search(order: Sequence[str]) -> tuple[int | None, dict[int, dict[str, Any]], dict[int, onnx.ModelProto]]:
        steps: dict[int, dict[str, Any]] = {}
        models: dict[int, onnx.ModelProto] = {}

        def met(k: int) -> bool:
            if k not in steps:
                steps[k], models[k] = evaluate(order, k)
            return bool(steps[k]["met"])

        found: int | None = 0 if met(0) else None
        lo, k = 0, 1
        while found is None and k <= limit:
            if met(k):
                found = k
                break
            lo = k
            k = k * 2 if k * 2 <= limit or k == limit else limit
        if found is not None:
            hi = found
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if met(mid):
                    hi = mid
                else:
                    lo = mid
            found = hi
        return found, steps, models

    orders: list[tuple[str, list[str]]] = []
    if config.ranking in ("auto", "local"):
        orders.append((fallback.ranked_by, list(ranking)))
    searches: list[dict[str, Any]] = []
    found: int | None = None
    steps: dict[int, dict[str, Any]] = {}
    models: dict[int, onnx.ModelProto] = {}
    order: list[str] = list(ranking)
    while True:
        if not orders:
            if config.ranking == "local" or limit == 0 or len(ranking) < 2 or any(
                    s["ranked_by"] == "output sensitivity" for s in searches):
                break
            if searches:
                logger.info("%s: target missed in %s order; measuring each of the %d nodes' output sensitivity",
                            what, searches[-1]["ranked_by"], len(ranking))
            sensitivity = output_sensitivity(ranking, make, probe, what=what)
            report["output_sensitivity"] = [{"node": n, **sensitivity[n]} for n in by_sensitivity(sensitivity)]
            orders.append(("output sensitivity", by_sensitivity(sensitivity)))
        name, order = orders.pop(0)
        found, steps, models = search(order)
        ordered = [steps[k] for k in sorted(steps)]
        searches.append({"ranked_by": name, "met": found is not None, "kept": found,
                         "fidelity": max(s["fidelity"] for s in ordered) if found is None else steps[found]["fidelity"],
                         "steps": ordered})
        if found is not None:
            break
    ordered = searches[-1]["steps"]
    base = ordered[0].get("latency_ms")
    for search_ in searches:
        for s in search_["steps"]:
            if base and s.get("latency_ms"):
                s["latency_vs_no_fallback"] = s["latency_ms"] / base
    n = report.get("held_out_samples", 0)
    if ordered[0]["loss_metric"] == "1 - top1" and n and 1.0 / n > 1.0 - config.fidelity:
        report["warning"] = (f"top-1 agreement on {n} held-out samples moves in steps of {1.0 / n:.3g}: the target "
                             f"{config.fidelity} only asks that all of them agree; pass more calibration data "
                             f"(> {math.ceil(1.0 / max(1.0 - config.fidelity, 1e-9))} held-out samples) for a "
                             "meaningful check")
    every = [s for search_ in searches for s in search_["steps"]]
    report.update(loss_metric=ordered[0]["loss_metric"], steps=ordered, met=found is not None, kept=found,
                  ranked_by=searches[-1]["ranked_by"],
                  fidelity=steps[found]["fidelity"] if found is not None else max(s["fidelity"] for s in every))
    if len(searches) > 1:
        report["searches"] = searches
    if found is None:
        best = max(every, key=lambda s: s["fidelity"])
        tried = f"; ordered by {' and by '.join(s['ranked_by'] for s in searches)}" if len(searches) > 1 else ""
        raise FidelityTargetError(
            f"{what}: fidelity target {config.fidelity} not reached: {best['fidelity']:.5f} at best "
            f"({best['kept']} of {len(ranking)} nodes {unit}; at most {limit} allowed{tried})",
            hint="allow more fallback (--max-fallback), lower --target-fidelity, or use other calibration data "
                 "(the report in passes.json lists every step)",
            report=report)
    return models[found], list(order[:found]), report


def kept_reasons(kept: Sequence[str], search: Mapping[str, Any], errors: Mapping[str, Mapping[str, float]],
                 *, verb: str) -> dict[str, str]:
    """Why each node of ``kept`` (in :func:`search_fallback`'s order) is out of the pass, for the report."""
    total = search["candidates"]
    if search.get("ranked_by") == "output sensitivity":
        cosine = {s["node"]: s["cosine"] for s in search["output_sensitivity"]}
        return {n: f"{verb} for the fidelity target (output cosine {cosine[n]:.5f} with only this node changed, "
                   f"rank {i + 1} of {total} by output sensitivity)" for i, n in enumerate(kept)}
    return {n: f"{verb} for the fidelity target (local error {errors[n]['rel_error']:.3g}, rank {i + 1} of {total})"
            for i, n in enumerate(kept)}


def _activation_qparams(qdq: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Node -> (activation tensor, names of its Q scale/zero-point initializers) for each quantized data input."""
    producer = {o: n for n in qdq.graph.node for o in n.output}
    inits = {t.name for t in qdq.graph.initializer}
    by_name = {n.name: n for n in qdq.graph.node}
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name in nodes:
        node = by_name.get(name)
        for x in node.input if node is not None else ():
            dq = producer.get(x)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if dq is not None and q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                out[name] = (q.input[0], tuple(t for t in q.input[1:] if t) + tuple(t for t in dq.input[1:] if t))
                break
    return out


@dataclass(frozen=True)
class Int8Draft:
    """The int8 pass's first result, before the fidelity target is met.

    ``float_model``: the model it quantized (after its own preparation: named nodes, constants
    as initializers, SmoothQuant); ``qdq``: its Q/DQ output (before non-quantized consumers
    were given back float inputs); ``quantized``: the nodes meant to be quantized;
    ``method``: the calibration method used; ``alternatives``: method -> a function
    quantizing with that method instead (None: no per-tensor choice, :func:`choose_methods`).
    """

    float_model: onnx.ModelProto
    qdq: onnx.ModelProto
    quantized: frozenset[str]
    method: str = "minmax"
    alternatives: Mapping[str, Callable[[], onnx.ModelProto]] | None = None


def choose_methods(draft: Int8Draft, alternatives: Mapping[str, onnx.ModelProto],
                   errors: Mapping[str, Mapping[str, float]], held: Sequence[Batch],
                   ) -> tuple[onnx.ModelProto, dict[str, str], dict[str, dict[str, float]]]:
    """Per activation tensor, the calibration method whose Q/DQ gives its consumers the least local error.

    ``alternatives``: method -> the same int8 pass calibrated with that method (built from
    ``draft.alternatives``); ``errors``: the local errors of ``draft.qdq`` per node (its keys
    are the nodes compared). The errors of each alternative are measured like ``errors`` (one
    ORT pass each, on ``held``); per tensor the sum over its quantized consumers decides, and
    the winner's activation scale and zero point are copied into a copy of ``draft.qdq``.
    Returns the model, tensor -> method (changed ones only), and the local errors of the mixed
    model. Does not modify ``draft``.
    """
    float_model, qdq, method = draft.float_model, draft.qdq, draft.method
    nodes = sorted(errors, key=lambda n: (-errors[n]["rel_error"], n))  # worst first, as the search ranks them
    params = _activation_qparams(qdq, nodes)
    per_method: dict[str, Mapping[str, Mapping[str, float]]] = {method: dict(errors)}
    for m, model in alternatives.items():
        per_method[m] = local_errors(float_model, qdq_variants(model, float_model, nodes), held)
    tensors: dict[str, list[str]] = {}
    for n, (t, _) in params.items():
        tensors.setdefault(t, []).append(n)
    choice: dict[str, str] = {}
    for t, consumers in tensors.items():
        totals = {m: sum(e[n]["rel_error"] for n in consumers if n in e) for m, e in per_method.items()}
        best = min(totals, key=lambda m: (totals[m], m != method))
        if best != method:
            choice[t] = best
    mixed = copy_model(qdq)
    values: dict[str, onnx.TensorProto] = {}
    for t, m in choice.items():
        alt = {x.name: x for x in alternatives[m].graph.initializer}
        alt_params = _activation_qparams(alternatives[m], tensors[t])
        for n in tensors[t]:
            if n in alt_params:
                for mine, theirs in zip(params[n][1], alt_params[n][1], strict=False):
                    values[mine] = alt[theirs]
    for init in mixed.graph.initializer:
        if init.name in values:
            name = init.name
            init.CopyFrom(values[name])
            init.name = name
    mixed_errors = local_errors(float_model, qdq_variants(mixed, float_model, nodes), held) if choice else {n: dict(e) for n, e in errors.items()}
    return mixed, choice, mixed_errors


def repair_int8(draft: Int8Draft, check: FidelityCheck,
                config: TargetConfig) -> tuple[onnx.ModelProto, dict[str, str], dict[str, Any]]:
    """Keep the int8 nodes with the largest local error float until ``config.fidelity`` holds.

    Fidelity is measured as ``check`` says (against the pass's input on the held-out batches
    and, where met, on the calibration batches: :func:`search_fallback`). Returns the model,
    the nodes kept float with the reason, and the report: ``local_error`` per node (sorted,
    worst first) and the search steps (:func:`search_fallback`). Does not modify ``draft``.

    ``draft.alternatives`` (method -> a function quantizing with that calibration method):
    when the target is missed with no node float, each activation tensor gets the method with
    the least local error (:func:`choose_methods`) if that raises the fidelity; the report's
    ``calibration_methods`` says what was measured and chosen.

    Raises:
        FidelityTargetError: the target is not met with ``max_fallback`` of the nodes float.
    """
    reference, float_model, quantized = check.reference, draft.float_model, draft.quantized
    held_list = check.held if hasattr(check.held, "__len__") else list(check.held)
    variants = qdq_variants(draft.qdq, float_model, sorted(quantized))
    errors = local_errors(float_model, variants, held_list)
    ranking = sorted(errors, key=lambda n: (-errors[n]["rel_error"], n))
    qdq = draft.qdq

    def make(kept: Sequence[str]) -> onnx.ModelProto:
        model = copy_model(qdq)
        restore_float_inputs(model, set(quantized) - set(kept))  # activations of kept nodes: float
        restore_float_weights(model, float_model, set(kept))  # and their weights
        return model

    report: dict[str, Any] = {"measured_on": describe_batches(held_list)}
    if draft.alternatives:
        first = fidelity_of(measure_fidelity(reference, make(()), held_list))
        if first < config.fidelity:
            built = {m: fn() for m, fn in draft.alternatives.items()}
            mixed, choice, mixed_errors = choose_methods(draft, built, errors, held_list)
            info: dict[str, Any] = {"tried": [draft.method, *built], "fidelity_single_method": first, "chosen": {}}
            if choice:
                info["per_tensor_choice"] = choice
                qdq = mixed
                second = fidelity_of(measure_fidelity(reference, make(()), held_list))
                info["fidelity_per_tensor"] = second
                if second > first:
                    info["chosen"] = choice
                    errors = mixed_errors
                    ranking = sorted(errors, key=lambda n: (-errors[n]["rel_error"], n))
                else:
                    qdq = draft.qdq
            report["calibration_methods"] = info
    report["local_error"] = [{"node": n, **errors[n]} for n in ranking]
    try:
        model, kept, search = search_fallback(Fallback(ranking, make, what="int8"),
                                              FidelityCheck(reference, held_list, check.also), config)
    except FidelityTargetError as exc:
        raise FidelityTargetError(exc.message, hint=exc.hint, report={**report, **exc.report}) from None
    report.update(search)
    return model, kept_reasons(kept, search, errors, verb="kept float"), report


__all__ = ["DEFAULT_TARGET", "Fallback", "FidelityCheck", "FidelityTargetError", "Int8Draft", "TargetConfig", "Variant", "fidelity_of", "local_errors", "qdq_variants",
           "RANKINGS", "by_sensitivity", "choose_methods", "kept_reasons", "output_sensitivity", "repair_int8", "search_fallback",
           "split_holdout"]
