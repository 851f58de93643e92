"""RepOptimizer's CSLA block: relu(conv3x3(x)*s + conv1x1(x)*t + x*u) (RULES-SPEC §3, §5, §11).

Convs have bias and no BN; s, t, u are constant per-channel scales (buffers of shape (1,C,1,1)).
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import Head, build_seeded

INPUT_SHAPE = (1, 3, 32, 32)


class CSLABlock(nn.Module):
    """Constant-scale linear addition block; no identity branch when stride 2 or Cin != Cout."""

    def __init__(self, cin: int, cout: int, stride: int = 1, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        self.act = nn.ReLU()
        if deploy:
            self.reparam = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
            return
        self.conv3 = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
        self.conv1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=True)
        self.register_buffer("s", torch.rand(1, cout, 1, 1) + 0.5)
        self.register_buffer("t", torch.rand(1, cout, 1, 1) + 0.5)
        self.has_identity = cin == cout and stride == 1
        if self.has_identity:
            self.register_buffer("u", torch.rand(1, cout, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.reparam(x))
        out = self.conv3(x) * self.s + self.conv1(x) * self.t
        if self.has_identity:
            out = out + x * self.u
        return self.act(out)


class CSLANet(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        cfg = [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 32, 1)]
        self.features = nn.Sequential(*[CSLABlock(a, b, s, deploy) for a, b, s in cfg])
        self.head = Head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_train() -> nn.Module:
    """Training-time CSLA network."""
    return build_seeded(lambda: CSLANet(deploy=False), seed=6)


def build_plain() -> nn.Module:
    """Deploy CSLA network: one 3x3 conv with bias per block."""
    return build_seeded(lambda: CSLANet(deploy=True), seed=6)
