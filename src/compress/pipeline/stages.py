"""The stages of ``compress run``: each reads its upstream artifacts, calls the library stage, writes its folder.

Each ``*_stage`` function computes its input hash (:mod:`compress.pipeline.cache`) and runs its
``*_work`` only when that hash changed; the work calls the same library function the command
does (:func:`compress.export.export`, :func:`compress.prune.prune`,
:func:`compress.build.build`) and writes through :mod:`compress.onnx_io` and the shared
report writers (:mod:`compress.reports`).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.blocks.mapfile import check_block_map
from compress.errors import CalibrationError, ConfigError
from compress.onnx_io import load_model, read_json, save_model, write_bytes, write_json
from compress.pipeline.cache import (
    Artifact,
    Run,
    StageRun,
    blocks_path,
    fingerprint,
    hash_json,
    module_versions,
    run_stage,
    stage_artifact,
    versions,
)
from compress.pipeline.config import CalibrationSection, PipelineConfig, PruneSection
from compress.pipeline.source import display_path

# --------------------------------------------------------------------------- export


def export_stage(run: Run) -> tuple[StageRun, Artifact]:
    """Export the torch source into ``OUT/export`` (an ONNX source is used as it is); returns the model artifact."""
    section = run.config.model
    src = section.source
    if src.kind == "onnx":
        assert src.path is not None
        sidecar = blocks_path(src.path)
        data = src.path.with_name(src.path.name + ".data")
        files = [p for p in (src.path, data, sidecar) if p.is_file()]
        digest = hash_json({"files": [run.digest(p) for p in files], "blocks": section.blocks})
        return StageRun("export", "skipped (ONNX source)"), Artifact(src.path, sidecar if sidecar.is_file() else None, digest)
    names = ["torch", "onnx", "onnxruntime", "onnxscript"] + {"hf": ["transformers"], "diffusers": ["diffusers"]}.get(src.kind, [])
    inputs = {"config": fingerprint(section, run.digest), "versions": versions(*names),
              "module": module_versions(src.target) if src.kind == "module" and src.target else None}
    stage = run_stage(run, "export", inputs, lambda tmp: _export_work(run.config, tmp))
    return stage, stage_artifact(run, "export")


def _export_work(config: PipelineConfig, tmp: Path) -> None:
    from compress.export import InputSpec, export, load_torch_model, make_example_inputs

    section = config.model
    export_config = section.export_config()
    start = time.perf_counter()
    loaded = load_torch_model(section.source.spec(), weights=section.weights, trust_code=section.trust_code)
    load_s = time.perf_counter() - start
    if section.inputs:
        example: Any = make_example_inputs([InputSpec.parse(s) for s in section.inputs])
    elif loaded.example_inputs is not None:
        example = loaded.example_inputs
    else:
        raise ConfigError(f"{config.source}: model.source {section.source.written} provides no example inputs",
                          hint="add model.inputs, e.g. inputs: [\"x:1x3x224x224\"], or return (module, example_inputs)")
    if not section.dynamic and loaded.dynamic:
        names = set(example) if isinstance(example, dict) else set()
        export_config = replace(export_config, dynamic=tuple(d for d in loaded.dynamic if d.name in names))
    exported, report = export(loaded.module, export_config, data=example)
    block_map = exported.block_map
    save_model(exported.proto, tmp / "model.onnx")
    context = {"model": loaded.name, "onnx": "model.onnx", "exporter": report.exporter, "opset": report.opset,
               "inputs": [i.to_dict() for i in report.inputs], "dynamic_axes": [d.to_dict() for d in report.dynamic]}
    write_json(tmp / "model.blocks.json", {**block_map.to_dict(), "export": context})
    summary = {**report.to_dict(), "model": loaded.name, "source": section.source.written, "model_kind": loaded.kind,
               "weights": section.weights.name if section.weights else None,
               "blocks": {"containers": list(block_map.containers), "source": block_map.source,
                          "count": len(block_map.blocks), "removable": len(block_map.removable)}}
    summary["timings"]["load_s"] = round(load_s, 3)
    write_json(tmp / "export.json", summary)


def load_with_blocks(artifact: Artifact, *, spec: str | None) -> tuple[onnx.ModelProto, Any]:
    """The model of ``artifact`` and its block map (its checked ``.blocks.json``, else found with ``spec``)."""
    from compress.blocks import find_blocks

    model = load_model(artifact.path)
    saved = read_json(artifact.blocks, what="block map") if artifact.blocks is not None and artifact.blocks.is_file() else None
    if saved is not None:
        check_block_map(saved, source=display_path(artifact.blocks))  # type: ignore[arg-type]
    return model, find_blocks(model, spec=spec, block_map=saved)


# ----- calibration


def _model_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def calib_stage(run: Run, model_artifact: Artifact, model: onnx.ModelProto) -> tuple[StageRun, Any]:
    """Make the calibration batches into ``OUT/calib`` (npz and random sources are read in place); returns them, checked."""
    c = run.config.calibration
    view = fingerprint(c, run.digest)
    view.pop("holdout")  # splits the batches for pruning; the data do not depend on it
    extra = {"text": ["tokenizers"], "images": ["Pillow"]}.get(c.kind, [])
    inputs = {"config": view, "model": model_artifact.digest if c.kind in ("text", "images", "random") else None,
              "versions": versions("numpy", *extra)}
    stage = run_stage(run, "calib", inputs, lambda tmp: _calib_work(c, model, tmp))
    return stage, load_calib(run, model)


def load_calib(run: Run, model: onnx.ModelProto) -> Any:
    """The calibration batches of a run whose calib stage is done (npz and random sources are read in place), checked.

    Raises:
        CalibrationError: the batches do not fit ``model``'s inputs.
    """
    from compress.calibration import check_calibration, load_calibration, load_calibration_for, random_calibration

    c = run.config.calibration
    if c.random is not None:
        r = c.random
        calib = random_calibration(model, batches=r.batches, batch_size=r.batch_size, dims=dict(r.dims), seed=r.seed)
    elif c.npz is not None:
        calib = load_calibration_for(c.npz, model, batch_size=c.batch_size)
    else:
        calib = load_calibration(run.out / "calib")
        source = c.text if c.text is not None else c.images
        assert source is not None
        calib = replace(calib, description=f"{source.name}, {'tokenized' if c.text else 'preprocessed'}: {calib.description}")
    check_calibration(calib, model)
    return calib


def _write_batches(batches: Iterable[Mapping[str, np.ndarray]], folder: Path) -> int:
    """``batch_0000.npz``, ... written through :func:`compress.onnx_io.write_bytes`; returns the count."""
    n = 0
    for n, batch in enumerate(batches, start=1):
        buf = io.BytesIO()
        np.savez(buf, **batch)  # type: ignore[arg-type]  # numpy stubs match **kwds against allow_pickle
        write_bytes(folder / f"batch_{n - 1:04d}.npz", buf.getvalue())
    if n == 0:
        raise CalibrationError("no calibration batches were made", hint="give at least one sample")
    return n


def _calib_work(c: CalibrationSection, model: onnx.ModelProto, tmp: Path) -> None:
    from compress.calibration import TextOptions, find_images, image_batches, split_texts, text_batches

    names = _model_inputs(model)
    info: dict[str, Any] = {"source": c.kind}
    if c.text is not None and c.tokenizer is not None:
        try:
            texts = split_texts(c.text.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{c.text.name} is not UTF-8 text: {exc}", hint="save it as UTF-8") from None
        if not texts:
            raise CalibrationError(f"{c.text.name} holds no texts (all lines are empty)", hint="write one text per line")
        tt = c.token_type_ids if c.token_type_ids is not None else "token_type_ids" in names
        opts = TextOptions(max_length=c.max_length, batch_size=c.batch_size or 8, pad_to_max=c.pad_to_max, token_type_ids=tt)
        info.update(file=c.text.name, texts=len(texts), tokenizer=c.tokenizer.name, max_length=opts.max_length,
                    batch_size=opts.batch_size, pad_to_max=opts.pad_to_max, token_type_ids=tt)
        info["files"] = _write_batches(text_batches(texts, tokenizer=c.tokenizer, options=opts), tmp)
    elif c.images is not None:
        if c.input_name is None and len(names) != 1:
            raise ConfigError(f"calibration.input_name is required: the model has {len(names)} inputs ({', '.join(names)})",
                              hint="name the image input, e.g. input_name: pixel_values")
        opts_i = c.image_options(c.input_name or names[0])
        paths = find_images(c.images)
        info.update(folder=c.images.name, images=len(paths), input_name=opts_i.input_name, size=opts_i.size,
                    crop=opts_i.crop_size, layout=opts_i.layout, batch_size=opts_i.batch_size)
        info["files"] = _write_batches(image_batches(paths, options=opts_i), tmp)
    elif c.npz is not None:
        info.update(path=c.npz.name, batch_size=c.batch_size)
    elif c.random is not None:
        info.update(random=True, batches=c.random.batches, batch_size=c.random.batch_size, dims=dict(c.random.dims),
                    seed=c.random.seed)
    write_json(tmp / "calib.json", info)


# ----- prune


def prune_stage(run: Run, original: Artifact, calib: Any, calib_hash: str | None, *,
                section: PruneSection | None = None, name: str = "prune") -> tuple[StageRun, Artifact]:
    """Score and prune ``original`` into ``OUT/name`` (verified on held-out batches); returns the pruned artifact.

    ``section``: the prune settings (default: the config's ``prune`` section); ``name``: the
    stage folder, relative to the output folder (``compress search`` prunes many candidates).
    """
    section = section if section is not None else run.config.prune
    assert section is not None
    inputs = {"config": fingerprint(section, run.digest), "holdout": run.config.calibration.holdout,
              "model": original.digest, "calibration": calib_hash,
              "versions": versions("onnx", "onnxruntime", "onnxruntime-gpu", "onnx-graphsurgeon")}
    stage = run_stage(run, name, inputs, lambda tmp: _prune_work(run, section, original, calib, tmp))
    return stage, stage_artifact(run, name)


def _prune_work(run: Run, section: PruneSection, original: Artifact, calib: Any, tmp: Path) -> None:
    from compress.blocks import MappedModel
    from compress.prune import blocks_for_ratio, check_blocks, prune
    from compress.reports.prune import write_prune_files
    from compress.validate import FieldError

    model, block_map = load_with_blocks(original, spec=_onnx_blocks_spec(run.config))
    remove = section.remove
    if section.ratio is not None:
        remove = blocks_for_ratio(section.ratio, block_map)
    config = replace(section, remove=remove)
    try:
        check_blocks(config, block_map)
    except FieldError as exc:
        key = "ratio" if section.ratio is not None else exc.field
        raise exc.as_key(f"{run.config.source}: prune.{key}", section.ratio if section.ratio is not None else None) from None
    pruned, pruned_report = prune(MappedModel(model, block_map), config, data=calib)
    report = {"model": f"{run.config.name}.onnx", "output": "model.onnx", **pruned_report.to_dict()}
    write_prune_files(pruned, report, model=tmp / "model.onnx", blocks=tmp / "model.blocks.json",
                      report_json=tmp / "prune.json", scores_plot=(tmp / "scores.png", block_map))


def _onnx_blocks_spec(config: PipelineConfig) -> str | None:
    """``model.blocks`` for an ONNX source (an exported model's block map already follows it)."""
    return config.model.blocks if config.model.source.kind == "onnx" else None


# ----- build


def build_stage(run: Run, candidate: Artifact, original: Artifact, calib: Any, calib_hash: str | None) -> StageRun:
    """Run the passes and the benchmark of ``candidate`` into ``OUT/build`` (against ``original`` unless ``baseline: none``)."""
    section = run.config.build
    baseline = original if section.baseline == "original" else None
    inputs = {"config": fingerprint(section, run.digest), "model": candidate.digest, "name": run.config.name,
              "baseline": baseline.digest if baseline else None, "calibration": calib_hash,
              "versions": versions("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")}
    return run_stage(run, "build", inputs, lambda tmp: _build_work(run, (candidate, baseline), calib, tmp))


def _build_work(run: Run, models: tuple[Artifact, Artifact | None], calib: Any, tmp: Path) -> None:
    from compress.build import build
    from compress.reports.build import render_build, write_build_files
    from compress.validate import FieldError

    config = run.config.build  # gates are evaluated by the report stage
    candidate, original = models
    model = load_model(candidate.path)
    baseline = load_model(original.path) if original is not None else None
    label = "pruned" if run.config.prune is not None else "exported"
    names = {"model": f"{run.config.name} ({label})", "baseline": f"{run.config.name} (original)" if baseline else None}
    try:
        result = build(model, config, data=calib, baseline=baseline, names=names)
    except FieldError as exc:  # a shape profile that does not fit the model's inputs
        raise exc.as_key(f"{run.config.source}: build.{exc.field}") from None
    write_build_files(tmp, result, render_build(result))  # no gates: the report stage evaluates them

