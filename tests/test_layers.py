"""The one-way import rule: core -> domain -> stages -> reports -> glue, and no import cycles.

Every ``import`` / ``from ... import`` in ``src/compress`` is parsed, function-level ones too
(a lazy import is still a dependency). A module may import its own layer or a lower one;
an import that climbs, or a cycle between modules (which Python resolves by import order
alone), fails with the importing file, the line and the imported module. See
``docs/architecture.md`` for the diagram and the reasons. The same parse checks one habit of
the code: no function takes more than six parameters.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "compress"

#: Layer of each top-level module or package of ``compress`` (its submodules share it).
LAYERS: dict[str, int] = {
    **dict.fromkeys(("errors", "registry", "log", "validate", "config", "graph", "onnx_io", "external", "outputs",
                     "runtime", "fidelity", "bench", "stage"), 0),
    **dict.fromkeys(("blocks", "calibration", "scoring", "surgery"), 1),
    **dict.fromkeys(("export", "prune", "passes", "build"), 2),
    **dict.fromkeys(("reports", "gates"), 3),
    **dict.fromkeys(("pipeline", "search", "cli", "__main__", ""), 4),
}
NAMES = ("core", "domain", "stages", "reports", "glue")


def _module_names() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ("compress", *path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _module_names()


def _target(name: str) -> str | None:
    """The compress module that ``name`` (a module or ``module.attribute``) is, or None outside compress."""
    if name != "compress" and not name.startswith("compress."):
        return None
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, source: str | None = None, *, is_package: bool | None = None) -> list[tuple[int, str]]:
    """(line, imported compress module) for every import in ``module`` (read from its file unless ``source``)."""
    path = MODULES.get(module)
    if source is None:
        assert path is not None
        source = path.read_text()
    if is_package is None:
        is_package = path is not None and path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = _target(name)
            if target is not None and target != module and (node.lineno, target) not in out:
                out.append((node.lineno, target))
    return out


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYERS, f"{module}: add '{top}' to LAYERS in tests/test_layers.py (and to docs/architecture.md)"
    return LAYERS[top]


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_imports_only_go_down() -> None:
    upward = [f"{MODULES[m].relative_to(SRC.parent)}:{line}: {m} ({NAMES[_layer(m)]}) imports {t} ({NAMES[_layer(t)]})"
              for m, deps in GRAPH.items() for line, t in deps if _layer(t) > _layer(m)]
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for _, w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    cycles = _cycles()
    lines = []
    for component in cycles:
        members = set(component)
        edges = [f"    {MODULES[m].relative_to(SRC.parent)}:{line} imports {t}"
                 for m in component for line, t in GRAPH[m] if t in members]
        lines.append(" <-> ".join(component) + "\n" + "\n".join(edges))
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_the_rule_sees_function_level_and_relative_imports() -> None:
    """The parser itself, on a module written here: lazy, relative and attribute imports are all found."""
    source = (
        "import numpy\n"
        "from compress.errors import ConfigError\n"
        "def f():\n"
        "    from compress.prune import prune\n"
        "    from ..reports import latency\n"
        "    import compress.cli\n"
        "from . import cuts\n"
    )
    found = _imports("compress.blocks.fake", source, is_package=False)
    assert found == [(2, "compress.errors"), (7, "compress.blocks.cuts"), (4, "compress.prune"),
                     (5, "compress.reports.latency"), (6, "compress.cli")]


#: The most parameters a function in src/compress takes (positional and keyword-only, not ``self``/``cls``).
MAX_PARAMETERS = 6


def _parameter_counts(source: str) -> list[tuple[int, str, int]]:
    """(line, name, count) of every function in ``source`` whose parameters exceed :data:`MAX_PARAMETERS`."""
    over = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            count = len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)
            if count > MAX_PARAMETERS:
                over.append((node.lineno, node.name, count))
    return over


def test_no_function_takes_more_than_six_parameters() -> None:
    """Options that travel together are one value (a config, a split, a removal), not a longer signature."""
    found = {(str(path.relative_to(SRC.parent)), name): f"{path.relative_to(SRC.parent)}:{line}: {name} takes {count}"
             for path in sorted(MODULES.values()) for line, name, count in _parameter_counts(path.read_text())}
    assert not found, f"functions over {MAX_PARAMETERS} parameters:\n" + "\n".join(found.values())


def test_the_parameter_count_skips_self_and_counts_keyword_only() -> None:
    source = ("class A:\n    def m(self, a, b, c, d, e, f): ...\n"
              "def g(a, b, *, c, d, e, f, g=1): ...\n"
              "def h(a, /, b, *args, c, **kw): ...\n")
    assert _parameter_counts(source) == [(3, "g", 7)]
