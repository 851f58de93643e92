"""MobileOne (Vasu et al. 2023): k over-parameterized kxk conv-BN branches + 1x1 conv-BN scale
branch + identity BN, summed, (SE), ReLU; depthwise 3x3 then pointwise 1x1 (RULES-SPEC §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import build_seeded, conv_bn

INPUT_SHAPE = (1, 3, 32, 32)


class SEBlock(nn.Module):
    """MobileOne's squeeze-excite: global average pool, 1x1, ReLU, 1x1, Sigmoid, Mul.

    The original uses ``F.avg_pool2d(x, kernel_size=[h, w])``; with a dynamic batch the
    TorchScript exporter fails on it (the traced kernel size is a Gather of Shape), so this
    uses the equivalent ``adaptive_avg_pool2d(x, 1)`` (GlobalAveragePool).
    """

    def __init__(self, c: int, rd_ratio: float = 0.25) -> None:
        super().__init__()
        rd = max(1, int(c * rd_ratio))
        self.reduce = nn.Conv2d(c, rd, 1, 1, bias=True)
        self.expand = nn.Conv2d(rd, c, 1, 1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        c = inputs.size(1)
        x = F.adaptive_avg_pool2d(inputs, 1)
        x = torch.sigmoid(self.expand(F.relu(self.reduce(x))))
        x = x.view(-1, c, 1, 1)
        return inputs * x


class MobileOneBlock(nn.Module):
    """MobileOne block as in apple/ml-mobileone (``inference_mode`` is ``deploy``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        deploy: bool = False,
        use_se: bool = False,
        num_conv_branches: int = 4,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.num_conv_branches = num_conv_branches
        self.se: nn.Module = SEBlock(cout) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        if deploy:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=True)
            return
        self.rbr_skip = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            [conv_bn(cin, cout, k, stride, padding, groups) for _ in range(num_conv_branches)]
        )
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.activation(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))


class MobileOne(nn.Module):
    """Stem (1 branch, stride 2), then depthwise 3x3 + pointwise 1x1 MobileOne blocks (k=4)."""

    def __init__(self, deploy: bool = False, use_se: bool = False, k: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            MobileOneBlock(3, 16, 3, 2, 1, deploy=deploy, num_conv_branches=1)
        ]
        cfg = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 32, 2)]  # cin, cout, dw stride
        for i, (cin, cout, s) in enumerate(cfg):
            se = use_se and i >= 2  # SE only in the last blocks, as in MobileOne-S4
            layers.append(MobileOneBlock(cin, cin, 3, s, 1, cin, deploy, se, num_conv_branches=k))
            layers.append(MobileOneBlock(cin, cout, 1, 1, 0, 1, deploy, se, num_conv_branches=k))
        self.features = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.gap(self.features(x)), 1))


def build_train() -> nn.Module:
    """Training-time MobileOne (k=4 branches)."""
    return build_seeded(lambda: MobileOne(deploy=False), seed=4)


def build_plain() -> nn.Module:
    """Deploy MobileOne: one conv with bias per block."""
    return build_seeded(lambda: MobileOne(deploy=True), seed=4)


def build_train_se() -> nn.Module:
    """Training-time MobileOne with SE after the branch sum in the last blocks."""
    return build_seeded(lambda: MobileOne(deploy=False, use_se=True), seed=5)


def build_plain_se() -> nn.Module:
    """Deploy MobileOne with SE."""
    return build_seeded(lambda: MobileOne(deploy=True, use_se=True), seed=5)
