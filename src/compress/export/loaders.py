"""Loading a ``MODEL`` string into a torch model, and example inputs from ``--input`` specs.

:func:`load_torch_model` dispatches on the kind of source (:func:`_model_kind`):
``package.module:callable`` and ``path/to/file.py:callable`` (user code: imported and
called; its exceptions, ``SystemExit`` included, become ModelError), ``hf:`` and
``diffusers:`` folders (:mod:`compress.export.hf`), and ``.pt2`` archives of
``torch.export`` (checked without unpickling by :func:`check_pt2_archive`, then loaded
with unpickling refused by :func:`_no_unpickling`, unless ``trust_code``). ``--weights``
are loaded strictly with ``torch.load(weights_only=True)``. Nothing is written; torch is
imported inside the functions.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from compress.errors import ConfigError, ModelError, TrustError
from compress.export.config import InputSpec, TorchModel
from compress.export.hf import _load_diffusers, _load_hf
from compress.export.messages import _first_line, _import_torch, _user_exception


def _model_kind(spec: str) -> str:
    """``hf``, ``diffusers``, ``pt2``, ``file`` or ``module``; ModelError for a MODEL that is none of them."""
    if spec.startswith("hf:"):
        return "hf"
    if spec.startswith("diffusers:"):
        return "diffusers"
    if spec.endswith(".pt2"):
        return "pt2"
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelError(
            f"MODEL {spec!r} is not package.module:callable, path/to/file.py:callable, hf:PATH, diffusers:PATH or a .pt2 file",
            hint="e.g. 'torchvision.models:resnet18', 'net.py:build', 'hf:./all-MiniLM-L6-v2' or 'model.pt2'",
        )
    return "file" if target.endswith(".py") or "/" in target or os.sep in target else "module"


def model_files(spec: str) -> tuple[Path, ...]:
    """Local files (or folder) that MODEL names: for the output-equals-input check."""
    kind = _model_kind(spec)
    if kind == "hf":
        return (Path(spec[3:]),)
    if kind == "diffusers":
        return (Path(spec.removeprefix("diffusers:")),)
    if kind == "pt2":
        return (Path(spec),)
    if kind == "file":
        return (Path(spec.rpartition(":")[0]),)
    return ()


def load_torch_model(spec: str, *, weights: str | os.PathLike[str] | None = None, verbose: bool = False,
                     trust_code: bool = False) -> TorchModel:
    """Load MODEL: ``package.module:callable``, ``path/to/file.py:callable``, ``hf:PATH``, ``diffusers:PATH`` or ``FILE.pt2``.

    A callable returns an ``nn.Module`` or ``(module, example_inputs)`` with example inputs a
    tuple of tensors or a dict name -> tensor. ``hf:PATH`` loads a local Hugging Face folder
    offline (``HF_HUB_OFFLINE=1`` while loading, restored afterwards) with
    ``transformers.AutoModelForCausalLM`` for causal LMs (output ``logits``) or
    ``transformers.AutoModel`` otherwise, ``use_cache`` off, and provides ``input_ids``,
    ``attention_mask`` (and ``token_type_ids`` where ``forward`` takes them and the config has
    a token-type embedding, ``type_vocab_size``), batch 2 x sequence 16, dynamic on both axes.
    ``diffusers:PATH`` loads a saved diffusers model folder offline, with a plain forward
    (:func:`diffusers_for_export`) and example inputs from its config
    (:func:`diffusers_example_inputs`). ``.pt2`` is a saved ``torch.export`` program; nothing in it
    is unpickled unless ``trust_code`` (see :func:`check_pt2_archive`).

    Exceptions raised by the user's code (importing the module or file, calling the
    callable) are reported as ModelError naming the callable, ``SystemExit`` included
    (so a callable that exits cannot make the command report success); only
    KeyboardInterrupt (Ctrl-C, SIGTERM) passes through.

    Args:
        spec: the MODEL string.
        weights: a state dict file (``torch.save(model.state_dict())``), loaded strictly.
        verbose: let torch/transformers print their own logs.
        trust_code: allow a ``.pt2`` archive with pickled payloads (unpickling runs code).

    Raises:
        ModelError: MODEL cannot be found, imported or called, returns no module, or the
            weights are not a checkpoint or do not fit.
        TrustError: a ``.pt2`` archive holds pickled payloads and ``trust_code`` is false.
    """
    kind = _model_kind(spec)
    _import_torch()
    if kind == "pt2":
        if weights is not None:
            raise ConfigError("--weights cannot be loaded into a saved torch.export program (.pt2)",
                              hint="the program holds its weights; export it again from the module with the weights loaded")
        return _load_pt2(spec, trust_code=trust_code)
    if kind == "hf":
        loaded = _load_hf(spec, verbose=verbose)
    elif kind == "diffusers":
        loaded = _load_diffusers(spec, verbose=verbose)
    else:
        loaded = _load_callable(spec, kind)
    if weights is not None:
        _load_weights(loaded.module, Path(weights))
    return loaded


#: Longest payload config (JSON) or sample-input member of a .pt2 archive that is read for the check.
_PT2_MAX_MEMBER = 64 << 20

_TRUST_HINT = ("unpickling runs code: pass --trust-code only for an archive you made or trust "
               "(or save the program again with plain tensors: torch.export.save)")


def check_pt2_archive(path: Path) -> None:
    """Refuse a ``.pt2`` archive that ``torch.export.load`` would unpickle, without unpickling anything.

    ``torch.export.load`` (``torch/export/pt2_archive/_package.py``,
    ``torch/_export/serde/serialize.py``) calls ``torch.load(weights_only=False)``,
    ``pickle.loads`` or ``torch._C._pickle_load_obj`` on: weights and constants whose
    payload config says ``use_pickle``; custom and opaque objects among the constants;
    legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` files; and the
    example inputs (``data/sample_inputs/<model>.pt``) when ``weights_only=True`` fails
    on them. Compiled AOTInductor code is native code. This function reads the zip's
    directory and payload configs (JSON) and loads the example inputs with
    ``torch.load(weights_only=True)``.

    Raises:
        ModelError: not a zip archive; TrustError: a payload would run code.
    """
    import io
    import json
    import zipfile

    import torch

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path} is not a saved torch.export program (torch.export.load fails with {type(exc).__name__})",
                         hint="write it with torch.export.save(torch.export.export(module, args), 'model.pt2')") from None
    with zf:
        infos = zf.infolist()
        for info in infos:
            parts = info.filename.split("/", 1)
            rel = parts[1] if len(parts) == 2 else parts[0]
            name = rel.rsplit("/", 1)[-1]
            why = None
            if rel.startswith("data/aotinductor/"):
                why = "compiled AOTInductor code"
            elif rel.startswith(("data/weights/", "data/constants/")) and name.endswith(".pt"):
                why = "a pickled (legacy format) weights or constants file"
            elif rel.startswith("data/constants/") and name.startswith(("custom_obj", "opaque_obj")):
                why = "a pickled custom object"
            elif rel.startswith(("data/weights/", "data/constants/")) and name.endswith("_config.json"):
                if info.file_size > _PT2_MAX_MEMBER:
                    why = f"a payload config of {info.file_size} bytes"
                else:
                    try:
                        config = json.loads(zf.read(info).decode("utf-8")).get("config", {})
                        pickled = sorted(k for k, v in config.items() if isinstance(v, dict) and v.get("use_pickle"))
                    except (ValueError, AttributeError, UnicodeDecodeError):
                        raise ModelError(f"{path}: {info.filename} is not a valid payload config",
                                         hint="save the program again with torch.export.save") from None
                    if pickled:
                        why = f"pickled tensors ({', '.join(pickled[:3])})"
            elif rel.startswith("data/sample_inputs/") and info.file_size:
                if info.file_size > _PT2_MAX_MEMBER:
                    why = f"example inputs of {info.file_size} bytes"
                else:
                    try:
                        torch.load(io.BytesIO(zf.read(info)), weights_only=True)
                    except Exception:  # translates torch.load(weights_only=True)'s refusal (UnpicklingError, ...)
                        why = "example inputs that torch.load(weights_only=True) refuses (a pickle of other objects)"
            if why is not None:
                raise TrustError(f"{path}: {info.filename} holds {why}; refusing to load it", hint=_TRUST_HINT)


@contextlib.contextmanager
def _no_unpickling() -> Iterator[None]:
    """While active, ``torch.load`` runs only with ``weights_only=True`` and plain unpickling raises.

    A second line of defence behind :func:`check_pt2_archive` for ``torch.export.load``
    (which falls back to ``weights_only=False``); restored on exit.
    """
    import pickle
    from unittest import mock

    import torch

    real_load = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            raise TrustError("torch.export.load asked to unpickle a payload", hint=_TRUST_HINT)
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TrustError("torch.export.load asked to unpickle an object", hint=_TRUST_HINT)

    with mock.patch.object(torch, "load", safe_load), mock.patch.object(pickle, "loads", refuse), \
            mock.patch.object(torch._C, "_pickle_load_obj", refuse, create=True):
        yield


def _load_pt2(spec: str, *, trust_code: bool = False) -> TorchModel:
    """``FILE.pt2``: a saved ``torch.export`` program, with its example inputs when it holds them."""
    import torch

    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", hint="check the path of the .pt2 file")
    if not trust_code:
        check_pt2_archive(path)
    with contextlib.nullcontext() if trust_code else _no_unpickling():
        try:
            program = torch.export.load(str(path))
        except TrustError as exc:  # raised by _no_unpickling's guards inside torch.export.load
            raise TrustError(f"{path}: {exc.message}; refusing to load it", hint=exc.hint) from None
        except Exception as exc:  # translates torch.export.load's errors (a damaged or foreign archive)
            raise ModelError(f"{path} is not a saved torch.export program (torch.export.load fails with "
                             f"{type(exc).__name__})",
                             hint="write it with torch.export.save(torch.export.export(module, args), 'model.pt2')") from None
    example = None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        example = dict(kwargs) if kwargs and not args else tuple(args)
    return TorchModel(program, example, "pt2", path.name, (), (path,))


def _load_callable(spec: str, kind: str) -> TorchModel:
    """``module:callable`` or ``file.py:callable``: import, then call (an ``nn.Module`` attribute is used as is)."""
    import torch

    target, _, attr = spec.rpartition(":")
    files: tuple[Path, ...]
    if kind == "file":
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}", hint="MODEL is path/to/file.py:callable; check the path")
        mod = _import_file(path)
        name, files = f"{path.name}:{attr}", (path,)
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as exc:
            raise ModelError(f"cannot import module {target!r} (MODEL {spec}): {_first_line(exc)}",
                             hint="install it or put its folder on PYTHONPATH, or pass path/to/file.py:callable") from None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # user code: SystemExit too
            raise ModelError(f"importing {target!r} failed: {_user_exception(exc)}",
                             hint="fix the error in the module") from None
        name, files = spec, ()
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = path.name if kind == "file" else target
            raise ModelError(f"{where} has no attribute {attr!r}",
                             hint="MODEL is module:callable where the callable returns an nn.Module") from None
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        result: Any = obj
    elif callable(obj):
        try:
            result = obj()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # user code: SystemExit too
            raise ModelError(f"calling {attr}() failed: {_user_exception(exc)}",
                             hint="the callable must build the model without arguments") from None
    else:
        raise ModelError(f"{attr} in {name.rpartition(':')[0]} is a {type(obj).__name__}, not a callable",
                         hint="MODEL is module:callable where the callable returns an nn.Module")
    example = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        result, example = result
        example = _check_example_inputs(example, f"{attr}()")
    if not isinstance(result, torch.nn.Module):
        raise ModelError(f"{attr}() returned {type(result).__name__}, not a torch.nn.Module",
                         hint="return an nn.Module, or a tuple (module, example_inputs)")
    return TorchModel(result.eval(), example, kind, name, (), files)


def _import_file(path: Path) -> Any:
    """Import ``path`` as module ``_compress_model_STEM`` with its folder on ``sys.path`` while it runs."""
    mod_name = "_compress_model_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path}: not a Python file", hint="MODEL is path/to/file.py:callable")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        sys.modules.pop(mod_name, None)
        raise
    except BaseException as exc:  # user code: SystemExit too
        sys.modules.pop(mod_name, None)
        raise ModelError(f"importing {path.name} failed: {_user_exception(exc)}",
                         hint="fix the error in the file") from None
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _check_example_inputs(example: Any, where: str) -> tuple[Any, ...] | dict[str, Any]:
    """``example`` as a tuple of tensors or a dict name -> tensor (a lone tensor becomes a 1-tuple); ModelError otherwise."""
    import torch

    if isinstance(example, torch.Tensor):
        return (example,)
    items: tuple[Any, ...] | dict[str, Any]
    if isinstance(example, Mapping):
        items = dict(example)
        bad = [k for k, v in items.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    elif isinstance(example, tuple | list):
        items = tuple(example)
        bad = [str(i) for i, v in enumerate(items) if not isinstance(v, torch.Tensor)]
    else:
        bad, items = ["?"], ()
    if bad or not items:
        raise ModelError(f"the example inputs of {where} must be a tuple of tensors or a dict name -> tensor "
                         f"(got {type(example).__name__})", hint="return (module, (tensor, ...)) or (module, {'x': tensor})")
    return items


def _load_weights(module: Any, path: Path) -> None:
    """Load the state dict in ``path`` into ``module`` (in place), strictly; ModelError naming what does not fit."""
    import torch

    if not path.is_file():
        raise ModelError(f"weights file not found: {path}", hint="check the --weights path")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # translates torch.load's errors (not a checkpoint, unsafe globals)
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsafe is not None:
            raise ModelError(f"--weights {path} holds a {unsafe.group(1)}, which torch.load(weights_only=True) refuses",
                             hint="save only the state dict: torch.save(model.state_dict(), path)") from None
        raise ModelError(f"--weights {path} is not a PyTorch checkpoint (torch.load fails with {type(exc).__name__})",
                         hint="pass a file written by torch.save(model.state_dict(), path)") from None
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), Mapping)), state)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--weights {path} does not hold a state dict (name -> tensor)",
                         hint="pass a file written by torch.save(model.state_dict(), path)")
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = [f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ModelError(f"--weights {path} does not fit the model: {'; '.join(parts)}",
                         hint="the checkpoint must be this model's state_dict (loaded strictly)")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), _first_line(exc))
        raise ModelError(f"--weights {path} does not fit the model: {detail}",
                         hint="the checkpoint must be this model's state_dict (loaded strictly)") from None


def make_example_inputs(specs: Sequence[InputSpec], *, seed: int = 0) -> dict[str, Any]:
    """Tensors for ``specs``, name -> tensor, in order.

    Floats are standard normal from a generator seeded with ``seed + position``; int inputs
    whose name contains ``mask`` are ones, ``*ids`` inputs (not ``token_type_ids``) are
    integers in [0, 100), other ints zeros; bools are True.
    """
    torch = _import_torch()
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"--input {dup!r} is given twice", hint="name each input once")
    out: dict[str, Any] = {}
    for i, s in enumerate(specs):
        dtype = getattr(torch, s.dtype)
        g = torch.Generator().manual_seed(seed + i)
        if dtype.is_floating_point:
            out[s.name] = torch.randn(s.shape, generator=g).to(dtype)
        elif dtype == torch.bool or "mask" in s.name:
            out[s.name] = torch.ones(s.shape, dtype=dtype)
        elif s.name.endswith("ids") and "type" not in s.name:
            out[s.name] = torch.randint(0, 100, s.shape, generator=g).to(dtype)
        else:
            out[s.name] = torch.zeros(s.shape, dtype=dtype)
    return out

