"""The work of one search candidate, as module-level functions a Ray worker (or this process) runs.

Each task reads its inputs from the output folder and writes one content-hashed stage folder
under ``OUT/search/`` (:func:`compress.pipeline.cache.run_stage`): a task whose inputs did not
change finds its folder done and returns what it recorded, so a re-run (or a resumed,
interrupted search) redoes nothing finished. Arguments are small and picklable (the run, the
artifacts' paths, frozen configs); models travel as files, never through the driver. Every
task returns JSON-ready data.

- :func:`prune_task` -- one pruned model (``search/prune/DEPTH``), verified on held-out batches;
- :func:`build_task` -- the passes of one candidate (``search/build/NAME``) and its fidelity
  against the original on the held-out batches;
- :func:`bench_task` -- the latency of one model (``search/bench/NAME``): a measurement, run
  alone on its device;
- :func:`confirm_task` -- the winner and the original timed back to back (``search/confirm/NAME``);
- :func:`runoff_task` -- near-tied candidates timed side by side, alternating (``search/runoff``);
- :func:`cost_task` -- the original's whole-model and per-block CPU time (``search/cost``),
  which predict the latency of pruned candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.build.config import BuildConfig
from compress.onnx_io import load_model, model_nbytes, read_json, save_model, write_json, write_text
from compress.pipeline.cache import Artifact, Run, fingerprint, run_stage, stage_artifact, versions
from compress.pipeline.config import PruneSection
from compress.pipeline.stages import load_calib, prune_stage

#: Distributions whose versions every search stage hashes.
_VERSIONS = ("onnx", "onnxruntime", "onnxruntime-gpu", "onnx-graphsurgeon", "tensorrt")


def artifact_data(artifact: Artifact) -> dict[str, Any]:
    """An :class:`Artifact` as JSON-ready data (absolute paths: it stays inside this run)."""
    return {"path": str(artifact.path), "blocks": str(artifact.blocks) if artifact.blocks else None,
            "digest": artifact.digest}


def artifact_of(data: Any) -> Artifact:
    """The :class:`Artifact` of :func:`artifact_data`."""
    return Artifact(Path(data["path"]), Path(data["blocks"]) if data["blocks"] else None, data["digest"])


def _held_out(run: Run, calib: Any) -> Any:
    from compress.prune.config import split_batches

    return split_batches(calib, run.config.calibration.holdout)[1]


def prune_task(run: Run, original: Artifact, section: PruneSection, name: str, calib_hash: str | None) -> dict[str, Any]:
    """Prune ``original`` by ``section`` into ``OUT/name``: its artifact, held-out fidelity, size and removed blocks."""
    calib = load_calib(run, load_model(original.path))
    stage, artifact = prune_stage(run, original, calib, calib_hash, section=section, name=name)
    report = read_json(run.out / name / "prune.json", what="prune report")
    return {"stage": stage.status, "artifact": artifact_data(artifact), "loss": float(report["fidelity"]["loss"]),
            "size_bytes": report["size_bytes"]["after"], "removed": [r["index"] for r in report["removed"]],
            "healed": any(s.get("accepted") for s in (report.get("heal") or {}).get("spans", []))}


def build_task(run: Run, source: Artifact, original: Artifact, config: BuildConfig, name: str,
               calib_hash: str | None) -> dict[str, Any]:
    """Run ``config``'s passes on ``source`` into ``OUT/name``; fidelity against ``original`` on the held-out batches."""
    inputs = {"config": fingerprint(config, run.digest), "model": source.digest, "original": original.digest,
              "calibration": calib_hash, "holdout": run.config.calibration.holdout, "versions": versions(*_VERSIONS)}

    def work(tmp: Path) -> None:
        from compress.build import run_passes
        from compress.fidelity import compare_models
        from compress.onnx_io import has_external_data

        reference = load_model(original.path)
        calib = load_calib(run, reference)
        model = load_model(source.path)
        final, passes = run_passes(model, config, data=calib)
        fidelity = compare_models(reference, final, _held_out(run, calib))
        save_model(final, tmp / "model.onnx", external_data=has_external_data(model) or None)
        write_json(tmp / "passes.json", passes.to_dict())
        write_json(tmp / "measure.json", {"fidelity": fidelity, "size_bytes": model_nbytes(final)})

    stage = run_stage(run, name, inputs, work)
    measured = read_json(run.out / name / "measure.json", what="candidate measurement")
    return {"stage": stage.status, "artifact": artifact_data(stage_artifact(run, name)),
            "loss": float(measured["fidelity"]["loss"]), "size_bytes": measured["size_bytes"]}


def _device(latency: dict[str, Any]) -> str:
    """What measured: ``CPU (ONNX Runtime CPUExecutionProvider)``, a CUDA provider, or the GPU of a TensorRT engine."""
    if latency.get("backend") == "trt":
        gpu = (latency.get("environment") or {}).get("gpu") or {}
        return f"GPU {gpu.get('name', '?')} (TensorRT)" if isinstance(gpu, dict) else f"GPU {gpu} (TensorRT)"
    provider = latency.get("provider", "?")
    return f"{'GPU' if 'CUDA' in provider else 'CPU'} (ONNX Runtime {provider})"


def bench_task(run: Run, model: Artifact, config: BuildConfig, name: str, calib_hash: str | None) -> dict[str, Any]:
    """Time ``model`` (already passed for ``config``) into ``OUT/name``: ``latency.json``, ``latency.md``, ``trtexec.sh``."""
    bench = {k: getattr(config, k) for k in ("backend", "shapes", "legacy_precision", "warmup_ms", "iterations",
                                             "duration", "precision", "sparsity")}
    inputs = {"config": bench, "model": model.digest, "calibration": calib_hash, "versions": versions(*_VERSIONS)}

    def work(tmp: Path) -> None:
        from compress.build import benchmark
        from compress.onnx_io import write_bytes
        from compress.reports.latency import latency_markdown

        m = load_model(model.path)
        built, report = benchmark(m, config, data=load_calib(run, m),
                                  names={"model": name.rsplit("/", 1)[-1], "baseline": None})
        write_json(tmp / "latency.json", report.to_dict())
        write_text(tmp / "latency.md", latency_markdown(report.to_dict()))
        write_text(tmp / "trtexec.sh", "#!/bin/sh\n# Equivalent trtexec build and benchmark of model.onnx\n"
                   + built.trtexec + "\n")
        if built.engine is not None:
            write_bytes(tmp / "engine.plan", built.engine.plan)
            write_json(tmp / "engine.json", built.engine.info)

    stage = run_stage(run, name, inputs, work)
    latency = read_json(run.out / name / "latency.json", what="latency report")
    lat = latency["candidate"]["latency"]
    return {"stage": stage.status, "median_ms": lat["median_ms"], "p99_ms": lat["p99_ms"], "device": _device(latency)}


def confirm_task(run: Run, model: Artifact, original: Artifact, config: BuildConfig, name: str,
                 calib_hash: str | None) -> dict[str, Any]:
    """Time ``model`` and ``original`` in one task, one after the other, into ``OUT/name``: the winner's speedup.

    Candidates are timed one at a time over the whole search, so their speedups compare
    measurements taken minutes apart; this one compares two taken back to back. Writes
    ``latency.json`` (with ``baseline`` and ``comparison``, fidelity on the held-out batches).
    """
    bench = {k: getattr(config, k) for k in ("backend", "shapes", "legacy_precision", "warmup_ms", "iterations",
                                             "duration", "precision", "sparsity")}
    inputs = {"config": bench, "model": model.digest, "original": original.digest, "calibration": calib_hash,
              "holdout": run.config.calibration.holdout, "versions": versions(*_VERSIONS)}

    def work(tmp: Path) -> None:
        from compress.build import benchmark

        reference = load_model(original.path)
        m = load_model(model.path)
        held = _held_out(run, load_calib(run, reference))
        _, report = benchmark(m, config, data=held, baseline=reference,
                              names={"model": name.rsplit("/", 1)[-1], "baseline": f"{run.config.name} (original)"})
        write_json(tmp / "latency.json", report.to_dict())

    stage = run_stage(run, name, inputs, work)
    latency = read_json(run.out / name / "latency.json", what="latency report")
    return {"stage": stage.status, "median_ms": latency["candidate"]["latency"]["median_ms"],
            "baseline_median_ms": latency["baseline"]["latency"]["median_ms"],
            "speedup_median": latency["comparison"]["speedup_median"], "device": _device(latency)}


def runoff_task(run: Run, models: list[tuple[str, Artifact]], config: BuildConfig, rounds: int, name: str,
                calib_hash: str | None) -> dict[str, Any]:
    """Time near-tied candidates side by side on ONNX Runtime: ``rounds`` rounds, each model once per round, alternating.

    One session per model is made first; every round times each model for ``config``'s
    benchmark duration, in turn, so slow phases of a shared machine hit every model alike.
    Writes ``runoff.json``: per model the median latency (ms) of each round, their median,
    and their spread ``(max - min) / median``.
    """
    inputs = {"config": {k: getattr(config, k) for k in ("warmup_ms", "iterations", "duration", "shapes")},
              "models": [[n, a.digest] for n, a in models], "rounds": rounds, "calibration": calib_hash,
              "versions": versions(*_VERSIONS)}

    def work(tmp: Path) -> None:
        import statistics

        from compress.bench import measure
        from compress.build import benchmark_feed
        from compress.runtime import load_session

        loaded = {n: load_model(a.path) for n, a in models}
        first = next(iter(loaded.values()))
        feed, _ = benchmark_feed(first, load_calib(run, first), config.profiles)
        sessions = {n: (load_session(m, providers=("CPUExecutionProvider",)), [o.name for o in m.graph.output])
                    for n, m in loaded.items()}
        times: dict[str, list[float]] = {n: [] for n in sessions}
        def once(sess: Any, outs: list[str]) -> Callable[[], Any]:
            return lambda: sess.run(outs, dict(feed))

        for _ in range(rounds):
            for n, (sess, outs) in sessions.items():
                times[n].append(measure(once(sess, outs), config.bench).median_ms)
        result = {}
        for n, ts in times.items():
            med = statistics.median(ts)
            result[n] = {"round_medians_ms": ts, "median_ms": med, "spread": (max(ts) - min(ts)) / med if med else None}
        write_json(tmp / "runoff.json", {"rounds": rounds, "models": result})

    stage = run_stage(run, name, inputs, work)
    return {"stage": stage.status, **read_json(run.out / name / "runoff.json", what="runoff")}


def cost_task(run: Run, original: Artifact, blocks_spec: str | None, calib_hash: str | None) -> dict[str, Any]:
    """The original's CPU time (ms) whole and per removable block (``OUT/search/cost/cost.json``)."""
    name = "search/cost"
    inputs = {"config": {k: getattr(run.config.build, k) for k in ("warmup_ms", "iterations", "duration")},
              "blocks": blocks_spec, "model": original.digest, "calibration": calib_hash,
              "versions": versions(*_VERSIONS)}

    def work(tmp: Path) -> None:
        from compress.pipeline.stages import load_with_blocks
        from compress.prune.cost import block_times, time_model

        model, block_map = load_with_blocks(original, spec=blocks_spec)
        feed = dict(next(iter(_held_out(run, load_calib(run, model)))))
        whole = time_model(model, feed, run.config.build.bench).median_ms
        blocks = block_times(model, block_map, feed, run.config.build.bench)
        write_json(tmp / "cost.json", {"model_ms": whole, "block_ms": {str(k): v for k, v in sorted(blocks.items())},
                                       "device": "CPU (ONNX Runtime CPUExecutionProvider)"})

    stage = run_stage(run, name, inputs, work)
    cost = read_json(run.out / name / "cost.json", what="block cost")
    return {"stage": stage.status, "model_ms": cost["model_ms"], "block_ms": cost["block_ms"]}


__all__ = ["artifact_data", "artifact_of", "bench_task", "build_task", "confirm_task", "cost_task", "prune_task",
           "runoff_task"]
