"""The CLI shell: help, version, error channel, inspect."""

from __future__ import annotations

import json

import onnx
import pytest

import compress.onnx_io
import models
from compress import __version__
from compress.cli import COMMANDS, main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"compress {__version__}"


def test_help_lists_available_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_no_command_prints_help_and_returns_2(capsys) -> None:
    assert main([]) == 2
    assert "usage: compress" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def transformer_onnx(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli") / "t.onnx"
    return str(models.export_onnx(models.tiny_transformer(), models.transformer_input(), path))


def test_inspect_table(transformer_onnx, capsys) -> None:
    assert main(["inspect", transformer_onnx]) == 0
    out = capsys.readouterr().out
    assert "blocks.3" in out
    assert "4 blocks in blocks (found from metadata); 4 removable" in out


def test_inspect_json_and_write_blocks(transformer_onnx, tmp_path, capsys) -> None:
    dest = tmp_path / "bm.json"
    assert main(["inspect", transformer_onnx, "--json", "--write-blocks", str(dest)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(dest.read_text())
    assert [b["name"] for b in printed["blocks"]] == [f"blocks.{i}" for i in range(4)]
    assert main(["inspect", transformer_onnx, "--write-blocks", str(dest)]) == 1
    assert capsys.readouterr().err == f"error: output {dest} already exists\nhint: pass --force to overwrite it\n"


def test_inspect_uses_the_sidecar_block_map(transformer_onnx, tmp_path, capsys) -> None:
    model = onnx.load(transformer_onnx)
    path = tmp_path / "m.onnx"
    compress.onnx_io.save_model(model, str(path))
    (tmp_path / "m.blocks.json").write_text("{not json")
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'm.blocks.json'} is not a valid block map:")


@pytest.mark.parametrize(("args", "message"), [
    (["inspect", "missing.onnx"], "error: model file not found: missing.onnx\nhint: check the path\n"),
    (["inspect", "{model}", "--blocks", "layers"],
     "error: no block container 'layers' in the model\n"
     "hint: --blocks takes a module path prefix followed by an index; candidates: blocks\n"),
])
def test_inspect_errors(transformer_onnx, capsys, args, message) -> None:
    assert main([a.replace("{model}", transformer_onnx) for a in args]) == 1
    assert capsys.readouterr().err == message


def test_not_an_onnx_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad} is not a readable ONNX model:")
    assert "Traceback" not in err


def test_import_compress_and_the_cli_parser_load_no_optional_dependency() -> None:
    # `import compress` needs only numpy, onnx and onnxruntime; the optional libraries load in the
    # commands that use them (checked in a fresh interpreter: this test session imported them all)
    import subprocess
    import sys

    optional = ("torch", "tensorrt", "transformers", "diffusers", "matplotlib", "onnx_graphsurgeon",
                "polygraphy", "PIL", "scipy", "onnxscript", "sklearn")
    code = ("import sys, compress, compress.cli; compress.cli.build_parser(); "
            f"print(sorted(m for m in {optional!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
