"""A small residual CNN for the pipeline example ``deploy/pipelines/cnn.yaml``.

``build()`` returns ``(module, example_inputs)``, the form ``compress export`` (and the
pipeline's ``model.source: ../examples/resnet_tiny.py:build``) accepts: a ResNet-style
network (a stem, then ``layer1`` with two basic blocks at 16 channels and ``layer2`` with two
at 32, the first of them downsampling), weights drawn from a fixed seed, and one example input
``x`` of shape [2, 3, 32, 32].

The weights are untrained. To give the scores something to find, the last BatchNorm of each
block (the residual branch's output scale) is set from ``RESIDUAL_SCALES``, as in a trained
network whose blocks contribute unequally: blocks with a small scale change the residual
stream least and are pruned first. The downsampling block changes the shape of the stream
and cannot be removed (``compress inspect`` says why).
"""

from __future__ import annotations

import torch
from torch import nn

#: Output scale of each block's residual branch: layer1.0, layer1.1, layer2.0, layer2.1.
RESIDUAL_SCALES = (1.0, 0.05, 1.0, 0.2)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the (projected, when the shape changes) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.project = None
        if stride != 1 or cin != cout:
            self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.project is None else self.project(x)
        return torch.relu(identity + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetTiny(nn.Module):
    """stem -> layer1 (2 blocks, 16 ch) -> layer2 (2 blocks, 32 ch, stride 2) -> pool -> fc."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean(dim=(2, 3)))


def build(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The network in eval mode and an example input ``x`` [2, 3, 32, 32]; the global RNG is left untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ResNetTiny()
        blocks = [*model.layer1, *model.layer2]
        with torch.no_grad():
            for block, scale in zip(blocks, RESIDUAL_SCALES, strict=True):
                block.bn2.weight.fill_(scale)
        x = torch.randn(2, 3, 32, 32)
    return model.eval(), (x,)
