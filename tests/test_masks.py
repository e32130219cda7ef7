"""Token masks in scoring: padding tokens do not change the scores; the mask input is found."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import models
from compress.blocks import MappedModel, find_blocks
from compress.errors import ConfigError
from compress.prune import PruneConfig, prune, split_batches
from compress.scoring import MetricConfig
from compress.scoring.collect import ScoreConfig, find_token_mask, score

METRICS = ("cosine", "cosine-signed", "angular", "cka")


class MaskedBlock(nn.Module):
    """Pre-norm encoder block whose attention ignores padded keys (BERT-like)."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class MaskedEncoder(nn.Module):
    def __init__(self, depth: int = 4, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(MaskedBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h, bias)
        return self.norm(h)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    module = models._randomise(MaskedEncoder(), 5)
    x, m = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.int64)
    path = tmp_path_factory.mktemp("mask") / "enc.onnx"
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, m), str(path), dynamo=True, opset_version=18, external_data=False,
                          input_names=["x", "attention_mask"], output_names=["y"],
                          dynamic_shapes={"x": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}})
    return module, onnx.load(path)


LENGTHS = ((5, 8, 3), (7, 2, 6), (4, 4, 8))


def _sentences(seed: int = 0) -> list[list[np.ndarray]]:
    """Three batches of three 'sentences' (token rows [L, 16]) of fixed lengths."""
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=(n, 16)).astype(np.float32) for n in lengths] for lengths in LENGTHS]


def _padded(sentences: list[list[np.ndarray]], width: int, *, seed: int) -> list[dict[str, np.ndarray]]:
    """Right-padded batches; padding positions hold random vectors (as a pad embedding would differ)."""
    rng = np.random.default_rng(seed)
    out = []
    for batch in sentences:
        x = rng.normal(size=(len(batch), width, 16)).astype(np.float32)
        m = np.zeros((len(batch), width), dtype=np.int64)
        for i, s in enumerate(batch):
            x[i, : len(s)], m[i, : len(s)] = s, 1
        out.append({"x": x, "attention_mask": m})
    return out


def _score(model, batches, **options):
    config = ScoreConfig(metrics=METRICS, options=MetricConfig(min_rows=4, **options))
    return score(MappedModel(model, find_blocks(model)), config, data=batches)[1]


def test_the_mask_input_is_found(encoder) -> None:
    _, model = encoder
    assert find_token_mask(model)[0] == "attention_mask"
    assert find_token_mask(model, "none")[0] is None
    assert find_token_mask(model, "attention_mask")[0] == "attention_mask"
    with pytest.raises(ConfigError, match=r"--token-mask 'mask' is not an input of the model \(inputs: x, attention_mask\)"):
        find_token_mask(model, "mask")
    with pytest.raises(ConfigError, match="--token-mask 'x': the input is not an integer/bool"):
        find_token_mask(model, "x")


def test_padding_does_not_change_the_scores(encoder) -> None:
    _, model = encoder
    sentences = _sentences()
    short = _score(model, _padded(sentences, 8, seed=1))
    long = _score(model, _padded(sentences, 24, seed=2))
    real = sum(sum(lengths) for lengths in LENGTHS)
    for report in (short, long):
        used = report.config["token_mask_used"]
        assert used["input"] == "attention_mask"
        assert "auto" in used["how"]
        assert used["real_tokens"] == real
    assert long.config["token_mask_used"]["positions"] == 9 * 24
    for name in METRICS:
        a, b = short.scores(name), long.scores(name)
        assert all(v is not None for v in a)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
        details = long.metrics[name]["details"]
        assert details["masked"]
    tokens = long.metrics["cosine"]["details"]
    assert tokens["tokens"] == [real] * 4
    assert tokens["positions"] == [9 * 24] * 4
    # without the mask the padding decides: the same sentences score differently
    plain_short = _score(model, _padded(sentences, 8, seed=1), token_mask="none")
    plain_long = _score(model, _padded(sentences, 24, seed=2), token_mask="none")
    assert plain_long.config["token_mask_used"]["input"] is None
    assert plain_long.metrics["cosine"]["details"]["tokens"] == [9 * 24] * 4
    assert np.max(np.abs(np.subtract(plain_short.scores("cosine"), plain_long.scores("cosine")))) > 1e-3


def test_last_token_is_each_samples_last_real_token(encoder) -> None:
    _, model = encoder
    sentences = _sentences(3)
    a = _score(model, _padded(sentences, 8, seed=4), last_token=True)
    b = _score(model, _padded(sentences, 20, seed=5), last_token=True)
    assert a.metrics["angular"]["details"]["tokens"] == [9] * 4
    np.testing.assert_allclose(a.scores("angular"), b.scores("angular"), rtol=0, atol=1e-6)


def test_per_range_scores_use_the_mask(encoder) -> None:
    from compress.scoring import parse_token_ranges

    _, model = encoder
    sentences = _sentences(6)
    ranges = parse_token_ranges("head=0:4,rest=4:")
    a = _score(model, _padded(sentences, 8, seed=7), token_ranges=ranges)
    b = _score(model, _padded(sentences, 16, seed=8), token_ranges=ranges)
    for name in ("cosine", "cka"):
        for r in ("head", "rest"):
            np.testing.assert_allclose(a.metrics[name]["per_range"][r], b.metrics[name]["per_range"][r],
                                       rtol=0, atol=1e-6, err_msg=f"{name} {r}")


def test_masked_view_keeps_real_tokens_and_ignores_a_mask_of_other_axes() -> None:
    from compress.scoring.collect import mask_fits
    from compress.scoring.metrics import masked_view

    a = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    m = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    v, used = masked_view(a, m)
    assert used
    assert v.shape == (1, 5, 3)
    np.testing.assert_array_equal(v[0], np.concatenate([a[0, :2], a[1, :3]]))
    last, _ = masked_view(a, m, last_token=True)
    np.testing.assert_array_equal(last[0], np.stack([a[0, 1], a[1, 2]]))
    nchw = np.zeros((2, 3, 2, 2), dtype=np.float32)  # 4 spatial tokens of 3 channels: fits [2, 4]
    assert masked_view(nchw, m)[1]
    assert mask_fits(m, [nchw], None)
    other, used = masked_view(np.zeros((2, 5, 3), dtype=np.float32), m)
    assert not used
    assert other.shape == (2, 5, 3)
    assert not mask_fits(m, [np.zeros((2, 5, 3)), np.zeros((3, 4, 3))], None)


def test_prune_heals_on_real_tokens_only(encoder) -> None:
    _, model = encoder
    batches = _padded(_sentences(), 12, seed=1) * 2
    config = PruneConfig(metric="cosine", remove=2, heal=True, latency=None)
    r = prune(MappedModel(model, find_blocks(model)), config, data=batches)[1].to_dict()
    assert r["heal"]["token_mask"] == "attention_mask"
    score_set, _ = split_batches(batches, config.holdout)
    real = sum(int(b["attention_mask"].sum()) for b in score_set)
    assert real < len(score_set) * 3 * 12
    for span in r["heal"]["spans"]:
        assert span["streams"][0]["tokens"] == real
    assert r["heal"]["fidelity_with"]["loss"] <= r["heal"]["fidelity_without"]["loss"]
    with pytest.raises(ConfigError, match="--token-mask"):
        PruneConfig(remove=1, options=MetricConfig(token_mask=""))
