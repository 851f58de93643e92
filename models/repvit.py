"""RepViT (Wang et al. 2024): RepVGGDW token mixer ``bn(conv3x3dw_bn(x) + conv1x1dw(x) + x)``
then a channel mixer (1x1 conv-BN, GELU, 1x1 conv-BN) with a residual add (RULES-SPEC §5)."""

from __future__ import annotations

import torch
from torch import nn

from models.common import SE, build_seeded, conv_bn

INPUT_SHAPE = (1, 3, 32, 32)


def _conv_bn(
    cin: int, cout: int, k: int = 1, s: int = 1, p: int = 0, g: int = 1, deploy: bool = False
) -> nn.Module:
    if deploy:
        return nn.Conv2d(cin, cout, k, s, p, groups=g, bias=True)
    return conv_bn(cin, cout, k, s, p, g)


class Residual(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class RepVGGDW(nn.Module):
    """Depthwise 3x3 conv-BN + depthwise 1x1 conv (with bias) + x, then BN."""

    def __init__(self, ed: int, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.reparam = nn.Conv2d(ed, ed, 3, 1, 1, groups=ed, bias=True)
            return
        self.conv = conv_bn(ed, ed, 3, 1, 1, ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        self.bn = nn.BatchNorm2d(ed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.reparam(x)
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class RepViTBlock(nn.Module):
    def __init__(
        self, inp: int, hidden: int, oup: int, stride: int, use_se: bool, deploy: bool
    ) -> None:
        super().__init__()
        if stride == 2:
            self.token_mixer = nn.Sequential(
                _conv_bn(inp, inp, 3, 2, 1, inp, deploy),
                SE(inp) if use_se else nn.Identity(),
                _conv_bn(inp, oup, 1, 1, 0, 1, deploy),
            )
        else:
            assert inp == oup
            self.token_mixer = nn.Sequential(
                RepVGGDW(inp, deploy), SE(inp) if use_se else nn.Identity()
            )
        self.channel_mixer = Residual(
            nn.Sequential(
                _conv_bn(oup, hidden, deploy=deploy),
                nn.GELU(),
                _conv_bn(hidden, oup, deploy=deploy),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mixer(self.token_mixer(x))


class RepViT(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn(3, 8, 3, 2, 1, deploy=deploy),
            nn.GELU(),
            _conv_bn(8, 16, 3, 2, 1, deploy=deploy),
        )
        self.blocks = nn.Sequential(
            RepViTBlock(16, 32, 16, 1, True, deploy),
            RepViTBlock(16, 32, 16, 1, False, deploy),
            RepViTBlock(16, 64, 32, 2, False, deploy),
            RepViTBlock(32, 64, 32, 1, False, deploy),
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.Identity() if deploy else nn.BatchNorm1d(32)
        self.linear = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.gap(self.blocks(self.stem(x))), 1)
        return self.linear(self.bn(x))


def build_train() -> nn.Module:
    """Training-time RepViT (BN1d before the classifier, as in RepViT's BN_Linear head)."""
    return build_seeded(lambda: RepViT(deploy=False), seed=8)


def build_plain() -> nn.Module:
    """Deploy RepViT: RepVGGDW as one depthwise 3x3 conv, every conv-BN as a biased conv."""
    return build_seeded(lambda: RepViT(deploy=True), seed=8)
