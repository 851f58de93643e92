"""FastViT (Vasu et al. 2023) RepMixer: ``x + layer_scale * (mixer(x) - norm(x))`` (RULES-SPEC §5).

mixer = depthwise 3x3 conv-BN + depthwise 1x1 conv-BN + identity BN (MobileOne-style, no act).
norm  = identity BN only in the original FastViT code (``use_scale_branch=False,
num_conv_branches=0``); the second RepMixer here also has a depthwise 1x1 conv-BN in ``norm``.
Each RepMixer is followed by a ConvFFN (dw 7x7 conv-BN, 1x1, GELU, 1x1) with layer scale.
The stem is FastViT's reparameterizable 7x7 + 3x3 depthwise pair (ReparamLargeKernelConv).
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import build_seeded, conv_bn

INPUT_SHAPE = (1, 3, 32, 32)


class MobileOneBranches(nn.Module):
    """FastViT's MobileOneBlock without activation/SE: sum of conv-BN / 1x1 / identity BN."""

    def __init__(
        self, dim: int, k: int, num_conv_branches: int = 1, use_scale_branch: bool = True
    ) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(dim)
        self.rbr_conv = nn.ModuleList(
            [conv_bn(dim, dim, k, 1, k // 2, dim) for _ in range(num_conv_branches)]
        )
        self.rbr_scale = conv_bn(dim, dim, 1, 1, 0, dim) if k > 1 and use_scale_branch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for conv in self.rbr_conv:
            out += conv(x)
        return out


class RepMixer(nn.Module):
    def __init__(self, dim: int, k: int = 3, norm_scale: bool = False, deploy: bool = False):
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.reparam_conv = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim, bias=True)
            return
        self.norm = MobileOneBranches(dim, k, 0, use_scale_branch=norm_scale)
        self.mixer = MobileOneBranches(dim, k, 1)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) * 0.9 + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, deploy: bool = False) -> None:
        super().__init__()
        if deploy:
            self.conv: nn.Module = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim, bias=True)
        else:
            self.conv = conv_bn(dim, dim, 7, 1, 3, dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, norm_scale: bool, deploy: bool) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, 3, norm_scale, deploy)
        self.convffn = ConvFFN(dim, 2 * dim, deploy)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) * 0.9 + 0.1)
        self.deploy = deploy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        if self.deploy:  # deploy: the layer scale lives in the ConvFFN's last conv
            return x + self.convffn(x)
        return x + self.layer_scale * self.convffn(x)


class ReparamLargeKernelConv(nn.Module):
    """FastViT's depthwise 7x7 conv-BN + 3x3 conv-BN summed, then GELU."""

    def __init__(self, c: int, k: int, small: int, stride: int, deploy: bool) -> None:
        super().__init__()
        self.deploy = deploy
        self.activation = nn.GELU()
        if deploy:
            self.lkb_reparam = nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=True)
            return
        self.lkb_origin = conv_bn(c, c, k, stride, k // 2, c)
        self.small_conv = conv_bn(c, c, small, stride, small // 2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.activation(self.lkb_reparam(x))
        out = self.lkb_origin(x)
        out += self.small_conv(x)
        return self.activation(out)


class FastViTTiny(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        stem_conv = nn.Conv2d(3, 16, 3, 2, 1) if deploy else conv_bn(3, 16, 3, 2, 1)
        pw = nn.Conv2d(16, 24, 1) if deploy else conv_bn(16, 24, 1)
        self.stem = nn.Sequential(
            stem_conv, nn.GELU(), ReparamLargeKernelConv(16, 7, 3, 2, deploy), pw, nn.GELU()
        )
        self.blocks = nn.Sequential(
            RepMixerBlock(24, False, deploy),  # original FastViT norm (identity BN only)
            RepMixerBlock(24, True, deploy),  # norm = identity BN + dw 1x1 conv-BN
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.gap(self.blocks(self.stem(x))), 1))


def build_train() -> nn.Module:
    """Training-time FastViT-like net (layer scales random in [0.1, 1])."""
    return build_seeded(lambda: FastViTTiny(deploy=False), seed=10)


def build_plain() -> nn.Module:
    """Deploy: each RepMixer is one depthwise 3x3 conv with bias (no residual add)."""
    return build_seeded(lambda: FastViTTiny(deploy=True), seed=10)
