"""Render a ``compress search`` report (``search.json``, schema version 1): Markdown, a terminal summary, a PNG.

The report is JSON-ready data; every function here reads it and never modifies it. Rows
are ordered the same way everywhere (:func:`ordered_candidates`): measured candidates
first, by the goal's measure ascending, then the ones skipped by prediction, then the
failed ones (the last two in the report's order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress.reports import fmt, markdown_table, optional_plot, png_bytes, pyplot, text_table

#: The measured field each goal minimizes (``pareto`` rows are ordered by median latency).
GOAL_MEASURE = {"median": "median_ms", "p99": "p99_ms", "size": "size_bytes", "pareto": "median_ms"}

#: What each goal asks for, as the Markdown paragraph says it.
GOAL_TEXT = {"median": "the lowest median latency", "p99": "the lowest p99 latency", "size": "the smallest model",
             "pareto": "the Pareto front of median latency against fidelity"}

_STATUS_RANK = {"measured": 0, "skipped": 1, "failed": 2}
_TEXT_STATUS_CHARS = 70


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _fid(value: Any) -> str:
    """A fidelity with six significant digits (fidelities sit close to 1), '-' for None."""
    return fmt(value, 6)


def _measured(c: Mapping[str, Any]) -> Mapping[str, Any]:
    return c.get("measured") or {}


def _predicted(c: Mapping[str, Any]) -> Mapping[str, Any]:
    return c.get("predicted") or {}


def ordered_candidates(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The candidates in report order: measured (by the goal's measure, ascending; missing values last), skipped, failed.

    Ties and the skipped and failed groups keep the report's order. Returns a new list of the
    report's own candidate dicts (not copies); does not modify ``report``.
    """
    measure = GOAL_MEASURE.get(report.get("goal", "median"), "median_ms")

    def key(c: Mapping[str, Any]) -> tuple[int, int, float]:
        rank = _STATUS_RANK.get(c.get("status", ""), len(_STATUS_RANK))
        if rank:
            return rank, 0, 0.0
        v = _number(_measured(c).get(measure))
        return rank, int(v is None), v if v is not None else 0.0

    return sorted(report.get("candidates") or [], key=key)


def _one_line(text: Any) -> str:
    """``text`` on one line (reasons may hold an error's newlines, which would break a table row)."""
    return " ".join(str(text).split())


def _status(c: Mapping[str, Any]) -> str:
    """'measured' (with '(below target)' when it misses the target), 'skipped: reason' or 'failed: reason'."""
    status = str(c.get("status", "-"))
    if status == "measured":
        return "measured (below target)" if c.get("meets_target") is False else "measured"
    reason = c.get("reason")
    return f"{status}: {_one_line(reason)}" if reason else status


def _speedup(c: Mapping[str, Any]) -> str:
    s = _measured(c).get("speedup")
    return f"{fmt(s)}x" if s is not None else "-"


def _where(c: Mapping[str, Any]) -> str:
    w = c.get("where") or {}
    host, device = w.get("host"), w.get("device")
    if host and device:
        return f"{host} ({device})"
    return str(host or device or "-")


def _label(c: Mapping[str, Any], bold: bool) -> str:
    name = str(c.get("name", "-"))
    if not c.get("chosen"):
        return name
    return f"**{name}** (chosen)" if bold else f"{name} (chosen)"


def _chosen(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The winner's candidate: the one named ``winner``, else the one marked ``chosen``; None when there is none."""
    cands = report.get("candidates") or []
    winner = report.get("winner")
    if winner is not None:
        for c in cands:
            if c.get("name") == winner:
                return c
    return next((c for c in cands if c.get("chosen")), None)


def _best_measured(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The measured candidate with the highest fidelity (the first of equals), None when none was measured."""
    best: Mapping[str, Any] | None = None
    best_f = -math.inf
    for c in report.get("candidates") or []:
        f = _number(_measured(c).get("fidelity")) if c.get("status") == "measured" else None
        if f is not None and f > best_f:
            best, best_f = c, f
    return best


def _outcome(report: Mapping[str, Any]) -> str:
    """The winner (name, fidelity, latency, speedup, size), or why there is none."""
    w = _chosen(report)
    if w is not None:
        m = _measured(w)
        parts = [f"fidelity {_fid(m.get('fidelity'))}", f"median {fmt(m.get('median_ms'))} ms"]
        if m.get("speedup") is not None:
            parts.append(f"{fmt(m['speedup'])}x speedup")
        if _mb(m.get("size_bytes")) is not None:
            parts.append(f"{fmt(_mb(m.get('size_bytes')))} MB")
        return f"winner: {w.get('name', report.get('winner'))} ({', '.join(parts)})"
    if report.get("goal") == "pareto" and _front(report):
        return "no single winner: the measured Pareto front is the answer"
    best = _best_measured(report)
    if best is None:
        return "no candidate meets the target (none was measured)"
    return (f"no candidate meets the target (best measured fidelity {_fid(_measured(best).get('fidelity'))}, "
            f"{best.get('name', '-')})")


def _confirmation(report: Mapping[str, Any]) -> str | None:
    """The winner timed back to back with the original (``report["confirmation"]``), or None."""
    c = report.get("confirmation")
    if not c:
        return None
    return (f"timed back to back with the original: {fmt(c.get('median_ms'))} ms vs "
            f"{fmt(c.get('baseline_median_ms'))} ms, {fmt(c.get('speedup_median'))}x ({c.get('device', '-')})")


def _counts(report: Mapping[str, Any]) -> str:
    n = report.get("counts") or {}
    return (f"built {n.get('built', 0)} of {n.get('candidates', 0)} candidates ({n.get('skipped', 0)} skipped by "
            f"prediction, {n.get('failed', 0)} failed, {n.get('resumed', 0)} found done)")


def _plural(value: Any, word: str) -> str:
    return f"{fmt(value)} {word}" + ("" if _number(value) == 1 else "s")


def _executor(report: Mapping[str, Any]) -> str:
    e = report.get("executor") or {}
    res = [_plural(e["nodes"], "node")] if e.get("nodes") is not None else []
    res += [_plural(e[k], w) for k, w in (("cpus", "CPU"), ("gpus", "GPU")) if e.get(k) is not None]
    where = "; ".join(x for x in (e.get("address"), ", ".join(res), e.get("note")) if x)
    return f"{e.get('kind', '-')}" + (f" ({_one_line(where)})" if where else "")


def _front(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The measured candidates on the Pareto front, by median latency."""
    return [c for c in ordered_candidates(report) if c.get("front") and c.get("status") == "measured"]


def search_markdown(report: Mapping[str, Any], plot_name: str | None = None) -> str:
    """``search.md``: the goal, target, winner, counts and executor, then a table of every candidate.

    Args:
        report: A search report (``search.json``, schema version 1); not modified.
        plot_name: The plot's file name, named on a last line when given (None: no plot line).

    Returns:
        The Markdown document, ending with a newline. Rows follow :func:`ordered_candidates`;
        the winner's name is bold and marked "(chosen)".
    """
    goal = report.get("goal", "-")
    target = report.get("target_fidelity")
    outcome = _outcome(report)
    para = (f"Goal `{goal}`: {GOAL_TEXT.get(goal, goal)} with fidelity >= {_fid(target)} against the original "
            f"model. {outcome[0].upper() + outcome[1:]}.")
    runoff = report.get("runoff")
    if runoff:
        times = runoff.get("times") or {}
        listed = ", ".join(f"{n} {fmt((times.get(n) or {}).get('median_ms'))} ms" for n in runoff.get("contenders", []))
        para += (f" Near-tied candidates re-timed side by side ({runoff.get('rounds')} rounds, alternating): {listed}"
                 + ("; within the measurement's spread, the more faithful one wins" if runoff.get("tie_broken_by_fidelity")
                    else "") + ".")
    confirmed = _confirmation(report)
    if confirmed is not None:
        para += f" The winner {confirmed}."
    front = _front(report)
    if goal == "pareto" and front:
        para += f" Pareto front: {', '.join(str(c.get('name')) for c in front)}."
    seconds = report.get("seconds")
    para += (f" The search {_counts(report)}" + (f" in {fmt(seconds)} s" if seconds is not None else "")
             + f"; executor: {_executor(report)}.")
    base = report.get("baseline") or {}
    if base:
        para += (f" Original model: median {fmt(base.get('median_ms'))} ms, p99 {fmt(base.get('p99_ms'))} ms, "
                 f"{fmt(_mb(base.get('size_bytes')))} MB.")
    head = ["candidate", "remove", "select", "heal", "precision", "sparsity", "predicted fidelity", "predicted ms",
            "fidelity", "median ms", "speedup", "size MB", "front", "status", "where"]
    rows = []
    for c in ordered_candidates(report):
        s, p, m = c.get("settings") or {}, _predicted(c), _measured(c)
        rows.append([_label(c, bold=True), s.get("remove"), s.get("select"), s.get("heal"), s.get("precision"),
                     s.get("sparsity"), _fid(p.get("fidelity")), p.get("median_ms"), _fid(m.get("fidelity")),
                     m.get("median_ms"), _speedup(c), _mb(m.get("size_bytes")), "yes" if c.get("front") else "",
                     _status(c), _where(c)])
    lines = [f"## Search: {goal}, target fidelity {_fid(target)}", "", para, ""]
    lines.append(markdown_table(head, rows) if rows else "No candidate.")
    if plot_name is not None:
        lines += ["", f"plot: {plot_name}"]
    return "\n".join(lines) + "\n"


def _mb(size_bytes: Any) -> float | None:
    v = _number(size_bytes)
    return None if v is None else v / 1e6


def search_text(report: Mapping[str, Any], *, limit: int = 15) -> str:
    """A short terminal summary: the outcome, the counts, and the first ``limit`` rows of the candidate table.

    Args:
        report: A search report (``search.json``, schema version 1); not modified.
        limit: Rows shown (in :func:`ordered_candidates` order); the rest are counted in a
            last line, "... N more in search.md".

    Returns:
        The summary, without a trailing newline.
    """
    cands = ordered_candidates(report)
    shown = cands[:max(limit, 0)]

    def status(c: Mapping[str, Any]) -> str:
        s = _status(c)
        return s if len(s) <= _TEXT_STATUS_CHARS else s[:_TEXT_STATUS_CHARS - 3] + "..."

    lines = [f"search ({report.get('goal', '-')}, target fidelity {_fid(report.get('target_fidelity'))}): "
             f"{_outcome(report)}", _counts(report)[0].upper() + _counts(report)[1:]]
    confirmed = _confirmation(report)
    if confirmed is not None:
        lines.insert(1, "Winner " + confirmed)
    if shown:
        lines += ["", text_table(["candidate", "fidelity", "median ms", "speedup", "status"],
                                 [[_label(c, bold=False), _fid(_measured(c).get("fidelity")),
                                   _measured(c).get("median_ms"), _speedup(c), status(c)] for c in shown])]
    if len(cands) > len(shown):
        lines.append(f"... {len(cands) - len(shown)} more in search.md")
    return "\n".join(lines)


def _point(values: Mapping[str, Any]) -> tuple[float, float] | None:
    """(median_ms, fidelity) of a measured or predicted record; None when either is missing."""
    x, y = _number(values.get("median_ms")), _number(values.get("fidelity"))
    return None if x is None or y is None else (x, y)


def _plot_series(ax: Any, points: Sequence[tuple[float, float]], style: str, **kwargs: Any) -> None:
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], style, linestyle="none", **kwargs)


def search_plot(report: Mapping[str, Any]) -> bytes:
    """PNG of the search: fidelity against median latency (ms) for every candidate with both values.

    Measured candidates are filled markers (blue: meets the target, orange: below it); the
    ones skipped by prediction are hollow grey markers at their predicted point; failed ones
    are not drawn. The measured Pareto front is a step line, the target a dashed line, the
    winner a large star with its name, and the original model a black diamond at
    (baseline median, 1.0).

    Args:
        report: A search report (``search.json``, schema version 1); not modified.

    Returns:
        The PNG bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    plt = pyplot("the search plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ys: list[float] = []
    measured = [(c, pt) for c in report.get("candidates") or []
                if c.get("status") == "measured" and (pt := _point(_measured(c))) is not None]
    ok = [pt for c, pt in measured if c.get("meets_target") is not False]
    low = [pt for c, pt in measured if c.get("meets_target") is False]
    _plot_series(ax, ok, "o", color="tab:blue", label="measured (meets target)")
    _plot_series(ax, low, "o", color="tab:orange", label="measured (below target)")
    predicted = [pt for c in report.get("candidates") or []
                 if c.get("status") == "skipped" and (pt := _point(_predicted(c))) is not None]
    _plot_series(ax, predicted, "o", markerfacecolor="none", markeredgecolor="0.55", label="predicted (not built)")
    ys += [p[1] for p in ok + low + predicted]
    front = sorted(pt for c, pt in measured if c.get("front"))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], "-", color="tab:red", where="post", label="Pareto front")
    target = _number(report.get("target_fidelity"))
    if target is not None:
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1, label=f"target {_fid(target)}")
        ys.append(target)
    chosen = _chosen(report)
    win = _point(_measured(chosen)) if chosen is not None else None
    if chosen is not None and win is not None:
        ax.plot([win[0]], [win[1]], "*", color="gold", markeredgecolor="black", markersize=18, linestyle="none",
                label="chosen", zorder=5)
        ax.annotate(str(chosen.get("name", "")), win, textcoords="offset points", xytext=(8, 6), fontsize=8)
    base = _number((report.get("baseline") or {}).get("median_ms"))
    if base is not None:
        ax.plot([base], [1.0], "D", color="black", linestyle="none", label="original")
        ys.append(1.0)
    if not ys:
        ax.text(0.5, 0.5, "no candidate to plot", ha="center", va="center", transform=ax.transAxes)
    else:
        lo, hi = min(ys), max(ys)
        pad = max((hi - lo) * 0.08, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("median latency (ms)")
    ax.set_ylabel("fidelity against the original (held-out)")
    ax.set_title(f"search: goal {report.get('goal', '-')}, target fidelity {_fid(report.get('target_fidelity'))}")
    fig.tight_layout()
    return png_bytes(fig)


def write_search_files(folder: Path, report: Mapping[str, Any]) -> list[str]:
    """Write ``search.json``, ``search.md`` and ``search.png`` into the existing ``folder``; return the names written.

    The plot is optional: without matplotlib a note is logged, ``search.png`` is not written
    and ``search.md`` does not name it. Each file is written atomically; ``report`` is not
    modified.
    """
    from compress.onnx_io import write_bytes, write_json, write_text

    write_json(folder / "search.json", report)
    plot = optional_plot(search_plot, report, name="search.png")
    write_text(folder / "search.md", search_markdown(report, plot_name="search.png" if plot is not None else None))
    names = ["search.json", "search.md"]
    if plot is not None:
        write_bytes(folder / "search.png", plot)
        names.append("search.png")
    return names


__all__ = ["GOAL_MEASURE", "ordered_candidates", "search_markdown", "search_plot", "search_text",
           "write_search_files"]
