"""Block-importance metrics against independent one-shot numpy references.

Every reference below is written from the published formula, on the concatenation of
all batches (or per batch for the minibatch CKA), and shares no code with
compress.scoring. Data: seeded Gaussian "hidden states"; outputs = inputs + noise.
"""

from __future__ import annotations

import itertools
import json
import math
from contextlib import contextmanager

import numpy as np
import pytest

from compress.errors import BlockError, CalibrationError, ConfigError
from compress.scoring import (
    AblationAccumulator,
    BlockActivations,
    MetricConfig,
    TokenRange,
    fisher_segments,
    get_metric,
    metric_names,
    minibatch_hsic,
    parse_token_ranges,
    segment_losses,
)

TOL = 1e-10


@contextmanager
def raises(exc, message, *, prefix=False):
    """pytest.raises on a CompressError, checking its message (without the hint) exactly or as a prefix."""
    with pytest.raises(exc) as err:
        yield err
    got = err.value.message
    assert got.startswith(message) if prefix else got == message, got


# ----------------------------------------------------------------------------- helpers


def make_batches(rng, *, shape=(2, 6, 8), blocks=4, batches=3, chained=True):
    """Per batch: (inputs, outputs); outputs[i] = inputs[i] + block-specific noise."""
    out = []
    for _ in range(batches):
        ins, outs = [], []
        h = rng.normal(size=shape)
        for i in range(blocks):
            ins.append(h)
            o = h + (0.2 + 0.3 * i) * rng.normal(size=shape)
            outs.append(o)
            h = o if chained else rng.normal(size=shape)
        out.append((ins, outs))
    return out


def run(name, batches, **config):
    acc = get_metric(name)(len(batches[0][0]), MetricConfig(**config))
    for ins, outs in batches:
        acc.update(BlockActivations(ins, outs))
    return acc.result()


def tokens(a):
    """[B, T, D] or [B, C, H, W] -> [tokens, hidden] (reference layout rule)."""
    if a.ndim == 4:
        a = a.transpose(0, 2, 3, 1)
    return a.reshape(-1, a.shape[-1])


def ref_cos(x, y):
    return np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


REFERENCES = {
    "cosine": lambda c: 1 - np.abs(c),
    "cosine-signed": lambda c: 1 - c,
    "angular": lambda c: np.arccos(np.clip(c, -1, 1)) / np.pi,
}


def ref_pair_scores(name, batches, *, interval=1, view=tokens):
    """Mean over all tokens of all batches, span i = input i vs output i+interval-1."""
    blocks = len(batches[0][0])
    scores = []
    for i in range(blocks):
        if i + interval - 1 >= blocks:
            scores.append(None)
            continue
        x = np.concatenate([view(ins[i]) for ins, _ in batches])
        y = np.concatenate([view(outs[i + interval - 1]) for _, outs in batches])
        scores.append(float(np.mean(REFERENCES[name](ref_cos(x, y)))))
    return scores


def ref_hsic(x, y):
    """Unbiased HSIC (Song et al. 2012), linear kernel, straight from the formula."""
    n = x.shape[0]
    k, l_ = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l_, 0)
    one = np.ones(n)
    return (
        np.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l_ @ one
    ) / (n * (n - 3))


def ref_cka_matrix(minibatches):
    """Nguyen et al. 2021: CKA from HSIC averaged over minibatches; minibatches = [[rep rows]]."""
    m = len(minibatches[0])
    h = np.zeros((m, m))
    for reps in minibatches:
        h += np.array([[ref_hsic(a, b) for b in reps] for a in reps])
    h /= len(minibatches)
    return h / np.sqrt(np.outer(np.diag(h), np.diag(h)))


def assert_scores(got, want, tol=TOL):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            assert g == pytest.approx(w, abs=tol, rel=tol)


# ----------------------------------------------------------------------------- per-token metrics


@pytest.mark.parametrize("name", ["cosine", "cosine-signed", "angular"])
def test_pair_metric_streaming_equals_one_shot_reference(name):
    batches = make_batches(np.random.default_rng(1))
    result = run(name, batches)
    assert_scores(result.scores, ref_pair_scores(name, batches))
    assert result.per_range is None
    assert result.details["tokens"] == [36, 36, 36, 36]
    # one call on the concatenated batch gives the same numbers
    joined = [
        (
            [np.concatenate([b[0][i] for b in batches]) for i in range(4)],
            [np.concatenate([b[1][i] for b in batches]) for i in range(4)],
        )
    ]
    assert_scores(run(name, joined).scores, result.scores, tol=1e-12)


def test_cosine_abs_differs_from_signed_on_sign_flips():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 5, 4))
    batches = [([x], [-x])]
    assert run("cosine", batches).scores[0] == pytest.approx(0.0, abs=1e-15)
    assert run("cosine-signed", batches).scores[0] == pytest.approx(2.0, abs=1e-15)
    assert run("angular", batches).scores[0] == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("name", ["cosine", "angular"])
def test_interval_scores_spans_and_leaves_the_tail_unscored(name):
    batches = make_batches(np.random.default_rng(3), blocks=5)
    result = run(name, batches, interval=3)
    want = ref_pair_scores(name, batches, interval=3)
    assert want[3:] == [None, None]
    assert_scores(result.scores, want)
    assert result.to_dict()["scores"][3:] == [None, None]


def test_interval_longer_than_model_is_a_config_error():
    batches = make_batches(np.random.default_rng(3), blocks=2)
    with raises(ConfigError, "--interval 3 is longer than the model's 2 blocks"):
        run("cosine", batches, interval=3)


def test_token_ranges_score_each_range_and_combine_unweighted():
    batches = make_batches(np.random.default_rng(4), shape=(2, 10, 8))
    ranges = parse_token_ranges("text=0:3,image=3:")
    result = run("cosine", batches, token_ranges=ranges)
    text = ref_pair_scores("cosine", batches, view=lambda a: a[:, 0:3].reshape(-1, 8))
    image = ref_pair_scores("cosine", batches, view=lambda a: a[:, 3:].reshape(-1, 8))
    assert set(result.per_range) == {"text", "image"}
    assert_scores(result.per_range["text"], text)
    assert_scores(result.per_range["image"], image)
    assert_scores(result.scores, [(t + i) / 2 for t, i in zip(text, image, strict=True)])
    # a negative start counts from the end
    tail = run("angular", batches, token_ranges=parse_token_ranges("last2=-2:"))
    assert_scores(tail.per_range["last2"], ref_pair_scores("angular", batches, view=lambda a: a[:, -2:].reshape(-1, 8)))


def test_nchw_layout_uses_channels_as_hidden_and_pixels_as_tokens():
    batches = make_batches(np.random.default_rng(5), shape=(2, 6, 3, 4))  # C=6, H*W=12 tokens
    result = run("cosine-signed", batches)
    assert_scores(result.scores, ref_pair_scores("cosine-signed", batches))
    assert result.details["tokens"] == [72] * 4
    # token range on the flattened spatial axis; explicit channel axis = auto
    sub = run("cosine-signed", batches, token_ranges=(TokenRange("top", 0, 4),), channel_axis=1)
    top = ref_pair_scores(
        "cosine-signed", batches, view=lambda a: a.reshape(2, 6, 12)[:, :, :4].transpose(0, 2, 1).reshape(-1, 6)
    )
    assert_scores(sub.scores, top)


def test_channel_axis_last_for_nhwc():
    batches = make_batches(np.random.default_rng(6), shape=(2, 3, 4, 5))
    result = run("cosine", batches, channel_axis=-1)
    assert_scores(result.scores, ref_pair_scores("cosine", batches, view=lambda a: a.reshape(-1, 5)))


def test_rank2_inputs_are_one_token_per_sample():
    batches = make_batches(np.random.default_rng(7), shape=(5, 8))
    assert_scores(run("cosine", batches).scores, ref_pair_scores("cosine", batches, view=lambda a: a))


def test_last_token_angular_matches_gromov_reference():
    batches = make_batches(np.random.default_rng(8), shape=(3, 7, 8))
    result = run("angular", batches, last_token=True, interval=2)
    want = ref_pair_scores("angular", batches, interval=2, view=lambda a: a[:, -1, :])
    assert_scores(result.scores, want)
    assert result.details["tokens"] == [9, 9, 9, 0]


def test_zero_vectors_follow_the_documented_rule():
    x = np.array([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]])  # [1, 4, 2]
    y = np.array([[[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [2.0, 2.0]]])
    batches = [([x], [y])]
    # per token: both zero -> cos 1; one zero -> cos 0 (twice); parallel -> cos 1
    assert run("cosine", batches).scores[0] == pytest.approx((0 + 1 + 1 + 0) / 4, abs=1e-15)
    assert run("cosine-signed", batches).scores[0] == pytest.approx(0.5, abs=1e-15)
    assert run("angular", batches).scores[0] == pytest.approx((0 + 0.5 + 0.5 + 0) / 4, abs=1e-15)
    assert run("cka", [([x[0]] * 4, [x[0]] * 4)]).scores[0] == pytest.approx(0.0, abs=1e-12)


def test_nearly_identical_vectors_keep_precision():
    x = np.random.default_rng(9).normal(size=(1, 50, 16))
    y = x * (1 + 1e-9 * np.random.default_rng(10).normal(size=x.shape))
    d = run("cosine-signed", [([x], [y])]).scores[0]
    xh = x / np.linalg.norm(x, axis=-1, keepdims=True)
    yh = y / np.linalg.norm(y, axis=-1, keepdims=True)
    want = float(np.mean(0.5 * np.sum((xh - yh) ** 2, axis=-1)))  # exact form of 1 - cos
    assert 0 < d == pytest.approx(want, rel=1e-6)


def test_float16_and_float32_inputs_are_upcast():
    batches = make_batches(np.random.default_rng(11))
    half = [([a.astype(np.float16) for a in i], [a.astype(np.float16) for a in o]) for i, o in batches]
    want = ref_pair_scores(
        "cosine", [([a.astype(np.float64) for a in i], [a.astype(np.float64) for a in o]) for i, o in half]
    )
    assert_scores(run("cosine", half).scores, want, tol=1e-12)


def ref_exact_distance(name, x, y):
    """Per-token distance in float64 from the normalised difference (exact for nearly parallel
    vectors), with the zero-vector rule; x, y: [N, D]."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    xh = x / np.where(nx == 0, 1, nx)[:, None]
    yh = y / np.where(ny == 0, 1, ny)[:, None]
    d2, p2 = np.sum((xh - yh) ** 2, axis=1), np.sum((xh + yh) ** 2, axis=1)
    value = {"cosine": 0.5 * np.minimum(d2, p2), "cosine-signed": 0.5 * d2,
             "angular": np.arctan2(np.sqrt(d2), np.sqrt(p2)) * 2 / np.pi}[name]
    one_zero = 0.5 if name == "angular" else 1.0
    return np.where((nx == 0) & (ny == 0), 0.0, np.where((nx == 0) | (ny == 0), one_zero, value))


@pytest.mark.parametrize("name", ["cosine", "cosine-signed", "angular"])
def test_float32_activations_match_the_float64_exact_reference(name):
    """float32 boundaries take the fast path (float32 dot products); nearly (anti-)parallel
    tokens go to a float32 normalised-difference tier, and are recomputed in float64 when
    even closer, like zero vectors and under/overflowing squared norms."""
    rng = np.random.default_rng(15)
    x = rng.normal(size=(4, 64, 16)) + 0.5
    y = x + 0.5 * rng.normal(size=x.shape)  # ordinary tokens: 1 - |cos| ~ 0.02 .. 0.5
    special = {  # token -> (x, y) of one sample
        0: (x[0, 0], x[0, 0] * (1 + 1e-6 * rng.normal(size=16))),  # nearly parallel: 1 - cos ~ 1e-13
        1: (x[0, 1], x[0, 1] * (1 + 1e-3 * rng.normal(size=16))),  # 1 - cos ~ 1e-7
        2: (x[0, 2], -x[0, 2] * (1 + 1e-3 * rng.normal(size=16))),  # nearly anti-parallel
        3: (np.zeros(16), np.zeros(16)),
        4: (np.zeros(16), y[0, 4]),
        5: (1e-30 * x[0, 5], 1e-30 * y[0, 5]),  # float32 squares underflow to 0
        6: (1e20 * x[0, 6], 1e20 * y[0, 6]),  # float32 squares overflow to inf
    }
    second_tier = {  # 1 - |cos| ~ 5e-4: float32 normalised difference
        7: (x[0, 7], x[0, 7] * (1 + 0.03 * rng.normal(size=16))),
        8: (x[0, 8], -x[0, 8] * (1 + 0.03 * rng.normal(size=16))),
    }
    for t, (a, b) in (special | second_tier).items():
        x[0, t], y[0, t] = a, b
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    acc = get_metric(name)(2, MetricConfig())
    acc.update(BlockActivations([x32, y32], [y32, x32]))  # span 1 compares y with x
    result = acc.result()
    want = ref_exact_distance(name, x32.reshape(-1, 16), y32.reshape(-1, 16))
    assert_scores(result.scores, [float(want.mean())] * 2, tol=1e-6)  # measured: < 1e-7
    assert result.details["exact_tokens"] == [len(special)] * 2  # the ordinary tokens stay on the fast path
    assert result.details["refined_tokens"] == [len(second_tier)] * 2
    # the nearly parallel tokens alone: exact to float64 precision
    tiny = get_metric(name)(1, MetricConfig())
    tiny.update(BlockActivations([x32[:1, :2]], [y32[:1, :2]]))
    want2 = ref_exact_distance(name, x32[0, :2], y32[0, :2]).mean()
    assert 0 < want2 < 1e-3  # 1 - cos < 1e-6; the angle ~ sqrt(1 - cos)
    assert tiny.result().scores[0] == pytest.approx(want2, rel=1e-9)
    # a float64 output next to a float32 input
    mixed = get_metric(name)(1, MetricConfig())
    mixed.update(BlockActivations([x32], [y32.astype(np.float64)]))
    assert mixed.result().scores[0] == pytest.approx(want.mean(), rel=1e-6)


def test_nan_in_an_activation_names_block_and_side():
    ins, outs = make_batches(np.random.default_rng(12), batches=1)[0]
    outs[2] = outs[2].copy()
    outs[2][0, 1, 3] = np.nan
    with pytest.raises(BlockError) as err:
        BlockActivations(ins, outs)
    assert err.value.message == "block 2 output contains NaN or Inf (1 of 96 values)"
    assert err.value.hint == (
        "the model overflows on this calibration data (common in float16); check its inputs, or score a float32 model"
    )
    ins[1] = ins[1].copy()
    ins[1][0, 0, 0] = np.inf
    with raises(BlockError, "block 1 (layers.1) input contains NaN or Inf", prefix=True):
        BlockActivations(ins, outs, names=[f"layers.{i}" for i in range(4)])


def test_bad_activations_are_block_errors():
    with raises(BlockError, "block activations need one input and one output per block, got 2 inputs and 1 outputs"):
        BlockActivations([np.zeros((1, 2))] * 2, [np.zeros((1, 2))])
    with raises(
        BlockError, "block 0 input is a int64 array of shape (1, 2); block boundaries must be float", prefix=True
    ):
        BlockActivations([np.zeros((1, 2), dtype=np.int64)], [np.zeros((1, 2))])
    acc = get_metric("cosine")(2)
    acc.update(BlockActivations([np.ones((1, 2))] * 2, [np.ones((1, 2))] * 2))
    with raises(BlockError, "batch 1 has 1 blocks; the metric was set up for 2"):
        acc.update(BlockActivations([np.ones((1, 2))], [np.ones((1, 2))]))


def test_shape_changing_span_is_unscored():
    rng = np.random.default_rng(13)
    ins = [rng.normal(size=(1, 4, 6, 6)), rng.normal(size=(1, 8, 3, 3))]
    outs = [ins[1], rng.normal(size=(1, 8, 3, 3))]
    result = run("cosine", [(ins, outs)])
    assert result.scores[0] is None
    assert result.scores[1] is not None
    assert result.details["unscored"] == {"0": "shape [1, 4, 6, 6] -> [1, 8, 3, 3]"}


# ----------------------------------------------------------------------------- registry and config


def test_unknown_metric_lists_valid_names():
    assert metric_names() == ["ablation", "angular", "cka", "cosine", "cosine-signed", "gradnorm"]
    with pytest.raises(ConfigError) as err:
        get_metric("cosin")
    assert err.value.message == "unknown metric 'cosin'; valid: ablation, angular, cka, cosine, cosine-signed, gradnorm"
    assert err.value.hint == "use --metric with one of: ablation, angular, cka, cosine, cosine-signed, gradnorm"


def test_parse_token_ranges():
    assert parse_token_ranges("text=0:77,image=77:") == (TokenRange("text", 0, 77), TokenRange("image", 77, None))
    assert parse_token_ranges(" a=:-1 , b=-1: ") == (TokenRange("a", None, -1), TokenRange("b", -1, None))
    assert parse_token_ranges("") == ()
    assert str(TokenRange("image", 77, None)) == "image=77:"
    with pytest.raises(ConfigError) as err:
        parse_token_ranges("text=0-77")
    assert err.value.message == "bad token range 'text=0-77' in --token-ranges 'text=0-77': expected NAME=START:STOP"
    assert "text=0:77,image=77:" in err.value.hint
    with raises(ConfigError, "token range name 'a' is repeated in --token-ranges 'a=0:1,a=1:'"):
        parse_token_ranges("a=0:1,a=1:")
    with raises(ConfigError, "token range name 'combined' is reserved", prefix=True):
        parse_token_ranges("combined=0:1")


def test_empty_token_range_is_a_config_error():
    batches = make_batches(np.random.default_rng(14), shape=(1, 4, 3), batches=1)
    with raises(ConfigError, "token range image=77: selects no token of an activation of shape (1, 4, 3) (4 tokens)"):
        run("cosine", batches, token_ranges=parse_token_ranges("image=77:"))
    # a range that runs past the end used to be cut silently (issue 10: an MMDiT image stream sliced as "text")
    with raises(ConfigError, "token range text=0:77 does not fit an activation of shape (1, 4, 3) (4 tokens): "
                             "token 77 is past its end"):
        run("cosine", batches, token_ranges=parse_token_ranges("text=0:77"))
    with raises(ConfigError, "token range a=-9:2 does not fit an activation of shape (1, 4, 3) (4 tokens): "
                             "token -9 is past its end"):
        run("cosine", batches, token_ranges=parse_token_ranges("a=-9:2"))


def test_stream_fusion_options():
    from compress.scoring import fuse_streams, parse_stream_weights

    assert fuse_streams({"image": 0.1, "text": 0.4}, MetricConfig()) == 0.4
    assert fuse_streams({"image": 0.1, "text": None}, MetricConfig()) == 0.1
    assert fuse_streams({"image": None}, MetricConfig()) is None
    cfg = MetricConfig(stream_fusion="mean", stream_weights=parse_stream_weights("image=3,text=1"))
    assert fuse_streams({"image": 0.1, "text": 0.5}, cfg) == pytest.approx(0.2)
    assert fuse_streams({"image": 0.1, "other": 0.5}, cfg) == pytest.approx((0.3 + 0.5) / 4)
    with raises(ConfigError, "--stream-fusion 'min' is invalid: one of max, mean"):
        MetricConfig(stream_fusion="min")
    with raises(ConfigError, "--stream-weights needs --stream-fusion mean"):
        MetricConfig(stream_weights=(("image", 1.0),))
    with raises(ConfigError, "bad stream weight 'text' in --stream-weights 'image=1,text': expected NAME=WEIGHT "
                             "(a weight >= 0, each stream once)"):
        parse_stream_weights("image=1,text")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "--interval 0 is invalid: an integer >= 1"),
        ({"max_tokens": 2}, "--max-tokens 2 is invalid: an integer >= 4"),
        ({"segments": 0}, "--segments 0 is invalid: an integer >= 1"),
        ({"channel_axis": 1.5}, "--channel-axis 1.5 is invalid: an integer axis"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError) as err:
        MetricConfig(**kwargs)
    assert err.value.message == message


def test_channel_axis_zero_is_rejected():
    with raises(ConfigError, "--channel-axis 0 does not fit a rank-3 activation (axis 0 is the batch)"):
        run("cosine", make_batches(np.random.default_rng(0), batches=1), channel_axis=0)


# ----------------------------------------------------------------------------- CKA


def test_minibatch_hsic_matches_song_formula():
    rng = np.random.default_rng(20)
    reps = [rng.normal(size=(30, 5)) + 2.0, rng.normal(size=(30, 7)), rng.normal(size=(30, 3)) * 10 - 4]
    got = minibatch_hsic(reps)
    want = np.array([[ref_hsic(a, b) for b in reps] for a in reps])
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    # float32 inputs take the float32 Gram path: close, not exact
    got32 = minibatch_hsic([r.astype(np.float32) for r in reps])
    want32 = np.array([[ref_hsic(a, b) for b in reps] for a in (r.astype(np.float32).astype(np.float64) for r in reps)])
    np.testing.assert_allclose(got32, want32, rtol=1e-4, atol=1e-4 * np.abs(want32).max())


def test_cka_streaming_equals_per_batch_minibatch_reference():
    batches = make_batches(np.random.default_rng(21), shape=(2, 5, 6), blocks=4, batches=3)
    result = run("cka", batches)
    minibatches = [[tokens(ins[0])] + [tokens(o) for o in outs] for ins, outs in batches]
    want = ref_cka_matrix(minibatches)
    np.testing.assert_allclose(np.array(result.matrix), want, rtol=TOL, atol=TOL)
    assert_scores(result.scores, [1 - want[i, i + 1] for i in range(4)])
    assert result.details["minibatches"] == [3]
    assert result.details["rows"] == "tokens"
    assert result.details["extra_inputs"] == []
    json.dumps(result.to_dict(), allow_nan=False)


def test_cka_identical_rotated_and_independent_representations():
    rng = np.random.default_rng(22)
    x = rng.normal(size=(1, 400, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    z = rng.normal(size=(1, 400, 16))
    result = run("cka", [([x, x, x @ q], [x, x @ q, z])])
    m = np.array(result.matrix)
    assert m[0, 1] == pytest.approx(1.0, abs=1e-12)  # identical
    assert m[0, 2] == pytest.approx(1.0, abs=1e-12)  # orthogonally rotated
    assert abs(m[0, 3]) < 0.02  # independent
    assert result.scores[0] == pytest.approx(0.0, abs=1e-12)


def test_cka_interval_and_extra_inputs():
    rng = np.random.default_rng(23)
    batches = make_batches(rng, shape=(1, 12, 5), blocks=3, batches=2, chained=False)
    result = run("cka", batches, interval=2)
    assert result.details["extra_inputs"] == [1, 2]
    reps = [[tokens(ins[0]), *map(tokens, outs), tokens(ins[1]), tokens(ins[2])] for ins, outs in batches]
    want = ref_cka_matrix(reps)
    # span i: input of block i (index 0, or its extra index 4, 5) vs output of block i+1 (index i+2)
    assert_scores(result.scores, [1 - want[0, 2], 1 - want[4, 3], None])
    np.testing.assert_allclose(np.array(result.matrix), want[:4, :4], rtol=TOL, atol=TOL)


def test_cka_token_subsampling_uses_the_seeded_generator():
    batches = make_batches(np.random.default_rng(24), shape=(2, 20, 4), blocks=2, batches=2)
    result = run("cka", batches, max_tokens=16, seed=5)
    rng = np.random.default_rng(5)
    minibatches = []
    for ins, outs in batches:
        idx = np.sort(rng.choice(40, 16, replace=False))
        minibatches.append([tokens(ins[0])[idx]] + [tokens(o)[idx] for o in outs])
    np.testing.assert_allclose(np.array(result.matrix), ref_cka_matrix(minibatches), rtol=TOL, atol=TOL)
    assert run("cka", batches, max_tokens=16, seed=5).matrix == result.matrix


def test_cka_samples_mode_for_different_resolutions_pools_small_batches():
    rng = np.random.default_rng(25)
    batches = []
    for _ in range(4):  # batch size 2 -> pooled into minibatches of 4 samples
        a = rng.normal(size=(2, 3, 8, 8))
        b = a[:, :, ::2, ::2].repeat(2, axis=1) + 0.5 * rng.normal(size=(2, 6, 4, 4))
        c = b + 0.5 * rng.normal(size=b.shape)
        batches.append(([a, b], [b, c]))
    result = run("cka", batches, min_rows=4)
    assert result.details["rows"] == "samples"
    assert result.details["minibatches"] == [2]
    minibatches = []
    for j in (0, 2):
        pooled = [batches[j], batches[j + 1]]
        minibatches.append(
            [np.concatenate([p[0][0] for p in pooled]).reshape(4, -1)]
            + [np.concatenate([p[1][k] for p in pooled]).reshape(4, -1) for k in range(2)]
        )
    want = ref_cka_matrix(minibatches)
    # samples mode flattens tokens-major [B, T, C]: a permutation of the features, CKA unchanged
    np.testing.assert_allclose(np.array(result.matrix), want, rtol=TOL, atol=TOL)


def test_cka_with_too_few_rows_is_a_calibration_error():
    with raises(
        CalibrationError, "CKA needs at least 4 rows (tokens or samples) per minibatch; the calibration data gave 3"
    ):
        run("cka", [([np.ones((3, 4))] * 2, [np.ones((3, 4))] * 2)])


def test_cka_token_ranges_average_per_range_matrices():
    batches = make_batches(np.random.default_rng(26), shape=(2, 9, 5), blocks=3, batches=2)
    result = run("cka", batches, token_ranges=parse_token_ranges("a=0:4,b=4:"))
    mats = []
    for lo, hi in ((0, 4), (4, 9)):
        mats.append(
            ref_cka_matrix(
                [
                    [ins[0][:, lo:hi].reshape(-1, 5)] + [o[:, lo:hi].reshape(-1, 5) for o in outs]
                    for ins, outs in batches
                ]
            )
        )
    np.testing.assert_allclose(np.array(result.matrix), (mats[0] + mats[1]) / 2, rtol=TOL, atol=TOL)
    assert_scores(result.per_range["a"], [1 - mats[0][i, i + 1] for i in range(3)])
    assert_scores(result.scores, [1 - (mats[0][i, i + 1] + mats[1][i, i + 1]) / 2 for i in range(3)])


def test_cka_segments_follow_output_similarity():
    rng = np.random.default_rng(27)
    base = [rng.normal(size=(1, 64, 8)) for _ in range(3)]
    outs = [base[0], base[0], base[0], base[1], base[1], base[2], base[2]]  # groups of 3, 2, 2
    ins = [base[2], *outs[:-1]]
    result = run("cka", [(ins, outs)])
    assert result.segments == ((0, 3), (3, 5), (5, 7))
    assert result.details["segment_count"] == "auto"
    assert run("cka", [(ins, outs)], segments=2).segments in {((0, 3), (3, 7)), ((0, 5), (5, 7))}
    with raises(ConfigError, "--segments 9 is more than the model's 7 blocks"):
        run("cka", [(ins, outs)], segments=9)


# ----------------------------------------------------------------------------- Fisher segmentation


def brute_force(similarity, k):
    n = similarity.shape[0]
    d = 1 - (similarity + similarity.T) / 2

    def cost(a, b):
        return sum(d[i, j] for i in range(a, b) for j in range(i + 1, b)) / (b - a)

    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        loss = sum(cost(bounds[i], bounds[i + 1]) for i in range(k))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, [(bounds[i], bounds[i + 1]) for i in range(k)])
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fisher_segments_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    s = rng.uniform(size=(7, 7))
    np.fill_diagonal(s, 1.0)
    losses = segment_losses(s)
    for k in range(1, 8):
        loss, segments = brute_force(s, k)
        assert fisher_segments(s, k) == segments
        assert losses[k - 1] == pytest.approx(loss, abs=1e-12)


def test_fisher_recovers_block_diagonal_groups_exactly():
    sizes = [3, 1, 4, 2]
    labels = np.repeat(np.arange(4), sizes)
    s = (labels[:, None] == labels[None, :]).astype(float)
    assert fisher_segments(s) == [(0, 3), (3, 4), (4, 8), (8, 10)]  # auto k = 4
    assert fisher_segments(s, 4) == [(0, 3), (3, 4), (4, 8), (8, 10)]
    assert fisher_segments(np.ones((1, 1))) == [(0, 1)]
    assert fisher_segments(np.eye(2)) == [(0, 1), (1, 2)]
    with raises(ConfigError, "cannot split 10 blocks into 11 segments"):
        fisher_segments(s, 11)


# ----------------------------------------------------------------------------- ablation


def ref_log_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return np.log(e / e.sum(-1, keepdims=True))


def test_ablation_logits_kl_top1_cosine_mae():
    rng = np.random.default_rng(30)
    refs = [{"logits": rng.normal(size=(3, 5, 10)), "image": rng.normal(size=(3, 2, 4, 4))} for _ in range(2)]
    abl = [{k: v + 0.7 * rng.normal(size=v.shape) for k, v in r.items()} for r in refs]
    acc = AblationAccumulator(3, logits={"logits"})
    for r, a in zip(refs, abl, strict=True):
        acc.update(1, r, a)
    result = acc.result()
    p = np.concatenate([r["logits"] for r in refs])
    q = np.concatenate([a["logits"] for a in abl])
    lp, lq = ref_log_softmax(p), ref_log_softmax(q)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    top1 = float(np.mean(p.argmax(-1) == q.argmax(-1)))
    assert result.scores[0] is None
    assert result.scores[2] is None
    assert result.scores[1] == pytest.approx(kl, rel=TOL)
    row = result.details["outputs"]["1"]["logits"]
    assert row["kl"] == pytest.approx(kl, rel=TOL)
    assert row["top1_agreement"] == pytest.approx(top1, abs=1e-15)
    assert row["mae"] == pytest.approx(float(np.mean(np.abs(p - q))), rel=TOL)
    assert row["cosine_distance"] == pytest.approx(
        float(np.mean(1 - ref_cos(p.reshape(6, -1), q.reshape(6, -1)))), rel=TOL
    )
    assert "kl" not in result.details["outputs"]["1"]["image"]  # not named as logits


def test_ablation_scores_unnamed_rank3_outputs_by_cosine_not_kl():
    # A [B, T, D] embedding has the shape of [B, T, V] logits; only the caller's names decide.
    rng = np.random.default_rng(32)
    ref = {"last_hidden_state": rng.normal(size=(2, 5, 16))}
    abl = {"last_hidden_state": ref["last_hidden_state"] + 0.5 * rng.normal(size=(2, 5, 16))}
    acc = AblationAccumulator(2)
    acc.update(0, ref, abl)
    row = acc.result().details["outputs"]["0"]["last_hidden_state"]
    assert "kl" not in row
    x, y = ref["last_hidden_state"].reshape(2, -1), abl["last_hidden_state"].reshape(2, -1)
    assert acc.result().scores[0] == pytest.approx(float(np.mean(1 - ref_cos(x, y))), rel=TOL)


def test_ablation_non_logits_scores_cosine_and_nonfinite_is_essential():
    rng = np.random.default_rng(31)
    ref = {"y": rng.normal(size=(4, 3, 2, 2))}
    acc = AblationAccumulator(4)
    acc.update(0, ref, {"y": ref["y"] * 2.0})
    acc.update(1, ref, {"y": -ref["y"]})
    acc.update(2, ref, {"y": np.full_like(ref["y"], np.inf)})
    result = acc.result()
    assert result.scores[0] == pytest.approx(0.0, abs=1e-15)
    assert result.scores[1] == pytest.approx(2.0, abs=1e-15)
    assert result.scores[2] == math.inf
    d = result.to_dict()
    assert d["scores"][2] is None
    assert d["details"]["nonfinite"] == [2]
    json.dumps(d, allow_nan=False)
    with raises(
        BlockError, "output 'y' of the model without block 3 is missing; the full model gives shape [4, 3, 2, 2]"
    ):
        acc.update(3, ref, {})


def test_result_without_data_is_a_calibration_error():
    with raises(CalibrationError, "metric 'cosine' received no calibration batch"):
        get_metric("cosine")(3).result()
    assert get_metric("ablation").needs_final is True
    assert get_metric("cka").needs_final is False
    with raises(BlockError, "ablation block index 4 is outside 0..3"):
        AblationAccumulator(4).update(4, {}, {})


def test_config_to_dict_is_json_ready():
    cfg = MetricConfig(interval=2, token_ranges=parse_token_ranges("text=0:77,image=77:"), segments=3)
    assert cfg.to_dict() == {
        "interval": 2,
        "token_ranges": ["text=0:77", "image=77:"],
        "last_token": False,
        "channel_axis": None,
        "segments": 3,
        "max_tokens": 1024,
        "min_rows": 8,
        "seed": 0,
        "stream_fusion": "max",
        "stream_weights": {},
        "token_mask": "auto",
    }
