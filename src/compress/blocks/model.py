"""The block map: :class:`Stream`, :class:`Block`, :class:`BlockMap` and their (de)serialization.

A *block* is one entry of a repeated container (``encoder.layer.3``); its boundary is a
tuple of *streams* (residual-stream tensors flowing in and the tensors replacing them on
the way out); every other tensor it reads from outside is a *side input*. These are plain
frozen values: nothing here reads or modifies a model (:class:`MappedModel` only pairs one
with its map). ``to_dict``/``from_dict`` give the
layout of ``MODEL.blocks.json`` (schema :data:`BLOCK_MAP_SCHEMA`; schema 1 is still read);
:func:`block_rows` gives the table ``compress inspect`` and ``compress export`` print.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from compress.blocks.mapfile import READABLE_BLOCK_MAP_SCHEMAS, check_block_map
from compress.errors import BlockError

if TYPE_CHECKING:
    import onnx

#: Schema version written into ``MODEL.blocks.json`` by :meth:`BlockMap.to_dict`.
BLOCK_MAP_SCHEMA = 2


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
        """JSON-ready form: ``name``, ``input``, ``output``, ``shape`` (a list or None), ``dtype``."""
        return {"name": self.name, "input": self.input, "output": self.output,
                "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stream:
        """Read what :meth:`to_dict` wrote (``shape``/``dtype`` may be missing: None)."""
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
        gradnorm: the block's GradNorm (SGLP's importance, computed in torch by
            :func:`compress.export.gradnorm.block_gradnorms`; the loss is the map's
            ``gradnorm_loss``); None when it was not computed (written only when set).
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
    gradnorm: float | None = None

    def __post_init__(self) -> None:
        if not self.streams and self.input is not None and self.output is not None:
            object.__setattr__(self, "streams", (Stream("stream0", self.input, self.output, self.shape, self.dtype),))

    @property
    def stream_inputs(self) -> tuple[str, ...]:
        """The input tensor of each stream, in stream order (primary first)."""
        return tuple(s.input for s in self.streams)

    @property
    def stream_outputs(self) -> tuple[str, ...]:
        """The output tensor of each stream, in stream order (primary first)."""
        return tuple(s.output for s in self.streams)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (schema 2): every field, tuples as lists, ``streams`` as :meth:`Stream.to_dict`.

        ``gradnorm`` is written only when it is set (maps without it read as before).
        """
        d = asdict(self)
        d["side_inputs"] = list(self.side_inputs)
        d["nodes"] = list(self.nodes)
        d["shape"] = None if self.shape is None else list(self.shape)
        d["streams"] = [st.to_dict() for st in self.streams]
        if self.gradnorm is None:
            del d["gradnorm"]
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
            gradnorm=None if d.get("gradnorm") is None else float(d["gradnorm"]),
        )


@dataclass(frozen=True)
class BlockMap:
    """The blocks of one model and where they were found.

    Attributes:
        containers: module paths of the block containers (``encoder.layer``).
        source: how module paths were found: ``block-map``, ``metadata``, ``names``,
            ``graph`` or ``user``.
        blocks: the blocks in graph order.
        gradnorm_loss: how the blocks' ``gradnorm`` was computed (the loss, a sentence);
            None when no block has one (written only when set).
    """

    containers: tuple[str, ...]
    source: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)
    gradnorm_loss: str | None = None

    @property
    def removable(self) -> list[Block]:
        """The removable blocks, in graph order."""
        return [b for b in self.blocks if b.removable]

    def to_dict(self) -> dict[str, Any]:
        """The layout of ``MODEL.blocks.json``: ``schema_version``, ``containers``, ``source``, ``blocks``.

        ``gradnorm_loss`` is added when the blocks carry GradNorm.
        """
        d: dict[str, Any] = {
            "schema_version": BLOCK_MAP_SCHEMA,
            "containers": list(self.containers),
            "source": self.source,
            "blocks": [b.to_dict() for b in self.blocks],
        }
        if self.gradnorm_loss is not None:
            d["gradnorm_loss"] = self.gradnorm_loss
        return d

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
                   tuple(Block.from_dict(b) for b in d["blocks"]), d.get("gradnorm_loss"))


@dataclass(frozen=True)
class MappedModel:
    """An ONNX model with its block map: what the block stages take and return.

    :func:`compress.export.export` makes one; :func:`compress.scoring.score` and
    :func:`compress.prune.prune` take one (the pruned model comes back with the map of the
    blocks it still has). A plain value: making one copies nothing and checks nothing (the
    block map's tensor names are checked against the graph where they are used).

    Attributes:
        proto: the ONNX model (large tensors may stay on disk as external-data references).
        block_map: its blocks (:func:`compress.blocks.find_blocks`, or a saved map).
    """

    proto: onnx.ModelProto
    block_map: BlockMap


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

