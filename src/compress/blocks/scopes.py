"""Find the blocks of a model from the module paths of its nodes, a ``--blocks`` spec, or a saved map.

Module paths of nodes come, in order of preference, from

1. a block map saved by ``compress export`` (``MODEL.blocks.json``),
2. node metadata written by the dynamo exporter (``pkg.torch.onnx.name_scopes``),
3. node names written by the TorchScript exporter (``/encoder/layer.3/attention/MatMul``),
4. the graph alone (residual cuts grouped by repeating structure; :mod:`compress.blocks.cuts`).

With 2 and 3, nodes without a module path of their own (an optimizer-made ``Split`` from
``torch.chunk``, a renamed node) take the longest common module path of their producers
and consumers (:func:`repair_scopes`), so they land in the block they belong to when
that is unambiguous and outside every block otherwise. The entries of the chosen
containers (:func:`choose_containers`) become blocks through
:func:`compress.blocks.boundary.blocks_from_groups`.

:func:`find_blocks` is the entry point. Nothing here modifies a model.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx

from compress.blocks.boundary import blocks_from_groups
from compress.blocks.cuts import blocks_from_graph
from compress.blocks.model import BlockMap
from compress.errors import BlockError
from compress.graph import GraphIndex, node_inputs, node_keys

_EMPTY_SCOPES = {"", "_empty_nn_module_stack_from_metadata_hook"}


# --------------------------------------------------------------------------- module paths


def _scope_path(scopes: Sequence[str]) -> str:
    """Module path from a dynamo ``name_scopes`` list (last item is the fx node)."""
    for scope in reversed(scopes[:-1]):
        if scope not in _EMPTY_SCOPES:
            return scope
    return ""


def _name_path(name: str) -> str | None:
    """Module path from a TorchScript-style node name ``/encoder/layer.3/attn/MatMul``."""
    if not name.startswith("/"):
        return None
    path: list[str] = []
    for part in (p for p in name.split("/")[1:-1] if p):
        # nn.Sequential children are scoped with the parent's name: /blocks/blocks.0/conv1
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def _common_path(paths: Iterable[str]) -> str:
    """Longest common dotted prefix of module paths ("" when they share none)."""
    split = [p.split(".") if p else [] for p in paths]
    if not split:
        return ""
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if any(x != parts[0] for x in parts):
            break
        common.append(parts[0])
    return ".".join(common)


def repair_scopes(model: onnx.ModelProto, known: Mapping[str, str]) -> dict[str, str]:
    """Module paths for the nodes that have none, from their neighbours. Does not modify ``model``.

    A node missing from ``known`` (no metadata: an optimizer-made ``Split`` from
    ``torch.chunk``; a node without a ``/module/...`` name) takes the longest common module
    path of its known producers (of non-constant inputs) and consumers: the Split of GPT-2's
    ``c_attn`` output lands in ``h.3.attn``, a node read by two blocks lands in their
    container (outside both). Repeated until nothing changes, so chains of such nodes are
    filled from both ends; a node whose neighbours have no path either gets "".

    Returns:
        node key -> module path for every node of the main graph.
    """
    index = GraphIndex(model)
    paths = {k: known[k] for k in index.keys if k in known}
    missing = [k for k in index.keys if k not in paths]
    const = index.constants
    for _ in range(8):
        changed = False
        for order in (missing, missing[::-1]):
            for key in order:
                if key in paths:
                    continue
                node = index.node_by_key[key]
                near = [index.producer[x] for x in node_inputs(node) if x not in const and x in index.producer]
                near += [c for o in node.output if o for c in index.consumers.get(o, ())]
                seen = [paths[n] for n in dict.fromkeys(near) if n in paths]
                if seen:
                    paths[key] = _common_path(seen)
                    changed = True
        if not changed:
            break
    return {k: paths.get(k, "") for k in index.keys}


def node_module_paths(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str], str | None]:
    """Module path and class of each node of ``model``'s main graph.

    Nodes without a path of their own get one from their neighbours (:func:`repair_scopes`).

    Returns:
        ``(paths, classes, source)``: node key -> module path (nodes outside any module
        map to ""), module path -> class name (dynamo metadata only), and the source
        (``metadata``, ``names``, or None when neither gave any path).
    """
    keys = node_keys(model.graph)
    paths: dict[str, str] = {}
    classes: dict[str, str] = {}
    for key, node in zip(keys, model.graph.node, strict=True):
        meta = {p.key: p.value for p in node.metadata_props}
        raw = meta.get("pkg.torch.onnx.name_scopes")
        if raw is None:
            continue
        try:
            scopes = ast.literal_eval(raw)
            hierarchy = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            continue
        paths[key] = _scope_path(scopes)
        for scope, cls in zip(scopes[:-1], hierarchy[:-1], strict=False):
            if scope not in _EMPTY_SCOPES:
                classes.setdefault(scope, cls.rsplit(".", 1)[-1])
    if any(paths.values()):
        return repair_scopes(model, paths), classes, "metadata"
    for key, node in zip(keys, model.graph.node, strict=True):
        p = _name_path(node.name)
        if p is not None:
            paths[key] = p
    if any(paths.values()):
        return repair_scopes(model, paths), {}, "names"
    return {k: "" for k in keys}, {}, None


def find_containers(paths: Iterable[str]) -> dict[str, set[int]]:
    """Containers (``encoder.layer``) and their entry indices, from module paths.

    Every path component that is an integer marks an entry of the container named by
    the components before it; nested containers are listed too.
    """
    found: dict[str, set[int]] = {}
    for path in set(paths):
        parts = path.split(".")
        for i, part in enumerate(parts):
            if i > 0 and part.isdigit():
                found.setdefault(".".join(parts[:i]), set()).add(int(part))
    return found


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def choose_containers(
    paths: Mapping[str, str], classes: Mapping[str, str], *, spec: str | None = None
) -> list[str]:
    """The containers whose entries are the blocks.

    With ``spec`` (comma-separated container paths, e.g. ``encoder.layer`` or
    ``layer1,layer2``) those are used and checked. Otherwise: the container with the
    most entries (ties: the one covering most nodes, then the shallowest), plus every
    other non-nested container whose entries have the same module classes
    (``layer1``..``layer4`` of a ResNet), plus every sibling container (same parent module)
    whose entries share one known class and are at least a quarter the size (in nodes) of the
    chosen ones (Flux's ``transformer_blocks`` beside its ``single_transformer_blocks``).
    """
    containers = find_containers(paths.values())
    if spec:
        chosen = [s.strip().rstrip(".") for s in spec.split(",") if s.strip()]
        for c in chosen:
            if c not in containers:
                valid = ", ".join(sorted(containers, key=lambda x: (-len(containers[x]), x))[:8]) or "none found"
                raise BlockError(f"no block container {c!r} in the model", hint=f"--blocks takes a module path prefix followed by an index; candidates: {valid}")
        return chosen
    candidates = {c: idx for c, idx in containers.items() if len(idx) >= 2}
    if not candidates:
        return []
    cover: Counter[str] = Counter()
    for p in paths.values():
        for c in candidates:
            if p == c or p.startswith(c + "."):
                cover[c] += 1

    def entry_classes(c: str) -> frozenset[str]:
        return frozenset(classes.get(f"{c}.{i}", "?") for i in candidates[c])

    best = max(candidates, key=lambda c: (len(candidates[c]), cover[c], -c.count(".")))
    chosen = [best]
    best_classes = entry_classes(best)
    if "?" not in best_classes:
        for c in sorted(candidates):
            if any(_nested(c, x) for x in chosen):
                continue
            if entry_classes(c) == best_classes:
                chosen.append(c)
    # containers of another block kind (Flux: double-stream blocks, then single-stream ones):
    # a sibling (same parent module) of known class whose entries are about as large (>= 1/4 of the nodes)
    per_entry = cover[best] / len(candidates[best])
    parent = best.rpartition(".")[0]
    for c in sorted(candidates, key=lambda c: (-cover[c], c)):
        if any(_nested(c, x) for x in chosen) or c.rpartition(".")[0] != parent or "?" in entry_classes(c):
            continue
        if cover[c] / len(candidates[c]) >= per_entry / 4 and len(entry_classes(c)) == 1:
            chosen.append(c)
    return chosen


def blocks_from_paths(
    model: onnx.ModelProto, paths: Mapping[str, str], containers: Sequence[str], *, source: str,
    index: GraphIndex | None = None,
) -> BlockMap:
    """Group nodes by container entry (``<container>.<i>``) into blocks, in graph order."""
    groups: dict[str, list[str]] = {}
    for key, path in paths.items():
        for c in containers:
            if path.startswith(c + "."):
                rest = path[len(c) + 1 :].split(".", 1)[0]
                if rest.isdigit():
                    groups.setdefault(f"{c}.{rest}", []).append(key)
                break
    return blocks_from_groups(model, groups, containers, source=source, index=index)


def find_blocks(
    model: onnx.ModelProto, *, spec: str | None = None, block_map: Mapping[str, Any] | None = None
) -> BlockMap:
    """Find the blocks of ``model``. Does not modify ``model``.

    Args:
        model: the ONNX model.
        spec: comma-separated block container path(s) (``--blocks``); overrides detection.
        block_map: a saved block map (``MODEL.blocks.json`` as a dict); used when its
            nodes are all in the model and no ``spec`` is given.

    Raises:
        BlockError: when no blocks can be found, naming what was tried.
    """
    index = GraphIndex(model)
    if block_map is not None and not spec:
        saved = BlockMap.from_dict(block_map)
        missing = [n for b in saved.blocks for n in b.nodes if n not in index.node_by_key]
        if missing:
            raise BlockError(
                f"the block map does not fit this model: node {missing[0]!r} is not in the graph",
                hint="the model was changed after the block map was written; delete the .blocks.json or pass --blocks",
            )
        return saved
    paths, classes, source = node_module_paths(model)
    if source is not None:
        containers = choose_containers(paths, classes, spec=spec)
        if containers:
            bm = blocks_from_paths(model, paths, containers, source="user" if spec else source, index=index)
            if bm.blocks and (spec or all(b.removable for b in bm.blocks)):
                return bm
            if bm.blocks:  # e.g. an optimizer-made node without a scope broke a boundary
                return _repair_with_graph(model, bm, index)
    elif spec:
        raise BlockError(
            f"--blocks {spec}: the model has no module paths (no dynamo metadata, no '/module/...' node names)",
            hint="name blocks only on models exported from torch; otherwise let compress find them from the graph",
        )
    bm = blocks_from_graph(model, index=index)
    if not bm.blocks:
        raise BlockError(
            "no repeated blocks found in the model (no module paths, no repeating residual structure)",
            hint="export with 'compress export' (it writes a block map) or pass --blocks CONTAINER",
        )
    return bm


def _repair_with_graph(model: onnx.ModelProto, named: BlockMap, index: GraphIndex) -> BlockMap:
    """Graph-found blocks named after the path-found ones, when they describe the same blocks better.

    Used when some path-found blocks are not removable: the graph's residual cuts give the
    boundaries, each graph block takes the name of the path-found block it shares most nodes
    with. Falls back to ``named`` when the graph finds a different number of blocks or no
    more removable ones.
    """
    graph = blocks_from_graph(model, index=index)
    if len(graph.blocks) != len(named.blocks) or len(graph.removable) <= len(named.removable):
        return named
    groups = {}
    for g in graph.blocks:
        best = max(named.blocks, key=lambda b: len(set(b.nodes) & set(g.nodes)))
        groups[best.name] = list(g.nodes)
    if len(groups) != len(graph.blocks):
        return named
    return blocks_from_groups(model, groups, named.containers, source=f"{named.source}+graph", index=index)
