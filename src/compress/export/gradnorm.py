"""GradNorm of each block of a torch module on calibration batches: SGLP's own block importance.

SGLP (arXiv 2410.14720) ranks the blocks inside each CKA segment by GradNorm, computed
without fine-tuning. For block ``b`` with parameters ``theta_b`` and a loss ``L``,

    GradNorm(b) = sqrt( (1 / N) * sum over the N batches of sum_{p in theta_b} ||dL/dp||^2 )

in float64 (each gradient is squared and summed in float64). :func:`block_gradnorms`
computes it with the module in eval mode; ONNX Runtime gives no gradients, so this needs
the torch module (``compress export --calib``, ``compress prune --torch-source MODEL``).
The values go into the block map (:func:`compress.scoring.gradnorm.with_gradnorms`) and
the ``gradnorm`` metric reads them from there.

The loss (recorded as a sentence in :attr:`GradNormResult.loss`):

- labels given (a ``labels`` array in the batches that is not a ``forward`` argument, or
  ``labels=``): the task loss. Integer labels: cross-entropy of the first logits output
  (``[B, C]`` with labels ``[B]``, or ``[B, T, C]`` with ``[B, T]``, mean over all
  positions); float labels of the output's shape: mean squared error.
- no labels, logits among the outputs: cross-entropy against the unpruned model's own
  argmax (pseudo-labels). The distance of the output to the unpruned output is not used:
  at the unpruned model it is zero with a zero gradient, so it would score every block 0.
- no labels, no logits: a Hutchinson estimate of the output Jacobian. ``L = sum over the
  float outputs of <f(x), u>`` with ``u ~ N(0, I)`` (:class:`Hutchinson`: ``draws`` draws per
  batch, drawn from ``torch.Generator().manual_seed(seed)``; the squared norms are averaged
  over draws).
  ``E ||dL/dtheta_b||^2 = ||J_b||_F^2``, the squared Frobenius norm of the Jacobian of the
  batch's outputs with respect to the block's parameters: the output's sensitivity to them.

Deterministic for a seed (on the same hardware and torch build). The module is left as it
was found: its training flag and its parameters' ``requires_grad`` are restored and no
``.grad`` is written (gradients come from ``torch.autograd.grad``). torch is imported
inside the functions.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compress.errors import BlockError, CalibrationError, ConfigError, ModelError
from compress.export.messages import _import_torch, _user_exception
from compress.log import logger

#: Hutchinson draws per batch when the loss is label-free and the outputs are not logits.
DEFAULT_DRAWS = 4
#: The batch key that holds labels (when it is not an argument of ``forward``).
LABELS = "labels"


@dataclass(frozen=True)
class GradNormResult:
    """GradNorm of every block, and how it was computed.

    Attributes:
        values: block module path -> GradNorm (>= 0; 0 for a block without parameters).
        loss: the loss, a sentence (``cross-entropy vs labels (output 'logits')``, ...).
        batches: calibration batches used.
        samples: samples in them (axis 0 of the first input).
        seed: seed of the Hutchinson draws.
        draws: Hutchinson draws per batch (0 when the loss is not the Hutchinson one).
        seconds: wall time of the forward and backward passes.
    """

    values: Mapping[str, float]
    loss: str
    batches: int
    samples: int
    seed: int
    draws: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form: every field, ``values`` in block order, ``seconds`` rounded to ms."""
        return {"values": dict(self.values), "loss": self.loss, "batches": self.batches, "samples": self.samples,
                "seed": self.seed, "draws": self.draws, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class ModuleIO:
    """How the torch module's inputs and outputs are named: what the ONNX model exported from it tells.

    Every field is optional; ``ModuleIO()`` feeds every batch entry in the mapping's order
    and names the outputs as ``compress export`` does. A plain value: the names are not
    checked against the module.

    Attributes:
        input_names: the inputs to feed, in order (the batch entries named here; the others
            are left out); None = every entry, in the mapping's order.
        output_names: names of the module's output tensors, in order (the ONNX model's
            graph outputs; used when their number matches); None = the names
            ``compress export`` gives them (``output``, ``logits``, ``output_0``, ...).
        logits: output names that are logits (the ONNX model's
            :func:`compress.fidelity.logit_outputs`); None = outputs named like ``*logit*``;
            empty = none is (no pseudo-labels: the Hutchinson loss when there are no labels).
    """

    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    logits: Collection[str] | None = None


@dataclass(frozen=True)
class Hutchinson:
    """The random draws of the label-free Hutchinson loss (used only when there are no labels and no logits).

    ``draws`` must be an integer >= 1; :func:`block_gradnorms` checks it (ConfigError) before
    any work, whatever the loss turns out to be.

    Attributes:
        draws: Hutchinson draws ``u ~ N(0, I)`` per batch.
        seed: seed of the draws (``torch.Generator().manual_seed(seed)``), recorded in
            :attr:`GradNormResult.seed`.
    """

    draws: int = DEFAULT_DRAWS
    seed: int = 0


def _submodules(module: Any, paths: Sequence[str]) -> list[Any]:
    """The torch submodule of each block path; BlockError naming the first that is not one."""
    out = []
    for path in paths:
        try:
            out.append(module.get_submodule(path))
        except AttributeError:
            raise BlockError(f"block {path!r} of the block map is not a submodule of the torch module",
                             hint="GradNorm needs block names that are module paths (a map written by 'compress "
                                  "export', or --blocks CONTAINER); pass the torch module the ONNX model was "
                                  "exported from") from None
    return out


def _forward_names(module: Any) -> list[str]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _tensor(torch: Any, a: Any, device: Any) -> Any:
    """A numpy array (or tensor) as a torch tensor on ``device``; bfloat16 arrays via float32."""
    if isinstance(a, torch.Tensor):
        return a.to(device)
    arr = np.asarray(a)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device)


def output_leaves(obj: Any) -> list[tuple[str, Any]]:
    """Output tensors of torch, with names from their pytree path (``last_hidden_state``, ``output_0``).

    The names ``compress export`` gives the graph outputs (``output``, ``logits``).
    """
    import torch
    from torch.utils import _pytree

    flat, _ = _pytree.tree_flatten_with_path(obj)
    out: list[tuple[str, Any]] = []
    for path, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        name = "_".join(parts) if parts else "output"
        if name[:1].isdigit():
            name = "output_" + name
        name = re.sub(r"[^\w.]", "_", name)
        while name in {n for n, _ in out}:
            name += "_"
        out.append((name, leaf))
    return out


def _loss(outputs: list[tuple[str, Any]], labels: Any, logits: Collection[str] | None) -> tuple[Any, str]:
    """The loss of one batch and its description (labels given, or pseudo-labels); None for Hutchinson."""
    from torch.nn import functional

    named = [(n, t) for n, t in outputs if t.is_floating_point()]
    is_logit = [(n, t) for n, t in named if (n in logits if logits is not None else "logit" in n.lower())]
    if labels is not None:
        if is_logit:
            name, out = is_logit[0]
        elif len(named) == 1:
            name, out = named[0]
        else:
            raise ConfigError(f"labels given, but which of the outputs {', '.join(n for n, _ in named)} they are for "
                              "cannot be told (none is logits)",
                              hint="return one output, or name the logits output 'logits'")
        if not labels.is_floating_point():
            if out.dim() not in (2, 3) or tuple(labels.shape) != tuple(out.shape[:-1]):
                raise ConfigError(f"integer labels of shape {list(labels.shape)} do not fit output {name!r} of shape "
                                  f"{list(out.shape)} (cross-entropy needs [B] for [B, C], [B, T] for [B, T, C])",
                                  hint="give one class index per sample (or per token)")
            ce = functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1).long())
            return ce, f"cross-entropy vs labels (output {name!r})"
        if tuple(labels.shape) != tuple(out.shape):
            raise ConfigError(f"float labels of shape {list(labels.shape)} do not fit output {name!r} of shape "
                              f"{list(out.shape)}", hint="give float labels of the output's shape, or integer classes")
        return functional.mse_loss(out.float(), labels.float()), f"mean squared error vs labels (output {name!r})"
    if is_logit:
        name, out = is_logit[0]
        target = out.detach().argmax(dim=-1)
        ce = functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), target.reshape(-1))
        return ce, f"cross-entropy vs the unpruned model's argmax (pseudo-labels; output {name!r})"
    return None, ""


def block_gradnorms(
    module: Any,
    block_paths: Sequence[str],
    batches: Iterable[Mapping[str, Any]],
    *,
    labels: Sequence[Any] | None = None,
    io: ModuleIO | None = None,
    hutchinson: Hutchinson | None = None,
) -> GradNormResult:
    """GradNorm of each block (a submodule named by its module path) on ``batches`` (module docstring).

    Each batch is a mapping input name -> array (numpy or torch; leading batch axis), the
    calibration format of ONNX models exported by ``compress export``: it is passed by
    keyword when every name is an argument of ``forward``, else positionally (in
    ``io.input_names`` order when given, else in the mapping's order). A ``labels`` entry that
    is not a ``forward`` argument holds the batch's labels.

    Args:
        module: an ``nn.Module`` (or a ``torch.export.ExportedProgram``, unflattened first).
            Left as found (training flag, ``requires_grad``, ``.grad``).
        block_paths: module paths of the blocks (``blocks.3``; the block map's names).
        batches: calibration batches (iterated once).
        labels: one label array per batch (overrides ``labels`` entries in the batches).
        io: the module's input order, output names and logits outputs (:class:`ModuleIO`);
            None = ``ModuleIO()``.
        hutchinson: draws and seed of the label-free Hutchinson loss (:class:`Hutchinson`);
            None = ``Hutchinson()`` (4 draws, seed 0).

    Returns:
        A :class:`GradNormResult` (values in ``block_paths`` order).

    Raises:
        BlockError: a path is not a submodule of ``module``.
        ConfigError: ``hutchinson.draws`` < 1, or labels that fit no output.
        CalibrationError: no batches, or a non-finite loss or gradient.
        ModelError: ``forward`` fails on a batch, or returns no float tensor.
    """
    io = io if io is not None else ModuleIO()
    hutchinson = hutchinson if hutchinson is not None else Hutchinson()
    logits, input_names, output_names = io.logits, io.input_names, io.output_names
    draws, seed = hutchinson.draws, hutchinson.seed
    torch = _import_torch()
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"GradNorm draws {draws!r} must be an integer >= 1", hint="e.g. draws=4 (the default)")
    if isinstance(module, torch.export.ExportedProgram):
        module = torch.export.unflatten(module)
    subs = _submodules(module, block_paths)
    # Each block's parameters as positions into one flat list (a parameter shared by blocks counts in each).
    flat: list[Any] = []
    where: dict[int, int] = {}
    owned: list[list[int]] = []
    for sub in subs:
        idx = []
        for p in sub.parameters():
            if id(p) not in where:
                where[id(p)] = len(flat)
                flat.append(p)
            idx.append(where[id(p)])
        owned.append(idx)
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    names = _forward_names(module)
    was_training = module.training
    flags = [p.requires_grad for p in flat]
    sums = np.zeros(len(subs), dtype=np.float64)
    gen = torch.Generator().manual_seed(int(seed))
    loss_name: str | None = None
    used_draws = 0
    n_batches = n_samples = 0
    start = time.perf_counter()
    try:
        module.eval()
        for p in flat:
            p.requires_grad_(True)
        for i, batch in enumerate(batches):
            feed = dict(batch)
            in_batch = feed.pop(LABELS) if LABELS in feed and LABELS not in names else None
            if labels is not None and i >= len(labels):
                raise ConfigError(f"GradNorm: {len(labels)} label arrays for more calibration batches",
                                  hint="give one label array per batch")
            y = labels[i] if labels is not None else in_batch
            order = [n for n in input_names if n in feed] if input_names is not None else list(feed)
            tensors = {n: _tensor(torch, feed[n], device) for n in order}
            y_t = None if y is None else _tensor(torch, y, device)
            try:
                with torch.enable_grad():
                    result = module(**tensors) if names and all(n in names for n in tensors) else module(*tensors.values())
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # the user's forward: SystemExit too
                raise ModelError(f"GradNorm: the torch module fails on calibration batch {i}: {_user_exception(exc)}",
                                 hint="the calibration batches must fit the module's forward (the exported model's "
                                      "inputs)") from None
            outputs = output_leaves(result)
            if output_names is not None and len(output_names) == len(outputs):
                outputs = [(n, t) for n, (_, t) in zip(output_names, outputs, strict=True)]
            if not any(t.is_floating_point() for _, t in outputs):
                raise ModelError("GradNorm: the torch module returns no float tensor",
                                 hint="forward must return a float tensor, or a tuple/dict of them")
            loss, what = _loss(outputs, y_t, logits)
            per = np.zeros(len(subs), dtype=np.float64)
            if loss is not None:
                grads = [torch.autograd.grad(loss, flat, allow_unused=True)] if flat else [[]]
                what_draws = 0
            else:
                floats = [t for _, t in outputs if t.is_floating_point() and t.requires_grad]
                what = (f"Hutchinson: <f(x), u>, u ~ N(0, I), {draws} draws per batch, seed {seed} "
                        f"(all {len(floats)} float outputs)")
                grads = []
                for d in range(draws):
                    if not floats or not flat:
                        grads.append([None] * len(flat))
                        continue
                    dot = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=t.dtype)).sum()
                              for t in floats)
                    grads.append(torch.autograd.grad(dot, flat, retain_graph=d < draws - 1, allow_unused=True))
                what_draws = draws
            if loss is not None and not bool(torch.isfinite(loss.detach())):
                raise CalibrationError(f"GradNorm: the loss is {float(loss.detach())} on calibration batch {i}",
                                       hint="check the calibration data and the labels for NaN/Inf")
            for g in grads:
                sq = [0.0 if gi is None else float((gi.detach().double() ** 2).sum()) for gi in g]
                per += np.array([sum(sq[j] for j in idx) for idx in owned], dtype=np.float64)
            per /= len(grads)
            if not np.isfinite(per).all():
                raise CalibrationError(f"GradNorm: a gradient is not finite on calibration batch {i}",
                                       hint="check the calibration data and the labels for NaN/Inf")
            if loss_name is None:
                loss_name, used_draws = what, what_draws
            elif what != loss_name:
                raise CalibrationError(f"GradNorm: calibration batch {i} would use another loss ({what}) than the "
                                       f"first batches ({loss_name})", hint="give labels for every batch or none")
            sums += per
            n_batches += 1
            first = next(iter(tensors.values()), None)
            n_samples += int(first.shape[0]) if first is not None and first.dim() else 1
            del result, outputs, loss, grads
    finally:
        for p, f in zip(flat, flags, strict=True):
            p.requires_grad_(f)
        module.train(was_training)
    if n_batches == 0:
        raise CalibrationError("GradNorm: the calibration data has no batches", hint="pass at least one batch")
    values = {path: math.sqrt(float(s) / n_batches) for path, s in zip(block_paths, sums, strict=True)}
    seconds = time.perf_counter() - start
    logger.info("GradNorm of %d blocks on %d batches (%s) in %.1f s", len(values), n_batches, loss_name, seconds)
    assert loss_name is not None
    return GradNormResult(values, loss_name, n_batches, n_samples, int(seed), used_draws, seconds)


def block_map_with_gradnorms(module: Any, model: Any, block_map: Any, batches: Iterable[Mapping[str, Any]],
                             **options: Any) -> tuple[Any, GradNormResult]:
    """``(block_map with each block's GradNorm, result)`` for ONNX ``model`` exported from torch ``module``.

    :func:`block_gradnorms` with what the ONNX model tells: the block map's names as module
    paths, the model's (non-initializer) input order, its output names and its logits outputs
    (:func:`compress.fidelity.logit_outputs`) as its :class:`ModuleIO`; ``options`` go to
    :func:`block_gradnorms` (``labels``, ``hutchinson``); a calibration set with labels
    (:func:`compress.calibration.with_labels`: a ``labels`` array in every .npz file) gives
    them unless ``labels`` is passed. Used by ``compress export --calib`` and ``compress
    prune --torch-source``. Does not modify ``block_map`` or ``model``.
    """
    from compress.calibration import iter_labels
    from compress.fidelity import logit_outputs
    from compress.scoring.gradnorm import with_gradnorms

    if getattr(batches, "labels_key", None) is not None and "labels" not in options:
        options["labels"] = list(iter_labels(batches))  # type: ignore[arg-type]  # the files' labels arrays
    inits = {t.name for t in model.graph.initializer}
    io = ModuleIO(logits=logit_outputs(model), input_names=[i.name for i in model.graph.input if i.name not in inits],
                  output_names=[o.name for o in model.graph.output])
    result = block_gradnorms(module, [b.name for b in block_map.blocks], batches, io=io, **options)
    return with_gradnorms(block_map, result.values, result.loss), result
