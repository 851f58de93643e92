"""ACNet (Ding et al. 2019): BN(conv kxk) + BN(conv 1xk) + BN(conv kx1) (RULES-SPEC §4-§5).

Follows the original ``acb.py``: when ``padding < k // 2`` the 1xk / kx1 branches crop their
input with a slice (the CropLayer), which an ONNX converter must read as a negative pad.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import Head, build_seeded

INPUT_SHAPE = (1, 3, 32, 32)


class ACBlock(nn.Module):
    """Asymmetric convolution block (no activation inside, as in the original)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.fused_conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=True)
            return
        self.square_conv = nn.Conv2d(cin, cout, (k, k), stride, padding, groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        if padding - k // 2 >= 0:
            self.crop = 0
            hor_padding = (padding - k // 2, padding)
            ver_padding = (padding, padding - k // 2)
        else:
            self.crop = k // 2 - padding
            hor_padding = (0, padding)
            ver_padding = (padding, 0)
        self.ver_conv = nn.Conv2d(cin, cout, (k, 1), stride, ver_padding, groups=groups, bias=False)
        self.hor_conv = nn.Conv2d(cin, cout, (1, k), stride, hor_padding, groups=groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)
        self.hor_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.fused_conv(x)
        square = self.square_bn(self.square_conv(x))
        if self.crop > 0:
            ver_input = x[:, :, :, self.crop : -self.crop]
            hor_input = x[:, :, self.crop : -self.crop, :]
        else:
            ver_input = x
            hor_input = x
        vertical = self.ver_bn(self.ver_conv(ver_input))
        horizontal = self.hor_bn(self.hor_conv(hor_input))
        return square + vertical + horizontal


class ACNet(nn.Module):
    """ACBlock-ReLU stack: k3 p1, k3 p0 (cropping), k5 p2, stride-2 k3, grouped k3."""

    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        cfg = [  # cin, cout, k, stride, padding, groups
            (3, 16, 3, 1, 1, 1),
            (16, 16, 3, 1, 0, 1),  # padding < k//2: CropLayer branches, 32 -> 30
            (16, 16, 5, 1, 2, 1),
            (16, 32, 3, 2, 1, 1),
            (32, 32, 3, 1, 1, 2),
        ]
        layers: list[nn.Module] = []
        for cin, cout, k, s, p, g in cfg:
            layers += [ACBlock(cin, cout, k, s, p, g, deploy), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = Head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_train() -> nn.Module:
    """Training-time ACNet."""
    return build_seeded(lambda: ACNet(deploy=False), seed=3)


def build_plain() -> nn.Module:
    """Deploy ACNet: one kxk conv with bias per ACBlock."""
    return build_seeded(lambda: ACNet(deploy=True), seed=3)
