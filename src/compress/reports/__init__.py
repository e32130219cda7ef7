"""Plain-text and Markdown tables, number formatting, optional plots: shared by every report.

Rendering only: every function reads a report and never modifies it. A plot needs matplotlib
(the ``[plot]`` extra); without it :func:`optional_plot` logs a note and the plot is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """Compact human formatting: floats to ``digits`` significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.{digits}g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table (for terminals)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    esc = [[fmt(c).replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def pyplot(purpose: str) -> Any:
    """matplotlib.pyplot with the non-interactive Agg backend; MissingDependencyError naming ``purpose``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from compress.errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", purpose=purpose, extra="plot") from None
    return plt


def png_bytes(fig: Any) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def optional_plot(plot: Callable[[Any], bytes], report: Any, *, name: str) -> bytes | None:
    """``plot(report)`` as PNG bytes, or None with a logged note when matplotlib is missing (plots are optional)."""
    from compress.errors import MissingDependencyError
    from compress.log import logger

    try:
        return plot(report)
    except MissingDependencyError as exc:
        logger.warning("note: %s not written: %s (%s)", name, exc.message, exc.hint)
        return None


def write_plot(path: Path, plot: Callable[[Any], bytes], report: Any) -> None:
    """Write ``plot(report)`` to ``path`` as PNG; without matplotlib log a note and write nothing."""
    from compress.onnx_io import write_bytes

    data = optional_plot(plot, report, name=path.name)
    if data is not None:
        write_bytes(path, data)

