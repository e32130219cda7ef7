"""The layout check of a saved block map (``MODEL.blocks.json``): types and order of every field.

Only the shape of the data is checked here; :meth:`compress.blocks.BlockMap.from_dict` and
its callers check it against the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from compress.errors import ModelError
from compress.validate import shown

#: ``schema_version`` values of block maps this version reads.
READABLE_BLOCK_MAP_SCHEMAS = (1, 2)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_gradnorm(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0)


def _is_shape(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(d is None or isinstance(d, str) or (_is_int(d) and d >= 0) for d in v))


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_BLOCK_FIELDS: dict[str, tuple[Any, str, bool]] = {  # field: (check, expected, required)
    "index": (_is_int, "an integer", True),
    "name": (_is_str, "a string", True),
    "nodes": (_is_str_list, "a list of node names", True),
    "removable": (lambda v: isinstance(v, bool), "true or false", True),
    "input": (_is_opt_str, "a tensor name or null", False),
    "output": (_is_opt_str, "a tensor name or null", False),
    "side_inputs": (_is_str_list, "a list of tensor names", False),
    "params": (lambda v: _is_int(v) and v >= 0, "an integer >= 0", False),
    "shape": (_is_shape, "a list of dims (integers, names or null) or null", False),
    "dtype": (_is_opt_str, "a type name or null", False),
    "reason": (_is_opt_str, "a string or null", False),
    "streams": (lambda v: v is None or isinstance(v, list), "a list of streams", False),
    "gradnorm": (_is_gradnorm, "a finite number >= 0 or null", False),
}
_STREAM_FIELDS: dict[str, tuple[Any, str, bool]] = {
    "name": (_is_str, "a string", True),
    "input": (_is_str, "a tensor name", True),
    "output": (_is_str, "a tensor name", True),
    "shape": (_is_shape, "a list of dims (integers, names or null) or null", False),
    "dtype": (_is_opt_str, "a type name or null", False),
}


def check_block_map(data: Any, *, source: str) -> None:
    """A block map read from JSON (``MODEL.blocks.json``) has the documented layout and types.

    Checks the shape of the data only (the caller checks it against the model): a mapping
    with ``blocks``, a list of mappings with the fields of :class:`compress.blocks.Block`
    of the right types, block ``i`` having ``index`` i. The GradNorm fields are optional
    (``blocks[i].gradnorm``: a finite number >= 0 or null; ``gradnorm_loss``: a string or
    null), so maps written before them stay readable.

    Raises:
        ModelError: naming ``source`` (the file) and the field, e.g. ``blocks[2].index``.
    """
    hint = "re-create it with 'compress export' or 'compress inspect --write-blocks', or delete it"

    def bad(where: str, problem: str) -> ModelError:
        return ModelError(f"{source} is not a valid block map: {where}: {problem}", hint=hint)

    if not isinstance(data, Mapping):
        raise bad("the top level", f"must be a mapping with 'schema_version' and 'blocks', got {_kind(data)}")
    if data.get("schema_version") not in READABLE_BLOCK_MAP_SCHEMAS:
        raise bad("schema_version", f"is {shown(data.get('schema_version'), 40)}, expected "
                                    f"{' or '.join(map(str, READABLE_BLOCK_MAP_SCHEMAS))} (not a compress block map?)")
    blocks = data.get("blocks")
    if not isinstance(blocks, list):
        raise bad("blocks", f"must be a list of blocks, got {_kind(blocks)}")
    containers = data.get("containers", [])
    if not _is_str_list(containers):
        raise bad("containers", f"must be a list of module paths, got {_kind(containers)}")
    if not _is_opt_str(data.get("source")):
        raise bad("source", f"must be a string, got {_kind(data.get('source'))}")
    if not _is_opt_str(data.get("gradnorm_loss")):
        raise bad("gradnorm_loss", f"must be a string or null, got {_kind(data.get('gradnorm_loss'))}")
    for i, b in enumerate(blocks):
        _check_fields(b, _BLOCK_FIELDS, f"blocks[{i}]", bad)
        if b["index"] != i:
            raise bad(f"blocks[{i}].index", f"is {b['index']}; block {i} of {len(blocks)} must have index {i} "
                                            f"(blocks are listed in order, indices 0..{len(blocks) - 1})")
        for j, s in enumerate(b.get("streams") or []):
            _check_fields(s, _STREAM_FIELDS, f"blocks[{i}].streams[{j}]", bad)


def _check_fields(d: Any, spec: Mapping[str, tuple[Any, str, bool]], where: str, bad: Any) -> None:
    if not isinstance(d, Mapping):
        raise bad(where, f"must be a mapping, got {_kind(d)}")
    for key, (ok, expected, required) in spec.items():
        if key not in d:
            if required:
                raise bad(f"{where}.{key}", "is missing")
            continue
        if not ok(d[key]):
            raise bad(f"{where}.{key}", f"must be {expected}, got {shown(d[key], 60)}")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {list: "a list", dict: "a mapping", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)
