"""RepLKNet (Ding et al. 2022): depthwise 13x13 conv-BN + depthwise 5x5 conv-BN summed
(``ReparamLargeKernelConv``), inside a RepLKBlock (BN, 1x1 conv-BN-ReLU, large kernel, ReLU,
1x1 conv-BN, residual). Also a FastViT-style stride-2 depthwise 7x7 + 3x3 pair with GELU.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import Head, build_seeded, conv_bn
from models.fastvit import ReparamLargeKernelConv as PairedDWConv

INPUT_SHAPE = (1, 3, 32, 32)


class ReparamLargeKernelConv(nn.Module):
    """Large kernel conv-BN + small kernel conv-BN (original RepLKNet code, no activation)."""

    def __init__(
        self, c: int, k: int, stride: int, groups: int, small_kernel: int, deploy: bool = False
    ) -> None:
        super().__init__()
        self.deploy = deploy
        padding = k // 2
        if deploy:
            self.lkb_reparam = nn.Conv2d(c, c, k, stride, padding, groups=groups, bias=True)
            return
        self.lkb_origin = conv_bn(c, c, k, stride, padding, groups)
        self.small_conv = conv_bn(c, c, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        out += self.small_conv(x)
        return out


class RepLKBlock(nn.Module):
    """prelkb BN -> pw1 (1x1 conv-BN-ReLU) -> large kernel -> ReLU -> pw2 (1x1 conv-BN) + x.

    Deploy: the pre-BN is folded into pw1 (§2, pw1 is 1x1 pad 0) and the kernels are merged.
    """

    def __init__(self, c: int, dw: int, k: int, small: int, deploy: bool = False) -> None:
        super().__init__()
        self.prelkb_bn: nn.Module = nn.Identity() if deploy else nn.BatchNorm2d(c)
        if deploy:
            self.pw1: nn.Module = nn.Sequential(nn.Conv2d(c, dw, 1), nn.ReLU())
            self.pw2: nn.Module = nn.Conv2d(dw, c, 1)
        else:
            self.pw1 = nn.Sequential(conv_bn(c, dw, 1), nn.ReLU())
            self.pw2 = conv_bn(dw, c, 1)
        self.large_kernel = ReparamLargeKernelConv(dw, k, 1, dw, small, deploy)
        self.lk_nonlinear = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw1(self.prelkb_bn(x))
        out = self.lk_nonlinear(self.large_kernel(out))
        return x + self.pw2(out)


class RepLKNetTiny(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        stem_conv = nn.Conv2d(3, 16, 3, 1, 1) if deploy else conv_bn(3, 16, 3, 1, 1)
        self.stem = nn.Sequential(stem_conv, nn.ReLU())
        self.block1 = RepLKBlock(16, 16, 13, 5, deploy)
        self.down = PairedDWConv(16, 7, 3, 2, deploy)  # FastViT-style 7x7 + 3x3, stride 2
        self.block2 = RepLKBlock(16, 32, 13, 5, deploy)
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.head(x)


def build_train() -> nn.Module:
    """Training-time RepLKNet-like net (13x13 + 5x5 and 7x7 + 3x3 depthwise pairs)."""
    return build_seeded(lambda: RepLKNetTiny(deploy=False), seed=16)


def build_plain() -> nn.Module:
    """Deploy: one depthwise conv with bias per kernel pair, pre-BN folded into pw1."""
    return build_seeded(lambda: RepLKNetTiny(deploy=True), seed=16)
