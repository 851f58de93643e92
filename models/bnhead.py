"""A small CNN whose last BatchNorm sits before the classifier head (docs/RULES.md).

Three Conv-BN-ReLU (two stride 2), then ``BatchNorm2d -> AdaptiveAvgPool2d(1) -> Flatten ->
Linear`` (Next-ViT's and many timm nets' final norm before the pooled head).

Deploy (``build_plain``): every Conv-BN fused into a biased Conv and the final BN folded into
the Linear through the (linear, per-channel) average pool: GAP -> Flatten -> Linear.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import build_seeded, conv_bn_relu, conv_relu

INPUT_SHAPE = (1, 3, 32, 32)


class BNHeadNet(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        block = conv_relu if deploy else conv_bn_relu
        self.features = nn.Sequential(
            block(3, 8, 3, 2, 1), block(8, 16, 3, 1, 1), block(16, 24, 3, 2, 1)
        )
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(24)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.norm(self.features(x)))
        return self.fc(torch.flatten(x, 1))


def build_train() -> nn.Module:
    """Training-time net with a random final BN before GAP -> Linear."""
    return build_seeded(lambda: BNHeadNet(deploy=False), seed=25)


def build_plain() -> nn.Module:
    """Deploy: biased convs, GAP -> Flatten -> Linear (the final BN folded into the Linear)."""
    return build_seeded(lambda: BNHeadNet(deploy=True), seed=25)
