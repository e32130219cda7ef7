"""Hugging Face sources of ``compress export``: ``hf:FOLDER`` (transformers) and ``diffusers:FOLDER``.

Both load a local folder offline (``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` while
loading, both restored afterwards, on failure too: :func:`_hub_offline`); nothing is
downloaded. The loaded model gets a plain ``forward`` over tensors only
(:func:`plain_forward`: no cache or non-tensor arguments for the exporters to trace) and
seeded example inputs. transformers and diffusers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from compress.errors import MissingDependencyError, ModelError
from compress.export.config import DynamicAxis, TorchModel
from compress.export.exporters import quiet
from compress.export.messages import _first_line

#: ``architectures`` suffixes in a Hugging Face config.json that mark a causal (decoder) LM.
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` while active; restore both on exit."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    try:
        os.environ.update({k: "1" for k in saved})
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_causal_lm(config: Any) -> bool:
    """Whether a transformers config describes a causal LM (``architectures`` ends in ``ForCausalLM``/``LMHeadModel``)."""
    return any(str(a).endswith(_CAUSAL_LM_SUFFIXES) for a in (getattr(config, "architectures", None) or ()))


def _load_hf(spec: str, *, verbose: bool) -> TorchModel:
    """``hf:FOLDER``: a local transformers folder, loaded offline, exported as a plain forward.

    Causal LMs (config ``architectures`` ``*ForCausalLM`` / ``*LMHeadModel``) load with
    ``AutoModelForCausalLM`` and get a plain ``forward(input_ids, attention_mask)`` returning
    ``{"logits": ...}`` (:func:`plain_forward`: no cache or int arguments for the exporters
    to trace); other models load with ``AutoModel``.
    ``use_cache`` is switched off (no ``DynamicCache`` in the outputs, which the dynamo
    exporter cannot return). The offline environment variables are restored afterwards.
    """
    import torch

    path = Path(spec[3:])
    if not (path / "config.json").is_file():
        what = "Hugging Face model folder not found:" if not path.is_dir() else "no config.json in Hugging Face model folder"
        raise ModelError(f"{what} {path}",
                         hint="hf: takes a local Hugging Face model folder (with config.json); nothing is downloaded")
    with _hub_offline():  # huggingface_hub reads HF_HUB_OFFLINE when first imported
        try:
            import transformers
        except ImportError:
            raise MissingDependencyError("transformers", purpose="hf: models", extra="hf") from None
        with quiet(not verbose):
            try:
                config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            except Exception as exc:  # translates transformers.AutoConfig.from_pretrained's errors
                raise _hf_load_error(path, exc) from None
            causal = is_causal_lm(config)
            auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
            try:
                module = auto.from_pretrained(str(path), local_files_only=True)
            except Exception as exc:  # translates transformers' AutoModel*.from_pretrained errors
                raise _hf_load_error(path, exc) from None
    if hasattr(module.config, "use_cache"):
        module.config.use_cache = False  # a plain forward: no key/value cache among the outputs
    module.eval()
    params = inspect.signature(module.forward).parameters
    # GPT-2's forward takes token_type_ids too, but adds their *word* embeddings: only models
    # with a token-type embedding (type_vocab_size, BERT-like) get them.
    typed = "token_type_ids" in params and int(getattr(module.config, "type_vocab_size", 0) or 0) > 0
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if typed else [])
    if causal:  # forward(input_ids, attention_mask[, token_type_ids]) -> {"logits"}: no int/cache arguments traced
        module = plain_forward(module, names, {"use_cache": False, "return_dict": True},
                              lambda out: {"logits": out.logits})
    vocab = int(getattr(module.config, "vocab_size", 1000) or 1000)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, min(vocab, 1000), (2, 16), generator=g, dtype=torch.int64),
        "attention_mask": torch.ones(2, 16, dtype=torch.int64),
        "token_type_ids": torch.zeros(2, 16, dtype=torch.int64),
    }
    example = {n: inputs[n] for n in names}
    dynamic = tuple(DynamicAxis(n, a, label) for n in names for a, label in ((0, "batch"), (1, "sequence")))
    return TorchModel(module, example, "hf", f"hf:{path.resolve().name}", dynamic, (path,))


def _hf_load_error(path: Path, exc: Exception) -> ModelError:
    """The ModelError for a transformers folder that ``from_pretrained`` cannot load."""
    return ModelError(f"cannot load the Hugging Face model in {path}: {_first_line(exc)}",
                      hint="the folder needs config.json and the weights (model.safetensors or pytorch_model.bin)")


#: Non-tensor arguments passed to every diffusers model (besides ``return_dict=False``).
_DIFFUSERS_FIXED = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
#: Largest latent side of the derived example inputs (a real model's ``sample_size`` is 64-128).
_DIFFUSERS_MAX_SIDE = 32


def _tensor_params(forward: Any) -> list[str]:
    """Parameters of a diffusers ``forward`` annotated as a (optional) tensor, in order."""
    names = []
    for p in inspect.signature(forward).parameters.values():
        text = str(p.annotation)
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _DIFFUSERS_FIXED or p.name == "return_dict":
            continue
        if "Tensor" in text and not any(w in text for w in ("list", "tuple", "dict", "List", "Tuple", "Dict")):
            names.append(p.name)
    return names


def diffusers_example_inputs(module: Any, *, batch: int = 2, text_tokens: int = 8) -> dict[str, Any]:
    """Example inputs of a diffusers transformer, derived from its config and ``forward``.

    For each tensor parameter of ``forward`` that the config can size (others are left out):

    - ``hidden_states``: ``(batch, in_channels, S, S)`` with ``S = min(sample_size, 32)``
      rounded down to a multiple of ``patch_size``; a model without ``sample_size`` whose
      forward takes ``img_ids`` (Flux) gets packed tokens ``(batch, 16, in_channels)``.
    - ``encoder_hidden_states``: ``(batch, 8, D)``, D = ``joint_attention_dim``,
      ``caption_channels`` or ``cross_attention_dim`` (the first the config has).
    - ``pooled_projections``: ``(batch, pooled_projection_dim)``; ``timestep``: ``(batch,)``
      floats in [0, 1000) ([0, 1) for Flux, which scales by 1000 itself; int64 when the model
      embeds classes); ``class_labels``:
      ``(batch,)`` in [0, num_embeds_ada_norm); ``guidance``: ``(batch,)`` when
      ``guidance_embeds``; ``img_ids``/``txt_ids``: 2-D ``(tokens, 3)`` position ids (no
      batch axis, diffusers' current Flux API).

    Floats come from a generator seeded with 0. Raises ModelError when ``hidden_states``
    cannot be sized (pass ``--input`` then).
    """
    import torch

    cfg = dict(module.config)
    params = getattr(type(module), "export_inputs", None) or _tensor_params(type(module).forward)
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    channels = cfg.get("in_channels")
    if channels is None or "hidden_states" not in params:
        raise ModelError(f"cannot derive example inputs for {type(module).__name__}: its config has no in_channels "
                         "or its forward no hidden_states", hint="pass every input with --input NAME:SHAPE[:DTYPE]")
    tokens = 16
    if cfg.get("sample_size") is None and "img_ids" in params:
        out["hidden_states"] = torch.randn(batch, tokens, channels, generator=g)
    else:
        sample = cfg.get("sample_size") or _DIFFUSERS_MAX_SIDE
        sample = sample[0] if isinstance(sample, list | tuple) else sample
        patch = int(cfg.get("patch_size") or 1)
        side = max(patch, min(int(sample), _DIFFUSERS_MAX_SIDE) // patch * patch)
        out["hidden_states"] = torch.randn(batch, channels, side, side, generator=g)
    text_dim = next((cfg[k] for k in ("joint_attention_dim", "caption_channels", "cross_attention_dim") if cfg.get(k)), None)
    if "encoder_hidden_states" in params and text_dim:
        out["encoder_hidden_states"] = torch.randn(batch, text_tokens, int(text_dim), generator=g)
    if "pooled_projections" in params and cfg.get("pooled_projection_dim"):
        out["pooled_projections"] = torch.randn(batch, int(cfg["pooled_projection_dim"]), generator=g)
    classes = cfg.get("num_embeds_ada_norm") if "class_labels" in params else None
    if "timestep" in params:
        scale = 1.0 if "img_ids" in params else 1000.0  # Flux multiplies its timestep by 1000 itself
        out["timestep"] = (torch.randint(0, 1000, (batch,), generator=g) if classes
                           else torch.rand(batch, generator=g) * scale)
    if classes:
        out["class_labels"] = torch.randint(0, int(classes), (batch,), generator=g)
    if "guidance" in params and cfg.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5)
    if "img_ids" in params and out["hidden_states"].dim() == 3:
        side = int(math.isqrt(tokens))
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        out["img_ids"] = torch.stack([torch.zeros(tokens), rows.flatten().float(), cols.flatten().float()], dim=1)
    if "txt_ids" in params:
        out["txt_ids"] = torch.zeros(text_tokens, 3)
    return out


def plain_forward(module: Any, names: Sequence[str], fixed: Mapping[str, Any], pick: Callable[[Any], Any]) -> Any:
    """Replace ``module``'s class (in place) by a subclass with a plain ``forward(*names)``.

    The new ``forward`` takes ``names`` (all optional, by name or position), calls the
    original with the given ones plus ``fixed`` (non-tensor arguments such as
    ``return_dict=False``) and returns ``pick(output)``. The class keeps its name and module
    paths are unchanged (``transformer_blocks.0``); it lists ``names`` in ``export_inputs``.
    """
    base = type(module)
    original = base.forward
    names = tuple(names)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = dict(zip(names, args, strict=False))  # fewer positional args than names is fine
        bound.update(kwargs)
        return pick(original(self, **{k: v for k, v in bound.items() if v is not None}, **fixed))

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names])
    forward.__doc__ = f"{base.__name__}.forward({', '.join(names)}) with {', '.join(f'{k}=...' for k in fixed)}."
    module.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                                     "export_inputs": names})
    return module


def diffusers_for_export(module: Any) -> Any:
    """Give a diffusers model a plain ``forward``: tensors in by name, the sample tensor out.

    :func:`plain_forward` over the tensor parameters of the original (:func:`_tensor_params`),
    called with ``return_dict=False`` (and ``added_cond_kwargs`` of no extra conditions
    where the model takes it), returning the first element.
    """
    original = type(module).forward
    takes = set(inspect.signature(original).parameters)
    fixed = {**{k: v for k, v in _DIFFUSERS_FIXED.items() if k in takes}, "return_dict": False}
    return plain_forward(module, _tensor_params(original), fixed, lambda out: out[0] if isinstance(out, tuple) else out)


def _load_diffusers(spec: str, *, verbose: bool) -> TorchModel:
    """``diffusers:FOLDER``: a model saved with diffusers' ``save_pretrained`` (config.json with ``_class_name``)."""
    import json

    path = Path(spec.removeprefix("diffusers:"))
    hint = "diffusers: takes a folder written by a diffusers model's save_pretrained (config.json with _class_name)"
    config_path = path / "config.json"
    if not config_path.is_file():
        what = "diffusers model folder not found:" if not path.is_dir() else "no config.json in diffusers model folder"
        raise ModelError(f"{what} {path}", hint=hint)
    try:
        class_name = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, OSError, AttributeError) as exc:
        raise ModelError(f"{config_path.name} in {path.name} is not a JSON object: {_first_line(exc)}", hint=hint) from None
    if not isinstance(class_name, str) or not class_name:
        raise ModelError(f"{config_path.name} in {path.name} has no _class_name", hint=hint)
    with _hub_offline():  # huggingface_hub reads HF_HUB_OFFLINE when first imported
        try:
            import diffusers
        except ImportError:
            raise MissingDependencyError("diffusers", purpose="diffusers: models", extra="diffusers") from None
        cls = getattr(diffusers, class_name, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
            raise ModelError(f"{path.name}: _class_name {class_name!r} is not a diffusers model class "
                             f"(diffusers {diffusers.__version__})", hint=hint)
        with quiet(not verbose):
            try:
                module = cls.from_pretrained(str(path), local_files_only=True)
            except Exception as exc:  # translates diffusers' ModelMixin.from_pretrained errors
                raise ModelError(f"cannot load the diffusers model in {path.name}: {_first_line(exc)}",
                                 hint="the folder needs config.json and the weights "
                                      "(diffusion_pytorch_model.safetensors)") from None
    module = diffusers_for_export(module.eval())
    example = diffusers_example_inputs(module)
    return TorchModel(module, example, "diffusers", f"diffusers:{path.resolve().name}", (), (path,))

