"""``compress calib text`` / ``images`` flags are generated from TextOptions / ImageOptions fields."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from compress.calibration import ImageOptions, TextOptions
from compress.cli import build_parser, main
from compress.cli.calib import image_options, text_options
from compress.config import settings
from compress.errors import ConfigError


def _subparser(kind: str) -> argparse.ArgumentParser:
    def sub(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]

    return sub(sub(build_parser(), "calib"), kind)


REQUIRED = {"text": ["t.txt", "--tokenizer", "tok.json", "-o", "out"], "images": ["imgs", "-o", "out"]}
CASES = [("text", TextOptions, text_options), ("images", ImageOptions, image_options)]


@pytest.mark.parametrize(("kind", "cls", "read"), CASES)
def test_every_option_field_is_a_flag_with_the_field_default(kind, cls, read) -> None:
    parser = _subparser(kind)
    actions = {a.dest: a for a in parser._actions}
    flagged = [s for s in settings(cls) if s.flag]
    assert [s.name for s in settings(cls)] == [f.name for f in cls.__dataclass_fields__.values()]
    for s in flagged:
        a = actions[s.name]
        assert (a.option_strings, a.default, a.help) == ([s.flag], None, s.option.help)
        m = re.search(r"\(default: ([^)]+)\)", s.option.help)
        if m and isinstance(s.default, int | float | str) and not isinstance(s.default, bool):
            shown = f"{s.default:g}" if isinstance(s.default, float) else str(s.default)
            assert m.group(1) == shown, f"{s.flag}: help says default {m.group(1)}, the field's is {shown}"
    assert read(parser.parse_args(REQUIRED[kind])) == cls()  # no flag given: the dataclass defaults


def test_text_flags_set_the_fields() -> None:
    parser = _subparser("text")
    assert [s.name for s in settings(TextOptions) if not s.flag] == ["token_type_ids"]  # the --no- flag below
    args = parser.parse_args([*REQUIRED["text"], "--max-length", "16", "--batch-size", "3", "--pad-to-max",
                              "--no-token-type-ids"])
    assert text_options(args) == TextOptions(max_length=16, batch_size=3, pad_to_max=True, token_type_ids=False)


def test_image_flags_set_the_fields() -> None:
    args = _subparser("images").parse_args([*REQUIRED["images"], "--size", "8", "--crop", "6", "--mean", "127",
                                            "--std", "1,2,3", "--scale", "1", "--layout", "NHWC",
                                            "--input-name", "pixel_values", "--batch-size", "2"])
    assert image_options(args) == ImageOptions(size=8, crop=6, mean=(127.0,), std=(1.0, 2.0, 3.0), scale=1.0,
                                               layout="NHWC", input_name="pixel_values", batch_size=2)


def test_bad_values_name_the_flag(tmp_path: Path, capsys) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("hello\n", encoding="utf-8")
    text = ["calib", "text", str(txt), "--tokenizer", str(tmp_path / "tok.json"), "-o", str(tmp_path / "o")]
    assert main([*text, "--max-length", "1"]) == 1
    assert capsys.readouterr().err == ("error: --max-length must be between 2 and 65536 tokens, got 1\n"
                                       "hint: e.g. --max-length 128 (special tokens included)\n")
    assert main([*text, "--batch-size", "0"]) == 1
    assert capsys.readouterr().err.startswith("error: --batch-size must be a positive number of samples, got 0\n")

    images = ["calib", "images", str(tmp_path), "-o", str(tmp_path / "o")]
    assert main([*images, "--crop", "300"]) == 1
    assert capsys.readouterr().err.startswith("error: --crop must be between 1 and --size (224) pixels, got 300\n")
    assert main([*images, "--std", "1,a"]) == 1
    assert capsys.readouterr().err.startswith("error: --std takes comma-separated numbers, got '1,a'\n")
    assert main([*images, "--scale", "0"]) == 1
    assert capsys.readouterr().err.startswith("error: --std and --scale must be non-zero\n")
    with pytest.raises(SystemExit):
        main([*images, "--layout", "CHW"])
    assert "error: argument --layout: invalid choice: 'CHW'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_options_read_a_mapping_too() -> None:
    assert TextOptions.from_mapping({"max_length": 64, "token_type_ids": False}) == TextOptions(
        max_length=64, token_type_ids=False)
    assert ImageOptions.from_mapping({"mean": [127], "layout": "NHWC"}) == ImageOptions(mean=(127.0,), layout="NHWC")
    with pytest.raises(ConfigError) as e:
        TextOptions.from_mapping({"max_length": 1}, section="calibration")
    assert e.value.message == "config: calibration.max_length: must be at least 2, got 1"
    with pytest.raises(ConfigError) as e:
        ImageOptions.from_mapping({"layout": "CHW"}, section="calibration")
    assert e.value.message == "config: calibration.layout: 'CHW' is not one of NCHW, NHWC"
