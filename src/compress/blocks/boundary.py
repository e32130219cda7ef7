"""Block boundaries: streams, the structural guard, and blocks made from groups of nodes.

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

Nodes outside every block whose results only one block reads (a per-block adaLN
``Linear`` that the exporter hoisted out of its block, with the nodes feeding only it)
belong to that block (:func:`blocks_from_groups`): they go when it goes, and their
parameters count as its.

Everything here reads a :class:`~compress.graph.GraphIndex` (or a model) and never
modifies the model; blocks are described by node keys and tensor names.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace

import onnx

from compress.blocks.model import Block, BlockMap, Stream
from compress.graph import GraphIndex, TensorType, node_inputs


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


def make_block(index: GraphIndex, i: int, name: str, keys: Sequence[str], *, previous_outputs: Sequence[str] = (),
               shared: Collection[str] = ()) -> Block:
    """Describe the nodes ``keys`` as block number ``i`` called ``name``.

    Streams are matched by :func:`_pair_streams` (``previous_outputs``: the streams leaving
    the block before, preferred as inputs; ``shared``: tensors that are no stream output,
    see :func:`blocks_from_groups`); side nodes whose results are also read outside the
    block (:func:`hoisted_nodes`) are left out, then the streams are matched again.
    Removability is decided by :func:`check_block`.
    """
    keyset = set(keys)
    previous = list(previous_outputs)

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
    """The blocks with their streams named.

    A stream that continues a previous block's stream keeps its name; a new one is named
    after the graph input only it descends from (else ``stream<k>``).
    """
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


def remaining_blocks(model: onnx.ModelProto, block_map: BlockMap, removed: Iterable[int]) -> BlockMap:
    """The block map of ``model`` after ``removed`` (block indices of ``block_map``) were deleted.

    Blocks keep their names and nodes and are re-indexed in graph order; their boundaries
    are recomputed on ``model`` (an input may now be an earlier block's input).
    """
    gone = set(removed)
    groups = {b.name: list(b.nodes) for b in block_map.blocks if b.index not in gone}
    return blocks_from_groups(model, groups, block_map.containers, source=block_map.source)

