"""What a model costs: parameters, and ONNX Runtime latency (the whole model and each block alone).

Times are CPU ONNX Runtime latencies in milliseconds (:func:`compress.bench.measure`;
median and p90 over the timed runs). One session exists at a time. Nothing here modifies
a model or touches files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from compress.bench import BenchConfig, Timing, measure
from compress.blocks import Block, BlockMap
from compress.graph import GraphIndex
from compress.runtime import add_outputs, load_session


def _params(model: onnx.ModelProto) -> int:
    index = GraphIndex(model)
    return index.params_of(index.keys)


def time_model(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], config: BenchConfig) -> Timing:
    """CPU ORT latency of ``model`` on one feed, every graph output fetched (:func:`compress.bench.measure`).

    Raises:
        BlockError: ORT cannot load the model.
    """
    sess = load_session(model, providers=("CPUExecutionProvider",))
    names = [o.name for o in model.graph.output]
    return measure(lambda: sess.run(names, dict(feed)), config)


def block_times(model: onnx.ModelProto, block_map: BlockMap, feed: Mapping[str, np.ndarray],
                config: BenchConfig) -> dict[int, float]:
    """Median ORT latency (ms) of each removable block run alone (its subgraph cut out with gs)."""
    import onnx_graphsurgeon as gs

    blocks = [b for b in block_map.blocks if b.removable]
    needed = list(dict.fromkeys(t for b in blocks for t in _block_inputs(b)))
    index = GraphIndex(model)
    needed = [t for t in needed if t not in index.graph_inputs]
    sess = load_session(add_outputs(model, needed), providers=("CPUExecutionProvider",))
    values = dict(feed)
    if needed:
        values.update(zip(needed, sess.run(needed, dict(feed)), strict=True))
    del sess  # one session at a time: each holds (or maps) the weights it runs
    times: dict[int, float] = {}
    for b in blocks:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        graph = gs.import_onnx(copy)
        tensors = graph.tensors()
        ins = [tensors[t] for t in _block_inputs(b)]
        for t in ins:
            t.inputs.clear()
            if t.dtype is None or t.shape is None:
                arr = np.asarray(values[t.name])
                t.to_variable(dtype=arr.dtype, shape=list(arr.shape))
        graph.inputs = ins
        graph.outputs = [tensors[t] for t in b.stream_outputs]
        graph.cleanup().toposort()
        sub = gs.export_onnx(graph, do_type_check=False)
        sub_feed = {t: values[t] for t in _block_inputs(b)}
        times[b.index] = time_model(sub, sub_feed, config).median_ms
    return times


def _block_inputs(b: Block) -> list[str]:
    """Every tensor block ``b`` reads from outside: its stream inputs, then its side inputs."""
    return list(dict.fromkeys([*b.stream_inputs, *b.side_inputs]))


def _latency(model: onnx.ModelProto, pruned: onnx.ModelProto, block_map: BlockMap, removed: Sequence[Block],
             feed: Mapping[str, np.ndarray], config: BenchConfig) -> dict[str, Any]:
    """The ``latency`` report section: both models timed, the speedup, and the ideal one from the block times."""
    base = time_model(model, feed, config)
    new = time_model(pruned, feed, config)
    per_block = block_times(model, block_map, feed, config) if removed else {}
    removed_ms = sum(per_block.get(b.index, 0.0) for b in removed)
    # The ideal is undefined when the removed blocks, each timed alone, take at least the whole
    # model's time (per-call overhead dominates tiny models): reported as None, not as a huge ratio.
    ideal: float | None = 1.0
    if removed:
        ideal = base.median_ms / (base.median_ms - removed_ms) if removed_ms < base.median_ms else None
    measured = base.median_ms / new.median_ms
    return {
        "provider": "CPUExecutionProvider",
        "original": base.to_dict(), "pruned": new.to_dict(),
        "speedup_median": measured, "speedup_p90": base.p90_ms / new.p90_ms,
        "block_ms": {str(k): v for k, v in per_block.items()},
        "ideal_speedup": ideal,
        "efficiency": (measured - 1) / (ideal - 1) if ideal is not None and ideal > 1.0001 else None,
        "efficiency_ratio": measured / ideal if ideal is not None else None,
    }
