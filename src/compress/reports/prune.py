"""Render prune and sweep reports: Markdown for CI job summaries, a PNG for the sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.bench import UNSTABLE_COV_PCT
from compress.reports import fmt, markdown_table, png_bytes, pyplot


def prune_markdown(report: dict[str, Any]) -> str:
    """Blocks removed and why, size, fidelity on held-out data, latency next to the ideal."""
    m = report["method"]
    cal = report["calibration"]
    lines = [f"## Pruned {report.get('model', 'model')}: {report['blocks_before']} -> {report['blocks_after']} blocks", ""]
    how = f"metric `{m['metric']}`" + (f" ({m['metric_choice']})" if m.get("metric_choice") else "")
    how += f", rule `{m['select']}`" + (f", budget {m['max_drop']}" if m["max_drop"] is not None else "")
    how += f", GradNorm {m['gradnorm']}" if m.get("gradnorm") else ""
    lines.append(f"Method: {how}. Calibration: {cal['description']}"
                 + (" **(random data)**" if cal["random"] else "")
                 + f"; {cal['scoring_batches']} batches scored, {cal['holdout_batches']} held out"
                 + (" (held-out = scoring data: only one batch)" if cal.get("holdout_is_scoring_data") else "") + ".")
    lines.append("")
    if report["removed"]:
        lines.append(markdown_table(["removed block", "name", "score", "params"],
                                    [[b["index"], b["name"], b["score"], b["params"]] for b in report["removed"]]))
    else:
        lines.append("No block was removed" + (" (no removal stays within the budget; the model is unchanged)."
                                               if m["max_drop"] is not None else "."))
    if report.get("steps"):
        lines += ["", markdown_table(["step", "candidate", "score", "loss", "accepted"],
                                     [[i + 1, s["block"], s["score"], s["loss"], s["accepted"]]
                                      for i, s in enumerate(report["steps"])])]
    f = report["fidelity"]
    p, sz = report["params"], report["size_bytes"]
    rows = [["parameters", p["before"], p["after"], f"{p['after'] / max(p['before'], 1):.3f}x"],
            ["size (MB)", sz["before"] / 1e6, sz["after"] / 1e6, f"{sz['after'] / max(sz['before'], 1):.3f}x"]]
    lat = report.get("latency")
    if lat:
        rows.append(["ORT latency median (ms)", lat["original"]["median_ms"], lat["pruned"]["median_ms"],
                     f"{fmt(lat['speedup_median'])}x faster (ideal {fmt(lat['ideal_speedup'])}x)"])
        rows.append(["ORT latency p90 (ms)", lat["original"]["p90_ms"], lat["pruned"]["p90_ms"],
                     f"{fmt(lat['speedup_p90'])}x"])
    lines += ["", markdown_table(["", "original", "pruned", "ratio"], rows)]
    fid = [["output cosine (worst output)", f["cosine"]], ["max abs error", f["max_abs"]],
           ["mean abs error", f["mean_abs"]]]
    if f.get("top1") is not None:
        fid += [["top-1 agreement", f["top1"]], ["KL(original || pruned)", f["kl"]]]
    if f.get("agreement") is not None:
        fid.append(["exact agreement (integer outputs)", f["agreement"]])
    fid.append([f"fidelity loss ({f['loss_metric']})", f["loss"]])
    lines += ["", "Fidelity against the original on held-out calibration data:", "",
              markdown_table(["measure", "value"], fid)]
    lines += _mask_lines(report) + _measured_lines(report) + _heal_lines(report)
    if lat:
        unstable = [f"{k} (CoV {lat[k]['cov_pct']:.1f}%)" for k in ("original", "pruned") if lat[k]["cov_pct"] > UNSTABLE_COV_PCT]
        if unstable:
            lines += ["", f"Unstable measurement: {', '.join(unstable)} above {UNSTABLE_COV_PCT}% (trtexec's threshold); "
                          "compare medians, re-run on an idle machine for tails."]
    if lat and lat.get("efficiency_ratio") is not None:
        lines += ["", f"Measured / ideal speedup: {fmt(lat['efficiency_ratio'])} "
                      "(ideal from the removed blocks' share of time, each block timed alone)."]
    return "\n".join(lines) + "\n"


def _mask_lines(report: dict[str, Any]) -> list[str]:
    """Which padding mask the scores used and how many tokens were real."""
    metrics = report.get("scores") or {}
    first = next(iter(metrics.values()), None)
    details = (first or {}).get("details") or {}
    if not details.get("masked"):
        return []
    tokens, positions = details.get("tokens"), details.get("positions")
    t = tokens[0] if isinstance(tokens, list) and tokens else tokens
    p = positions[0] if isinstance(positions, list) and positions else positions
    return ["", f"Scores use real tokens only (padding mask): {t} of {p} positions per block boundary."]


def _measured_lines(report: dict[str, Any]) -> list[str]:
    """The ``measured`` rule's candidate table: every removal set tried, its held-out fidelity, the one kept."""
    m = report.get("measured")
    if not m:
        return []
    rows = [[", ".join(c["rules"]), ", ".join(map(str, c["blocks"])) or "-", "yes" if c["healed"] else "no",
             c["loss"], c["cosine"], "**yes**" if c["chosen"] else ""] for c in m["candidates"]]
    return ["", f"Chosen by measured fidelity: {m['candidate_sets']} candidate sets, {m['evaluated']} models evaluated "
                f"on the held-out batches in {fmt(m['seconds'])} s (default rule `{m['default_rule']}`):", "",
            markdown_table(["rules", "blocks", "healed", "held-out loss", "cosine", "chosen"], rows),
            *[f"- {n}" for n in m.get("notes", [])]]


def _heal_lines(report: dict[str, Any]) -> list[str]:
    """The healing table: per span, the fit's residual and the held-out loss with and without the map."""
    heal = report.get("heal")
    if not heal or not heal.get("spans"):
        return []
    rows = []
    for s in heal["spans"]:
        st = [x for x in s.get("streams", []) if "residual" in x]
        rows.append([", ".join(s["blocks"]), ", ".join(x["stream"] for x in st) or "-", s.get("ridge"),
                     s.get("fit_inputs", "-"),
                     max((x["residual"] for x in st), default=None),
                     max((x["skip_residual"] for x in st if x["skip_residual"] is not None), default=None),
                     s.get("loss_without"), s.get("loss_with"), "yes" if s["accepted"] else "no"])
    w, wo = heal["fidelity_with"], heal["fidelity_without"]
    notes = [f"- {', '.join(s['blocks'])}: {s['note']}" for s in heal["spans"] if s.get("note")]
    ridge = heal["ridge"] if isinstance(heal["ridge"], str) else f"{heal['ridge']:g}"
    return ["", f"Healing (ridge {ridge}, fitted on {heal['fit_batches']} scoring batches"
            + (f", real tokens of `{heal['token_mask']}`" if heal.get("token_mask") else "") + "):", "",
            markdown_table(["span", "streams", "ridge", "fit on inputs of", "fit residual", "residual without map", "held-out loss without",
                            "with", "healed"], rows), "",
            f"Held-out fidelity: loss {fmt(wo['loss'])} -> {fmt(w['loss'])}, cosine {fmt(wo['cosine'])} -> "
            f"{fmt(w['cosine'])} ({heal['healed_spans']} of {len(heal['spans'])} spans healed).", *notes]


def sweep_markdown(report: dict[str, Any]) -> str:
    """The sweep table (``front``: on the loss/latency Pareto front), then the loss/parameters front over every candidate."""
    rows = [[r["removed"], ", ".join(r["blocks"]) or "-", r.get("rule", "-"), "yes" if r.get("healed") else "no",
             r["loss"], r["cosine"], r["top1"], r["params"], r["median_ms"], r["speedup"], r["ideal_speedup"],
             "**yes**" if r.get("front") else ""] for r in report["sweep"]]
    head = ["removed", "blocks", "rule", "healed", "loss", "cosine", "top1", "params", "median ms", "speedup", "ideal",
            "front"]
    m = report["method"]
    cal = report["calibration"]
    text = (f"## Sweep: {report['model']} (metric `{m['metric']}`, rule `{m['select']}`)\n\n"
            f"Calibration: {cal['description']}" + (" **(random data)**" if cal["random"] else "") + "\n\n"
            + markdown_table(head, rows) + "\n")
    if all(r["median_ms"] is None for r in report["sweep"]):
        text += "\nNo latency measured (--no-latency): the loss/latency front is not marked.\n"
    front = [[r["removed"], ", ".join(c["rules"]), ", ".join(map(str, c["blocks"])) or "-",
              "yes" if c["healed"] else "no", c["params"], c["loss"], "yes" if c["chosen"] else ""]
             for r in report["sweep"] for c in r.get("candidates") or [] if c.get("front")]
    if front:
        n = sum(len(r.get("candidates") or []) for r in report["sweep"])
        text += (f"\nPareto front of held-out loss against parameters, over all {n} candidates:\n\n"
                 + markdown_table(["removed", "rules", "blocks", "healed", "params", "loss", "chosen"], front) + "\n")
    return text


def plot_sweep(report: dict[str, Any]) -> bytes:
    """PNG of a pruning sweep: fidelity loss against latency and against parameters.

    Left: the chosen model per count against its measured latency; right: every candidate
    against its parameter count; the Pareto fronts marked.
    """
    plt = pyplot("the sweep plot")
    rows = report["sweep"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    timed = [r for r in rows if r["median_ms"] is not None]
    if timed:
        a.plot([r["median_ms"] for r in timed], [r["loss"] for r in timed], "o", color="0.6", label="chosen per count")
        for r in timed:
            a.annotate(f"-{r['removed']}" + ("h" if r.get("healed") else ""), (r["median_ms"], r["loss"]),
                       textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = sorted((r for r in timed if r.get("front")), key=lambda r: (r["median_ms"], r["loss"]))
        a.step([r["median_ms"] for r in front], [r["loss"] for r in front], "r-", where="post", label="Pareto front")
        a.plot([r["median_ms"] for r in front], [r["loss"] for r in front], "r*", markersize=9)
        a.legend(fontsize=7)
    else:
        a.text(0.5, 0.5, "no latency measured", ha="center", va="center", transform=a.transAxes)
    a.set_xlabel("ORT latency median (ms)")
    a.set_ylabel("fidelity loss (held-out)")
    a.set_title("fidelity vs latency")
    cands = [(r, c) for r in rows for c in (r.get("candidates") or [{**r, "healed": r.get("healed", False),
                                                                      "front": r.get("params_front")}])]
    for healed, marker in ((False, "o"), (True, "^")):
        pts = [c for _, c in cands if bool(c.get("healed")) == healed]
        if pts:
            b.plot([c["params"] for c in pts], [c["loss"] for c in pts], marker, color="0.6", linestyle="none",
                   label="healed" if healed else "plain")
    front = sorted((c for _, c in cands if c.get("front")), key=lambda c: (c["params"], c["loss"]))
    if front:
        b.step([c["params"] for c in front], [c["loss"] for c in front], "r-", where="post", label="Pareto front")
        b.plot([c["params"] for c in front], [c["loss"] for c in front], "r*", markersize=9)
    b.legend(fontsize=7)
    b.set_xlabel("parameters")
    b.set_ylabel("fidelity loss (held-out)")
    b.set_title("fidelity vs parameters (every candidate)")
    fig.tight_layout()
    return png_bytes(fig)


def write_prune_files(pruned: Any, report: dict[str, Any], *, model: Path, blocks: Path, report_json: Path | None,
                      scores_plot: tuple[Path, Any] | None = None) -> None:
    """Write a prune stage's artifacts (the CLI and ``compress run`` call this inside an atomic folder).

    ``pruned``: the :class:`~compress.blocks.MappedModel` the prune stage returned;
    ``report``: its report's ``to_dict()`` with the model names added;
    ``model``/``blocks``: the pruned model and its block map;
    ``report_json``: ``prune.json``, with ``prune.md`` beside it (None: no report files);
    ``scores_plot``: ``(scores.png, the unpruned block map)``: the score plot of the
    original's blocks, skipped with a note without matplotlib. Nothing is modified.
    """
    from compress.onnx_io import save_model, write_json, write_text
    from compress.reports import write_plot
    from compress.reports.scoring import plot_scores

    save_model(pruned.proto, model)
    write_json(blocks, pruned.block_map.to_dict())
    if report_json is not None:
        write_json(report_json, report)
        write_text(report_json.with_suffix(".md"), prune_markdown(report))
    if scores_plot is not None:
        scores_png, original = scores_plot
        scores = {"metrics": report["scores"], "blocks": [b.to_dict() for b in original.blocks],
                  "calibration": report["calibration"]}
        write_plot(scores_png, plot_scores, scores)

