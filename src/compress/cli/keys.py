"""The key tables of ``deploy/README.md``, generated from the sections' fields so the docs cannot drift.

Each table lists a section's keys in declaration order with the default and the help text
of its :func:`compress.config.option`. ``deploy/README.md`` holds each table between
``<!-- keys: SECTION -->`` and ``<!-- /keys -->``; ``tests/test_pipeline.py`` checks that
they are current, and ``python -m compress.cli.keys --write deploy/README.md`` rewrites
them (nothing else in the file changes).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from compress.config import settings
from compress.pipeline.config import BuildSection, GatesSection, PruneSection
from compress.reports import markdown_table
from compress.search.space import SearchSection

#: The generated tables: section name -> its config class.
TABLES: dict[str, type] = {"prune": PruneSection, "build": BuildSection, "gates": GatesSection, "search": SearchSection}

_BLOCK = re.compile(r"(<!-- keys: (?P<name>\w+) -->\n)(?P<body>.*?)(<!-- /keys -->)", re.S)


def _default(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{json.dumps(list(value))}`"
    return f"`{value}`"


def keys_table(cls: type) -> str:
    """The Markdown table of ``cls``'s pipeline keys: key, default, meaning (with the valid values)."""
    rows = []
    for s in settings(cls):
        if not s.key:
            continue
        meaning = s.option.help.replace("%%", "%")
        choices = s.option.choice_list()
        if choices and len(choices) <= 8 and not all(c in meaning for c in choices):
            meaning += f" ({', '.join(choices)})"
        rows.append([f"`{s.key}`", _default(s.default), meaning])
    return markdown_table(["key", "default", "meaning"], rows)


def rewrite(text: str) -> str:
    """``text`` with every marked key table replaced by the generated one.

    Raises:
        KeyError: a marker names a section that has no generated table.
    """
    return _BLOCK.sub(lambda m: m.group(1) + keys_table(TABLES[m.group("name")]) + "\n" + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    """Print the tables, or rewrite them in place in ``--write FILE``; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m compress.cli.keys", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="README.md", help="rewrite the marked tables of this file")
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(rewrite(path.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    for name, cls in TABLES.items():
        print(f"### {name}\n\n{keys_table(cls)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
