"""The block map of an exported model: block containers from the torch module tree, or ``--blocks``.

:func:`find_block_containers` reads a torch module's tree (repeated ``ModuleList`` /
``Sequential`` children); :func:`_block_map` turns those paths (or ``config.blocks``)
into a :class:`compress.blocks.BlockMap` of the ONNX model. Neither modifies its inputs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import onnx

from compress.blocks import BlockMap, find_blocks, node_module_paths
from compress.errors import BlockError
from compress.export.config import ExportConfig
from compress.export.messages import _import_torch
from compress.log import logger


def find_block_containers(module: Any) -> list[str]:
    """Block containers of a torch module, found from its module tree.

    The longest ``nn.ModuleList``/``nn.Sequential`` (ties: the first) whose >= 2 children
    all have the same type, plus every other such container with that child type, or with a
    child type the model declares as a repeated block (``_repeated_blocks`` or
    ``_no_split_modules`` of diffusers/transformers models: Flux's double- and single-stream
    blocks), that is not nested in (or around) one already chosen (``layer1``..``layer4`` of
    a ResNet). Returns module paths (``encoder.layer``); empty when there is none.
    """
    torch = _import_torch()
    found: list[tuple[str, type, int]] = []
    for name, m in module.named_modules():
        if not name or not isinstance(m, torch.nn.ModuleList | torch.nn.Sequential):
            continue
        children = list(m.children())
        if len(children) >= 2 and len({type(c) for c in children}) == 1:
            found.append((name, type(children[0]), len(children)))
    if not found:
        return []
    best = max(found, key=lambda f: f[2])  # max keeps the first of equals
    declared = {str(n) for attr in ("_repeated_blocks", "_no_split_modules") for n in (getattr(module, attr, None) or ())}
    chosen = [best[0]]
    for name, cls, _ in found:
        nested = any(name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in chosen)
        if (cls is best[1] or (best[1].__name__ in declared and cls.__name__ in declared)) and not nested:
            chosen.append(name)
    return chosen



def _block_map(model: onnx.ModelProto, module: Any, config: ExportConfig) -> BlockMap:
    """Blocks of the exported model: --blocks, else containers found in the module tree."""
    import torch

    if config.blocks:
        return find_blocks(model, spec=config.blocks)
    spec = None if isinstance(module, torch.export.ExportedProgram) else ",".join(find_block_containers(module)) or None
    for attempt in dict.fromkeys((spec, None)):
        try:
            found = find_blocks(model, spec=attempt)
        except (BlockError, ImportError) as exc:
            logger.debug("block detection with spec %r failed: %s", attempt, exc)
            continue
        # containers found in the module tree: the paths still come from the graph
        return replace(found, source=node_module_paths(model)[2] or found.source) if attempt else found
    logger.warning("warning: no repeated blocks found in the model; pass --blocks CONTAINER to name them")
    return BlockMap((), "none", ())

