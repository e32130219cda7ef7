"""GradNorm (SGLP's block importance): torch computation, block map storage, the gradnorm metric in prune.

The model (seeded, in NET below): x [4, 8] -> four residual MLP blocks -> Linear head [4, 3]::

    x -> blocks.0 -> blocks.1 -> blocks.2 -> blocks.3 -> head -> output (logits)
         x + W2 gelu(W1 x + b1) + b2;  blocks.2 has W1, b1, W2, b2 scaled by 1e-3 (near identity)

The near-identity block's weight gradients are ~1e-3 of the others' (dL/dW2 ~ gelu(W1 x),
dL/dW1 ~ W2); only its output bias keeps a full gradient, so it has the smallest GradNorm
whatever the loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from compress.blocks import BlockMap  # noqa: E402
from compress.blocks.mapfile import check_block_map  # noqa: E402
from compress.errors import BlockError, ModelError  # noqa: E402
from compress.export.gradnorm import Hutchinson, ModuleIO, block_gradnorms  # noqa: E402
from compress.scoring.gradnorm import GradNormMetric, carry_gradnorms, with_gradnorms  # noqa: E402

NET = '''
import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(self, d, scale):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Mlp(8, s) for s in (1.0, 1.0, 1e-3, 1.0)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),)
'''

PATHS = [f"blocks.{i}" for i in range(4)]
TINY = 2


def _net():
    ns: dict = {}
    exec(compile(NET, "net.py", "exec"), ns)
    return ns["build"]()[0]


def _batches(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(n)]


def _direct(model, batches, loss_fn) -> list[float]:
    """GradNorm by plain torch: backward per batch, squared grads of each block summed, mean, sqrt."""
    sums = [0.0] * len(PATHS)
    for i, b in enumerate(batches):
        model.zero_grad()
        out = model(torch.from_numpy(b["x"]))
        loss_fn(out, i).backward()
        for j, p in enumerate(PATHS):
            sums[j] += sum(float((q.grad.double() ** 2).sum()) for q in model.get_submodule(p).parameters())
    model.zero_grad()
    return [math.sqrt(s / len(batches)) for s in sums]


def _order(values) -> list[str]:
    return sorted(values, key=values.get)


# --------------------------------------------------------------------------- torch side


def test_pseudo_label_gradnorm_matches_torch_and_ranks_the_identity_block_lowest():
    model, batches = _net(), _batches()
    before = [p.detach().clone() for p in model.parameters()]
    r = block_gradnorms(model, PATHS, batches, io=ModuleIO(logits=("output",)))

    assert r.loss == "cross-entropy vs the unpruned model's argmax (pseudo-labels; output 'output')"
    assert (r.batches, r.samples, r.draws) == (3, 12, 0)
    assert _order(r.values)[0] == f"blocks.{TINY}"
    assert r.values[f"blocks.{TINY}"] < 0.8 * min(v for k, v in r.values.items() if k != f"blocks.{TINY}")
    want = _direct(model, batches, lambda out, _: torch.nn.functional.cross_entropy(out, out.detach().argmax(-1)))
    for p, w in zip(PATHS, want, strict=True):
        assert r.values[p] == pytest.approx(w, rel=1e-6)
    # the module is left as found: eval mode, no .grad, weights unchanged, requires_grad restored
    assert not model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_labels_use_cross_entropy_and_match_torch():
    model = _net()
    labels = [np.array([0, 1, 2, 0]), np.array([2, 2, 1, 0]), np.array([1, 0, 0, 2])]
    batches = [{**b, "labels": y} for b, y in zip(_batches(), labels, strict=True)]
    r = block_gradnorms(model, PATHS, batches, io=ModuleIO(logits=("output",)))

    assert r.loss == "cross-entropy vs labels (output 'output')"
    want = _direct(model, batches, lambda out, i: torch.nn.functional.cross_entropy(out, torch.from_numpy(labels[i])))
    assert r.values["blocks.1"] == pytest.approx(want[1], rel=1e-6)
    assert _order(r.values)[0] == f"blocks.{TINY}"


def test_hutchinson_gradnorm_is_seeded_and_estimates_the_jacobian_norm():
    model, batches = _net(), _batches(2)
    no_logits, seeded = ModuleIO(logits=()), Hutchinson(draws=4, seed=3)
    r = block_gradnorms(model, PATHS, batches, io=no_logits, hutchinson=seeded)
    assert r.loss == "Hutchinson: <f(x), u>, u ~ N(0, I), 4 draws per batch, seed 3 (all 1 float outputs)"
    assert r.draws == 4
    assert r.values == block_gradnorms(model, PATHS, batches, io=no_logits, hutchinson=seeded).values  # deterministic
    assert _order(r.values)[0] == f"blocks.{TINY}"
    # many draws: close to the exact ||J||_F (the Jacobian of the batch output w.r.t. the block's parameters)
    many = block_gradnorms(model, PATHS, batches, io=no_logits, hutchinson=Hutchinson(draws=400, seed=0))
    block = model.get_submodule("blocks.1")
    exact = 0.0
    for b in batches:
        out = model(torch.from_numpy(b["x"])).reshape(-1)
        for k in range(out.numel()):
            g = torch.autograd.grad(out[k], list(block.parameters()), retain_graph=True)
            exact += sum(float((x.double() ** 2).sum()) for x in g)
    assert many.values["blocks.1"] == pytest.approx(math.sqrt(exact / len(batches)), rel=0.1)


def test_a_block_that_is_not_a_submodule_is_named():
    with pytest.raises(BlockError, match=r"block 'encoder.layer.0' of the block map is not a submodule"):
        block_gradnorms(_net(), ["encoder.layer.0"], _batches(1))


# --------------------------------------------------------------------------- block map


def _map(names=PATHS) -> BlockMap:
    from compress.blocks import Block

    return BlockMap(("blocks",), "metadata", tuple(Block(i, n, f"t{i}", f"t{i + 1}", (), (f"n{i}",), 10, None, None, True)
                                                   for i, n in enumerate(names)))


def test_block_map_round_trip_keeps_gradnorm_and_old_maps_stay_readable():
    plain = _map()
    assert "gradnorm_loss" not in plain.to_dict()
    assert all("gradnorm" not in b for b in plain.to_dict()["blocks"])  # maps without GradNorm are written as before
    bm = with_gradnorms(plain, {"blocks.0": 1.5, "blocks.1": 0.25, "blocks.2": 0.0, "blocks.3": 2.0}, "some loss")
    d = json.loads(json.dumps(bm.to_dict()))
    check_block_map(d, source="x.blocks.json")
    back = BlockMap.from_dict(d)
    assert back == bm
    assert [b.gradnorm for b in back.blocks] == [1.5, 0.25, 0.0, 2.0]
    assert back.gradnorm_loss == "some loss"
    assert BlockMap.from_dict(plain.to_dict()) == plain
    d["blocks"][1]["gradnorm"] = -1
    with pytest.raises(ModelError, match=r"x.blocks.json is not a valid block map: blocks\[1\].gradnorm: must be a "
                                         r"finite number >= 0 or null, got -1"):
        check_block_map(d, source="x.blocks.json")
    # the map of a pruned model keeps the values of its remaining blocks
    carried = carry_gradnorms(_map(["blocks.0", "blocks.1", "blocks.3"]), bm)
    assert [b.gradnorm for b in carried.blocks] == [1.5, 0.25, 2.0]


def test_metric_scores_spans_and_refuses_a_map_without_gradnorm():
    from compress.scoring import MetricConfig

    bm = with_gradnorms(_map(), {"blocks.0": 3.0, "blocks.1": 4.0, "blocks.2": 0.5, "blocks.3": 1.0}, "loss")
    assert GradNormMetric(4).score_map(bm.blocks).scores == (3.0, 4.0, 0.5, 1.0)
    span = GradNormMetric(4, MetricConfig(interval=2)).score_map(bm.blocks).scores
    assert span[:3] == pytest.approx((5.0, math.sqrt(16.25), math.sqrt(1.25)))
    assert span[3] is None
    with pytest.raises(BlockError) as exc:
        GradNormMetric(4).score_map(_map().blocks, source="m.blocks.json")
    assert exc.value.message == "m.blocks.json has no GradNorm scores (metric gradnorm)"


# --------------------------------------------------------------------------- CLI: export and prune


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``net.onnx`` exported with --calib (GradNorm in net.blocks.json), the calibration folder and net.py."""
    from compress.cli import main

    root = tmp_path_factory.mktemp("gradnorm")
    (root / "net.py").write_text(NET)
    calib = root / "calib"
    calib.mkdir()
    for i, b in enumerate(_batches(4)):
        np.savez(calib / f"b{i}.npz", **b)
    assert main(["export", f"{root / 'net.py'}:build", "-o", str(root / "net.onnx"), "--calib", str(calib), "-q"]) == 0
    return root


def test_export_with_calib_stores_gradnorm_in_the_block_map(exported):
    data = json.loads((exported / "net.blocks.json").read_text())
    bm = BlockMap.from_dict(data)
    assert [b.name for b in bm.blocks] == PATHS
    assert bm.gradnorm_loss == "cross-entropy vs the unpruned model's argmax (pseudo-labels; output 'output')"
    values = {b.name: b.gradnorm for b in bm.blocks}
    direct = block_gradnorms(_net(), PATHS, _batches(4), io=ModuleIO(logits=("output",)))
    for p in PATHS:
        assert values[p] == pytest.approx(direct.values[p], rel=1e-6)
    assert _order(values)[0] == f"blocks.{TINY}"
    rep = json.loads((exported / "net.export.json").read_text())["gradnorm"]
    assert (rep["calibration"], rep["batches"], rep["samples"]) == ("calib/ (4 files, 16 samples)", 4, 16)
    assert rep["values"] == pytest.approx(values, rel=1e-12)
    assert rep["loss"] == bm.gradnorm_loss


def _prune(run_cli, exported, tmp_path, *extra):
    out = tmp_path / "pruned.onnx"
    r = run_cli(["prune", exported / "net.onnx", "--calib", exported / "calib", "-o", out, "--remove", "1",
                 "--no-latency", "--json", *extra])
    return r, (json.loads(r.out) if r.code == 0 else None)


@pytest.mark.parametrize("rule", [[], ["--per-segment"]])
def test_prune_by_gradnorm_removes_the_identity_block(exported, tmp_path, run_cli, rule):
    r, rep = _prune(run_cli, exported, tmp_path, "--metric", "gradnorm", *rule)
    assert r.code == 0, r.err
    assert [b["name"] for b in rep["removed"]] == [f"blocks.{TINY}"]
    assert rep["method"]["gradnorm"] == ("present (cross-entropy vs the unpruned model's argmax (pseudo-labels; "
                                         "output 'output'))")
    assert rep["scores"]["gradnorm"]["details"]["source"] == "block map"


def _strip(exported, tmp_path) -> Path:
    """A copy of net.onnx whose block map has no GradNorm (as written before GradNorm existed)."""
    import shutil

    shutil.copy(exported / "net.onnx", tmp_path / "old.onnx")
    data = json.loads((exported / "net.blocks.json").read_text())
    data.pop("gradnorm_loss")
    for b in data["blocks"]:
        b.pop("gradnorm")
    (tmp_path / "old.blocks.json").write_text(json.dumps(data))
    return tmp_path / "old.onnx"


def test_absent_gradnorm_is_an_error_and_the_segment_report_says_absent(exported, tmp_path, run_cli):
    old = _strip(exported, tmp_path)
    argv = ["prune", old, "--calib", exported / "calib", "-o", tmp_path / "p.onnx", "--remove", "1", "--no-latency"]
    r = run_cli([*argv, "--metric", "gradnorm"])
    assert r.code == 1
    assert r.err.strip().splitlines()[-2:] == [
        "error: old.blocks.json has no GradNorm scores (metric gradnorm)",
        "hint: GradNorm needs the torch module: export with calibration data (compress export MODEL -o OUT.onnx "
        "--calib DIR), or pass compress prune --torch-source MODEL"]
    assert not (tmp_path / "p.onnx").exists()
    r = run_cli([*argv, "--metric", "cosine", "--per-segment", "--json"])
    assert r.code == 0, r.err
    assert json.loads(r.out)["method"]["gradnorm"] == "absent"


def test_torch_source_computes_gradnorm_for_prune(exported, tmp_path, run_cli):
    old = _strip(exported, tmp_path)
    out = tmp_path / "p.onnx"
    r = run_cli(["prune", old, "--calib", exported / "calib", "-o", out, "--remove", "1", "--no-latency", "--json",
                 "--metric", "gradnorm", "--torch-source", f"{exported / 'net.py'}:build"])
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert [b["name"] for b in rep["removed"]] == [f"blocks.{TINY}"]
    assert rep["method"]["gradnorm"].startswith("present (cross-entropy vs the unpruned model's argmax")
    assert rep["calibration"]["scoring_batches"] == 3  # GradNorm on the scoring batches; 1 of 4 held out
    # the pruned model's block map carries no GradNorm: the values described the unpruned model
    assert all("gradnorm" not in b for b in json.loads((tmp_path / "p.blocks.json").read_text())["blocks"])


LABELS = [np.array([0, 1, 2, 0]), np.array([2, 2, 1, 0]), np.array([1, 0, 0, 2]), np.array([0, 0, 1, 1])]


def test_labels_in_the_calibration_files_give_the_task_loss(exported, tmp_path, run_cli):
    """A 'labels' array in every .npz: GradNorm uses cross-entropy vs them; ORT never sees them."""
    calib = tmp_path / "labelled"
    calib.mkdir()
    for i, (b, y) in enumerate(zip(_batches(4), LABELS, strict=True)):
        np.savez(calib / f"b{i}.npz", **b, labels=y)
    old = _strip(exported, tmp_path)
    out = tmp_path / "p.onnx"
    r = run_cli(["prune", old, "--calib", calib, "-o", out, "--remove", "1", "--no-latency", "--json",
                 "--metric", "gradnorm", "--torch-source", f"{exported / 'net.py'}:build"])
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["method"]["gradnorm"] == "present (cross-entropy vs labels (output 'output'))"
    assert [b["name"] for b in rep["removed"]] == [f"blocks.{TINY}"]
    # the values: torch's cross-entropy against the labels of the 3 scoring batches (batch 2 of 4 is held out)
    scoring = [0, 1, 3]
    batches = [{**_batches(4)[i], "labels": LABELS[i]} for i in scoring]
    want = block_gradnorms(_net(), PATHS, batches, io=ModuleIO(logits=("output",)))
    assert want.loss == "cross-entropy vs labels (output 'output')"
    assert rep["scores"]["gradnorm"]["scores"] == pytest.approx([want.values[p] for p in PATHS], rel=1e-6)
    pseudo = block_gradnorms(_net(), PATHS, [_batches(4)[i] for i in scoring], io=ModuleIO(logits=("output",)))
    assert want.values["blocks.1"] != pytest.approx(pseudo.values["blocks.1"], rel=1e-3)  # the labels mattered

    np.savez(calib / "b1.npz", **_batches(4)[1])  # one file without labels
    r = run_cli(["prune", old, "--calib", calib, "-o", tmp_path / "q.onnx", "--remove", "1", "--no-latency"])
    assert r.code == 1
    error, hint = r.err.strip().splitlines()[-2:]
    assert error == f"error: {calib / 'b1.npz'} has no 'labels' array, but {calib / 'b0.npz'} has one"
    assert hint == "hint: give every calibration file a 'labels' array (one label per sample), or none"
    assert not (tmp_path / "q.onnx").exists()


def test_export_gradnorm_flag_needs_calib(tmp_path, run_cli):
    (tmp_path / "net.py").write_text(NET)
    r = run_cli(["export", f"{tmp_path / 'net.py'}:build", "-o", tmp_path / "n.onnx", "--gradnorm"])
    assert r.code == 1
    assert "error: --gradnorm needs calibration data" in r.err
    assert not (tmp_path / "n.onnx").exists()


class _Evil:
    """Unpickling this writes the marker file named by its argument."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_torch_source_archive_with_pickles_is_refused_without_trust_code(exported, tmp_path, run_cli):
    """--torch-source loads like 'compress export': a .pt2 with pickled payloads needs --trust-code."""
    import io
    import zipfile

    import torch

    evil = tmp_path / "evil.pt2"
    program = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4)).eval(), (torch.randn(2, 4),))
    torch.export.save(program, str(evil))
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    torch.save((_Evil(str(marker)),), buf)
    with zipfile.ZipFile(evil) as zf:
        members = [(i, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(evil, "w") as zf:
        for info, content in members:
            zf.writestr(info, buf.getvalue() if info.filename.endswith("data/sample_inputs/model.pt") else content)
    old = _strip(exported, tmp_path)
    r = run_cli(["prune", old, "--calib", exported / "calib", "-o", tmp_path / "p.onnx", "--remove", "1",
                 "--no-latency", "--metric", "gradnorm", "--torch-source", evil])
    assert r.code == 1
    assert "refuses" in r.err
    assert "--trust-code" in r.err
    assert not marker.exists()
    assert not (tmp_path / "p.onnx").exists()
