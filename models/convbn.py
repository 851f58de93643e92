"""Plain Conv-BN-ReLU network exercising every Conv/BN fold pattern (§1)."""

from __future__ import annotations

import torch
from torch import nn

from models.common import build_seeded

INPUT_SHAPE = (1, 3, 32, 32)


class ConvBNNet(nn.Module):
    """Conv-BN-ReLU stack: stride-2 conv, grouped conv, bias=True conv + BN,
    ConvTranspose2d + BN2d, and a Linear followed by BatchNorm1d in the head."""

    def __init__(self, deploy: bool = False, num_classes: int = 10) -> None:
        super().__init__()

        def cbr(
            cin: int, cout: int, k: int, s: int = 1, p: int = 0, g: int = 1, bias: bool = False
        ) -> nn.Sequential:
            if deploy:
                return nn.Sequential(nn.Conv2d(cin, cout, k, s, p, groups=g), nn.ReLU())
            return nn.Sequential(
                nn.Conv2d(cin, cout, k, s, p, groups=g, bias=bias), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.stem = cbr(3, 16, 3, 1, 1)
        self.down = cbr(16, 16, 3, 2, 1)  # stride 2
        self.grouped = cbr(16, 32, 3, 1, 1, g=4)  # grouped conv
        self.biased = cbr(32, 32, 1, bias=True)  # conv with bias + BN
        if deploy:
            self.up = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, 2), nn.ReLU())
        else:
            self.up = nn.Sequential(
                nn.ConvTranspose2d(32, 16, 2, 2, bias=False), nn.BatchNorm2d(16), nn.ReLU()
            )
        self.last = cbr(16, 24, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if deploy:
            self.fc = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, num_classes))
        else:
            self.fc = nn.Sequential(
                nn.Linear(24, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.up(self.biased(self.grouped(self.down(self.stem(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_train() -> nn.Module:
    """Training-time Conv-BN network with random weights and BN statistics."""
    return build_seeded(lambda: ConvBNNet(deploy=False), seed=1)


def build_plain() -> nn.Module:
    """Same network with every BN folded away (one biased Conv / Linear per layer)."""
    return build_seeded(lambda: ConvBNNet(deploy=True), seed=1)
