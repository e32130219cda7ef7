"""Export side of the transformer families: ``hf:`` causal LMs, ``diffusers:`` folders, shared inputs.

Models are tiny and seeded (tests/families.py), saved with ``save_pretrained`` into
``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import compress.onnx_io
import families
from compress import calibration as cal
from compress import export as ex
from compress.errors import CalibrationError, ExportError, ModelError

pytest.importorskip("transformers")


def _ort(path_or_model: Path | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from compress.runtime import make_session

    if isinstance(path_or_model, Path):
        sess = ort.InferenceSession(str(path_or_model), providers=["CPUExecutionProvider"])
    else:
        sess = make_session(path_or_model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


# --------------------------------------------------------------------------- hf: causal LMs


@pytest.mark.parametrize(("kind", "exporter"), [("gpt2", "dynamo"), ("llama", "dynamo"), ("gpt2", "torchscript")])
def test_hf_causal_lm_exports_logits_without_cache(kind, exporter, tmp_path, run_cli, monkeypatch):
    folder = tmp_path / kind
    lm = families.save_causal_lm(kind, folder, layers=2)  # config.json keeps use_cache=True, as in real checkpoints
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    out = tmp_path / f"{kind}.onnx"
    r = run_cli(["export", f"hf:{folder}", "-o", str(out), "--exporter", exporter])
    assert r.code == 0, r.err
    assert "HF_HUB_OFFLINE" not in os.environ
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"
    model = onnx.load(out)
    # GPT-2's forward takes token_type_ids but has no token-type embedding: not an input
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]  # no past_key_values
    dims = _dims(model.graph.output[0])
    if exporter == "dynamo":
        assert dims == ["batch", "sequence", 128]
    else:  # TorchScript names the output's dynamic dims itself
        assert [isinstance(d, str) for d in dims] == [True, True, False]
        assert dims[2] == 128
    rep = json.loads(out.with_name(f"{kind}.export.json").read_text())
    assert rep["blocks"]["count"] == 2
    assert rep["blocks"]["containers"] == ["transformer.h" if kind == "gpt2" else "model.layers"]
    # dynamic batch and sequence: another shape than the example (2 x 16) matches torch
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.int64)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    with torch.no_grad():
        want = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    got = _ort(out, feeds)["logits"]
    assert got.shape == (3, 7, 128)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def _process_state() -> dict:
    """What loading must leave as it found it: environment, cwd, the exporters' loggers, warnings, fds 1/2."""
    import logging
    import sys
    import warnings

    from compress.export.exporters import _NOISY_LOGGERS

    loggers = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in _NOISY_LOGGERS}
    return {"environ": dict(os.environ), "cwd": os.getcwd(), "loggers": loggers,
            "filters": list(warnings.filters), "streams": (sys.stdout, sys.stderr),
            "fds": [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]}


@pytest.mark.parametrize("source", ["hf", "diffusers"])
@pytest.mark.parametrize("outcome", ["loads", "fails"])
def test_loading_a_folder_leaves_the_process_as_it_found_it(source, outcome, tmp_path, monkeypatch):
    """The offline switches (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) and quiet() are undone, on failure too."""
    if source == "diffusers":
        pytest.importorskip("diffusers")
    folder = tmp_path / source
    if source == "hf":
        families.save_causal_lm("gpt2", folder, layers=1)
        weights = "model.safetensors"
    else:
        families.save_diffusers("dit", folder)
        weights = "diffusion_pytorch_model.safetensors"
    if outcome == "fails":
        (folder / weights).unlink()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # one switch unset, the other set to another value
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    before = _process_state()
    if outcome == "fails":
        with pytest.raises(ModelError, match="cannot load the"):
            ex.load_torch_model(f"{source}:{folder}")
    else:
        assert ex.load_torch_model(f"{source}:{folder}").kind == source
    assert _process_state() == before


def test_a_returned_cache_gets_its_own_hint_and_torchscript_does_not_point_back():
    import transformers

    model = transformers.AutoModel.from_config(families.causal_lm_config("gpt2")).eval()  # use_cache=True
    x = {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.int64)}
    with pytest.raises(ExportError) as info:
        ex.export(model, ex.ExportConfig(), data=x)
    assert "DynamicCache" in info.value.message
    assert info.value.hint == ("the model returns a key/value cache: call it with use_cache=False and return_dict=False "
                               "(hf:FOLDER does this for you); -v shows the exporter's own log")
    err = ex.export_error(RuntimeError("boom"), ex.ExportConfig(exporter="torchscript"))
    assert err.hint == "try a newer --opset; -v shows the exporter's own log"
    err = ex.export_error(RuntimeError("boom"), ex.ExportConfig())
    assert err.hint == "try --exporter torchscript or a newer --opset; -v shows the exporter's own log"


# --------------------------------------------------------------------------- diffusers:


def test_diffusers_source_derives_inputs_from_the_config(tmp_path, run_cli):
    pytest.importorskip("diffusers")
    folder = tmp_path / "sd3"
    plain = families.save_diffusers("sd3", folder, num_layers=3)
    loaded = ex.load_torch_model(f"diffusers:{folder}")
    assert loaded.kind == "diffusers"
    assert loaded.name == "diffusers:sd3"
    assert {k: tuple(v.shape) for k, v in loaded.example_inputs.items()} == {
        "hidden_states": (2, 4, 8, 8), "encoder_hidden_states": (2, 8, 32), "pooled_projections": (2, 16),
        "timestep": (2,)}
    # the plain forward is the model's forward with return_dict=False
    fresh = families.build("sd3", layers=3).make_inputs(3)
    with torch.no_grad():
        want = plain(**fresh, return_dict=False)[0]
        assert torch.equal(loaded.module(**fresh), want)

    out = tmp_path / "sd3.onnx"
    r = run_cli(["export", f"diffusers:{folder}", "-o", str(out)])
    assert r.code == 0, r.err
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                                   "timestep"]
    got = _ort(out, {k: v.numpy() for k, v in fresh.items()})["output"]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-3)
    rep = json.loads((tmp_path / "sd3.export.json").read_text())
    assert rep["model"] == "diffusers:sd3"
    assert rep["model_kind"] == "diffusers"
    assert rep["blocks"]["containers"] == ["transformer_blocks"]
    assert rep["blocks"]["count"] == 3


def test_diffusers_source_takes_input_overrides(tmp_path, run_cli):
    pytest.importorskip("diffusers")
    folder = tmp_path / "dit"
    families.save_diffusers("dit", folder, num_layers=2)
    loaded = ex.load_torch_model(f"diffusers:{folder}")
    assert {k: (tuple(v.shape), v.dtype) for k, v in loaded.example_inputs.items()} == {
        "hidden_states": ((2, 4, 8, 8), torch.float32), "timestep": ((2,), torch.int64),
        "class_labels": ((2,), torch.int64)}
    assert int(loaded.example_inputs["class_labels"].max()) < 10  # num_embeds_ada_norm
    out = tmp_path / "dit.onnx"
    r = run_cli(["export", f"diffusers:{folder}", "-o", str(out), "--input", "hidden_states:1x4x8x8",
                 "--input", "timestep:1:int64", "--input", "class_labels:1:int64"])
    assert r.code == 0, r.err
    assert [_dims(i) for i in onnx.load(out).graph.input] == [[1, 4, 8, 8], [1], [1]]


def test_flux_source_gets_2d_ids_and_both_block_containers(tmp_path):
    pytest.importorskip("diffusers")
    folder = tmp_path / "flux"
    families.save_diffusers("flux", folder)
    loaded = ex.load_torch_model(f"diffusers:{folder}")
    shapes = {k: tuple(v.shape) for k, v in loaded.example_inputs.items()}
    assert shapes == {"hidden_states": (2, 16, 16), "encoder_hidden_states": (2, 8, 32), "pooled_projections": (2, 16),
                      "timestep": (2,), "img_ids": (16, 3), "txt_ids": (8, 3)}
    assert float(loaded.example_inputs["timestep"].max()) < 1.0  # Flux scales by 1000 itself
    assert sorted(ex.find_block_containers(loaded.module)) == ["single_transformer_blocks", "transformer_blocks"]


@pytest.mark.parametrize(("case", "message", "hint"), [
    ("missing", "diffusers model folder not found: {d}",
     "diffusers: takes a folder written by a diffusers model's save_pretrained (config.json with _class_name)"),
    ("no-class", "config.json in {name} has no _class_name",
     "diffusers: takes a folder written by a diffusers model's save_pretrained (config.json with _class_name)"),
    ("unknown-class", "{name}: _class_name 'NotAModel' is not a diffusers model class (diffusers {version})",
     "diffusers: takes a folder written by a diffusers model's save_pretrained (config.json with _class_name)"),
    ("no-weights", "cannot load the diffusers model in {name}: ",
     "the folder needs config.json and the weights (diffusion_pytorch_model.safetensors)"),
])
def test_diffusers_source_errors(case, message, hint, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    d = tmp_path / "model"
    if case != "missing":
        d.mkdir()
        config = {"no-class": {"in_channels": 4}, "unknown-class": {"_class_name": "NotAModel"},
                  "no-weights": {"_class_name": "DiTTransformer2DModel", **families.DIFFUSERS_CONFIGS["dit"][1]}}[case]
        (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as info:
        ex.load_torch_model(f"diffusers:{d}")
    expected = message.format(d=d, name=d.name, version=diffusers.__version__)
    assert info.value.message.startswith(expected) if case == "no-weights" else info.value.message == expected
    assert info.value.hint == hint


def test_declared_repeated_blocks_of_another_type_are_containers_too():
    nn = torch.nn

    class Double(nn.Linear):
        pass

    class Single(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self, declared: list[str] | None):
            super().__init__()
            if declared is not None:
                self._no_split_modules = declared
            self.transformer_blocks = nn.ModuleList(Double(4, 4) for _ in range(2))
            self.single_transformer_blocks = nn.ModuleList(Single(4, 4) for _ in range(4))
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))  # not declared: not blocks

    assert ex.find_block_containers(Net(None)) == ["single_transformer_blocks"]
    assert ex.find_block_containers(Net(["Double", "Single"])) == ["single_transformer_blocks", "transformer_blocks"]
    assert ex.find_block_containers(Net(["Single"])) == ["single_transformer_blocks"]


# --------------------------------------------------------------------------- shared (unbatched) inputs


def _flux_like_model() -> onnx.ModelProto:
    """y[batch, 4] = x[batch, 4] + sum(ids[5, 4]) (ids: no batch axis, like Flux's img_ids)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.FLOAT, [5, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("ReduceSum", ["ids", "axes"], ["s"], keepdims=1),
             helper.make_node("Add", ["x", "s"], ["y"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    graph = helper.make_graph(nodes, "flux_like", [x, ids], [y], initializer=[axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_inputs_without_batch_axis_are_shared_not_split(tmp_path):
    model = _flux_like_model()
    assert cal.shared_inputs(model) == frozenset({"ids"})
    ids = np.arange(20, dtype=np.float32).reshape(5, 4)
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    np.savez(tmp_path / "b0.npz", x=x, ids=ids)
    calib = cal.load_calibration(tmp_path, batch_size=4, shared=cal.shared_inputs(model))
    assert calib.files[0].shared == frozenset({"ids"})
    assert calib.samples == 6
    assert len(calib) == 2
    cal.check_calibration(calib, model)
    batches = list(cal.iter_batches(calib))
    assert [b["x"].shape for b in batches] == [(4, 4), (2, 4)]
    assert all(np.array_equal(b["ids"], ids) for b in batches)  # passed whole to every batch
    for b in batches:
        np.testing.assert_allclose(_ort(model, b)["y"], b["x"] + ids.sum(0), rtol=1e-6)


def test_calib_check_cli_accepts_a_shared_input(tmp_path, run_cli):
    model = _flux_like_model()
    compress.onnx_io.save_model(model, tmp_path / "m.onnx")
    data = tmp_path / "calib"
    data.mkdir()
    for i in range(2):
        np.savez(data / f"b{i}.npz", x=np.full((4, 4), i, np.float32), ids=np.ones((5, 4), np.float32))
    r = run_cli(["calib", "check", str(data), "--model", str(tmp_path / "m.onnx"), "--batch-size", "2"])
    assert r.code == 0, r.err
    assert r.out.startswith("ok: calib/ (2 files, 8 samples, 4 batches of <= 2), 4 batches fit m.onnx")


def test_shared_inputs_against_the_model(tmp_path):
    model = _flux_like_model()
    # the model names none when inputs agree: ids with a batch axis
    batched = onnx.ModelProto()
    batched.CopyFrom(model)
    batched.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "batch"
    assert cal.shared_inputs(batched) == frozenset()
    # a file whose arrays disagree on axis 0 while the model's input has a batch axis
    np.savez(tmp_path / "b0.npz", x=np.zeros((6, 4), np.float32), ids=np.zeros((5, 4), np.float32),
             z=np.zeros((6, 4), np.float32))
    calib = cal.load_calibration(tmp_path)  # no model at hand: inferred from the majority (x, z: 6 samples)
    assert calib.files[0].shared == frozenset({"ids"})
    three = onnx.ModelProto()
    three.CopyFrom(batched)
    three.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4]))
    with pytest.raises(CalibrationError) as info:
        cal.check_calibration(calib, three)
    assert info.value.message == (f"{tmp_path / 'b0.npz'}: array 'ids' has 5 along axis 0 but the file's other arrays "
                                  "hold 6 samples, and model input 'ids' has a batch axis (batchx4)")
    assert info.value.hint == "all arrays of one file must hold the same samples along axis 0"
    # a shared input must keep the model's static leading dim
    (tmp_path / "b0.npz").unlink()
    np.savez(tmp_path / "c.npz", x=np.zeros((6, 4), np.float32), ids=np.zeros((3, 4), np.float32))
    calib = cal.load_calibration(tmp_path, shared=cal.shared_inputs(model))
    with pytest.raises(CalibrationError) as info:
        cal.check_calibration(calib, model)
    assert info.value.message == f"{tmp_path / 'c.npz'}: input 'ids' axis 0 has size 3 but the model expects 5 (5x4)"


def test_shared_input_of_the_same_size_cannot_be_split(tmp_path):
    model = _flux_like_model()
    np.savez(tmp_path / "b0.npz", x=np.zeros((5, 4), np.float32), ids=np.zeros((5, 4), np.float32))
    whole = cal.load_calibration(tmp_path)  # one batch per file: ids goes in whole
    cal.check_calibration(whole, model)
    split = cal.load_calibration(tmp_path, batch_size=2)
    with pytest.raises(CalibrationError) as info:
        cal.check_calibration(split, model)
    assert info.value.message == (f"{tmp_path / 'b0.npz'}: model input 'ids' has no batch axis (5x4) but the file is "
                                  "split into batches along axis 0")
    assert info.value.hint == "drop --batch-size (one batch per file); a shared input is passed whole"


# --------------------------------------------------------------------------- the torch oracle


def test_run_skipping_is_the_identity_on_every_stream():
    pytest.importorskip("diffusers")
    fam = families.build("sd3", layers=3)
    block = fam.module.transformer_blocks[1]
    seen = {}

    def grab(_m, args, kwargs, out):
        seen["in"], seen["out"] = families._bound_inputs(block, args, kwargs), families.identity_output(block, args, kwargs, out)

    h = block.register_forward_hook(grab, with_kwargs=True)
    try:
        families.run(fam.module, fam.inputs)
    finally:
        h.remove()
    enc, hid = seen["out"]  # JointTransformerBlock returns (encoder_hidden_states, hidden_states)
    assert enc is seen["in"]["encoder_hidden_states"]
    assert hid is seen["in"]["hidden_states"]
    # skipping every block == a model without blocks
    full = families.run_skipping(fam.module, fam.inputs, "transformer_blocks", range(3))
    blocks = fam.module.transformer_blocks
    fam.module.transformer_blocks = torch.nn.ModuleList()
    try:
        assert torch.equal(full, families.run(fam.module, fam.inputs))
    finally:
        fam.module.transformer_blocks = blocks
    assert not torch.allclose(full, families.run(fam.module, fam.inputs))
