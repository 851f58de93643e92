"""Diverse Branch Block (Ding et al. 2021), following the original ``diversebranchblock.py``.

Four branches summed: BN(convKxK); BN(conv1x1); conv1x1 -> BNAndPad -> AvgPool(K, s, pad 0)
-> BN; conv1x1 (identity-based or plain) -> BNAndPad -> convKxK(pad 0) -> BN
(RULES-SPEC §6, §7). When groups == out channels (depthwise) the avg branch is
AvgPool(K, s, pad p) -> BN and there is no 1x1 branch, as in the original.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.common import Head, build_seeded, conv_bn

INPUT_SHAPE = (1, 3, 32, 32)


class IdentityBasedConv1x1(nn.Conv2d):
    """1x1 conv whose kernel is ``weight + I`` (computed in forward, as in the original)."""

    def __init__(self, channels: int, groups: int = 1, init_std: float = 0.1) -> None:
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = np.zeros((channels, input_dim, 1, 1), dtype=np.float32)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.register_buffer("id_tensor", torch.from_numpy(id_value))
        # the original zero-initialises weight; a trained model has moved away from identity
        nn.init.normal_(self.weight, 0.0, init_std)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel = self.weight + self.id_tensor
        return F.conv2d(input, kernel, None, 1, 0, self.dilation, self.groups)


class BNAndPadLayer(nn.Module):
    """BN, then pad by ``pad_pixels`` filling the border with the BN's bias (original code)."""

    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = (
                    self.bn.bias.detach()
                    - self.bn.running_mean
                    * self.bn.weight.detach()
                    / torch.sqrt(self.bn.running_var + self.bn.eps)
                )
            else:
                pad_values = -self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0 : self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels :, :] = pad_values
            output[:, :, :, 0 : self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels :] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        internal_channels_1x1_3x3: int | None = None,
        deploy: bool = False,
        nonlinear: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if padding != k // 2:
            raise ValueError("DiverseBranchBlock needs padding == kernel_size // 2")
        self.deploy = deploy
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        if deploy:
            self.dbb_reparam = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=True)
            return
        self.dbb_origin = conv_bn(cin, cout, k, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module(
                "conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False)
            )
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module(
                "conv1",
                nn.Conv2d(cin, internal_channels_1x1_3x3, 1, 1, 0, groups=groups, bias=False),
            )
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal_channels_1x1_3x3))
        self.dbb_1x1_kxk.add_module(
            "conv2",
            nn.Conv2d(internal_channels_1x1_3x3, cout, k, stride, 0, groups=groups, bias=False),
        )
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class DBBNet(nn.Module):
    """DBB-ReLU stack from a config of (cin, cout, k, stride, padding, groups, internal)."""

    def __init__(
        self,
        cfg: list[tuple[int, int, int, int, int, int, int | None]],
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *[
                DiverseBranchBlock(a, b, k, s, p, g, internal, deploy, nn.ReLU())
                for a, b, k, s, p, g, internal in cfg
            ]
        )
        self.head = Head(cfg[-1][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# cin, cout, k, stride, padding, groups, internal channels of the 1x1-KxK branch
_DBB_CFG: list[tuple[int, int, int, int, int, int, int | None]] = [
    (3, 16, 3, 1, 1, 1, None),  # identity-based 1x1 (internal == cin)
    (16, 16, 5, 1, 2, 1, None),  # kernel 5, pad 2
    (16, 32, 3, 2, 1, 1, None),  # stride 2
    (32, 32, 3, 1, 1, 2, None),  # groups 2, grouped identity-based 1x1
]
# dense 1x1 (internal != cin) and depthwise (AvgPool with pad). As in the original, padding
# must be k // 2 (the 1x1 branch is unpadded).
_DBB_DENSE_CFG: list[tuple[int, int, int, int, int, int, int | None]] = [
    (3, 16, 3, 1, 1, 1, 8),  # plain 1x1 conv with 8 internal channels
    (16, 16, 5, 2, 2, 1, 32),  # k5 stride 2, 2x internal channels
    (16, 16, 3, 1, 1, 16, None),  # depthwise: AvgPool(3, 1, pad 1) branch, internal 2*cin
    (16, 16, 3, 2, 1, 16, None),  # depthwise stride 2
]


def build_train() -> nn.Module:
    """Training-time DBB net: k3, k5, stride 2, groups 2; identity-based 1x1 convs."""
    return build_seeded(lambda: DBBNet(_DBB_CFG, deploy=False), seed=11)


def build_plain() -> nn.Module:
    """Deploy DBB net: one KxK conv with bias per block."""
    return build_seeded(lambda: DBBNet(_DBB_CFG, deploy=True), seed=11)


def build_train_dense() -> nn.Module:
    """Training-time DBB variants: dense 1x1 in the 1x1-KxK branch, pad 0, depthwise."""
    return build_seeded(lambda: DBBNet(_DBB_DENSE_CFG, deploy=False), seed=12)


def build_plain_dense() -> nn.Module:
    """Deploy counterpart of :func:`build_train_dense`."""
    return build_seeded(lambda: DBBNet(_DBB_DENSE_CFG, deploy=True), seed=12)
