"""compress export: PyTorch -> ONNX, parity against torch, block map, artifacts, user errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

import compress.onnx_io  # noqa: E402
from compress import export as ex  # noqa: E402
from compress.errors import ConfigError, ExportError  # noqa: E402
from compress.export import DynamicAxis, ExportConfig, InputSpec, export  # noqa: E402
from compress.runtime import add_outputs, make_session  # noqa: E402
from models import block_hooks, image_input, tiny_resnet, tiny_transformer, transformer_input  # noqa: E402

NET_PY = '''
import torch
from torch import nn

from models import tiny_resnet, image_input, tiny_transformer, transformer_input


class Cholesky(nn.Module):
    def forward(self, x):
        return torch.linalg.cholesky(x @ x.transpose(-1, -2) + torch.eye(x.shape[-1]))


class Drift(nn.Module):
    """Returns lin(x) * (number of calls): torch (first call) and the export disagree."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * self.calls


def build():
    return tiny_transformer(), (transformer_input(),)


def resnet():
    return tiny_resnet(), {"x": image_input()}


def bare():
    return tiny_transformer()


def number():
    return 42


def broken():
    raise RuntimeError("no GPU here")


def unsupported():
    return Cholesky(), (torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0)),)


def linear():
    return nn.Linear(4, 2), (torch.randn(3, 4),)


def drift():
    torch.manual_seed(0)
    return Drift(), (torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),)
'''

HOST_PATH_MARKERS = ("/root", "/home", "site-packages")


@pytest.fixture
def net_py(tmp_path: Path) -> Path:
    """``tmp_path/src/net.py`` with model callables (outputs go to ``tmp_path/out``)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    path = tmp_path / "src" / "net.py"
    path.write_text(NET_PY)
    return path


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _assert_no_host_paths(folder: Path, *needles: str) -> None:
    for f in folder.iterdir():
        data = f.read_bytes()
        for needle in (*needles, *HOST_PATH_MARKERS):
            assert needle.encode() not in data, f"{f.name} contains {needle!r}"


def _ort(path_or_model: Path | onnx.ModelProto) -> ort.InferenceSession:
    if isinstance(path_or_model, Path):
        return ort.InferenceSession(str(path_or_model), providers=["CPUExecutionProvider"])
    return make_session(path_or_model)


# --------------------------------------------------------------------------- MODEL forms


def test_module_callable_writes_model_block_map_and_report(tmp_path, monkeypatch, run_cli):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "compress_test_tinynet.py").write_text(NET_PY)
    monkeypatch.syspath_prepend(str(pkg))
    out = tmp_path / "tiny.onnx"

    r = run_cli(["export", "compress_test_tinynet:build", "-o", out, "--dynamic", "x:0=batch"])

    assert r.code == 0, r.err
    assert _files(tmp_path) == ["pkg", "tiny.blocks.json", "tiny.export.json", "tiny.onnx"]
    lines = r.out.splitlines()
    assert lines[0].split() == ["#", "block", "nodes", "params", "input", "->", "output", "shape", "removable"]
    assert [ln.split()[1] for ln in lines[2:6]] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert all(ln.rstrip().endswith("float32[batch,8,32]  yes") for ln in lines[2:6])
    assert lines[-1].startswith("wrote tiny.onnx: 133 nodes, 35,064 params, 4 blocks in blocks (4 removable); "
                                "parity max abs error ")
    for step in ("loading compress_test_tinynet:build...", "exporting with the dynamo exporter (opset 18)...",
                 "checking the model and comparing ONNX Runtime with torch..."):
        assert step in r.err
    assert "torch.onnx" not in r.out + r.err
    assert "torchvision" not in r.out + r.err

    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", 8, 16]
    y = _ort(out).run(None, {"x": transformer_input(batch=3).numpy()})[0]  # dynamic batch
    with torch.no_grad():
        np.testing.assert_allclose(y, tiny_transformer()(transformer_input(batch=3)).numpy(), atol=1e-5, rtol=0)

    blocks = json.loads((tmp_path / "tiny.blocks.json").read_text())
    assert blocks["schema_version"] == 2  # block maps list each block's streams since issue 10
    assert blocks["containers"] == ["blocks"]
    assert blocks["source"] == "metadata"
    assert [(b["name"], b["removable"], b["params"]) for b in blocks["blocks"]] == [(f"blocks.{i}", True, 8544) for i in range(4)]
    assert blocks["export"] == {"model": "compress_test_tinynet:build", "onnx": "tiny.onnx", "exporter": "dynamo",
                                "opset": 18, "inputs": [{"name": "x", "shape": [2, 8, 16], "dtype": "float32"}],
                                "dynamic_axes": [{"name": "x", "axis": 0, "label": "batch"}]}

    rep = json.loads((tmp_path / "tiny.export.json").read_text())
    assert rep["exporter"] == "dynamo"
    assert rep["opset"] == 18
    assert rep["model_kind"] == "module"
    assert set(rep["versions"]) == {"torch", "onnx", "onnxruntime", "onnxscript"}
    assert rep["versions"]["onnx"] == onnx.__version__
    assert rep["versions"]["torch"] == torch.__version__
    assert rep["nodes"] == 133
    assert rep["params"] == 35064
    assert rep["torch_params"] == 35048
    assert rep["files"] == ["tiny.onnx", "tiny.blocks.json", "tiny.export.json"]
    assert rep["blocks"] == {"containers": ["blocks"], "source": "metadata", "count": 4, "removable": 4}
    (par,) = rep["parity"]["outputs"]
    assert par["name"] == "output"
    assert par["shape"] == [2, 8, 8]
    assert par["ok"] is True
    assert par["max_abs_error"] < 1e-5
    assert par["max_rel_error"] < 1e-3
    assert par["cosine"] > 0.999999
    assert rep["parity"]["tolerance"] == {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.9999}
    assert set(rep["timings"]) == {"load_s", "export_s", "parity_s"}
    assert rep["timings"]["export_s"] > 0


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_file_callable_artifacts_hold_no_host_paths(net_py, run_cli, exporter):
    out_dir = net_py.parent.parent / "out"
    r = run_cli(["export", f"{net_py}:resnet", "-o", out_dir / "r.onnx", "--exporter", exporter, "--json"])

    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["model"] == "net.py:resnet"
    assert summary["model_kind"] == "file"
    assert summary["exporter"] == exporter
    assert summary["blocks"]["count"] == 4
    assert summary["blocks"]["removable"] == 4
    assert summary["blocks"]["source"] == ("metadata" if exporter == "dynamo" else "names")
    assert summary["inputs"] == [{"name": "x", "shape": [2, 3, 8, 8], "dtype": "float32"}]
    assert summary["parity"]["ok"] is True
    assert summary["parity"]["outputs"][0]["max_abs_error"] < 1e-5
    assert json.loads((out_dir / "r.export.json").read_text()) == summary
    assert _files(out_dir) == ["r.blocks.json", "r.export.json", "r.onnx"]
    _assert_no_host_paths(out_dir, str(net_py.parent.parent), str(Path.cwd()))


def test_hf_minilm_export(minilm_path, tmp_path, run_cli):
    out = tmp_path / "minilm.onnx"
    r = run_cli(["export", f"hf:{minilm_path}", "-o", out])

    assert r.code == 0, r.err
    assert "wrote minilm.onnx: " in r.out
    assert "6 blocks in encoder.layer (6 removable)" in r.out
    blocks = json.loads((tmp_path / "minilm.blocks.json").read_text())
    assert [b["name"] for b in blocks["blocks"]] == [f"encoder.layer.{i}" for i in range(6)]
    assert all(b["removable"] and b["shape"] == ["batch", "sequence", 384] for b in blocks["blocks"])
    rep = json.loads((tmp_path / "minilm.export.json").read_text())
    assert rep["model"] == f"hf:{minilm_path.name}"
    assert rep["model_kind"] == "hf"
    assert [i["name"] for i in rep["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert rep["outputs"] == ["last_hidden_state", "pooler_output"]
    assert {(d["name"], d["axis"], d["label"]) for d in rep["dynamic_axes"]} == {
        (n, a, lbl) for n in ("input_ids", "attention_mask", "token_type_ids") for a, lbl in ((0, "batch"), (1, "sequence"))}
    assert [p["ok"] for p in rep["parity"]["outputs"]] == [True, True]
    assert max(p["max_abs_error"] for p in rep["parity"]["outputs"]) < 1e-4
    _assert_no_host_paths(tmp_path, str(minilm_path), str(Path.cwd()))

    sess = _ort(out)  # dynamic batch and sequence
    feeds = {"input_ids": np.full((3, 5), 101, np.int64), "attention_mask": np.ones((3, 5), np.int64),
             "token_type_ids": np.zeros((3, 5), np.int64)}
    assert [o.shape for o in sess.run(None, feeds)] == [(3, 5, 384), (3, 384)]


def test_pt2_program_export(tmp_path, run_cli):
    module, x = tiny_transformer(), transformer_input()
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "tiny.pt2"))

    r = run_cli(["export", tmp_path / "tiny.pt2", "-o", tmp_path / "tiny.onnx", "--dynamic", "x:0=batch"])

    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "tiny.export.json").read_text())
    assert rep["model"] == "tiny.pt2"
    assert rep["model_kind"] == "pt2"
    assert rep["parity"]["ok"] is True
    assert rep["blocks"] == {"containers": ["blocks"], "source": "metadata", "count": 4, "removable": 4}
    model = onnx.load(str(tmp_path / "tiny.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x3 = transformer_input(batch=3)
    y = _ort(model).run(None, {"x": x3.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(y, module(x3).numpy(), atol=1e-5, rtol=0)


def test_input_flag_replaces_example_inputs(net_py, run_cli):
    out = net_py.parent.parent / "out" / "t.onnx"
    r = run_cli(["export", f"{net_py}:bare", "-o", out, "--input", "x:1x5x16", "--exporter", "torchscript"])

    assert r.code == 0, r.err
    rep = json.loads(out.with_name("t.export.json").read_text())
    assert rep["inputs"] == [{"name": "x", "shape": [1, 5, 16], "dtype": "float32"}]
    assert rep["exporter"] == "torchscript"
    assert "onnxscript" not in rep["versions"]


def test_weights_are_loaded_strictly(net_py, tmp_path, run_cli):
    trained = tiny_transformer(seed=7)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out" / "w.onnx"

    r = run_cli(["export", f"{net_py}:build", "-o", out, "--weights", tmp_path / "w.pt", "--exporter", "torchscript"])

    assert r.code == 0, r.err
    x = transformer_input()
    with torch.no_grad():
        np.testing.assert_allclose(_ort(out).run(None, {"x": x.numpy()})[0], trained(x).numpy(), atol=1e-5, rtol=0)
    assert json.loads(out.with_name("w.export.json").read_text())["weights"] == "w.pt"


# --------------------------------------------------------------------------- API: boundaries vs torch hooks


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["transformer", "resnet"])
def test_block_boundaries_match_torch_hooks(kind, exporter):
    module, x = (tiny_transformer(), transformer_input()) if kind == "transformer" else (tiny_resnet(), image_input())
    before = {k: v.clone() for k, v in module.state_dict().items()}

    exported, report = export(module, ExportConfig(exporter=exporter), data=(x,))
    model, block_map = exported.proto, exported.block_map

    assert [b.name for b in block_map.blocks] == [f"blocks.{i}" for i in range(4)]
    assert block_map.containers == ("blocks",)
    assert all(b.removable for b in block_map.blocks)
    assert report.exporter == exporter
    assert report.outputs == ("output",)
    assert report.parity[0].ok
    names = [t for b in block_map.blocks for t in (b.input, b.output)]
    values = dict(zip(names, _ort(add_outputs(model, names)).run(names, {"x": x.numpy()}), strict=True))
    hooks = block_hooks(module, module.blocks, x)
    assert len(hooks) == 4
    for b, (h_in, h_out) in zip(block_map.blocks, hooks, strict=True):
        np.testing.assert_allclose(values[b.input], h_in.numpy(), atol=1e-5, rtol=0, err_msg=f"{b.name} input")
        np.testing.assert_allclose(values[b.output], h_out.numpy(), atol=1e-5, rtol=0, err_msg=f"{b.name} output")
    # the module is not changed
    assert not module.training
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_export_model_is_pure_and_strips_host_paths():
    module, x = tiny_transformer(depth=2), transformer_input()
    module.train()
    exported, report = export(module, ExportConfig(), data={"x": x})
    model = exported.proto
    assert module.training  # restored
    assert report.inputs == (InputSpec("x", (2, 8, 16), "float32"),)
    keys = {p.key for n in model.graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.name_scopes" in keys
    assert "pkg.torch.onnx.stack_trace" not in keys
    assert not any(m.encode() in model.SerializeToString() for m in HOST_PATH_MARKERS)


def test_export_model_parity_failure_is_an_error():
    class Offset(torch.nn.Module):
        def forward(self, x):
            return x + (1.0 if torch.compiler.is_exporting() or torch.jit.is_tracing() else 0.0)

    x = torch.ones(2, 3)
    with pytest.raises(ExportError, match=r"^ONNX Runtime output 'output' differs from torch: max abs error 1, "
                                          r"max rel error 1, cosine 1\.000000 \(allowed: atol 0\.0001 \+ rtol 0\.001"):
        export(Offset(), ExportConfig(exporter="torchscript"), data=(x,))
    _, report = export(Offset(), ExportConfig(exporter="torchscript", atol=1.0, rtol=0.0), data=(x,))
    assert report.parity[0].max_abs_error == 1.0
    assert report.parity[0].ok


def test_find_block_containers_picks_longest_and_same_type_siblings():
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())  # mixed types: not blocks
            self.layer1 = nn.Sequential(*(nn.Linear(4, 4) for _ in range(2)))
            self.layer2 = nn.Sequential(*(nn.Linear(4, 4) for _ in range(3)))
            self.heads = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(2))  # other type
            self.single = nn.ModuleList([nn.Linear(4, 4)])  # one entry

    assert ex.find_block_containers(Net()) == ["layer2", "layer1"]
    assert ex.find_block_containers(tiny_resnet()) == ["blocks"]
    assert ex.find_block_containers(nn.Linear(2, 2)) == []


def test_make_example_inputs_is_seeded():
    specs = [InputSpec("x", (2, 3)), InputSpec("input_ids", (1, 4), "int64"),
             InputSpec("attention_mask", (1, 4), "int64"), InputSpec("token_type_ids", (1, 4), "int32"),
             InputSpec("h", (2,), "float16")]
    a, b = ex.make_example_inputs(specs), ex.make_example_inputs(specs)
    assert list(a) == ["x", "input_ids", "attention_mask", "token_type_ids", "h"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["x"].dtype == torch.float32
    assert a["h"].dtype == torch.float16
    assert int(a["input_ids"].min()) >= 0
    assert int(a["input_ids"].max()) < 100
    assert a["attention_mask"].tolist() == [[1, 1, 1, 1]]
    assert a["token_type_ids"].tolist() == [[0, 0, 0, 0]]


def test_spec_parsing():
    assert InputSpec.parse("x:1x3x224x224:float32") == InputSpec("x", (1, 3, 224, 224), "float32")
    assert InputSpec.parse("ids:2x7:int64") == InputSpec("ids", (2, 7), "int64")
    assert InputSpec.parse("x:4") == InputSpec("x", (4,), "float32")
    assert DynamicAxis.parse("x:0=batch") == DynamicAxis("x", 0, "batch")
    assert DynamicAxis.parse("input_ids:1") == DynamicAxis("input_ids", 1, "input_ids_dim1")
    with pytest.raises(ConfigError) as exc:
        ExportConfig(exporter="onnx")
    assert exc.value.message == "unknown exporter 'onnx'; valid: dynamo, torchscript"
    assert exc.value.hint == "use --exporter with one of: dynamo, torchscript"
    assert ExportConfig(exporter="torchscript", opset=17).opset == 17


# --------------------------------------------------------------------------- artifacts


def test_external_data_and_large_model_parity_path(net_py, monkeypatch, run_cli):
    monkeypatch.setattr(compress.onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    out_dir = net_py.parent.parent / "out"

    r = run_cli(["export", f"{net_py}:build", "-o", out_dir / "big.onnx"])

    assert r.code == 0, r.err
    assert _files(out_dir) == ["big.blocks.json", "big.export.json", "big.onnx", "big.onnx.data"]
    assert json.loads((out_dir / "big.export.json").read_text())["files"] == [
        "big.onnx", "big.onnx.data", "big.blocks.json", "big.export.json"]
    model = onnx.load(str(out_dir / "big.onnx"), load_external_data=False)
    assert {t.data_location for t in model.graph.initializer if t.dims and np.prod(t.dims) > 256} == {onnx.TensorProto.EXTERNAL}
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {"big.onnx.data"}
    loaded = compress.onnx_io.load_model(out_dir / "big.onnx")
    x = transformer_input()
    with torch.no_grad():
        np.testing.assert_allclose(_ort(loaded).run(None, {"x": x.numpy()})[0], tiny_transformer()(x).numpy(), atol=1e-5)
    _assert_no_host_paths(out_dir, str(net_py.parent.parent))


def test_force_overwrites_and_existing_outputs_are_refused(net_py, run_cli):
    out_dir = net_py.parent.parent / "out"
    out = out_dir / "f.onnx"
    argv = ["export", f"{net_py}:build", "-o", out, "--exporter", "torchscript"]
    assert run_cli(argv).code == 0
    before = {name: (out_dir / name).read_bytes() for name in _files(out_dir)}

    r = run_cli(argv)
    assert r.code == 1
    assert r.errors == [f"error: output {out} already exists", "hint: pass --force to overwrite it"]
    assert {name: (out_dir / name).read_bytes() for name in _files(out_dir)} == before

    out.unlink()  # a leftover sidecar is protected too
    r = run_cli(argv)
    assert r.errors == [f"error: output {out_dir / 'f.blocks.json'} already exists", "hint: pass --force to overwrite it"]
    assert not out.exists()

    r = run_cli([*argv, "--force", "--opset", "17"])
    assert r.code == 0, r.err
    assert json.loads((out_dir / "f.export.json").read_text())["opset"] == 17
    assert onnx.load(str(out)).opset_import[0].version == 17


def test_help_explains_every_flag_with_an_example(capsys):
    import argparse

    from compress.cli import build_parser, main

    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for form in ("package.module:callable", "path/to/file.py:callable", "hf:PATH", "FILE.pt2", "examples:"):
        assert form in text
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["export"]
    flags = {a.option_strings[-1]: a for a in sub._actions if a.option_strings and a.dest not in ("help", "verbose", "quiet")}
    assert sorted(flags) == ["--atol", "--batch-size", "--blocks", "--calib", "--dynamic", "--exporter", "--force",
                             "--input", "--json", "--min-cosine", "--no-gradnorm", "--opset", "--output", "--rtol",
                             "--trust-code", "--weights"]
    for flag, action in flags.items():
        assert action.help
        assert flag in text
        if action.nargs != 0:  # flags that take a value show one
            assert "e.g." in action.help, flag


# --------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    ("missing-module", ["nosuchmod_xyz:build"],
     ["error: cannot import module 'nosuchmod_xyz' (MODEL nosuchmod_xyz:build): No module named 'nosuchmod_xyz'",
      "hint: install it or put its folder on PYTHONPATH, or pass path/to/file.py:callable"]),
    ("missing-file", ["{src}/missing.py:build"],
     ["error: model file not found: {src}/missing.py", "hint: MODEL is path/to/file.py:callable; check the path"]),
    ("missing-attribute", ["{net}:nothere"],
     ["error: net.py has no attribute 'nothere'", "hint: MODEL is module:callable where the callable returns an nn.Module"]),
    ("unknown-form", ["justaname"],
     ["error: MODEL 'justaname' is not package.module:callable, path/to/file.py:callable, hf:PATH, diffusers:PATH "
      "or a .pt2 file",
      "hint: e.g. 'torchvision.models:resnet18', 'net.py:build', 'hf:./all-MiniLM-L6-v2' or 'model.pt2'"]),
    ("unimportable-file", ["{src}/bad.py:build"],
     ["error: importing bad.py failed: ZeroDivisionError: division by zero", "hint: fix the error in the file"]),
    ("hf-missing", ["hf:{src}/nomodel"],
     ["error: Hugging Face model folder not found: {src}/nomodel",
      "hint: hf: takes a local Hugging Face model folder (with config.json); nothing is downloaded"]),
    ("hf-no-config", ["hf:{src}"],
     ["error: no config.json in Hugging Face model folder {src}",
      "hint: hf: takes a local Hugging Face model folder (with config.json); nothing is downloaded"]),
    ("pt2-not-a-program", ["{src}/notes.pt2"],
     ["error: {src}/notes.pt2 is not a saved torch.export program (torch.export.load fails with BadZipFile)",
      "hint: write it with torch.export.save(torch.export.export(module, args), 'model.pt2')"]),
    ("pt2-torchscript", ["{src}/tiny.pt2", "--exporter", "torchscript"],
     ["error: a saved torch.export program (.pt2) can only be exported with --exporter dynamo",
      "hint: drop --exporter torchscript"]),
    ("blocks-unknown", ["{net}:build", "--exporter", "torchscript", "--blocks", "layers"],
     ["error: no block container 'layers' in the model",
      "hint: --blocks takes a module path prefix followed by an index; candidates: blocks"]),
    ("not-a-module", ["{net}:number"],
     ["error: number() returned int, not a torch.nn.Module", "hint: return an nn.Module, or a tuple (module, example_inputs)"]),
    ("callable-raises", ["{net}:broken"],
     ["error: calling broken() failed: RuntimeError: no GPU here", "hint: the callable must build the model without arguments"]),
    ("no-inputs", ["{net}:bare"],
     ["error: MODEL {net}:bare provides no example inputs and no --input was given",
      "hint: pass --input NAME:SHAPE[:DTYPE] (e.g. --input x:1x3x224x224), or return (module, example_inputs) from the callable"]),
    ("input-no-shape", ["{net}:build", "--input", "x"],
     ["error: --input 'x': expected NAME:SHAPE[:DTYPE]", "hint: write --input NAME:SHAPE[:DTYPE], e.g. --input x:1x3x224x224:float32"]),
    ("input-bad-shape", ["{net}:build", "--input", "x:2xAx3"],
     ["error: --input 'x:2xAx3': shape '2xAx3' must be positive integers separated by 'x'",
      "hint: write --input NAME:SHAPE[:DTYPE], e.g. --input x:1x3x224x224:float32"]),
    ("input-bad-dtype", ["{net}:build", "--input", "x:2x3:float"],
     ["error: --input 'x:2x3:float': unknown dtype 'float'; valid: float32, float16, bfloat16, float64, int64, int32, "
      "int16, int8, uint8, bool", "hint: write --input NAME:SHAPE[:DTYPE], e.g. --input x:1x3x224x224:float32"]),
    ("input-twice", ["{net}:build", "--input", "x:2x3", "--input", "x:2x3"],
     ["error: --input 'x' is given twice", "hint: name each input once"]),
    ("dynamic-bad", ["{net}:build", "--dynamic", "x"],
     ["error: --dynamic 'x': expected NAME:AXIS[=LABEL]", "hint: write --dynamic NAME:AXIS[=LABEL], e.g. --dynamic x:0=batch"]),
    ("dynamic-unknown-input", ["{net}:build", "--dynamic", "y:0"],
     ["error: --dynamic y:0: no input named 'y'; inputs: x", "hint: name an input of the model (see --input)"]),
    ("dynamic-bad-axis", ["{net}:build", "--dynamic", "x:5"],
     ["error: --dynamic x:5: input 'x' has 3 axes", "hint: use an axis from 0 to 2"]),
    ("opset-too-low", ["{net}:build", "--opset", "17"],
     ["error: --opset 17 is below 18, the lowest opset of the dynamo exporter",
      "hint: use --opset 18 or higher (a down-converted model loses its module metadata), or --exporter torchscript"]),
    ("unsupported-op-dynamo", ["{net}:unsupported"],
     ["error: the dynamo exporter cannot convert operator aten.linalg_cholesky_ex to ONNX (opset 18)",
      "hint: try --exporter torchscript or a newer --opset, or replace aten.linalg_cholesky_ex in the model"]),
    ("unsupported-op-torchscript", ["{net}:unsupported", "--exporter", "torchscript"],
     ["error: the torchscript exporter cannot convert operator aten::linalg_cholesky to ONNX (opset 18)",
      "hint: try a newer --opset, or replace aten::linalg_cholesky in the model"]),
    ("parity", ["{net}:drift", "--exporter", "torchscript"],
     ["error: ONNX Runtime output 'output' differs from torch: max abs error 0.801, max rel error 1, cosine 1.000000 "
      "(allowed: atol 0.0001 + rtol 0.001, cosine >= 0.9999)",
      "hint: nothing was written; try the other --exporter, or loosen --atol/--rtol/--min-cosine if the difference "
      "is expected (e.g. float16)"]),
    ("weights-not-checkpoint", ["{net}:build", "--weights", "{src}/notes.txt"],
     ["error: --weights {src}/notes.txt is not a PyTorch checkpoint (torch.load fails with KeyError)",
      "hint: pass a file written by torch.save(model.state_dict(), path)"]),
    ("weights-not-state-dict", ["{net}:build", "--weights", "{src}/config.pt"],
     ["error: --weights {src}/config.pt does not hold a state dict (name -> tensor)",
      "hint: pass a file written by torch.save(model.state_dict(), path)"]),
    ("weights-wrong-keys", ["{net}:build", "--weights", "{src}/linear.pt"],
     ["error: --weights {src}/linear.pt does not fit the model: 54 missing keys (blocks.0.attn.proj.bias, "
      "blocks.0.attn.proj.weight, blocks.0.attn.qkv.bias, ...); 2 unexpected keys (bias, weight)",
      "hint: the checkpoint must be this model's state_dict (loaded strictly)"]),
    ("weights-not-tensors", ["{net}:build", "--weights", "{src}/namespace.pt"],
     ["error: --weights {src}/namespace.pt holds a argparse.Namespace, which torch.load(weights_only=True) refuses",
      "hint: save only the state dict: torch.save(model.state_dict(), path)"]),
]


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(a, e, id=i) for i, a, e in BAD_INPUTS])
def test_bad_input_is_one_error_and_writes_nothing(net_py, run_cli, argv, expected):
    import argparse

    src = net_py.parent
    (src / "notes.txt").write_text("hello\n")
    (src / "notes.pt2").write_text("hello\n")
    (src / "bad.py").write_text("x = 1 / 0\n")
    if "tiny.pt2" in " ".join(argv):
        module = torch.nn.Linear(2, 2)
        torch.export.save(torch.export.export(module, (torch.ones(1, 2),)), str(src / "tiny.pt2"))
    torch.save({"lr": 0.1}, src / "config.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), src / "linear.pt")
    torch.save({"args": argparse.Namespace(lr=0.1)}, src / "namespace.pt")
    out_dir = src.parent / "out"
    subst = {"src": str(src), "net": str(net_py)}

    r = run_cli(["export", *(a.format(**subst) for a in argv), "-o", out_dir / "m.onnx"])

    assert r.code == 1
    assert r.errors == [e.format(**subst) for e in expected]
    assert "Traceback" not in r.err
    assert r.out == ""
    assert _files(out_dir) == []


def test_blocks_flag_and_models_without_blocks(net_py, run_cli):
    out_dir = net_py.parent.parent / "out"
    r = run_cli(["export", f"{net_py}:resnet", "-o", out_dir / "r.onnx", "--exporter", "torchscript", "--blocks", "blocks"])
    assert r.code == 0, r.err
    blocks = json.loads((out_dir / "r.blocks.json").read_text())
    assert blocks["source"] == "user"
    assert [b["name"] for b in blocks["blocks"]] == [f"blocks.{i}" for i in range(4)]

    r = run_cli(["export", f"{net_py}:linear", "-o", out_dir / "l.onnx", "--exporter", "torchscript"])
    assert r.code == 0, r.err
    assert "warning: no repeated blocks found in the model; pass --blocks CONTAINER to name them" in r.err.splitlines()
    assert r.out.startswith("wrote l.onnx: 1 nodes, 10 params, 0 blocks in no container (0 removable); ")
    assert json.loads((out_dir / "l.blocks.json").read_text())["blocks"] == []


@pytest.mark.parametrize(("output", "message"), [
    ("{tmp}/nofolder/m.onnx", ["error: output folder does not exist: {tmp}/nofolder", "hint: create it or choose another -o"]),
    ("{tmp}/src/net.py", ["error: output {tmp}/src/net.py is the input file", "hint: choose another -o; inputs are never overwritten"]),
])
def test_bad_output_path_is_refused_before_any_work(net_py, run_cli, output, message):
    tmp = str(net_py.parent.parent)
    r = run_cli(["export", f"{net_py}:build", "-o", output.format(tmp=tmp)])
    assert r.code == 1
    assert r.err.splitlines() == [m.format(tmp=tmp) for m in message]  # no 'loading ...': nothing was done
    assert net_py.read_text() == NET_PY
    assert _files(net_py.parent) == ["net.py"]


def test_dynamo_noise_is_silenced(net_py, capfd):
    from compress.cli import main

    assert main(["export", f"{net_py}:build", "-o", str(net_py.parent.parent / "out" / "q.onnx"), "-q"]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    assert out.splitlines()[-1].startswith("wrote q.onnx: ")
    assert "[torch.onnx]" not in out
    assert "Warning" not in out
    assert os.path.exists(net_py.parent.parent / "out" / "q.onnx")


def _process_state() -> dict:
    """What the library must leave as it found it: environment, cwd, the exporters' loggers, warnings, fds 1/2."""
    import logging
    import sys
    import warnings

    from compress.export.exporters import _NOISY_LOGGERS

    loggers = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in _NOISY_LOGGERS}
    return {"environ": dict(os.environ), "cwd": os.getcwd(), "loggers": loggers,
            "filters": list(warnings.filters), "streams": (sys.stdout, sys.stderr),
            "fds": [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]}


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def test_quiet_restores_loggers_warnings_streams_and_descriptors_on_error(capfd):
    import logging
    import sys
    import warnings

    torch_onnx = logging.getLogger("torch.onnx")
    torch_onnx.setLevel(logging.INFO)

    def noisy_then_fail() -> None:
        with ex.quiet():
            assert torch_onnx.level == logging.ERROR
            print("python print")
            os.write(1, b"c-level print\n")
            warnings.warn("a warning", UserWarning, stacklevel=1)
            sys.stderr.write("python stderr\n")
            raise RuntimeError("boom")

    try:
        before, fds = _process_state(), _open_fds()
        with pytest.raises(RuntimeError, match="boom"):
            noisy_then_fail()
        assert _process_state() == before
        assert _open_fds() == fds  # the saved duplicates of 1 and 2 are closed
        assert capfd.readouterr() == ("", "")
        with ex.quiet(False):  # disabled: nothing is touched
            print("shown")
        assert capfd.readouterr().out == "shown\n"
    finally:
        torch_onnx.setLevel(logging.NOTSET)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_model_leaves_the_process_as_it_found_it(exporter, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # torch's inductor sets it while exporting
    before = _process_state()
    export(tiny_transformer(), ExportConfig(exporter=exporter), data=(transformer_input(),))
    assert _process_state() == before
