"""Render a ScoreReport: a Markdown table and a PNG plot (matplotlib, imported lazily)."""

from __future__ import annotations

from typing import Any

from compress.reports import markdown_table, png_bytes, pyplot, text_table


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    metrics = report["metrics"]
    headers = ["#", "block", "params"] + list(metrics) + ["removable"]
    rows = []
    for b in report["blocks"]:
        row: list[Any] = [b["index"], b["name"], b["params"]]
        row += [metrics[m]["scores"][b["index"]] for m in metrics]
        row.append("yes" if b["removable"] else f"no: {b['reason']}")
        rows.append(row)
    return headers, rows


def _caption(report: dict[str, Any]) -> str:
    cal = report["calibration"]
    label = " **(random data, not real calibration)**" if cal["random"] else ""
    cfg = report["config"]
    extras = [f"interval {cfg['interval']}"]
    if cfg.get("token_ranges"):
        extras.append("token ranges " + ", ".join(cfg["token_ranges"]))
    if cfg.get("last_token"):
        extras.append("last token only")
    used = cfg.get("token_mask_used") or {}
    if used.get("input"):
        extras.append(f"padding mask `{used['input']}`: {used['real_tokens']} real tokens of {used['positions']} "
                      "positions")
    elif used:
        extras.append(f"padding mask: {used.get('how')}")
    return (f"Calibration: {cal['description']}, {cal['batches']} batches, {cal['samples']} samples{label}; "
            f"{'; '.join(extras)}. Higher score = more important (prune the lowest).")


def scores_text(report: dict[str, Any]) -> str:
    """The per-block score table for a terminal."""
    headers, rows = _rows(report)
    return text_table(headers, rows) + "\n" + _caption(report).replace("**", "")


def scores_markdown(report: dict[str, Any]) -> str:
    """The per-block score table, CKA segments, per-range and per-stream scores as Markdown."""
    headers, rows = _rows(report)
    parts = ["## Block scores", "", _caption(report), "", markdown_table(headers, rows)]
    for name, m in report["metrics"].items():
        if m.get("per_range"):
            ranges = list(m["per_range"])
            prow = [[b["index"], b["name"]] + [m["per_range"][r][b["index"]] for r in ranges] + [m["scores"][b["index"]]]
                    for b in report["blocks"]]
            parts += ["", f"### {name} per token range", "", markdown_table(["#", "block", *ranges, "combined"], prow)]
        if m.get("per_stream"):
            names = list(m["per_stream"])
            srow = [[b["index"], b["name"]] + [m["per_stream"][s][b["index"]] for s in names] + [m["scores"][b["index"]]]
                    for b in report["blocks"]]
            fusion = m.get("stream_fusion", "max")
            how = ("max: a block is only as redundant as its least redundant stream" if fusion == "max"
                   else f"{fusion}: weighted mean of the streams")
            k = int(report["config"].get("interval", 1))
            what = "the block does not carry that stream" if k == 1 else (
                f"the stream does not run through the whole span; row i = the span of blocks i..i+{k - 1}")
            parts += ["", f"### {name} per stream", "", f"Fused score = {how}; `-` = {what}.", "",
                      markdown_table(["#", "block", *names, "fused"], srow)]
        if m.get("segments"):
            idx = m["scored_blocks"]
            segs = ", ".join(f"[{idx[a]}..{idx[b - 1]}]" for a, b in m["segments"])
            parts += ["", f"CKA segments (Fisher optimal segmentation of block outputs): {segs}"]
    return "\n".join(parts) + "\n"


def plot_scores(report: dict[str, Any]) -> bytes:
    """A PNG: one panel of per-block scores per metric, plus the CKA heatmap with segment borders.

    Bars: the fused score; lines: per token range and per stream.
    """
    plt = pyplot("the score plot")
    metrics = report["metrics"]
    per_block = [m for m in metrics if any(v is not None for v in metrics[m]["scores"])]
    cka = metrics.get("cka")
    panels = len(per_block) + (1 if cka and cka.get("matrix") else 0)
    cols = min(3, max(1, panels))
    rows = -(-max(1, panels) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    axes = [list(grid.ravel())]
    for ax in axes[0][panels:]:
        ax.axis("off")
    names = [b["name"] for b in report["blocks"]]
    for ax, name in zip(axes[0], per_block, strict=False):
        scores = metrics[name]["scores"]
        xs = [i for i, v in enumerate(scores) if v is not None]
        ax.bar(xs, [scores[i] for i in xs], color="#4c72b0")
        lines = {**(metrics[name].get("per_range") or {}), **(metrics[name].get("per_stream") or {})}
        for label, vals in lines.items():
            ax.plot([i for i, v in enumerate(vals) if v is not None], [v for v in vals if v is not None], "o-", label=label)
        if lines:
            ax.legend(fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("block")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([str(i) for i in range(len(names))], fontsize=7)
    if cka and cka.get("matrix"):
        ax = axes[0][len(per_block)]
        im = ax.imshow(cka["matrix"], vmin=0, vmax=1, cmap="viridis")
        ax.set_title("linear CKA (0 = input)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        for a, _b in (cka.get("segments") or [])[1:]:
            ax.axhline(a + 0.5, color="w", lw=1)  # matrix index k = output of scored block k-1
            ax.axvline(a + 0.5, color="w", lw=1)
    if report["calibration"]["random"]:
        fig.suptitle("RANDOM calibration data", color="red")
    fig.tight_layout()
    return png_bytes(fig)
