"""Healing: each removed contiguous span replaced by a fitted linear map per stream, kept where it helps.

:func:`fit_spans` accumulates the closed-form fits (:class:`compress.scoring.heal.LinearFit`)
of every stream of every span in one ORT pass of the original model over the scoring
batches (real tokens only under the token mask); :func:`heal_spans` solves them per ridge
strength and keeps a span's map only when the held-out fidelity improves
(:func:`_better`), so a healed model is never worse there than the plain pruned one. Every
trial passes the surgery guard, ``onnx.checker`` and :func:`compress.surgery.verify_removal`.
Models are never modified; nothing touches files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from compress.blocks import Block
from compress.fidelity import Batches, compare_models
from compress.graph import GraphIndex
from compress.log import logger
from compress.prune.config import CalibrationSplit, PruneConfig
from compress.runtime import add_outputs, load_session, run_batch
from compress.scoring.collect import batch_mask, find_token_mask, mask_fits
from compress.scoring.heal import RIDGE_GRID, LinearFit, LinearMap
from compress.scoring.metrics import masked_view
from compress.surgery import HealMap, check_model, remove_blocks, verify_removal


def removed_spans(removed: Sequence[Block]) -> list[list[Block]]:
    """The removed blocks as maximal runs of consecutive block indices, in order."""
    spans: list[list[Block]] = []
    for b in sorted(removed, key=lambda b: b.index):
        if spans and spans[-1][-1].index == b.index - 1:
            spans[-1].append(b)
        else:
            spans.append([b])
    return spans


def _rows(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Token rows ``[N, d]`` of an activation (real tokens only under ``mask``).

    The hidden axis is the last one for rank <= 3; a rank >= 4 feature map is channels first
    (``[N, C, H, W]``): one row of ``C`` features per position.
    """
    if a.ndim >= 4:
        return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
    v, _ = masked_view(a, mask, channel_axis=-1)
    return v.reshape(-1, v.shape[-1])


def _stream_plan(spans: Sequence[Sequence[Block]]) -> list[list[tuple[str, str] | str]]:
    """Per span and stream (the first block's streams): ``(input, output)`` tensors, or why it cannot be fitted."""
    plan: list[list[tuple[str, str] | str]] = []
    for span in spans:
        first, last = span[0], span[-1]
        row: list[tuple[str, str] | str] = []
        for st in first.streams:
            out = next((o for o in last.streams if o.name == st.name), None)
            if out is None or len(last.streams) != len(first.streams):
                row.append(f"stream {st.name} does not run through the whole span")
            else:
                row.append((st.input, out.output))
        plan.append(row)
    return plan


def target_session(model: onnx.ModelProto, spans: Sequence[Sequence[Block]]) -> Any:
    """One ORT session of ``model`` with the output streams of every span as extra outputs.

    For :func:`fit_spans` ``targets=``: the refits of later spans (each against a different
    pruned model) then share one session of the original instead of loading it once per span.
    Does not modify ``model``.
    """
    names = list(dict.fromkeys(e[1] for row in _stream_plan(spans) for e in row if isinstance(e, tuple)))
    return load_session(add_outputs(model, names), providers=("CPUExecutionProvider",))


def fit_spans(model: onnx.ModelProto, spans: Sequence[Sequence[Block]], batches: Batches, *,
              token_mask: str = "auto", inputs_from: onnx.ModelProto | None = None, targets: Any = None,
              ) -> tuple[list[list[LinearFit | str]], str | None]:
    """Healing sums for every stream of every span, from one ORT pass of ``model`` over ``batches``.

    ``inputs_from``: read the spans' input streams ``X`` from this model instead (the model
    with the spans upstream already removed and healed, run side by side with ``model``, which
    gives the targets ``Y``): the map then also corrects what upstream pruning changed in its
    input. ``targets``: with ``inputs_from``, a :func:`target_session` of ``model`` covering
    these spans, used instead of a new session. Returns, per span and stream (the first
    block's streams), a :class:`LinearFit` or the reason the stream cannot be healed, and the
    token mask input used (None = every position).
    """
    mask_name, _ = find_token_mask(model, token_mask)
    plan = _stream_plan(spans)
    if inputs_from is not None:
        known = {i.name for i in inputs_from.graph.input} | {o for n in inputs_from.graph.node for o in n.output}
        plan = [[e if isinstance(e, str) or e[0] in known else f"stream input {e[0]!r} is not in the pruned model"
                 for e in row] for row in plan]
    names = list(dict.fromkeys(n for row in plan for e in row if isinstance(e, tuple) for n in e))
    fits: list[list[LinearFit | str]] = [[e if isinstance(e, str) else "" for e in row] for row in plan]
    if not names:
        return fits, None
    x_names = list(dict.fromkeys(e[0] for row in plan for e in row if isinstance(e, tuple)))
    if inputs_from is not None:  # the original model gives the targets only
        names = list(dict.fromkeys(e[1] for row in plan for e in row if isinstance(e, tuple)))
    if targets is not None and inputs_from is not None:
        session = targets
    else:
        session = load_session(add_outputs(model, names), providers=("CPUExecutionProvider",))
    x_session = (None if inputs_from is None else
                 load_session(add_outputs(inputs_from, x_names), providers=("CPUExecutionProvider",)))
    used = mask_name
    for i, feed in enumerate(batches):
        values = run_batch(session, feed, names, batch=i)
        if x_session is not None:
            values_x = run_batch(x_session, feed, x_names, batch=i)
            values = {**values, **{f"{n}\0x": v for n, v in values_x.items()}}
        mask = batch_mask(feed, used, batch=i)
        if i == 0 and mask is not None and not mask_fits(mask, values.values(), None):
            used, mask = None, None
        for r, row in enumerate(plan):
            for k, e in enumerate(row):
                if isinstance(e, str) or isinstance(fits[r][k], str) and fits[r][k]:
                    continue
                a, b = values[e[0] if x_session is None else f"{e[0]}\0x"], values[e[1]]
                if (a.ndim >= 4) != (b.ndim >= 4) or (a.ndim >= 4 and a.shape[2:] != b.shape[2:]):
                    fits[r][k] = (f"stream {e[0]!r}: the span maps {list(a.shape)} to {list(b.shape)} "
                                  "(not one position to one position): not healed")
                    continue
                x, y = _rows(a, mask if a.ndim < 4 else None), _rows(b, mask if b.ndim < 4 else None)
                if not isinstance(fits[r][k], LinearFit):
                    fits[r][k] = LinearFit(x.shape[1], y.shape[1], spatial=max(0, a.ndim - 2) if a.ndim >= 4 else 0)
                fits[r][k].update(x, y)  # type: ignore[union-attr]
    return fits, used


def _better(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Fidelity ``a`` is strictly better than ``b``: a lower loss, or the same loss and a higher cosine."""
    if a["loss"] < b["loss"] - 1e-12:
        return True
    ca, cb = a.get("cosine"), b.get("cosine")
    return abs(a["loss"] - b["loss"]) <= 1e-12 and ca is not None and cb is not None and ca > cb + 1e-9


@dataclass(frozen=True)
class Removal:
    """Blocks removed from a model without healing: what healing starts from.

    Attributes:
        pruned: the model without ``blocks`` (plain removal).
        blocks: the removed blocks (of the original model's block map).
        fidelity: ``pruned`` against the original on the held-out batches
            (:func:`compress.fidelity.compare_models`).
    """

    pruned: onnx.ModelProto
    blocks: Sequence[Block]
    fidelity: Mapping[str, Any]


def heal_spans(model: onnx.ModelProto, removal: Removal, data: CalibrationSplit, config: PruneConfig, *,
               evaluate: Callable[[onnx.ModelProto], dict[str, Any]] | None = None,
               fits: tuple[list[list[LinearFit | str]], str | None] | None = None,
               ) -> tuple[onnx.ModelProto, dict[str, Any], dict[str, Any]]:
    """Heal the removed spans of ``removal.pruned`` where that improves the held-out fidelity.

    Fits the maps on the scoring batches of ``data`` (:func:`fit_spans`), then tries the spans in order: a
    span's maps are solved for each ridge strength (``config.heal_ridge``, or every value of
    :data:`RIDGE_GRID`), the one with the best held-out fidelity is taken, and the span keeps
    it when the model with it (and the maps kept so far) has a better held-out fidelity than
    without (:func:`_better`); each trial passes the surgery guard,
    ``onnx.checker`` and :func:`verify_removal`. Returns the model to write (``pruned``
    itself when no span helps), its fidelity, and the ``heal`` report section. Does not
    modify ``model`` or ``removal.pruned``.

    ``evaluate`` (default :func:`compare_models` against ``model`` on the held-out batches; e.g.
    :meth:`HeldOut.fidelity`) scores a trial; ``fits`` are the :func:`fit_spans` result for
    these spans when already computed (the ``measured`` rule fits every candidate's spans in
    one pass).
    """
    pruned, removed, fidelity = removal.pruned, removal.blocks, removal.fidelity
    score_set, held = data.scoring, data.held
    spans = removed_spans(removed)
    all_fits, mask_used = fits if fits is not None else fit_spans(model, spans, score_set,
                                                                 token_mask=config.options.token_mask)
    evaluate = evaluate or (lambda m: compare_models(model, m, held))
    maps: dict[tuple[int, int], HealMap] = {}
    current, current_fid = pruned, dict(fidelity)
    rows: list[dict[str, Any]] = []
    index = GraphIndex(model)
    targets = None  # the original's session for the refits, made at the first one
    ridges = (config.heal_ridge,) if config.heal_ridge is not None else RIDGE_GRID
    for j, (span, span_fits) in enumerate(zip(spans, all_fits, strict=True)):
        last = span[-1]
        row: dict[str, Any] = {"blocks": [b.name for b in span], "first": span[0].index, "last": last.index,
                               "accepted": False, "loss_without": current_fid["loss"],
                               "cosine_without": current_fid["cosine"], "ridges": []}
        sources: list[tuple[str, list[LinearFit | str]]] = [("original", span_fits)]
        if j and config.heal_refit:  # spans upstream are removed: this span's input is not the original's
            if targets is None:
                targets = target_session(model, spans[1:])
            refit, _ = fit_spans(model, [span], score_set, token_mask=config.options.token_mask, inputs_from=current,
                                 targets=targets)
            sources.append(("pruned", refit[0]))
        best: tuple[dict[str, Any], Any, dict[tuple[int, int], HealMap], list[dict[str, Any]]] | None = None
        for source, source_fits in sources:
            for ridge in ridges:
                streams: list[dict[str, Any]] = []
                trial_maps = dict(maps)
                for k, fit in enumerate(source_fits):
                    st = span[0].streams[k]
                    entry: dict[str, Any] = {"stream": st.name, "input": st.input, "output": last.streams[k].output,
                                             "fit_inputs": source}
                    if isinstance(fit, LinearFit) and fit.rows:
                        m: LinearMap = fit.solve(ridge)
                        entry.update(tokens=m.rows, residual=m.residual, skip_residual=m.skip_residual, ridge=m.ridge)
                        out_k = next(i for i, o in enumerate(last.streams) if o.name == st.name)
                        trial_maps[last.index, out_k] = (st.input, m.weight, m.bias, fit.spatial)
                    else:
                        entry["skipped"] = fit or "no token to fit on"
                    streams.append(entry)
                if len(trial_maps) == len(maps):
                    row.setdefault("streams", streams)
                    break
                trial = remove_blocks(model, removed, check=False, index=index, heal=trial_maps)
                check_model(trial)
                verify_removal(model, trial, next(iter(held)), blocks=removed)
                fid = evaluate(trial)
                row["ridges"].append({"fit_inputs": source, "ridge": ridge, "loss": fid["loss"], "cosine": fid["cosine"]})
                if best is None or _better(fid, best[0]):
                    best = (fid, trial, trial_maps, streams)
        if best is None:
            row["note"] = "no stream of this span can be healed"
        else:
            fid, trial, trial_maps, streams = best
            row.update(streams=streams, ridge=streams[0].get("ridge"), fit_inputs=streams[0]["fit_inputs"],
                       loss_with=fid["loss"], cosine_with=fid["cosine"])
            if _better(fid, current_fid):
                row["accepted"] = True
                maps, current, current_fid = trial_maps, trial, fid
            else:
                row["note"] = "healing does not improve the held-out fidelity here: this span stays plainly removed"
        rows.append(row)
        logger.info("heal %s: %s", row["blocks"], "kept" if row["accepted"] else row.get("note"))
    report = {"ridge": config.heal_ridge if config.heal_ridge is not None else "auto", "ridge_grid": list(ridges),
              "token_mask": mask_used, "fit_batches": len(score_set),
              "fit_pass": "one ORT pass of the original model over the scoring batches, after the selection"
                          + ("; every later span also refitted on its input in the model pruned (and healed) so far, "
                             "one pass of both models" if config.heal_refit and len(spans) > 1 else ""),
              "spans": rows, "healed_spans": sum(r["accepted"] for r in rows),
              "fidelity_without": dict(fidelity), "fidelity_with": current_fid}
    return current, current_fid, report
