"""compress: ONNX/TensorRT deployment compressor (export, block scoring, depth pruning, build).

``import compress`` needs only numpy, onnx and onnxruntime; torch and tensorrt are
imported inside the functions that use them.
"""

from __future__ import annotations

from compress.blocks import Block, BlockMap, find_blocks
from compress.errors import CompressError

__version__ = "0.1.0"

__all__ = ["Block", "BlockMap", "CompressError", "__version__", "find_blocks"]
