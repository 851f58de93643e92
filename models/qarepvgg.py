"""QARepVGG (Chu et al. 2023, YOLOv6): BN(conv3x3) + conv1x1 + x, BN after the sum, ReLU.

The 1x1 conv has no BN and no bias; the identity branch is a plain ``x``. The post-sum BN folds
into the merged conv by §1 (RULES-SPEC §5).
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import Head, build_seeded, conv_bn

INPUT_SHAPE = (1, 3, 32, 32)


class QARepVGGBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.nonlinearity = nn.ReLU()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
            return
        self.rbr_identity = nn.Identity() if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.nonlinearity(self.rbr_reparam(x))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.bn(self.rbr_dense(x) + self.rbr_1x1(x) + id_out))


class QARepVGG(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        cfg = [(3, 16, 2, 1), (16, 16, 1, 1), (16, 32, 2, 1), (32, 32, 1, 2), (32, 32, 1, 1)]
        self.features = nn.Sequential(*[QARepVGGBlock(a, b, s, g, deploy) for a, b, s, g in cfg])
        self.head = Head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_train() -> nn.Module:
    """Training-time QARepVGG."""
    return build_seeded(lambda: QARepVGG(deploy=False), seed=7)


def build_plain() -> nn.Module:
    """Deploy QARepVGG: one 3x3 conv with bias per block."""
    return build_seeded(lambda: QARepVGG(deploy=True), seed=7)
