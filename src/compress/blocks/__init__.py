"""Find the repeated blocks of an ONNX model and their residual-stream boundaries.

A *block* is one entry of a repeated container (``encoder.layer.3``, ``_blocks.7``,
``transformer_blocks.12``). Its boundary is a tuple of *streams*: residual-stream tensors
that flow in and the tensors that replace them on the way out. A transformer layer has
one stream (the hidden states); an MMDiT joint block has two (image and text hidden
states). Other tensors the block reads from outside (attention masks, timestep
conditioning, rotary tables, shape scalars) are *side inputs*. Nothing in this package
modifies a model.

Submodules (each imports its siblings directly, never this package):

* :mod:`compress.blocks.model`: the values :class:`Stream`, :class:`Block`,
  :class:`BlockMap`, :class:`MappedModel` (a model with its map), their (de)serialization
  (``MODEL.blocks.json``) and :func:`block_rows`.
* :mod:`compress.blocks.mapfile`: the field-by-field check of a saved block map.
* :mod:`compress.blocks.boundary`: stream pairing, residual paths, the structural guard
  :func:`check_block`, :func:`make_block` and blocks made from groups of nodes.
* :mod:`compress.blocks.cuts`: blocks from the graph alone (residual cuts grouped by
  repeating structure), for models without module paths.
* :mod:`compress.blocks.scopes`: module paths of nodes (dynamo metadata, TorchScript
  names), container choice (``--blocks``) and :func:`find_blocks`, the entry point.
"""

from __future__ import annotations

from compress.blocks.boundary import (
    WEIGHT_OPS,
    blocks_from_groups,
    check_block,
    hoisted_nodes,
    make_block,
    remaining_blocks,
    residual_sources,
)
from compress.blocks.model import BLOCK_MAP_SCHEMA, Block, BlockMap, MappedModel, Stream, block_rows
from compress.blocks.scopes import (
    blocks_from_paths,
    choose_containers,
    find_blocks,
    find_containers,
    node_module_paths,
    repair_scopes,
)

__all__ = [
    "BLOCK_MAP_SCHEMA", "WEIGHT_OPS", "Block", "BlockMap", "MappedModel", "Stream", "block_rows", "blocks_from_groups",
    "blocks_from_paths", "check_block", "choose_containers", "find_blocks", "find_containers", "hoisted_nodes",
    "make_block", "node_module_paths", "remaining_blocks", "repair_scopes", "residual_sources",
]
