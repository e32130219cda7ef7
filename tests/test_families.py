"""Every transformer family prunes like torch with the block skipped (issue 10, graph side).

Tiny seeded diffusers / transformers models (tests/families.py) exported once per session with
``compress export``'s code path; for each: all true blocks are found and removable, and the
pruned ONNX model equals torch with one middle block replaced by the identity on its streams
(cosine >= 0.9999 on fresh inputs). Also: the structural guard refuses wrong boundaries, and
multi-stream (MMDiT) blocks get per-stream scores.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import compress.onnx_io
import families  # noqa: E402
from compress.blocks import BlockMap, MappedModel, Stream, check_block, find_blocks, make_block  # noqa: E402
from compress.errors import BlockError, ConfigError  # noqa: E402
from compress.graph import GraphIndex, node_keys  # noqa: E402
from compress.reports.scoring import scores_markdown  # noqa: E402
from compress.runtime import (
    add_outputs,  # noqa: E402
    make_session,
)
from compress.scoring import MetricConfig, parse_token_ranges  # noqa: E402
from compress.scoring.collect import ScoreConfig, score  # noqa: E402
from compress.surgery import remove_blocks, verify_removal  # noqa: E402

#: family -> builder options: 3-4 blocks each keep the whole file near a minute on 2 cores.
SIZES = {
    "sana": {"layers": 3}, "sd3": {"layers": 3}, "flux": {"double": 2, "single": 2}, "pixart": {"layers": 3},
    "dit": {"layers": 3}, "gpt2": {"layers": 3}, "llama": {"layers": 3},
}
_CACHE: dict[str, tuple] = {}


def exported(name: str) -> tuple:
    """(family, onnx model, block map found on the model as the CLI would) for ``name``, once per session."""
    if name not in _CACHE:
        fam = families.build(name, **SIZES[name])
        model, _, _ = families.export(fam)
        _CACHE[name] = (fam, model, find_blocks(model))
    return _CACHE[name]


def _feeds(fam, seed: int) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in fam.make_inputs(seed).items()}


@pytest.mark.parametrize("name", list(SIZES))
def test_every_true_block_is_found_and_removable(name: str) -> None:
    fam, model, bm = exported(name)
    true = [f"{c}.{i}" for c, n in fam.true_blocks().items() for i in range(n)]
    assert sorted(b.name for b in bm.blocks) == sorted(true)
    assert [b.reason for b in bm.blocks] == [None] * len(true)
    assert all(b.removable for b in bm.blocks)
    for b in bm.blocks:  # the guard, re-run on the graph, agrees
        assert check_block(GraphIndex(model), b) is None


@pytest.mark.parametrize("name", list(SIZES))
def test_pruned_middle_block_equals_torch_skipping_it(name: str) -> None:
    fam, model, bm = exported(name)
    inputs = fam.make_inputs(7)  # fresh inputs, not the export's
    by_name = {b.name: b for b in bm.blocks}
    for container, n in fam.true_blocks().items():
        block = by_name[f"{container}.{n // 2}"]
        pruned = remove_blocks(model, [block])
        verify_removal(model, pruned, _feeds(fam, 7), blocks=[block])
        assert len(model.graph.node) - len(pruned.graph.node) >= len(block.nodes)
        got = families.ort_run(pruned, inputs)[0]
        want = families.run_skipping(fam.module, inputs, container, n // 2).numpy()
        full = families.run(fam.module, inputs).numpy()
        assert families.cosine(got, want) >= 0.9999, (block.name, families.cosine(got, want))
        assert families.cosine(full, want) < 0.9999  # the block matters: the check is not vacuous


def test_sana_torchscript_export_prunes_like_torch() -> None:
    """Issue 10: the TorchScript export of Sana reshapes to computed shapes that shape inference
    cannot follow (every block output was ``float32[?]``: 0 / 6 removable); the shapes are now
    measured with one ONNX Runtime run (static input shapes)."""
    fam = families.build("sana", layers=3)
    model, _, _ = families.export(fam, exporter="torchscript")
    bm = find_blocks(model)
    assert bm.source == "names"
    assert [b.name for b in bm.blocks] == [f"transformer_blocks.{i}" for i in range(3)]
    assert all(b.removable for b in bm.blocks)
    assert bm.blocks[1].shape == (2, 64, 64)
    inputs = fam.make_inputs(5)
    got = families.ort_run(remove_blocks(model, [bm.blocks[1]]), inputs)[0]
    want = families.run_skipping(fam.module, inputs, "transformer_blocks", 1).numpy()
    assert families.cosine(got, want) >= 0.9999


def test_mmdit_and_flux_blocks_have_two_named_streams() -> None:
    _, _, sd3 = exported("sd3")
    joint, last = sd3.blocks[0], sd3.blocks[-1]
    assert [st.name for st in joint.streams] == ["hidden_states", "encoder_hidden_states"]
    assert [st.name for st in last.streams] == ["hidden_states"]  # context_pre_only: the text stream ends here
    assert joint.stream_outputs == tuple(st.input for st in sd3.blocks[1].streams)
    fam, _, flux = exported("flux")
    assert flux.containers == ("transformer_blocks", "single_transformer_blocks") or set(flux.containers) == {
        "transformer_blocks", "single_transformer_blocks"}
    assert [b.name for b in flux.blocks][:2] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert all(len(b.streams) == 2 for b in flux.blocks[:-1])
    # the map survives a round trip, and a schema-1 map (one stream, no list) still loads
    assert BlockMap.from_dict(sd3.to_dict()) == sd3
    old = sd3.to_dict()
    old["schema_version"] = 1
    for b in old["blocks"]:
        b.pop("streams")
    one = BlockMap.from_dict(old).blocks[0]
    assert one.streams == (Stream("stream0", joint.input, joint.output, joint.shape, joint.dtype),)


def test_block_params_include_the_per_block_adaln_weights() -> None:
    fam, _, bm = exported("dit")
    # block 0's timestep/class embedder is shared with the output head (diffusers' DiT reads
    # transformer_blocks[0].norm1.emb there), so it stays outside; the others own theirs.
    for b in bm.blocks[1:]:
        torch_params = sum(p.numel() for p in fam.module.get_submodule(b.name).parameters())
        assert abs(b.params - torch_params) <= 64, (b.name, b.params, torch_params)  # a shared 64-vector may count


def test_guard_refuses_a_k_v_slice_as_the_residual_input(tmp_path) -> None:
    _, model, bm = exported("gpt2")
    index = GraphIndex(model)
    b = bm.blocks[1]
    split = next(k for k in b.nodes if index.node_by_key[k].op_type == "Split")
    v_slice = index.node_by_key[split].output[-1]
    planted = replace(b, input=v_slice, streams=(replace(b.streams[0], input=v_slice),))
    assert check_block(index, planted) == f"stream input {v_slice} is computed inside the block"
    with pytest.raises(BlockError) as err:
        remove_blocks(model, [planted])
    assert err.value.message == (f"block 1 ({b.name}) fails the structural check: stream input {v_slice} is computed "
                                 "inside the block")
    assert "nothing was written" in (err.value.hint or "")
    assert not list(tmp_path.iterdir())


def test_guard_refuses_the_gpt2_bug_blocks_without_scope_repair() -> None:
    """Without scope repair the scope-less Split of ``c_attn`` sits outside its layer, and the
    old detection took one of its slices (a K/V slice) for the layer's residual input."""
    import ast

    _, model, _ = exported("gpt2")
    keys = node_keys(model.graph)
    index = GraphIndex(model)
    groups: dict[str, list[str]] = {}
    for key, node in zip(keys, model.graph.node, strict=True):
        meta = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" not in meta:
            continue  # the Split: no module path of its own
        scopes = [s for s in ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])[:-1] if s]
        path = scopes[-1] if scopes else ""
        if path.startswith("transformer.h."):
            groups.setdefault(".".join(path.split(".")[:3]), []).append(key)
    for i, (name, nodes) in enumerate(groups.items()):
        raw = make_block(index, i, name, nodes)
        assert not raw.removable, name
        split_out = [x for x in raw.side_inputs if index.node_by_key[index.producer[x]].op_type == "Split"]
        assert split_out, name
        last = max(nodes, key=index.position.__getitem__)
        out = index.node_by_key[last].output[0]
        planted = replace(raw, removable=True, reason=None, input=split_out[-1], output=out,
                          streams=(Stream("hidden_states", split_out[-1], out),))
        assert check_block(index, planted) is not None, name
        with pytest.raises(BlockError, match=rf"^block {i} \({name}\) fails the structural check: "):
            remove_blocks(model, [planted])


def test_per_stream_scores_on_sd3() -> None:
    fam, model, bm = exported("sd3")
    batches = [_feeds(fam, s) for s in (11, 12)]
    report = score(MappedModel(model, bm), ScoreConfig(metrics=("cosine",)), data=batches)[1].to_dict()
    m = report["metrics"]["cosine"]
    assert list(m["per_stream"]) == ["hidden_states", "encoder_hidden_states"]
    assert m["stream_fusion"] == "max"
    # per-stream score = mean over tokens of 1 - |cos| on that stream's own boundary tensors
    joint = bm.blocks[1]
    names = [t for st in joint.streams for t in (st.input, st.output)]

    sess = make_session(add_outputs(model, names))
    want = {}
    for st in joint.streams:
        vals = []
        for feed in batches:
            x, y = (a.astype(np.float64) for a in sess.run([st.input, st.output], feed))
            cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
            vals.append(1 - np.abs(cos).ravel())
        want[st.name] = float(np.concatenate(vals).mean())
        assert m["per_stream"][st.name][joint.index] == pytest.approx(want[st.name], rel=1e-4)
    assert m["scores"][joint.index] == pytest.approx(max(want.values()), rel=1e-4)
    assert m["per_stream"]["encoder_hidden_states"][bm.blocks[-1].index] is None
    assert m["scores"][bm.blocks[-1].index] == m["per_stream"]["hidden_states"][bm.blocks[-1].index]
    md = scores_markdown(report)
    assert "### cosine per stream" in md
    assert "| # | block | hidden_states | encoder_hidden_states | fused |" in md
    # weighted fusion
    weights = (("hidden_states", 3.0), ("encoder_hidden_states", 1.0))
    mean = score(MappedModel(model, bm), ScoreConfig(metrics=("cosine",), options=MetricConfig(
        stream_fusion="mean", stream_weights=weights)), data=batches)[1].to_dict()["metrics"]["cosine"]
    expected = (3 * want["hidden_states"] + want["encoder_hidden_states"]) / 4
    assert mean["scores"][joint.index] == pytest.approx(expected, rel=1e-4)
    # token ranges slice one tensor: refused on separate streams
    with pytest.raises(ConfigError) as err:
        score(MappedModel(model, bm), ScoreConfig(metrics=("cosine",), options=MetricConfig(
            token_ranges=parse_token_ranges("text=0:8,image=8:"))), data=batches)[1]
    assert err.value.message == (f"--token-ranges slices one tensor, but block 0 ({bm.blocks[0].name}) has 2 separate "
                                 "streams (hidden_states, encoder_hidden_states)")


def _stream(block, name):
    return next((st for st in block.streams if st.name == name), None)


def test_per_stream_span_scores_on_sd3() -> None:
    """--interval 2 (the span scores --span selects on): every stream of a span is scored from the
    first block's stream input to the last block's stream output; the text stream, which ends in
    the last block, is not scored for the span that reaches it; fused = max of the streams."""

    fam, model, bm = exported("sd3")
    batches = [_feeds(fam, s) for s in (21, 22)]
    cfg = ScoreConfig(metrics=("cosine",), options=MetricConfig(interval=2))
    report = score(MappedModel(model, bm), cfg, data=batches)[1].to_dict()
    m = report["metrics"]["cosine"]
    assert list(m["per_stream"]) == ["hidden_states", "encoder_hidden_states"]
    blocks = bm.blocks
    names = list(dict.fromkeys(t for b in blocks for st in b.streams for t in (st.input, st.output)))
    sess = make_session(add_outputs(model, names))
    values = [dict(zip(names, sess.run(names, feed), strict=True)) for feed in batches]
    checked = 0
    for i in range(len(blocks) - 1):
        first, last = blocks[i], blocks[i + 1]
        want = {}
        for s in m["per_stream"]:
            a, b = _stream(first, s), _stream(last, s)
            if a is None or b is None:
                assert m["per_stream"][s][first.index] is None
                continue
            vals = []
            for v in values:
                x, y = v[a.input].astype(np.float64), v[b.output].astype(np.float64)
                cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
                vals.append(1 - np.abs(cos).ravel())
            want[s] = float(np.concatenate(vals).mean())
            assert abs(m["per_stream"][s][first.index] - want[s]) <= 1e-6, (i, s)
            checked += 1
        assert abs(m["scores"][first.index] - max(want.values())) <= 1e-6
    assert checked == 2 * (len(blocks) - 1) - 1  # the text stream ends in the last block
    last_span = blocks[-2].index
    assert m["per_stream"]["encoder_hidden_states"][last_span] is None
    assert m["scores"][last_span] == m["per_stream"]["hidden_states"][last_span]
    assert m["scores"][blocks[-1].index] is None  # no span of 2 starts at the last block
    # the two streams really differ: the fusion picks one of them, not a primary-only score
    first = blocks[0].index
    assert m["per_stream"]["hidden_states"][first] != m["per_stream"]["encoder_hidden_states"][first]
    md = scores_markdown(report)
    assert "### cosine per stream" in md
    assert "`-` = the stream does not run through the whole span; row i = the span of blocks i..i+1." in md
    # weighted fusion on spans, and the first span's mean uses both streams
    weights = (("hidden_states", 3.0), ("encoder_hidden_states", 1.0))
    mean = score(MappedModel(model, bm), ScoreConfig(metrics=("cosine",), options=MetricConfig(
        interval=2, stream_fusion="mean", stream_weights=weights)), data=batches)[1].to_dict()["metrics"]["cosine"]
    ps = m["per_stream"]
    assert abs(mean["scores"][first] - (3 * ps["hidden_states"][first] + ps["encoder_hidden_states"][first]) / 4) <= 1e-9
    assert mean["scores"][last_span] == ps["hidden_states"][last_span]


def test_random_calibration_drives_flux_2d_ids(tmp_path, run_cli) -> None:
    """--random-calib gives inputs without a batch axis (Flux's 2-D img_ids/txt_ids) the model's
    own shape, passed whole; `compress prune --random-calib 2 --scores-only` scores every block."""
    import json

    from compress.calibration import check_calibration, model_input_types, random_calibration

    _, model, bm = exported("flux")
    types = model_input_types(model)
    calib = random_calibration(model, batches=2, batch_size=2)
    check_calibration(calib, model)
    feeds = list(calib)
    assert len(feeds) == 2
    for feed in feeds:
        assert feed["img_ids"].shape == types["img_ids"].shape == (16, 3)
        assert feed["txt_ids"].shape == types["txt_ids"].shape == (8, 3)
        assert feed["hidden_states"].shape == (2, 16, 16)
    assert not np.array_equal(feeds[0]["img_ids"], feeds[1]["img_ids"])  # drawn per batch, seeded
    assert np.array_equal(list(random_calibration(model, batches=2, batch_size=2))[1]["img_ids"], feeds[1]["img_ids"])
    path = tmp_path / "flux.onnx"
    compress.onnx_io.save_model(model, path)
    res = run_cli(["prune", path, "--random-calib", "2", "--batch-size", "2", "--scores-only",
                   "--report", tmp_path / "scores.json"])
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["calibration"]["random"] is True
    assert report["calibration"]["batches"] == 2
    scores = report["metrics"]["cosine"]["scores"]
    assert len(scores) == len(bm.blocks)
    assert all(isinstance(s, float) and s > 0 for s in scores)
    assert set(report["metrics"]["cosine"]["per_stream"]) == {"hidden_states", "encoder_hidden_states"}
