"""Helpers shared by the benchmark scripts (standard library only: the scripts' parents measure children)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rounded(x: Any, nd: int = 6) -> Any:
    """``x`` with every float rounded to ``nd`` digits (non-finite ones as None), through dicts and lists."""
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, nd)
    if isinstance(x, dict):
        return {k: rounded(v, nd) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v, nd) for v in x]
    return x
