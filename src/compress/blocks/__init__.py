"""Find the repeated blocks of an ONNX model and their residual-stream boundaries.

A *block* is one entry of a repeated container (``encoder.layer.3``, ``_blocks.7``,
``transformer_blocks.12``). Its boundary is a tuple of *streams*: residual-stream tensors
that flow in and the tensors that replace them on the way out. A transformer layer has
one stream (the hidden states); an MMDiT joint block has two (image and text hidden
states). Other tensors the block reads from outside (attention masks, timestep
conditioning, rotary tables, shape scalars) are *side inputs*.

A block is *removable* when every tensor that leaves it is the output of one stream and
the block passes :func:`check_block` (the structural guard): each stream input is read
by the block and produced outside it, no path leaves the block and comes back into it
(the block is a convex piece of the graph), each stream output has its input's dtype and
shape and is computed from it, and no side input carries the residual stream in place of
the chosen input. Removing it rewires each stream output's consumers to the matching
stream input. Stream outputs are matched to inputs by the *residual path* (walking back
from the output through ops that do not apply a weight: ``Add``, norms, activations,
reshapes; never through ``MatMul``/``Conv``/``Gemm``) first, then by exact shape, then by
the previous block's outputs; not by position.

Module paths of nodes come, in order of preference, from

1. a block map saved by ``compress export`` (``MODEL.blocks.json``),
2. node metadata written by the dynamo exporter (``pkg.torch.onnx.name_scopes``),
3. node names written by the TorchScript exporter (``/encoder/layer.3/attention/MatMul``),
4. the graph alone (residual cuts grouped by repeating structure; :mod:`compress.blocks.cuts`).

With 2 and 3, nodes without a module path of their own (an optimizer-made ``Split`` from
``torch.chunk``, a renamed node) take the longest common module path of their producers
and consumers (:func:`repair_scopes`), so they land in the block they belong to when
that is unambiguous and outside every block otherwise.

Nodes outside every block whose results only one block reads (a per-block adaLN
``Linear`` that the exporter hoisted out of its block, with the nodes feeding only it)
belong to that block: they go when it goes, and their parameters count as its.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import onnx

from compress.blocks.mapfile import READABLE_BLOCK_MAP_SCHEMAS, check_block_map
from compress.errors import BlockError
from compress.graph import GraphIndex, TensorType, node_inputs

BLOCK_MAP_SCHEMA = 2
_INDEXED = re.compile(r"^(?P<container>.+?)\.(?P<index>\d+)(?:\.|$)")
_EMPTY_SCOPES = {"", "_empty_nn_module_stack_from_metadata_hook"}


@dataclass(frozen=True)
class Stream:
    """One residual stream through a block: ``output`` replaces ``input`` when the block goes.

    Attributes:
        name: label of the stream, the same for all blocks that carry it (``hidden_states``,
            ``encoder_hidden_states``: the graph input it starts from, else ``stream<k>``).
        input: the tensor flowing in.
        output: the tensor flowing out (same dtype and shape).
        shape: shape of ``output`` (ints, symbols, None for unknown); None if unknown.
        dtype: element type of ``output``.
    """

    name: str
    input: str
    output: str
    shape: tuple[int | str | None, ...] | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input": self.input, "output": self.output,
                "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stream:
        return cls(str(d["name"]), str(d["input"]), str(d["output"]),
                   None if d.get("shape") is None else tuple(d["shape"]), d.get("dtype"))


@dataclass(frozen=True)
class Block:
    """One block of a model.

    Attributes:
        index: position among the model's blocks (0-based, in graph order).
        name: module path, e.g. ``encoder.layer.3``.
        input: the primary stream's input tensor (see ``streams``), or None when there is none.
        output: the primary stream's output tensor, or None when the block has no stream.
        side_inputs: other tensors read from outside the block (masks, conditioning, shape
            scalars), including the inputs of streams that end in the block.
        nodes: names (keys) of the block's nodes, in graph order.
        params: number of parameters read by the block.
        shape: shape of ``output`` (ints, symbols, None for unknown); None if unknown.
        dtype: element type of ``output``.
        removable: whether the block can be deleted by rewiring each stream output -> input.
        reason: why it is not removable (None when it is).
        streams: the block's streams, the primary one first (the stream with the most
            elements, e.g. the image tokens of an MMDiT block); one for a plain layer.
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
    streams: tuple[Stream, ...] = ()

    def __post_init__(self) -> None:
        if not self.streams and self.input is not None and self.output is not None:
            object.__setattr__(self, "streams", (Stream("stream0", self.input, self.output, self.shape, self.dtype),))

    @property
    def stream_inputs(self) -> tuple[str, ...]:
        return tuple(s.input for s in self.streams)

    @property
    def stream_outputs(self) -> tuple[str, ...]:
        return tuple(s.output for s in self.streams)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["side_inputs"] = list(self.side_inputs)
        d["nodes"] = list(self.nodes)
        d["shape"] = None if self.shape is None else list(self.shape)
        d["streams"] = [st.to_dict() for st in self.streams]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Block:
        """Read a block of a schema-2 map, or of a schema-1 map (one stream: ``input`` -> ``output``)."""
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
            streams=tuple(Stream.from_dict(x) for x in d.get("streams") or ()),
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
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "the block map") -> BlockMap:
        """Read a saved block map; ModelError naming ``source`` and the field when its layout or types are wrong."""
        if not isinstance(d, Mapping):
            check_block_map(d, source=source)  # raises: names what it is instead
        if d.get("schema_version") not in READABLE_BLOCK_MAP_SCHEMAS or "blocks" not in d:
            raise BlockError(
                f"not a compress block map (schema_version {d.get('schema_version')!r}, expected "
                f"{' or '.join(map(str, READABLE_BLOCK_MAP_SCHEMAS))})",
                hint="re-create it with 'compress export' or 'compress inspect --write-blocks'",
            )
        check_block_map(d, source=source)
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


#: Ops that apply a weight: a residual path never passes through them (only Gemm's bias input C).
WEIGHT_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger", "ConvInteger", "QLinearMatMul",
    "QLinearConv", "MatMulNBits", "Gather", "GatherElements", "GatherND", "LSTM", "GRU", "RNN", "Attention",
    "MultiHeadAttention", "Softmax",
})


def residual_sources(index: GraphIndex, output: str, keys: set[str]) -> set[str]:
    """Tensors that reach ``output`` on a residual path through the nodes ``keys``.

    Walks back from ``output`` through nodes of ``keys`` that do not apply a weight
    (:data:`WEIGHT_OPS`): sums, norms, activations, gates, reshapes, concatenations and
    slices pass the stream on; a ``MatMul``/``Conv`` (a projection of the stream) does not.
    Constants are not followed. Returns the non-constant tensors reached (``output`` too).
    """
    seen = {output}
    stack = [output]
    const = index.constants
    while stack:
        key = index.producer.get(stack.pop())
        if key is None or key not in keys:
            continue
        node = index.node_by_key[key]
        if node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
            follow = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        elif node.op_type in WEIGHT_OPS:
            continue
        else:
            follow = node_inputs(node)
        for x in follow:
            if x not in seen and x not in const:
                seen.add(x)
                stack.append(x)
    return seen


def _elements(t: TensorType | None) -> float:
    if t is None or t.shape is None:
        return 0.0
    n = 1.0
    for d in t.shape:
        n *= d if isinstance(d, int) else 1024.0  # a symbolic dim counts as large
    return n


def _pair_streams(
    index: GraphIndex, keys: set[str], inputs: Sequence[str], outputs: Sequence[str], previous: Sequence[str],
    shared: Collection[str] = (),
) -> list[tuple[str, str]]:
    """Match block outputs to the stream inputs they replace: one input per output at most.

    A pair (x, o) needs o computed from x inside the block and the same dtype and shape;
    among those, pairs on a residual path (:func:`residual_sources`) win, then pairs of
    exactly equal shapes, then x being a previous block's output, then (as a tie-breaker
    for single-stream blocks) the input that feeds fewer outputs and fewer nodes.
    The matching maximises the number of pairs, then those preferences (in that order).
    Outputs in ``shared`` (read by several other blocks: conditioning computed once) and
    outputs the block reads itself pair with nothing.
    """
    every_output = list(outputs)
    # a stream output is the block's last word on its stream: the block itself does not read it
    outputs = [o for o in outputs if o not in shared and not any(c in keys for c in index.consumers.get(o, ()))]
    if not inputs or not outputs:
        return []
    reach = {x: _forward(index, x, keys) for x in inputs}
    res = {o: residual_sources(index, o, keys) for o in outputs}
    prev = set(previous)

    def score(x: str, o: str) -> tuple[int, ...] | None:
        tx, to = index.type_of(x), index.type_of(o)
        if not _same(tx, to) or index.producer.get(o) not in reach[x]:
            return None
        fed = sum(index.producer.get(y) in reach[x] for y in every_output)
        return (int(x in res[o]), int(tx.shape == to.shape), int(x in prev), -fed,  # type: ignore[union-attr]
                -len(index.consumers.get(x, ())), -inputs.index(x))

    table = {(x, o): sc for x in inputs for o in outputs if (sc := score(x, o)) is not None}
    if not table:
        return []
    outs = [o for o in outputs if any((x, o) in table for x in inputs)]
    best: tuple[tuple[float, ...], list[tuple[str, str]]] | None = None
    if len(outs) <= 5 and len(inputs) <= 8:
        options = [[None, *[x for x in inputs if (x, o) in table]] for o in outs]
        for choice in itertools.product(*options):
            used = [x for x in choice if x is not None]
            if len(used) != len(set(used)):
                continue
            pairs = [(x, o) for x, o in zip(choice, outs, strict=True) if x is not None]
            totals = tuple(sum(table[p][j] for p in pairs) for j in range(6))
            key = (len(pairs), *totals)
            if best is None or key > best[0]:
                best = (key, pairs)
    else:  # greedy on many outputs: best-scored pairs first
        pairs, used_x, used_o = [], set(), set()
        for (x, o), _sc in sorted(table.items(), key=lambda kv: kv[1], reverse=True):
            if x not in used_x and o not in used_o:
                pairs.append((x, o))
                used_x.add(x)
                used_o.add(o)
        best = ((), pairs)
    assert best is not None
    return sorted(best[1], key=lambda p: outputs.index(p[1]))


def check_block(index: GraphIndex, block: Block) -> str | None:
    """The structural guard: why ``block`` cannot be removed from the graph of ``index``, or None.

    Checked on the graph itself (the block map may come from a file): the block's nodes are
    in the graph; every stream input is read by the block and not computed in it; the
    tensors that leave the block are exactly the stream outputs (nothing else is read
    downstream); each stream output has its input's dtype and shape and is computed from it;
    no path leaves the block and comes back into it (then a "boundary" tensor is computed
    from the block's own results, as when a scope-less ``Split`` of a projection sits
    outside the layer that reads its slices); and no side input carries the residual stream
    into a stream output where the chosen input does not (:func:`residual_sources`).
    """
    missing = [k for k in block.nodes if k not in index.node_by_key]
    if missing:
        return f"node {missing[0]!r} is not in the graph"
    if not block.streams:
        return "the block has no stream (no input of an output's type)"
    keys = set(block.nodes)
    ordered = sorted(keys, key=index.position.__getitem__)
    inputs, outputs = _boundary(index, ordered)
    produced = {o for k in keys for o in index.node_by_key[k].output if o}
    ins, outs = block.stream_inputs, block.stream_outputs
    if len(set(ins)) != len(ins) or len(set(outs)) != len(outs):
        return "two streams share a tensor"
    for st in block.streams:
        if st.input in produced:
            return f"stream input {st.input} is computed inside the block"
        if st.input not in inputs:
            return f"stream input {st.input} is not read by the block"
        if st.output not in outputs:
            return f"stream output {st.output} does not leave the block"
        tin, tout = index.type_of(st.input), index.type_of(st.output)
        if not _same(tin, tout):
            show = lambda t: "?" if t is None else f"{t.dtype}[{t.shape_str()}]"  # noqa: E731
            return f"stream output {st.output} {show(tout)} does not have the type of its input {st.input} {show(tin)}"
        if index.producer.get(st.output) not in _forward(index, st.input, keys):
            return f"stream output {st.output} is not computed from its input {st.input}"
    extra = [o for o in outputs if o not in outs]
    if extra:
        return f"{len(extra)} more tensor(s) leave the block besides its streams ({', '.join(extra[:4])})"
    # convexity: walk forward from the block's results through outside nodes; no block input may be reached
    entry = {x for x in inputs if x in index.producer}
    if entry:
        last = max(index.position[index.producer[x]] for x in entry)
        seen: set[str] = set()
        stack = list(outputs)
        while stack:
            t = stack.pop()
            for c in index.consumers.get(t, ()):
                if c in keys or c in seen or index.position[c] > last:
                    continue
                seen.add(c)
                for o in index.node_by_key[c].output:
                    if o in entry:
                        return (f"the block is not a closed piece of the graph: its input {o} is computed outside "
                                f"it from its own results (a node without a module path between its nodes?)")
                    if o:
                        stack.append(o)
    for st in block.streams:
        res = residual_sources(index, st.output, keys)
        if st.input not in res:
            rival = [x for x in inputs if x in res and x not in ins and _same(index.type_of(x), index.type_of(st.output))]
            if rival:
                return f"stream input {st.input} is not the residual stream of {st.output}; {rival[0]} is"
    return None


def make_block(index: GraphIndex, i: int, name: str, keys: Sequence[str], *, previous_output: str | None = None,
               previous_outputs: Sequence[str] = (), shared: Collection[str] = ()) -> Block:
    """Describe the nodes ``keys`` as block number ``i`` called ``name``.

    Streams are matched by :func:`_pair_streams` (``previous_outputs``: the streams leaving
    the block before, preferred as inputs; ``shared``: tensors that are no stream output,
    see :func:`blocks_from_groups`); side nodes whose results are also read outside the
    block (:func:`hoisted_nodes`) are left out, then the streams are matched again.
    Removability is decided by :func:`check_block`.
    """
    keyset = set(keys)
    previous = [*previous_outputs, *([previous_output] if previous_output else [])]

    def ordered() -> list[str]:
        return sorted(keyset, key=index.position.__getitem__)

    inputs, outputs = _boundary(index, ordered())
    pairs = _pair_streams(index, keyset, inputs, outputs, previous, shared)
    if pairs:
        carried: set[str] = set()
        for x, _ in pairs:
            carried |= _forward(index, x, keyset)
        keyset -= hoisted_nodes(index, keyset, keyset - carried)
        inputs, outputs = _boundary(index, ordered())
        pairs = _pair_streams(index, keyset, inputs, outputs, previous, shared)
    keys = ordered()
    streams = [Stream(f"stream{k}", x, o, t.shape if (t := index.type_of(o)) else None, t.dtype if t else None)
               for k, (x, o) in enumerate(pairs)]
    if len(streams) > 1:  # primary = most elements; ties: the later output
        streams.sort(key=lambda st: (-_elements(index.type_of(st.output)), -index.position[index.producer[st.output]]))
    primary = streams[0] if streams else None
    paired_out = {st.output for st in streams}
    paired_in = {st.input for st in streams}
    unmatched = [o for o in outputs if o not in paired_out]
    floats = [x for x in inputs if (t := index.type_of(x)) is not None and t.dtype.startswith(("float", "bfloat"))]
    reason = None
    if not outputs:
        reason = "no output leaves the block"
    elif unknown := [o for o in outputs if index.type_of(o) is None]:
        reason = f"type of output {unknown[0]} is unknown (run shape inference on the model)"
    elif unmatched:
        o = unmatched[0]
        t = index.type_of(o)
        assert t is not None
        res = residual_sources(index, o, keyset)
        joined = [x for x in floats if x in res]
        if len(joined) > 1:
            reason = (f"the block joins streams: {', '.join(joined[:4])} are combined into {o} "
                      f"{t.dtype}[{t.shape_str()}] (no output replaces each input)")
        elif joined and any(joined[0] in residual_sources(index, y, keyset) for y in outputs if y != o) \
                and joined[0] not in paired_in:
            reason = f"the block splits stream {joined[0]} into {len([y for y in outputs if joined[0] in residual_sources(index, y, keyset)])} outputs"
        elif len(outputs) == 1:
            shown = ", ".join(f"{x} [{tx.shape_str() if (tx := index.type_of(x)) else '?'}]" for x in inputs[:4]) or "none"
            reason = f"no input has the output's type {t.dtype}[{t.shape_str()}] (inputs: {shown})"
        else:
            verb = "replaces" if len(unmatched) == 1 else "replace"
            reason = (f"{len(outputs)} outputs leave the block ({', '.join(outputs[:4])}); "
                      f"{', '.join(unmatched[:4])} {verb} no input of the same type (a removable block has one "
                      "output per stream)")
    inp = primary.input if primary else (floats[0] if len(floats) == 1 else None)
    side = tuple(x for x in inputs if x != inp and x not in paired_in)
    block = Block(
        index=i, name=name, input=inp, output=primary.output if primary else (outputs[0] if len(outputs) == 1 else None),
        side_inputs=side, nodes=tuple(keys), params=index.params_of(keys),
        shape=primary.shape if primary else None, dtype=primary.dtype if primary else None,
        removable=False, reason=reason, streams=tuple(streams),
    )
    if reason is None:
        reason = check_block(index, block)
    return replace(block, removable=reason is None, reason=reason)


def _stream_ancestors(index: GraphIndex, tensors: Iterable[str]) -> set[str]:
    """Nodes whose results reach any of ``tensors`` (their backward closure)."""
    nodes: set[str] = set()
    stack = [index.producer[t] for t in tensors if t in index.producer]
    while stack:
        k = stack.pop()
        if k in nodes:
            continue
        nodes.add(k)
        stack.extend(index.producer[x] for x in node_inputs(index.node_by_key[k]) if x in index.producer)
    return nodes


def _exclusive_feeders(index: GraphIndex, keys: set[str], taken: set[str], barrier: set[str]) -> set[str]:
    """Nodes outside ``keys`` whose results only ``keys`` (and each other) read, walking back from ``keys``.

    ``taken`` (nodes of other blocks) and ``barrier`` (ancestors of the residual streams) are
    never added. Graph outputs are never exclusive.
    """
    outputs = set(index.graph_outputs)
    feeders: set[str] = set()
    frontier = [index.producer[x] for k in keys for x in node_inputs(index.node_by_key[k]) if x in index.producer]
    while frontier:
        p = frontier.pop()
        if p in keys or p in feeders or p in taken or p in barrier:
            continue
        node = index.node_by_key[p]
        readers = {c for o in node.output if o for c in index.consumers.get(o, ())}
        if any(o in outputs for o in node.output) or not readers or not readers <= (keys | feeders):
            continue
        feeders.add(p)
        frontier.extend(index.producer[x] for x in node_inputs(node) if x in index.producer)
    return feeders


def _name_streams(index: GraphIndex, blocks: list[Block]) -> list[Block]:
    """Stream names: a stream that continues a previous block's stream keeps its name; a new
    one is named after the graph input only it descends from (else ``stream<k>``)."""
    named: dict[str, str] = {}  # output tensor -> stream name
    out: list[Block] = []
    inputs = set(index.graph_inputs)
    ancestry: dict[str, set[str]] = {}

    def graph_inputs_of(t: str) -> set[str]:
        if t not in ancestry:
            nodes = _stream_ancestors(index, [t])
            ancestry[t] = {x for k in nodes for x in node_inputs(index.node_by_key[k]) if x in inputs}
            if t in inputs:
                ancestry[t].add(t)
        return ancestry[t]

    for b in blocks:
        streams = []
        used: set[str] = set()
        for k, st in enumerate(b.streams):
            name = named.get(st.input)
            if name is None:  # a new stream (first block, or after a join): computed only then
                others = set().union(*(graph_inputs_of(o.input) for o in b.streams if o is not st))
                own = sorted(graph_inputs_of(st.input) - others, key=index.graph_inputs.index)
                name = own[0] if len(own) == 1 else f"stream{k}"
            if name in used:
                name = f"stream{k}"
            used.add(name)
            named[st.output] = name
            streams.append(replace(st, name=name))
        out.append(replace(b, streams=tuple(streams)))
    return out


def blocks_from_groups(
    model: onnx.ModelProto, groups: Mapping[str, Sequence[str]], containers: Sequence[str], *, source: str,
    index: GraphIndex | None = None,
) -> BlockMap:
    """Describe each named group of node keys as a block; blocks are ordered by first node.

    A tensor that two or more other groups read is no stream output: it is conditioning
    computed once in the first block that needs it (the ``SiLU`` of an MMDiT's timestep
    embedding, read by every block); it is hoisted out of the block instead.

    Each group is completed by the nodes outside all groups that only it reads (hoisted
    per-block work: an adaLN ``Linear`` of the timestep embedding, with the nodes feeding
    only it); ancestors of the block's own stream inputs never join.
    """
    index = index or GraphIndex(model)
    groups = {name: [k for k in keys if k in index.position] for name, keys in groups.items()}
    ordered = sorted((g for g in groups if groups[g]), key=lambda g: min(index.position[k] for k in groups[g]))
    owner = {k: g for g in ordered for k in groups[g]}

    def shared_outputs(name: str) -> set[str]:
        out = set()
        for k in groups[name]:
            for o in index.node_by_key[k].output:
                readers = {owner.get(c) for c in index.consumers.get(o, ())} - {name, None}
                if len(readers) >= 2:
                    out.add(o)
        return out

    shared = {name: shared_outputs(name) for name in ordered}
    first: list[Block] = []
    prev: tuple[str, ...] = ()
    for i, name in enumerate(ordered):
        block = make_block(index, i, name, groups[name], previous_outputs=prev, shared=shared[name])
        first.append(block)
        prev = block.stream_outputs or ((block.output,) if block.output else ())
    in_blocks = {k for b in first for k in b.nodes}
    blocks: list[Block] = []
    prev = ()
    for i, (name, b) in enumerate(zip(ordered, first, strict=True)):
        feeders = _exclusive_feeders(index, set(b.nodes), in_blocks - set(b.nodes), set())
        if feeders:  # the O(nodes) ancestor walk only where there is something to keep out
            barrier = _stream_ancestors(index, b.stream_inputs)
            feeders = _exclusive_feeders(index, set(b.nodes), in_blocks - set(b.nodes), barrier)
        if feeders:
            b = make_block(index, i, name, [*b.nodes, *feeders], previous_outputs=prev, shared=shared[name])
        blocks.append(b)
        prev = b.stream_outputs or ((b.output,) if b.output else ())
    return BlockMap(tuple(containers), source, tuple(_name_streams(index, blocks)))


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
    from compress.blocks.cuts import blocks_from_graph

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

    def dims(shape: Sequence[Any] | None) -> str:
        return "?" if shape is None else ",".join("?" if d is None else str(d) for d in shape)

    for b in block_map.blocks:
        if len(b.streams) > 1:  # one line per stream: name: input -> output, and their shapes
            flow = "; ".join(f"{st.name}: {st.input} -> {st.output}" for st in b.streams)
            shape = "; ".join(f"{st.dtype or '?'}[{dims(st.shape)}]" for st in b.streams)
        else:
            flow, shape = f"{b.input} -> {b.output}", f"{b.dtype or '?'}[{dims(b.shape)}]"
        rows.append([b.index, b.name, len(b.nodes), b.params, flow, shape,
                     "yes" if b.removable else f"no: {b.reason}"])
    return headers, rows


def _repair_with_graph(model: onnx.ModelProto, named: BlockMap, index: GraphIndex) -> BlockMap:
    """Graph-found blocks named after the path-found ones, when they describe the same blocks better.

    Used when some path-found blocks are not removable: the graph's residual cuts give the
    boundaries, each graph block takes the name of the path-found block it shares most nodes
    with. Falls back to ``named`` when the graph finds a different number of blocks or no
    more removable ones.
    """
    from compress.blocks.cuts import blocks_from_graph

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
