"""Precision and sparsity passes for ``compress build``: pure ONNX -> ONNX functions.

Each pass is ``pass(model, config) -> (model, PassReport)``; it copies the model and never
modifies its input. Weights stay on disk (external references of a model loaded by
:func:`compress.onnx_io.load_model`): a pass reads, transforms and writes back one tensor
at a time (:func:`compress.external.read_array` / :func:`~compress.external.array_tensor`)
and never serializes the whole model. Registered passes (:data:`PASSES`):

- ``fp16`` (:func:`fp16_pass`, :class:`Fp16Config`): FP32 -> FP16 by Cast insertion,
  FP32 kept where FP16 is unsafe;
- ``int8`` (:func:`int8_pass`, :class:`Int8Config`): explicit INT8 Q/DQ from calibration
  data with ONNX Runtime's static quantizer: symmetric int8 activations by default (what
  TensorRT 10+/11 needs), or uint8 activations (``activation_type="uint8"``: the form ONNX
  Runtime's x86 CPU kernels fuse into integer MatMuls);
- ``smoothquant`` (:func:`smoothquant_pass`, :class:`SmoothQuantConfig`): SmoothQuant's
  exact migration of activation outliers into the weights, before int8;
- ``sparsity-2:4`` (:func:`sparsity_pass`, :class:`SparsityConfig`): 2:4 structured
  sparsity of MatMul/Gemm/Conv weights along their input dimension.

:func:`measure_fidelity` compares a pass's output with its input on calibration batches.
:mod:`compress.passes.accuracy` gives int8 and 2:4 a fidelity target (``target``): local
error per node in one ORT pass, then the fewest nodes kept float / dense that meet it, or
``FidelityTargetError`` with the report of what was tried.

Helper modules (imports between them form a DAG: base <- qdq, nm, int8_reader <- int8_ort,
fp16_convert, fp16_ranges, sparse_calib, accuracy <- fp16, int8, smoothquant, sparsity):
:mod:`~compress.passes.qdq` (Q/DQ edits shared by int8 and its fidelity target),
:mod:`~compress.passes.int8_reader` / :mod:`~compress.passes.int8_ort` (ORT's calibration
reader and quantizer driver), :mod:`~compress.passes.fp16_convert` /
:mod:`~compress.passes.fp16_ranges` (ORT's float16 converter on external data, activation
ranges), :mod:`~compress.passes.nm` (2:4 mask arithmetic) and
:mod:`~compress.passes.sparse_calib` (Wanda / SparseGPT masks).
"""

from __future__ import annotations

from compress.passes.base import (
    PASSES,
    Pass,
    PassReport,
    get_pass,
    measure_fidelity,
    pass_names,
    register_pass,
)
from compress.passes.fp16 import Fp16Config, fp16_pass
from compress.passes.fp16_ranges import activation_ranges
from compress.passes.int8 import Int8Config, int8_pass
from compress.passes.int8_ort import CALIBRATION_METHODS
from compress.passes.nm import prune_2_4
from compress.passes.smoothquant import SmoothQuantConfig, smoothquant_pass
from compress.passes.sparsity import SparsityConfig, sparsity_pass

__all__ = [
    "CALIBRATION_METHODS",
    "PASSES",
    "Fp16Config",
    "Int8Config",
    "Pass",
    "PassReport",
    "SmoothQuantConfig",
    "SparsityConfig",
    "activation_ranges",
    "fp16_pass",
    "get_pass",
    "int8_pass",
    "measure_fidelity",
    "pass_names",
    "prune_2_4",
    "register_pass",
    "smoothquant_pass",
    "sparsity_pass",
]
