"""Find repeated blocks from the graph alone: residual cuts grouped by repeating structure.

Used by :func:`compress.blocks.scopes.find_blocks` when a model carries no module paths (no
dynamo metadata, no ``/module/...`` node names), e.g. after onnxsim renamed its nodes.
Nothing here modifies a model; the cost is O(nodes + edges) plus one
:func:`compress.blocks.boundary.make_block` per block found.

Method
------

1. **Stream tensors.** A block is cut along its floating-point residual stream, so only
   *stream tensors* count as live. A tensor is a stream tensor when it is not constant
   (:attr:`GraphIndex.constants`), has a floating-point dtype, is not *shape-only* (the
   output of ``Shape``/``Size`` or computed only from such outputs and constants), and
   is the *root* of the spine or descends (through data edges of any dtype, so through
   int8 QDQ and dynamic-quantization pairs too) from a spine tensor after the root. The
   *spine* is the heaviest input->output path (node weight 1, plus :data:`HEAVY_WEIGHT`
   for a ``MatMul``/``Conv``/``Gemm``/``Gather``... reading a constant of at least
   :data:`HEAVY_MIN_ELEMENTS` elements), found by a longest-path pass that ignores
   shape-only edges. Everything else is a *side* tensor and never counts as live:
   integer/bool shape arithmetic, and float tensors computed apart from the stream and
   read by many layers, such as an attention mask built from ``attention_mask`` (or
   from ``input_ids`` values), rotary ``cos``/``sin`` tables, or a timestep embedding.
   The spine's weighting keeps a long mask-building chain from being taken for the
   stream: the stream's path always reads weights before it meets the mask.
   Reads by ``Shape``/``Size`` do not keep a tensor live (they only need its metadata).
2. **Residual cuts.** Walking the nodes in topological order, a *cut* is a position after
   which exactly one stream tensor is live (produced or a graph input, and still read by
   a later node or a graph output). Every input->output path of the stream passes through
   it. Consecutive positions with the same single live tensor are one cut (the earliest).
3. **Segments and signatures.** The nodes between two consecutive cuts form a segment.
   Its signature is the sequence (graph order) of the op types of its *stream nodes*
   (nodes reading or producing a stream tensor), leaving out ``Shape``/``Size`` and
   no-ops (``Identity``, ``Dropout``, a ``Cast`` to the same dtype). A segment of no-ops joins the segment that reads
   its output (so a no-op ``Cast`` opening a Llama RMSNorm belongs to the next layer).
   Nodes before the first cut and after the last one belong to no segment.
4. **Repetition.** For each period p = 1 .. :data:`MAX_PERIOD`, every maximal stretch of
   segments in which segment i has the signature of segment i + p gives one candidate run
   of at least two groups of p segments. Its phase is the one covering the most stream
   nodes; ties go to the later start (a BERT-style post-norm layer ``[attn, LN, ffn, LN]``
   follows the embedding LayerNorm, whose signature equals the layer's last segment).
   Candidates are taken greedily, most groups first (then most stream nodes, smaller p,
   later start), when they overlap no taken run and their first group applies a weight to
   the stream (has a heavy stream node: this drops runs such as the two ``Add`` nodes that
   sum BERT's embedding tables). Most groups first makes a CNN's stages come out as single residual blocks
   (``[B, B, B]``) rather than as ``[downsample, B, B]`` groups spanning two stages.
5. **Blocks.** Each group of p segments is one block: the nodes of its segments less the
   *hoisted* side nodes (nodes producing no stream tensor whose results are read outside
   the group, e.g. mask building placed in the first layer, and their side ancestors),
   described by :func:`compress.blocks.boundary.make_block` and named ``graph.0``, ``graph.1``, ...
   in graph order. A run is kept only when one of its blocks is *residual*: a stream output
   carries the block's input on a residual path (:func:`compress.blocks.boundary.residual_sources`:
   a skip connection); runs of plain layers (VGG's conv-ReLU stages, Inception branches)
   are repeated structure but no removable block, and are not proposed.

Limitations: blocks read by a tensor that stays live across them (an encoder output read
by every decoder layer, DenseNet-style concatenations, U-Net skips) have no cuts and are
not found; a float mask computed from the stream's own values counts as stream.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from compress.blocks.boundary import hoisted_nodes, make_block, residual_sources
from compress.blocks.model import Block, BlockMap
from compress.graph import GraphIndex, node_inputs

#: Longest repeating group of segments considered (a BERT layer has 4: attn, LN, ffn, LN).
MAX_PERIOD = 8
#: Extra spine weight of a node that applies a weight tensor (see :data:`HEAVY_OPS`).
HEAVY_WEIGHT = 16
#: Minimum number of elements of a constant input that makes a node "heavy".
HEAVY_MIN_ELEMENTS = 64
#: Ops that apply a weight tensor (matrix, kernel, embedding table).
HEAVY_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Einsum", "MatMulInteger", "ConvInteger",
    "QLinearMatMul", "QLinearConv", "MatMulNBits", "LSTM", "GRU", "RNN",
})
#: Ops whose outputs carry only a tensor's metadata.
SHAPE_OPS = frozenset({"Shape", "Size"})
#: Ops whose outputs are never floating point (used when shape inference gave no type).
_NON_FLOAT_OPS = frozenset({
    "Shape", "Size", "NonZero", "ArgMax", "ArgMin", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "QuantizeLinear",
    "DynamicQuantizeLinear", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot",
})


@dataclass(frozen=True)
class Cut:
    """A residual cut: the one point where a single stream tensor is live.

    After node number ``position`` (-1: before the first node) of the topological order,
    ``tensor`` is the only live stream tensor.
    """

    position: int
    tensor: str


@dataclass(frozen=True)
class _Stream:
    order: tuple[str, ...]  # node keys in topological order
    counted: frozenset[str]  # stream tensors
    stream_nodes: frozenset[str]  # nodes reading or producing a stream tensor
    heavy: frozenset[str]  # nodes applying a weight (HEAVY_OPS reading a large constant) to the stream


def _topological_order(index: GraphIndex) -> list[str]:
    """Node keys in graph order when that is topological, else a stable Kahn order."""
    seen: set[str] = set(index.graph_inputs) | set(index.initializers)
    ok = True
    for node in index.graph.node:
        if any(x not in seen and x in index.producer for x in node_inputs(node)):
            ok = False
            break
        seen.update(o for o in node.output if o)
    if ok:
        return list(index.keys)
    pending = {k: len({index.producer[x] for x in node_inputs(n) if x in index.producer})
               for k, n in index.node_by_key.items()}
    ready = [k for k in index.keys if pending[k] == 0]
    order: list[str] = []
    heap = [(index.position[k], k) for k in ready]
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        order.append(k)
        for c in dict.fromkeys(c for o in index.node_by_key[k].output if o for c in index.consumers.get(o, ())):
            pending[c] -= 1
            if pending[c] == 0:
                heapq.heappush(heap, (index.position[c], c))
    return order  # nodes on a cycle (invalid model) are left out


def _is_float(index: GraphIndex, name: str) -> bool:
    t = index.type_of(name)
    if t is not None:
        return t.dtype.startswith(("float", "bfloat"))
    key = index.producer.get(name)
    if key is None:
        return True
    node = index.node_by_key[key]
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), onnx.TensorProto.FLOAT)
        return to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                      onnx.TensorProto.BFLOAT16)
    return node.op_type not in _NON_FLOAT_OPS


def _is_noop(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Identity, Dropout, or a Cast to the dtype its input already has."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Identity", "Dropout"):
        return True
    if node.op_type == "Cast" and node.input and node.output:
        a, b = index.type_of(node.input[0]), index.type_of(node.output[0])
        return a is not None and b is not None and a.dtype == b.dtype
    return False


def _numel(index: GraphIndex, name: str) -> int:
    init = index.weight_tensor(name)  # an initializer or a Constant node's value
    if init is not None:
        return int(np.prod(init.dims)) if len(init.dims) else 1
    t = index.type_of(name)
    shape = t.static_shape() if t is not None else None
    if shape is None:
        return 0
    return int(np.prod(shape)) if shape else 1


def _stream(index: GraphIndex) -> _Stream:
    """Stream tensors: see step 1 of the module docstring."""
    order = tuple(_topological_order(index))
    const = index.constants
    shape_only: set[str] = set()
    depth: dict[str, int] = dict.fromkeys(index.graph_inputs, 0)
    pred: dict[str, str | None] = {}  # node key -> its data input on its heaviest path
    data_in: dict[str, list[str]] = {}
    heavy_nodes: set[str] = set()
    for key in order:
        node = index.node_by_key[key]
        ins = [x for x in node_inputs(node) if x not in const]
        outs = [o for o in node.output if o and o not in const]
        if not outs:
            continue
        if (node.op_type in SHAPE_OPS and node.domain in ("", "ai.onnx")) or (ins and all(x in shape_only for x in ins)):
            shape_only.update(outs)
            continue
        data = [x for x in ins if x not in shape_only]
        data_in[key] = data
        heavy = node.op_type in HEAVY_OPS and any(
            x in const and _numel(index, x) >= HEAVY_MIN_ELEMENTS for x in node_inputs(node))
        if heavy:
            heavy_nodes.add(key)
        best = max(data, key=lambda x: depth.get(x, 0), default=None)
        pred[key] = best
        d = (depth.get(best, 0) if best is not None else 0) + 1 + (HEAVY_WEIGHT if heavy else 0)
        for o in outs:
            depth[o] = d
    ends = [o for o in index.graph_outputs if o in depth and o not in const]
    if not ends:
        return _Stream(order, frozenset(), frozenset(), frozenset())
    t = max(ends, key=lambda o: depth[o])
    seeds: list[str] = []  # the spine after its root, from its end backwards
    while (producer := index.producer.get(t)) is not None and (before := pred.get(producer)) is not None:
        seeds.append(t)
        t = before
    root = t
    derived = set(seeds)
    seed_nodes = {index.producer[s] for s in seeds}
    for key in order:
        key_data = data_in.get(key)
        if key_data is None:
            continue
        if key in seed_nodes or any(x in derived for x in key_data):
            derived.update(o for o in index.node_by_key[key].output if o and o not in const)
    derived.add(root)
    counted = frozenset(x for x in derived if x not in shape_only and _is_float(index, x))
    stream_nodes = frozenset(
        key for key in order
        if any(x in counted for x in node_inputs(index.node_by_key[key]))
        or any(o in counted for o in index.node_by_key[key].output)
    )
    # a heavy node may read the stream only in integer form (DynamicQuantizeLinear -> ConvInteger)
    heavy_stream = frozenset(k for k in heavy_nodes if any(x in derived for x in data_in[k]))
    return _Stream(order, counted, stream_nodes, heavy_stream)


def _cuts(index: GraphIndex, stream: _Stream) -> list[Cut]:
    """Residual cuts in topological order: see step 2 of the module docstring."""
    order = stream.order
    n = len(order)
    pos = {k: i for i, k in enumerate(order)}
    outputs = set(index.graph_outputs)
    names = sorted(stream.counted)
    count = np.zeros(n + 2, dtype=np.int64)  # slot i + 1 <-> "after position i"
    ids = np.zeros(n + 2, dtype=np.int64)
    for tid, t in enumerate(names):
        if t in index.producer and index.producer[t] not in pos:
            continue  # produced on a cycle (invalid model)
        birth = pos[index.producer[t]] if t in index.producer else -1
        if t in outputs:
            death = n
        else:
            reads = [pos[c] for c in index.consumers.get(t, ())
                     if c in pos and index.node_by_key[c].op_type not in SHAPE_OPS]
            death = max(reads, default=birth)
        if death <= birth:
            continue
        count[birth + 1] += 1
        count[death + 1] -= 1
        ids[birth + 1] += tid
        ids[death + 1] -= tid
    live = np.cumsum(count)[: n + 1]
    idsum = np.cumsum(ids)[: n + 1]
    cuts: list[Cut] = []
    for slot in np.flatnonzero(live == 1):
        t = names[int(idsum[slot])]
        if not cuts or cuts[-1].tensor != t:
            cuts.append(Cut(int(slot) - 1, t))
    return cuts


def residual_cuts(model: onnx.ModelProto, *, index: GraphIndex | None = None) -> list[Cut]:
    """The residual cuts of ``model``, in topological order. Does not modify ``model``.

    A cut is a position of the topological node order after which exactly one stream
    tensor is live; every input->output path of the stream passes through that tensor.
    See the module docstring for which tensors count as stream tensors.
    """
    index = index or GraphIndex(model)
    return _cuts(index, _stream(index))


@dataclass(frozen=True)
class _Run:
    period: int
    start: int  # first segment
    reps: int
    covered: int  # stream nodes covered


def _runs(signatures: Sequence[int], weights: Sequence[int]) -> list[_Run]:
    """Candidate runs of repeating segment groups: see step 4 of the module docstring."""
    m = len(signatures)
    prefix = np.concatenate([[0], np.cumsum(weights, dtype=np.int64)])
    runs: list[_Run] = []
    for p in range(1, min(MAX_PERIOD, m // 2) + 1):
        i = 0
        while i < m - p:
            if signatures[i] != signatures[i + p]:
                i += 1
                continue
            a = i
            while i < m - p and signatures[i] == signatures[i + p]:
                i += 1
            length = i - a + p  # segments [a, i + p) are p-periodic
            best: _Run | None = None
            for r in range(p):
                reps = (length - r) // p
                if reps < 2:
                    continue
                covered = int(prefix[a + r + reps * p] - prefix[a + r])
                if best is None or covered >= best.covered:
                    best = _Run(p, a + r, reps, covered)
            if best is not None and best.covered > 0:
                runs.append(best)
    return runs


def _without_hoisted(index: GraphIndex, stream: _Stream, keys: Sequence[str]) -> list[str]:
    """``keys`` less the side nodes whose results are also read outside them.

    A side node produces no stream tensor (shape arithmetic, mask building, constants).
    Exporters place work shared by all layers (``Expand`` of the attention mask to the
    hidden state's shape) inside the first layer's span; it is not part of that layer.
    Their side ancestors among ``keys`` leave with them.
    """
    keyset = set(keys)
    side = {k for k in keys if not any(o in stream.counted for o in index.node_by_key[k].output)}
    hoisted = hoisted_nodes(index, keyset, side)
    return [k for k in keys if k not in hoisted]


def blocks_from_graph(model: onnx.ModelProto, *, index: GraphIndex | None = None) -> BlockMap:
    """Blocks of ``model`` found from its graph alone. Does not modify ``model``.

    Residual cuts split the graph into segments; runs of at least two consecutive
    groups of 1 .. :data:`MAX_PERIOD` segments with equal op-type signatures become
    blocks named ``graph.<i>`` (see the module docstring for the details).

    Args:
        model: the ONNX model (node names and metadata are not used).
        index: a :class:`GraphIndex` of ``model`` to reuse.

    Returns:
        ``BlockMap(containers=("graph",), source="graph", blocks=...)``; ``blocks`` is
        empty when nothing repeats.
    """
    index = index or GraphIndex(model)
    stream = _stream(index)
    cuts = _cuts(index, stream)
    order = stream.order
    empty = BlockMap(("graph",), "graph", ())
    if len(cuts) < 3:
        return empty

    def signature(lo: int, hi: int) -> tuple[str, ...]:  # nodes at positions (lo, hi]
        return tuple(
            f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            for k in order[lo + 1 : hi + 1]
            if k in stream.stream_nodes and not _is_noop(index, node := index.node_by_key[k])
            and node.op_type not in SHAPE_OPS
        )

    # A segment of no-ops joins the segment that reads its output (or the nodes after the last cut).
    kept: list[Cut] = [cuts[0]]
    for cut in cuts[1:]:
        if signature(kept[-1].position, cut.position):
            kept.append(cut)
    bounds = [c.position for c in kept]
    sigs = [signature(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    if len(sigs) < 2:
        return empty
    interned: dict[tuple[str, ...], int] = {}
    ids = [interned.setdefault(s, len(interned)) for s in sigs]
    candidates = sorted(_runs(ids, [len(s) for s in sigs]), key=lambda r: (-r.reps, -r.covered, r.period, -r.start))
    taken: list[_Run] = []
    used = np.zeros(len(sigs), dtype=bool)
    for run in candidates:
        end = run.start + run.reps * run.period
        if used[run.start : end].any():
            continue
        first = order[bounds[run.start] + 1 : bounds[run.start + run.period] + 1]
        if not stream.heavy.intersection(first):
            continue
        taken.append(run)
        used[run.start : end] = True
    blocks: list[Block] = []
    prev: str | None = None
    for run in sorted(taken, key=lambda r: r.start):
        group: list[Block] = []
        for g in range(run.reps):
            lo = bounds[run.start + g * run.period]
            hi = bounds[run.start + (g + 1) * run.period]
            keys = _without_hoisted(index, stream, order[lo + 1 : hi + 1])
            block = make_block(index, len(blocks) + len(group), f"graph.{len(blocks) + len(group)}", keys,
                               previous_outputs=(prev,) if prev else ())
            group.append(block)
            prev = block.output
        if any(_is_residual(index, b) for b in group):
            blocks.extend(group)
        else:  # plain layers (VGG, Inception branches): no residual path, not proposed
            prev = blocks[-1].output if blocks else None
    return BlockMap(("graph",), "graph", tuple(blocks))


def _is_residual(index: GraphIndex, block: Block) -> bool:
    """Whether some stream output of ``block`` carries its input on a residual path (a skip connection)."""
    keys = set(block.nodes)
    return any(st.input in residual_sources(index, st.output, keys) for st in block.streams)
