"""Linear Inception-style block: 1x1, 3x3, 5x5, 1x3 and 3x1 conv-BN branches on one input,
concatenated on channels, then ReLU (RULES-SPEC §8: one conv with the largest kernel)."""

from __future__ import annotations

import torch
from torch import nn

from models.common import Head, build_seeded, conv_bn

INPUT_SHAPE = (1, 3, 32, 32)

# (kernel, padding) of each branch; all centred on the same window
_BRANCHES: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = (
    ((1, 1), (0, 0)),
    ((3, 3), (1, 1)),
    ((5, 5), (2, 2)),
    ((1, 3), (0, 1)),
    ((3, 1), (1, 0)),
)


class LinearInception(nn.Module):
    def __init__(self, cin: int, per_branch: int, stride: int = 1, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        cout = per_branch * len(_BRANCHES)
        self.act = nn.ReLU()
        if deploy:
            self.reparam = nn.Conv2d(cin, cout, 5, stride, 2, bias=True)
            return
        self.branches = nn.ModuleList(
            [conv_bn(cin, per_branch, k, stride, p) for k, p in _BRANCHES]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.reparam(x))
        return self.act(torch.cat([b(x) for b in self.branches], dim=1))


class InceptionNet(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            LinearInception(3, 4, 1, deploy),  # 20 channels
            LinearInception(20, 4, 2, deploy),  # stride 2
            LinearInception(20, 6, 1, deploy),  # 30 channels
        )
        self.head = Head(30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_train() -> nn.Module:
    """Training-time linear Inception net."""
    return build_seeded(lambda: InceptionNet(deploy=False), seed=15)


def build_plain() -> nn.Module:
    """Deploy: one 5x5 conv with bias per block (output channels = concatenated branches)."""
    return build_seeded(lambda: InceptionNet(deploy=True), seed=15)
