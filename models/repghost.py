"""RepGhost (Chen et al. 2022): primary 1x1 conv-BN-ReLU, then the cheap op = depthwise 3x3
conv-BN plus a fusion BN(x1) (identity BN branch), summed, ReLU (RULES-SPEC §5)."""

from __future__ import annotations

import torch
from torch import nn

from models.common import SE, build_seeded

INPUT_SHAPE = (1, 3, 32, 32)


class RepGhostModule(nn.Module):
    """As in ChengpengChen/RepGhost; ``reparam_identity`` adds a plain ``x1`` branch too."""

    def __init__(
        self,
        inp: int,
        oup: int,
        kernel_size: int = 1,
        dw_size: int = 3,
        stride: int = 1,
        relu: bool = True,
        deploy: bool = False,
        reparam_bn: bool = True,
        reparam_identity: bool = False,
    ) -> None:
        super().__init__()
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=deploy),
            nn.BatchNorm2d(oup) if not deploy else nn.Sequential(),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        fusion_conv: list[nn.Module] = []
        fusion_bn: list[nn.Module] = []
        if not deploy and reparam_bn:
            fusion_conv.append(nn.Identity())
            fusion_bn.append(nn.BatchNorm2d(oup))
        if not deploy and reparam_identity:
            fusion_conv.append(nn.Identity())
            fusion_bn.append(nn.Identity())
        self.fusion_conv = nn.Sequential(*fusion_conv)
        self.fusion_bn = nn.Sequential(*fusion_bn)
        self.cheap_operation: nn.Module = nn.Sequential(
            nn.Conv2d(oup, oup, dw_size, 1, dw_size // 2, groups=oup, bias=deploy),
            nn.BatchNorm2d(oup) if not deploy else nn.Sequential(),
        )
        if deploy:
            self.cheap_operation = self.cheap_operation[0]
        self.relu: nn.Module = nn.ReLU(inplace=False) if relu else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn, strict=True):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)


class RepGhostBottleneck(nn.Module):
    """ghost1 (ReLU) -> [dw stride-2 conv-BN] -> [SE] -> ghost2 (no ReLU) + shortcut."""

    def __init__(
        self,
        cin: int,
        mid: int,
        cout: int,
        stride: int = 1,
        se: bool = False,
        deploy: bool = False,
        reparam_identity: bool = False,
    ) -> None:
        super().__init__()
        self.ghost1 = RepGhostModule(cin, mid, relu=True, deploy=deploy)
        self.conv_dw: nn.Module = nn.Identity()
        if stride > 1:
            self.conv_dw = nn.Sequential(
                nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=deploy),
                nn.BatchNorm2d(mid) if not deploy else nn.Identity(),
            )
        self.se: nn.Module = SE(mid) if se else nn.Identity()
        self.ghost2 = RepGhostModule(
            mid, cout, relu=False, deploy=deploy, reparam_identity=reparam_identity
        )
        if cin == cout and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=deploy),
                nn.BatchNorm2d(cin) if not deploy else nn.Identity(),
                nn.Conv2d(cin, cout, 1, 1, 0, bias=deploy),
                nn.BatchNorm2d(cout) if not deploy else nn.Identity(),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost2(self.se(self.conv_dw(self.ghost1(x))))
        return y + self.shortcut(x)


class RepGhostNet(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=deploy),
            nn.BatchNorm2d(16) if not deploy else nn.Identity(),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            RepGhostBottleneck(16, 16, 16, 1, False, deploy),
            RepGhostBottleneck(16, 24, 24, 2, False, deploy),
            RepGhostBottleneck(24, 32, 24, 1, True, deploy, reparam_identity=True),
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.gap(self.blocks(self.stem(x))), 1))


def build_train() -> nn.Module:
    """Training-time RepGhostNet (one module also has the plain-identity fusion branch)."""
    return build_seeded(lambda: RepGhostNet(deploy=False), seed=9)


def build_plain() -> nn.Module:
    """Deploy RepGhostNet: each cheap op is one depthwise 3x3 conv with bias."""
    return build_seeded(lambda: RepGhostNet(deploy=True), seed=9)
