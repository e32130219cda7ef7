"""Find the repeated blocks of an ONNX model and their residual-stream boundaries.

A *block* is one entry of a repeated container (``encoder.layer.3``, ``_blocks.7``,
``transformer_blocks.12``). Its *boundary* is the tensor that flows into it along the
residual stream (``input``) and the one that flows out (``output``). Other tensors
the block reads from outside (attention masks, timestep embeddings, shape scalars)
are *side inputs*. A block is *removable* when it has exactly one output and exactly
one input with the output's dtype and shape: removing it rewires the output's
consumers to the input.

Module paths of nodes come, in order of preference, from

1. a block map saved by ``compress export`` (``MODEL.blocks.json``),
2. node metadata written by the dynamo exporter (``pkg.torch.onnx.name_scopes``),
3. node names written by the TorchScript exporter (``/encoder/layer.3/attention/MatMul``),
4. the graph alone (residual cuts grouped by repeating structure; :mod:`compress.cuts`).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from compress.errors import BlockError
from compress.graph import GraphIndex, TensorType, node_inputs

BLOCK_MAP_SCHEMA = 1
_INDEXED = re.compile(r"^(?P<container>.+?)\.(?P<index>\d+)(?:\.|$)")
_EMPTY_SCOPES = {"", "_empty_nn_module_stack_from_metadata_hook"}


@dataclass(frozen=True)
class Block:
    """One block of a model.

    Attributes:
        index: position among the model's blocks (0-based, in graph order).
        name: module path, e.g. ``encoder.layer.3``.
        input: residual-stream input tensor, or None when there is none.
        output: output tensor, or None when the block has several outputs.
        side_inputs: other tensors read from outside the block (masks, shape scalars).
        nodes: names (keys) of the block's nodes, in graph order.
        params: number of parameters read by the block.
        shape: shape of ``output`` (ints, symbols, None for unknown); None if unknown.
        dtype: element type of ``output``.
        removable: whether the block can be deleted by rewiring output -> input.
        reason: why it is not removable (None when it is).
    """

    index: int
    name: str
    input: str | None
    output: str | None
    side_inputs: tuple[str, ...]
    nodes: tuple[str, ...]
    params: int
    shape: tuple[int | str | None, ...] | None
    dtype: str | None
    removable: bool
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["side_inputs"] = list(self.side_inputs)
        d["nodes"] = list(self.nodes)
        d["shape"] = None if self.shape is None else list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Block:
        return cls(
            index=int(d["index"]),
            name=str(d["name"]),
            input=d.get("input"),
            output=d.get("output"),
            side_inputs=tuple(d.get("side_inputs", ())),
            nodes=tuple(d["nodes"]),
            params=int(d.get("params", 0)),
            shape=None if d.get("shape") is None else tuple(d["shape"]),
            dtype=d.get("dtype"),
            removable=bool(d["removable"]),
            reason=d.get("reason"),
        )


@dataclass(frozen=True)
class BlockMap:
    """The blocks of one model and where they were found.

    Attributes:
        containers: module paths of the block containers (``encoder.layer``).
        source: how module paths were found: ``block-map``, ``metadata``, ``names``,
            ``graph`` or ``user``.
        blocks: the blocks in graph order.
    """

    containers: tuple[str, ...]
    source: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)

    @property
    def removable(self) -> list[Block]:
        return [b for b in self.blocks if b.removable]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": BLOCK_MAP_SCHEMA,
            "containers": list(self.containers),
            "source": self.source,
            "blocks": [b.to_dict() for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockMap:
        if d.get("schema_version") != BLOCK_MAP_SCHEMA or "blocks" not in d:
            raise BlockError(
                f"not a compress block map (schema_version {d.get('schema_version')!r}, expected {BLOCK_MAP_SCHEMA})",
                hint="re-create it with 'compress export' or 'compress inspect --write-blocks'",
            )
        return cls(tuple(d.get("containers", ())), str(d.get("source", "block-map")),
                   tuple(Block.from_dict(b) for b in d["blocks"]))


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


def node_module_paths(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str], str | None]:
    """Module path and class of each node of ``model``'s main graph.

    Returns:
        ``(paths, classes, source)``: node key -> module path (nodes outside any module
        map to ""), module path -> class name (dynamo metadata only), and the source
        (``metadata``, ``names``, or None when neither gave any path).
    """
    from compress.graph import node_keys

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
        return {k: paths.get(k, "") for k in keys}, classes, "metadata"
    for key, node in zip(keys, model.graph.node, strict=True):
        p = _name_path(node.name)
        if p is not None:
            paths[key] = p
    if any(paths.values()):
        return {k: paths.get(k, "") for k in keys}, {}, "names"
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
    (``layer1``..``layer4`` of a ResNet).
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
    cover = Counter()
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
    return chosen


# --------------------------------------------------------------------------- boundaries


def _boundary(index: GraphIndex, keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """Non-constant tensors entering and leaving the node set ``keys``."""
    inside = set(keys)
    produced = {o for k in keys for o in index.node_by_key[k].output if o}
    inputs: dict[str, None] = {}
    for k in keys:
        for x in node_inputs(index.node_by_key[k]):
            if x not in produced and x not in index.constants:
                inputs[x] = None
    graph_outputs = set(index.graph_outputs)
    outputs: dict[str, None] = {}
    for k in keys:
        for o in index.node_by_key[k].output:
            if not o:
                continue
            if o in graph_outputs or any(c not in inside for c in index.consumers.get(o, ())):
                outputs[o] = None
    return list(inputs), list(outputs)


def _same(a: TensorType | None, b: TensorType | None) -> bool:
    return a is not None and b is not None and a.matches(b)


def _forward(index: GraphIndex, start: str, keys: set[str]) -> set[str]:
    """Nodes of ``keys`` reachable from tensor ``start`` through nodes of ``keys``."""
    seen: set[str] = set()
    stack = [start]
    while stack:
        t = stack.pop()
        for c in index.consumers.get(t, ()):
            if c in keys and c not in seen:
                seen.add(c)
                stack.extend(o for o in index.node_by_key[c].output if o)
    return seen


def hoisted_nodes(index: GraphIndex, keys: set[str], side: set[str]) -> set[str]:
    """Side nodes among ``keys`` whose results are also read outside ``keys``, with their side ancestors.

    A side node does not compute the residual stream (shape arithmetic, mask building).
    Exporters hoist work shared by all layers into the first layer that needs it; those
    nodes survive the layer's removal, so they are not part of it.
    """
    outputs = set(index.graph_outputs)
    hoisted = {
        k for k in side
        for o in index.node_by_key[k].output
        if o and (o in outputs or any(c not in keys for c in index.consumers.get(o, ())))
    }
    stack = list(hoisted)
    while stack:  # their side ancestors inside the block go with them
        for x in node_inputs(index.node_by_key[stack.pop()]):
            p = index.producer.get(x)
            if p in side and p not in hoisted:
                hoisted.add(p)
                stack.append(p)
    return hoisted


def make_block(index: GraphIndex, i: int, name: str, keys: Sequence[str], *, previous_output: str | None) -> Block:
    """Describe the nodes ``keys`` as block number ``i`` called ``name``.

    The residual stream is the input whose forward closure inside the block produces an
    output of the same dtype and shape; with several, the previous block's output wins.
    """
    keyset = set(keys)

    def ordered() -> list[str]:
        return sorted(keyset, key=index.position.__getitem__)

    inputs, outputs = _boundary(index, ordered())
    reach = {x: _forward(index, x, keyset) for x in inputs}
    pairs = [
        (x, o) for x in inputs for o in outputs
        if index.producer.get(o) in reach[x] and _same(index.type_of(x), index.type_of(o))
    ]
    if pairs:
        stream_out = pairs[-1][1] if len(pairs) == 1 else max((o for _, o in pairs), key=lambda o: index.position[index.producer[o]])
        xs = [x for x, o in pairs if o == stream_out]
        if previous_output in xs:
            stream_in = previous_output
        else:  # a side input (mask) feeds several outputs and many nodes; the stream feeds one
            produced = {x: sum(index.producer[o] in reach[x] for o in outputs) for x in xs}
            stream_in = min(xs, key=lambda x: (produced[x], len(index.consumers.get(x, ())), inputs.index(x)))
        keyset -= hoisted_nodes(index, keyset, keyset - reach[stream_in])
        inputs, outputs = _boundary(index, ordered())
    else:
        stream_in = None
    keys = sorted(keyset, key=index.position.__getitem__)
    out = outputs[0] if len(outputs) == 1 else None
    out_type = index.type_of(out) if out else None
    floats = [x for x in inputs if (t := index.type_of(x)) is not None and t.dtype.startswith(("float", "bfloat"))]
    inp = stream_in if stream_in is not None else (floats[0] if len(floats) == 1 else None)
    reason = None
    if not outputs:
        reason = "no output leaves the block"
    elif len(outputs) > 1:
        reason = f"{len(outputs)} outputs leave the block ({', '.join(outputs[:4])}); a removable block has one"
    elif out_type is None:
        reason = f"type of output {out} is unknown (run shape inference on the model)"
    elif stream_in is None:
        shown = ", ".join(f"{x} [{t.shape_str() if (t := index.type_of(x)) else '?'}]" for x in inputs[:4]) or "none"
        reason = f"no input has the output's type {out_type.dtype}[{out_type.shape_str()}] (inputs: {shown})"
    side = tuple(x for x in inputs if x != inp)
    return Block(
        index=i, name=name, input=inp, output=out, side_inputs=side, nodes=tuple(keys),
        params=index.params_of(keys), shape=out_type.shape if out_type else None,
        dtype=out_type.dtype if out_type else None, removable=reason is None, reason=reason,
    )


def blocks_from_groups(
    model: onnx.ModelProto, groups: Mapping[str, Sequence[str]], containers: Sequence[str], *, source: str,
    index: GraphIndex | None = None,
) -> BlockMap:
    """Describe each named group of node keys as a block; blocks are ordered by first node."""
    index = index or GraphIndex(model)
    groups = {name: [k for k in keys if k in index.position] for name, keys in groups.items()}
    ordered = sorted((g for g in groups if groups[g]), key=lambda g: min(index.position[k] for k in groups[g]))
    blocks: list[Block] = []
    prev: str | None = None
    for i, name in enumerate(ordered):
        block = make_block(index, i, name, groups[name], previous_output=prev)
        blocks.append(block)
        prev = block.output
    return BlockMap(tuple(containers), source, tuple(blocks))


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


def remaining_blocks(model: onnx.ModelProto, block_map: BlockMap, removed: Iterable[int]) -> BlockMap:
    """The block map of ``model`` after ``removed`` (block indices of ``block_map``) were deleted.

    Blocks keep their names and nodes and are re-indexed in graph order; their boundaries
    are recomputed on ``model`` (an input may now be an earlier block's input).
    """
    gone = set(removed)
    groups = {b.name: list(b.nodes) for b in block_map.blocks if b.index not in gone}
    return blocks_from_groups(model, groups, block_map.containers, source=block_map.source)


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
    from compress.cuts import blocks_from_graph

    bm = blocks_from_graph(model, index=index)
    if not bm.blocks:
        raise BlockError(
            "no repeated blocks found in the model (no module paths, no repeating residual structure)",
            hint="export with 'compress export' (it writes a block map) or pass --blocks CONTAINER",
        )
    return bm


def block_rows(block_map: BlockMap) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows describing ``block_map`` (for text or Markdown tables)."""
    headers = ["#", "block", "nodes", "params", "input -> output", "shape", "removable"]
    rows = []
    for b in block_map.blocks:
        shape = "?" if b.shape is None else ",".join("?" if d is None else str(d) for d in b.shape)
        rows.append([b.index, b.name, len(b.nodes), b.params, f"{b.input} -> {b.output}",
                     f"{b.dtype or '?'}[{shape}]", "yes" if b.removable else f"no: {b.reason}"])
    return headers, rows


def _repair_with_graph(model: onnx.ModelProto, named: BlockMap, index: GraphIndex) -> BlockMap:
    """Graph-found blocks named after the path-found ones, when they describe the same blocks better.

    Used when some path-found blocks are not removable: the graph's residual cuts give the
    boundaries, each graph block takes the name of the path-found block it shares most nodes
    with. Falls back to ``named`` when the graph finds a different number of blocks or no
    more removable ones.
    """
    from compress.cuts import blocks_from_graph

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
