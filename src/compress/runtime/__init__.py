"""The ONNX Runtime layer every stage shares: sessions, one batch at a time, extra outputs.

- :mod:`compress.runtime.session`: :func:`make_session` (a session from the graph, the
  weights read by ONNX Runtime from their files; ONNX Runtime's exceptions propagate),
  :func:`load_session` (the same, a model it cannot load being a BlockError),
  :func:`run_batch` (one calibration batch; a rejected feed is a CalibrationError naming
  the batch) and :func:`session_view` (what a session is made from).
- :mod:`compress.runtime.augment`: :func:`add_outputs` (a copy of a model with extra graph
  outputs).

Nothing here modifies the model it is given. ``import compress.runtime`` does not import
onnxruntime; making a session does. :mod:`compress.graph` imports
:mod:`compress.runtime.session` (never this package's root), so that :mod:`compress.runtime.augment`
may use :class:`compress.graph.GraphIndex` without an import cycle.
"""

from __future__ import annotations

from compress.runtime.augment import add_outputs
from compress.runtime.session import load_session, make_session, run_batch, session_view

__all__ = ["add_outputs", "load_session", "make_session", "run_batch", "session_view"]
