"""Tiny models for tests, built in-test with fixed seeds (no committed binaries).

TinyTransformer (pre-norm encoder)::

    x[B,T,D] -> embed(Linear) -> blocks.0 .. blocks.{n-1} -> norm(LayerNorm) -> head(Linear) -> y
    block:  h = h + proj(softmax(q k^T / sqrt(d)) v)   with q,k,v = qkv(norm1(h))
            h = h + fc2(gelu(fc1(norm2(h))))

TinyResNet (NCHW)::

    x[B,3,H,W] -> stem(Conv3x3, BN, ReLU) -> blocks.0 .. blocks.{n-1} -> pool -> fc -> logits
    block:  h = relu(h + bn2(conv2(relu(bn1(conv1(h))))))     (same channels, same size)

All parameters (LayerNorm and BatchNorm included) are randomised, so exporters cannot
deduplicate byte-identical initializers across blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Draw every parameter and BatchNorm statistic from a seeded generator; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (fan_in**-0.5 if p.dim() > 1 else 0.1))
        for m in module.modules():
            if isinstance(m, nn.LayerNorm | nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1.0 + 0.1 * torch.rand(m.running_var.shape, generator=g))
    return module.eval()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, *, dim: int = 32, depth: int = 4, heads: int = 2, in_dim: int = 16, out_dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, *, ch: int = 8, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())
        self.blocks = nn.Sequential(*(ResBlock(ch) for _ in range(depth)))
        self.fc = nn.Linear(ch, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def tiny_transformer(*, depth: int = 4, seed: int = 0, **kw: int) -> TinyTransformer:
    """A randomised TinyTransformer; input ``x`` of shape [B, T, 16] (float32)."""
    torch.manual_seed(seed)
    return _randomise(TinyTransformer(depth=depth, **kw), seed)


def tiny_resnet(*, depth: int = 4, seed: int = 0, **kw: int) -> TinyResNet:
    """A randomised TinyResNet; input ``x`` of shape [B, 3, H, W] (float32)."""
    torch.manual_seed(seed)
    return _randomise(TinyResNet(depth=depth, **kw), seed)


def transformer_input(batch: int = 2, tokens: int = 8, *, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(seed))


def image_input(batch: int = 2, size: int = 8, *, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_onnx(module: nn.Module, x: torch.Tensor, path: Path, *, exporter: str = "dynamo", dynamic_batch: bool = False) -> Path:
    """Export ``module`` with one input ``x`` named "x" and output "y" to ``path`` (opset 18).

    ``exporter`` is "dynamo" (torch.export based, module paths in node metadata) or
    "torchscript" (module paths in node names). Weights are kept inside the file.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dyn = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
            torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=18, external_data=False,
                              input_names=["x"], output_names=["y"], dynamic_shapes=dyn, verbose=False)
        elif exporter == "torchscript":
            axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=18,
                              input_names=["x"], output_names=["y"], dynamic_axes=axes)
        else:
            raise ValueError(exporter)
    return path


def block_hooks(module: nn.Module, container: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every entry of ``container`` during ``module(x)``, from forward hooks."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [blk.register_forward_hook(lambda _m, i, o: seen.append((i[0].detach(), o.detach()))) for blk in container]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return seen
