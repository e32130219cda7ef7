"""Tiny seeded transformer families (diffusers and transformers), shared by tests and benchmarks.

Each builder returns a :class:`Family`: a torch module with an explicit ``forward`` (tensors
in, one tensor out: ``return_dict=False`` / ``use_cache=False`` handled inside), example
inputs (name -> tensor), the block container path(s) of the module tree, and a
``make_inputs(seed)`` that draws fresh inputs of the same shapes.

The wrappers are subclasses of the library classes that only replace ``forward``, so module
paths stay those of the library model (``transformer_blocks.3``, ``transformer.h.1``,
``model.layers.2``), which is what the ONNX node metadata and the block map name.

==========  ===========================================  ==============================================
family      class                                        containers (blocks)
==========  ===========================================  ==============================================
sana        diffusers SanaTransformer2DModel             ``transformer_blocks`` (6)
sd3         diffusers SD3Transformer2DModel (MMDiT)      ``transformer_blocks`` (6, joint: text + image)
flux        diffusers FluxTransformer2DModel             ``transformer_blocks`` (2 double-stream),
                                                         ``single_transformer_blocks`` (4)
pixart      diffusers PixArtTransformer2DModel           ``transformer_blocks`` (6)
dit         diffusers DiTTransformer2DModel              ``transformer_blocks`` (6)
gpt2        transformers GPT2LMHeadModel                 ``transformer.h`` (4)
llama       transformers LlamaForCausalLM                ``model.layers`` (4)
qwen2       transformers Qwen2ForCausalLM                ``model.layers`` (4)
==========  ===========================================  ==============================================

Sizes: 2 heads x 32 (width 64), 4-6 blocks. Every parameter is drawn from a seeded
generator (diffusers zero-initialises adaLN gates and output projections, which would make
every block an identity and every pruning test vacuous).

:func:`run_skipping` runs torch with one block replaced by the identity on its stream(s):
a block returning a tensor returns its ``hidden_states`` input; the joint/double-stream
blocks (``JointTransformerBlock``, ``FluxTransformerBlock``) and Flux's single-stream
block (which concatenates text and image inside) return ``(encoder_hidden_states,
hidden_states)`` -- read from diffusers' sources -- so both streams pass through
(a ``None`` output, the last SD3 block's text stream, stays ``None``).

diffusers and transformers are imported inside the builders; tests call
``pytest.importorskip("diffusers")`` first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Output order (stream input names) of the blocks that return a tuple of streams.
STREAM_OUTPUTS: dict[str, tuple[str, ...]] = {
    "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
}

BATCH = 2


@dataclass
class Family:
    """One tiny model of a family.

    Attributes:
        name: family name (``sana``, ``sd3``, ...).
        module: the wrapper (eval mode).
        inputs: example inputs, name -> tensor (``make_inputs(0)``).
        containers: block container paths, in execution order.
        make_inputs: fresh inputs of the same shapes from a seed.
        exporter: the exporter this family is exported with by default.
        dynamic: ``(input, axis, label)`` dynamic axes to export with (none by default).
    """

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    containers: tuple[str, ...]
    make_inputs: Callable[[int], dict[str, torch.Tensor]]
    exporter: str = "dynamo"
    dynamic: tuple[tuple[str, int, str], ...] = field(default_factory=tuple)

    def true_blocks(self) -> dict[str, int]:
        """Container path -> number of blocks in the module tree."""
        return {c: len(self.module.get_submodule(c)) for c in self.containers}


# --------------------------------------------------------------------------- weights


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Draw every parameter from a generator seeded with ``seed``; eval mode.

    Matrices get N(0, 1/fan_in); vectors named ``*weight`` (norm scales) 1 + N(0, 0.01);
    other vectors (biases, tables) N(0, 0.01).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _randn(shape: Sequence[int], g: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g)


# --------------------------------------------------------------------------- diffusers

#: Family -> (diffusers class name, tiny config). ``layers`` is filled in by the builders.
DIFFUSERS_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "sana": ("SanaTransformer2DModel", {
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 32, "num_layers": 6,
        "num_cross_attention_heads": 2, "cross_attention_head_dim": 32, "cross_attention_dim": 64,
        "caption_channels": 32, "sample_size": 8, "patch_size": 1}),
    "sd3": ("SD3Transformer2DModel", {
        "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 6, "attention_head_dim": 32,
        "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 64,
        "pooled_projection_dim": 16, "out_channels": 4, "pos_embed_max_size": 8}),
    "flux": ("FluxTransformer2DModel", {
        "in_channels": 16, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
        "axes_dims_rope": (8, 12, 12)}),
    "pixart": ("PixArtTransformer2DModel", {
        "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 4, "out_channels": 8, "num_layers": 6,
        "cross_attention_dim": 64, "sample_size": 8, "patch_size": 2, "caption_channels": 32}),
    "dit": ("DiTTransformer2DModel", {
        "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 4, "num_layers": 6, "sample_size": 8,
        "patch_size": 2, "num_embeds_ada_norm": 10}),
}


def _config(name: str, **overrides: Any) -> dict[str, Any]:
    return {**DIFFUSERS_CONFIGS[name][1], **overrides}


def save_diffusers(name: str, folder: Path, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """``save_pretrained`` the plain diffusers model of family ``name``; returns it.

    Same weights as ``build(name, seed=seed)`` when no config value is overridden
    (``num_layers=2`` etc. change the model).
    """
    import diffusers

    class_name, _ = DIFFUSERS_CONFIGS[name]
    m = randomise(getattr(diffusers, class_name)(**_config(name, **overrides)), seed)
    m.save_pretrained(str(folder))
    return m


def sana(*, seed: int = 0, layers: int = 6) -> Family:
    """``SanaTransformer2DModel``: linear attention + GLUMBConv, 8x8 latent, 8 caption tokens."""
    from diffusers import SanaTransformer2DModel

    class SanaForExport(SanaTransformer2DModel):
        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    timestep: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states, encoder_hidden_states, timestep, return_dict=False)[0]

    m = SanaForExport(**_config("sana", num_layers=layers))

    def make(s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + s)
        return {"hidden_states": _randn((BATCH, 4, 8, 8), g), "encoder_hidden_states": _randn((BATCH, 8, 32), g),
                "timestep": torch.rand((BATCH,), generator=g) * 1000}

    return Family("sana", randomise(m, seed), make(0), ("transformer_blocks",), make)


def sd3(*, seed: int = 0, layers: int = 6) -> Family:
    """``SD3Transformer2DModel`` (MMDiT): joint text/image blocks, the last one text-pre-only."""
    from diffusers import SD3Transformer2DModel

    class SD3ForExport(SD3Transformer2DModel):
        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    pooled_projections: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                   return_dict=False)[0]

    m = SD3ForExport(**_config("sd3", num_layers=layers))

    def make(s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(2000 + s)
        return {"hidden_states": _randn((BATCH, 4, 8, 8), g), "encoder_hidden_states": _randn((BATCH, 8, 32), g),
                "pooled_projections": _randn((BATCH, 16), g), "timestep": torch.rand((BATCH,), generator=g) * 1000}

    return Family("sd3", randomise(m, seed), make(0), ("transformer_blocks",), make)


def flux(*, seed: int = 0, double: int = 2, single: int = 4) -> Family:
    """``FluxTransformer2DModel``: double-stream then single-stream blocks; 2-D ``img_ids``/``txt_ids``.

    ``img_ids`` (16 x 3) and ``txt_ids`` (8 x 3) have no batch axis (diffusers' current API).
    """
    from diffusers import FluxTransformer2DModel

    class FluxForExport(FluxTransformer2DModel):
        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                    txt_ids: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                   img_ids, txt_ids, return_dict=False)[0]

    m = FluxForExport(**_config("flux", num_layers=double, num_single_layers=single))

    def make(s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(3000 + s)
        rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        img_ids = torch.stack([torch.zeros(16), rows.flatten().float(), cols.flatten().float()], dim=1)
        return {"hidden_states": _randn((BATCH, 16, 16), g), "encoder_hidden_states": _randn((BATCH, 8, 32), g),
                "pooled_projections": _randn((BATCH, 16), g), "timestep": torch.rand((BATCH,), generator=g),
                "img_ids": img_ids, "txt_ids": torch.zeros(8, 3)}

    return Family("flux", randomise(m, seed), make(0), ("transformer_blocks", "single_transformer_blocks"), make)


def pixart(*, seed: int = 0, layers: int = 6, exporter: str = "torchscript") -> Family:
    """``PixArtTransformer2DModel``: adaLN-single DiT with cross-attention, 8x8 latent.

    Exported with TorchScript by default: the dynamo export of diffusers 0.42's PixArt fails
    ``onnx.checker`` (a ``Squeeze`` of a 16-wide axis).
    """
    from diffusers import PixArtTransformer2DModel

    class PixArtForExport(PixArtTransformer2DModel):
        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    timestep: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states, encoder_hidden_states, timestep,
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                   return_dict=False)[0]

    m = PixArtForExport(**_config("pixart", num_layers=layers))

    def make(s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(4000 + s)
        return {"hidden_states": _randn((BATCH, 4, 8, 8), g), "encoder_hidden_states": _randn((BATCH, 8, 32), g),
                "timestep": torch.randint(0, 1000, (BATCH,), generator=g)}

    return Family("pixart", randomise(m, seed), make(0), ("transformer_blocks",), make, exporter=exporter)


def dit(*, seed: int = 0, layers: int = 6) -> Family:
    """``DiTTransformer2DModel``: class-conditional adaLN-zero DiT, 8x8 latent, 10 classes."""
    from diffusers import DiTTransformer2DModel

    class DiTForExport(DiTTransformer2DModel):
        def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states, timestep, class_labels, return_dict=False)[0]

    m = DiTForExport(**_config("dit", num_layers=layers))

    def make(s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(5000 + s)
        return {"hidden_states": _randn((BATCH, 4, 8, 8), g), "timestep": torch.randint(0, 1000, (BATCH,), generator=g),
                "class_labels": torch.randint(0, 10, (BATCH,), generator=g)}

    return Family("dit", randomise(m, seed), make(0), ("transformer_blocks",), make)


# --------------------------------------------------------------------------- transformers


def causal_lm_config(kind: str, *, layers: int = 4) -> Any:
    """A tiny transformers config: ``gpt2``, ``llama`` or ``qwen2`` (width 64, 2 heads, vocab 128)."""
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(n_layer=layers, n_head=2, n_embd=64, vocab_size=128, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    common = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    raise ValueError(f"unknown causal LM kind {kind!r}")


def causal_lm_module(kind: str, *, seed: int = 0, layers: int = 4) -> nn.Module:
    """The plain ``AutoModelForCausalLM.from_config`` model, seeded (for ``save_pretrained``)."""
    import transformers

    config = causal_lm_config(kind, layers=layers)  # use_cache stays at its default (True), as in real folders
    torch.manual_seed(seed)
    return randomise(transformers.AutoModelForCausalLM.from_config(config), seed)


def causal_lm(kind: str, *, seed: int = 0, layers: int = 4) -> Family:
    """GPT-2 / Llama / Qwen2 causal LM: ``forward(input_ids, attention_mask) -> logits`` (no cache)."""
    m = causal_lm_module(kind, seed=seed, layers=layers)
    base = type(m)

    def forward(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            return_dict=False)[0]

    m.__class__ = type(f"{base.__name__}ForExport", (base,), {"forward": forward})
    container = "transformer.h" if kind == "gpt2" else "model.layers"

    def make(s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(6000 + s)
        return {"input_ids": torch.randint(0, 128, (BATCH, 16), generator=g),
                "attention_mask": torch.ones(BATCH, 16, dtype=torch.int64)}

    return Family(kind, m.eval(), make(0), (container,), make)


def save_causal_lm(kind: str, folder: Path, *, seed: int = 0, layers: int = 4) -> nn.Module:
    """``save_pretrained`` a tiny seeded causal LM into ``folder`` (for ``hf:`` tests); returns it."""
    m = causal_lm_module(kind, seed=seed, layers=layers)
    m.save_pretrained(str(folder))
    return m


#: Family name -> builder (keyword arguments: seed).
BUILDERS: dict[str, Callable[..., Family]] = {
    "sana": sana, "sd3": sd3, "flux": flux, "pixart": pixart, "dit": dit,
    "gpt2": lambda **kw: causal_lm("gpt2", **kw), "llama": lambda **kw: causal_lm("llama", **kw),
    "qwen2": lambda **kw: causal_lm("qwen2", **kw),
}
DIFFUSERS = ("sana", "sd3", "flux", "pixart", "dit")
TRANSFORMERS = ("gpt2", "llama", "qwen2")


def build(name: str, **kw: Any) -> Family:
    """Build family ``name`` (see :data:`BUILDERS`)."""
    return BUILDERS[name](**kw)


def build_exporter(name: str) -> str:
    """The exporter family ``name`` is exported with by default (without building it)."""
    return "torchscript" if name == "pixart" else "dynamo"


# --------------------------------------------------------------------------- torch oracles


def _bound_inputs(block: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The block's call arguments by parameter name."""
    sig = inspect.signature(block.forward)
    return dict(sig.bind_partial(*args, **kwargs).arguments)


def identity_output(block: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], output: Any) -> Any:
    """What ``block`` returns when it is the identity on its stream(s) (see the module docstring)."""
    given = _bound_inputs(block, args, kwargs)
    order = STREAM_OUTPUTS.get(type(block).__name__)
    if order is not None:
        return tuple(None if out is None else given[name] for name, out in zip(order, output, strict=True))
    hidden = given.get("hidden_states", args[0] if args else None)
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):  # (hidden_states, extras...) of older transformers layers
        return (hidden, *output[1:])
    raise TypeError(f"cannot skip a {type(block).__name__} returning {type(output).__name__}")


def run(module: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``module(**inputs)`` without gradients."""
    with torch.no_grad():
        return module(**inputs)


def run_skipping(module: nn.Module, inputs: Mapping[str, torch.Tensor], container: str, index: int | Sequence[int]) -> torch.Tensor:
    """Torch output with block(s) ``container.index`` replaced by the identity on their stream(s)."""
    indices = [index] if isinstance(index, int) else list(index)
    handles = []
    for i in indices:
        block = module.get_submodule(f"{container}.{i}")
        handles.append(block.register_forward_hook(identity_output, with_kwargs=True))
    try:
        return run(module, inputs)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- export through compress


def export(family: Family, *, exporter: str | None = None, blocks: str | None = None, **config: Any) -> tuple[Any, Any, Any]:
    """Export ``family`` with :func:`compress.export.export`: ``(onnx model, block map, report)``.

    ``blocks`` defaults to none (the module-tree detection the CLI uses); pass
    ``",".join(family.containers)`` to name them.
    """
    from compress.export import DynamicAxis, ExportConfig, export

    cfg = ExportConfig(exporter=exporter or family.exporter, blocks=blocks,
                       dynamic=tuple(DynamicAxis(n, a, label) for n, a, label in family.dynamic), **config)
    exported, report = export(family.module, cfg, data=family.inputs)
    return exported.proto, exported.block_map, report


def ort_run(model: Any, inputs: Mapping[str, torch.Tensor]) -> list[Any]:
    """Run an ONNX model (proto) in ONNX Runtime on torch inputs; the outputs as numpy arrays."""
    from compress.runtime import make_session

    sess = make_session(model)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two flattened arrays/tensors (float64)."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
