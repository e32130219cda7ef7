"""Models prepared for a run that reads intermediate tensors: extra graph outputs.

:func:`add_outputs` returns a copy of the model with named tensors appended as graph
outputs, so that one ONNX Runtime run yields them beside the model's own outputs (block
boundaries for scoring, calibration statistics for the passes). The copy shares nothing
with the input: ``model`` is not modified.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from compress.errors import BlockError
from compress.graph import GraphIndex


def add_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the tensors ``names`` appended as graph outputs.

    Tensors that already are graph outputs are not added twice. Output types come from
    shape inference where known (element type only otherwise). Does not modify ``model``.

    Raises:
        BlockError: a name that is neither produced by a node nor a graph input.
    """
    index = GraphIndex(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in dict.fromkeys(names):
        if name in existing:
            continue
        if name not in index.producer and name not in index.graph_inputs:
            raise BlockError(f"tensor {name!r} is not produced in the graph", hint="the block map does not fit this model")
        t = index.type_of(name)
        elem = onnx.TensorProto.FLOAT if t is None else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        existing.add(name)
    return out
