"""Logging and progress bars. Library code logs; only the CLI configures output."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

logger = logging.getLogger("compress")


def configure_logging(verbosity: int) -> None:
    """Set the ``compress`` logger level from ``-v``/``-q`` counts (0 = INFO)."""
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
    logger.setLevel(level[max(-2, min(1, verbosity))])
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on stderr when it is a terminal and INFO is on.

    Falls back to plain iteration where tqdm is missing or output is not interactive.
    """
    show = sys.stderr.isatty() and logger.isEnabledFor(logging.INFO)
    if show:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a core dependency
            show = False
    if not show:
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr)
