"""compress.config: one declaration per field drives the pipeline key, the flag and the default."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from compress.config import add_arguments, from_args, option, read_section, settings
from compress.errors import ConfigError
from compress.registry import Registry
from compress.validate import Interval, check_int

TOOLS: Registry = Registry("tool")
TOOLS.register("hammer")(object)
TOOLS.register("saw")(object)


def _shape(text: str) -> None:
    if ":" not in text:
        raise ConfigError(f"--shape {text!r}: expected NAME:DIMS", hint="e.g. x:1x3")


@dataclass(frozen=True, kw_only=True)
class Toy:
    precision: str = option("fp32", help="precision", choices=("fp32", "fp16"))
    tool: str = option("hammer", help="from a registry", choices=TOOLS.names)
    iterations: int = option(10, help="timed runs", minimum=1)
    target: float | None = option(0.99, help="F or none", none_word="none", metavar="F|none")
    exclude: tuple[str, ...] = option((), help="names", split=True)
    shapes: tuple[str, ...] = option((), help="NAME:DIMS", repeat=True, parse=_shape, parse_hint="write NAME:DIMS",
                                     flag="--shape")
    fast: bool = option(False, help="go fast")
    internal: int = 3

    def __post_init__(self) -> None:
        check_int("Toy", "iterations", self.iterations, within=Interval(high=100), example="10")


def _read(data: object) -> Toy:
    return read_section(Toy, data, source="p.yaml", section="toy", hint="see the docs")


def test_defaults_exist_once_on_the_dataclass() -> None:
    assert _read({}) == Toy()
    assert _read(None) == Toy()
    parser = argparse.ArgumentParser()
    add_arguments(Toy, parser)
    assert from_args(Toy, parser.parse_args([])) == Toy()
    assert [s.name for s in settings(Toy)] == ["precision", "tool", "iterations", "target", "exclude", "shapes", "fast"]


def test_section_values_are_typed_and_converted() -> None:
    toy = _read({"precision": "fp16", "tool": "saw", "iterations": 5, "target": "none", "exclude": "a, b,",
                 "shapes": ["x:1"], "fast": True})
    assert toy == Toy(precision="fp16", tool="saw", iterations=5, target=None, exclude=("a", "b"), shapes=("x:1",),
                      fast=True)
    assert _read({"target": 1}).target == 1.0


@pytest.mark.parametrize(("data", "message", "hint"), [
    ({"precison": "fp16"}, "p.yaml: unknown key 'precison' in section 'toy'; valid keys: exclude, fast, iterations, "
                           "precision, shapes, target, tool", "did you mean 'precision'?"),
    ({"internal": 4}, "p.yaml: unknown key 'internal' in section 'toy'", "see the docs"),
    ({"precision": "int4"}, "p.yaml: toy.precision: 'int4' is not one of fp32, fp16", "e.g. precision: fp32"),
    ({"tool": "drill"}, "p.yaml: toy.tool: 'drill' is not one of hammer, saw", "e.g. tool: hammer"),
    ({"precision": 16}, "p.yaml: toy.precision: expected a string, got 16", 'quote the value in YAML, e.g. sparsity: "2:4"'),
    ({"iterations": 0}, "p.yaml: toy.iterations: must be at least 1, got 0", "e.g. iterations: 1"),
    ({"iterations": True}, "p.yaml: toy.iterations: expected an integer, got True", "e.g. iterations: 1"),
    ({"iterations": 500}, "p.yaml: toy.iterations = 500: must be <= 100", "e.g. iterations: 10"),
    ({"target": float("nan")}, "p.yaml: toy.target: must be a finite number, got nan", "e.g. target: 1"),
    ({"shapes": ["x"]}, "p.yaml: toy.shapes: 'x': expected NAME:DIMS", "write NAME:DIMS"),
    ({"fast": "yes"}, "p.yaml: toy.fast: expected true or false, got 'yes'", "e.g. fast: true (YAML booleans are unquoted)"),
    ([1], "p.yaml: section 'toy' must be a mapping (key: value), got a list", "see the docs"),
])
def test_section_errors_name_the_file_section_and_key(data: object, message: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        _read(data)
    assert info.value.message.startswith(message), info.value.message
    assert info.value.hint == hint


def test_flags_come_from_the_fields() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(Toy, parser)
    args = parser.parse_args(["--precision", "fp16", "--tool", "saw", "--iterations", "7", "--target", "none",
                              "--exclude", "a,b", "--shape", "x:1", "--shape", "y:2", "--fast"])
    assert from_args(Toy, args) == Toy(precision="fp16", tool="saw", iterations=7, target=None, exclude=("a", "b"),
                                       shapes=("x:1", "y:2"), fast=True)
    assert from_args(Toy, parser.parse_args(["--target", "0.5"])).target == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--tool", "drill"])  # argparse: choices from the registry, usage error


@pytest.mark.parametrize(("argv", "message", "hint"), [
    (["--iterations", "500"], "--iterations 500: must be <= 100", "e.g. --iterations 10"),
    (["--target", "high"], "--target 'high': not a number", "e.g. --target 0.99, or --target none"),
    (["--shape", "x"], "--shape 'x': expected NAME:DIMS", "e.g. x:1x3"),
])
def test_flag_errors_name_the_flag(argv: list[str], message: str, hint: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(Toy, parser)
    with pytest.raises(ConfigError) as info:
        from_args(Toy, parser.parse_args(argv))
    assert (info.value.message, info.value.hint) == (message, hint)


def test_a_field_type_without_a_reader_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Bad:
        mapping: dict = option(None, help="no kind")  # type: ignore[type-arg]

    with pytest.raises(TypeError, match="Bad.mapping: type dict is not one of"):
        settings(Bad)


def test_stage_configs_read_mappings_and_flags_from_their_fields() -> None:
    """BuildConfig / PruneConfig / Gates / ExportConfig: from_mapping, add_arguments, from_args (issue 15)."""
    from compress.build import BuildConfig
    from compress.export import ExportConfig
    from compress.gates import Gates
    from compress.prune import PruneConfig

    assert BuildConfig.from_mapping({"precision": "int8", "warmup_ms": 5}) == BuildConfig(precision="int8", warmup_ms=5.0)
    assert BuildConfig.from_mapping({}) == BuildConfig()
    assert PruneConfig.from_mapping({"remove": 2, "keep": 1}) == PruneConfig(remove=2, keep=(1,))
    assert Gates.from_mapping({"max_regression_pct": 5}) == Gates(max_regression_pct=5.0)
    assert ExportConfig.from_mapping({"opset": 19}) == ExportConfig(opset=19)
    with pytest.raises(ConfigError) as info:
        BuildConfig.from_mapping({"precison": "int8"}, source="job.json")
    assert info.value.message.startswith("job.json: unknown key 'precison' in section 'BuildConfig'; valid keys: backend,")
    assert info.value.hint == "did you mean 'precision'?"
    with pytest.raises(ConfigError) as info:
        BuildConfig.from_mapping({"warmup_ms": 1e9})
    assert info.value.message == "config: BuildConfig.warmup_ms = 1000000000.0: must be >= 0 and <= 3600"
    parser = argparse.ArgumentParser()
    BuildConfig.add_arguments(parser)
    assert BuildConfig.from_args(parser.parse_args(["--precision", "fp16", "--shapes", "x:1x2"])) == \
        BuildConfig(precision="fp16", shapes=("x:1x2",))
