"""ResNet-18/50 (torchvision layout, ResNet-50 v1.5 with the stride in the 3x3), their
RMNet-style plain counterparts (RULES-SPEC §10) and a pre-activation ResNet.

RM (Meng et al. 2021) removes a residual by widening: the block input ``x >= 0`` (a ReLU
output) is carried through extra Dirac-kernel channels that ReLU keeps intact, and the last
conv of the block reads them with ``[W | I]`` (or ``[W | W_downsample]``). The plain network is
a VGG-like Conv-ReLU chain; this module only builds its *structure* (weights are random).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.common import build_seeded

INPUT_SHAPE = (1, 3, 64, 64)


def _cbn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != planes:
            self.downsample = _cbn(cin, planes, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = _cbn(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet; ``width`` is the stem / layer1 width (64 in the paper)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        width: int = 64,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        stages: list[nn.Module] = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class RMPlainResNet(nn.Module):
    """RMNet plain counterpart of :class:`ResNet`: every residual removed by widening.

    Basic block (cin -> planes, stride s): Conv3x3(cin -> planes + cin, s) ReLU
    Conv3x3(planes + cin -> planes) ReLU. Bottleneck (cin -> mid -> cout): Conv1x1(cin -> mid
    + cin) ReLU Conv3x3(mid + cin -> mid + cin, s) ReLU Conv1x1(mid + cin -> cout) ReLU.
    """

    def __init__(
        self, bottleneck: bool, layers: Sequence[int], width: int = 64, num_classes: int = 1000
    ) -> None:
        super().__init__()
        feats: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            for j in range(n):
                s = 2 if (i > 0 and j == 0) else 1
                if bottleneck:
                    cout = planes * 4
                    feats += [
                        nn.Conv2d(cin, planes + cin, 1), nn.ReLU(),
                        nn.Conv2d(planes + cin, planes + cin, 3, s, 1), nn.ReLU(),
                        nn.Conv2d(planes + cin, cout, 1), nn.ReLU(),
                    ]  # fmt: skip
                else:
                    cout = planes
                    feats += [
                        nn.Conv2d(cin, planes + cin, 3, s, 1), nn.ReLU(),
                        nn.Conv2d(planes + cin, planes, 3, 1, 1), nn.ReLU(),
                    ]  # fmt: skip
                cin = cout
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def resnet18(
    width: int = 64, num_classes: int = 1000, plain: bool = False, seed: int = 0
) -> nn.Module:
    """ResNet-18 (width 64: 11.7M params; input 224x224); ``plain`` gives the RMNet chain."""
    if plain:
        return build_seeded(lambda: RMPlainResNet(False, (2, 2, 2, 2), width, num_classes), seed)
    return build_seeded(lambda: ResNet(BasicBlock, (2, 2, 2, 2), width, num_classes), seed)


def resnet50(
    width: int = 64, num_classes: int = 1000, plain: bool = False, seed: int = 0
) -> nn.Module:
    """ResNet-50 v1.5 (width 64: 25.6M params); ``plain`` gives the RMNet chain."""
    if plain:
        return build_seeded(lambda: RMPlainResNet(True, (3, 4, 6, 3), width, num_classes), seed)
    return build_seeded(lambda: ResNet(Bottleneck, (3, 4, 6, 3), width, num_classes), seed)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv-BN-ReLU-conv + shortcut (no ReLU after the add,
    so the next block's input is NOT provably non-negative: RM must not fire)."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != planes:
            self.shortcut = nn.Conv2d(cin, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(
        self, layers: Sequence[int] = (2, 2, 2), width: int = 16, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            for j in range(n):
                blocks.append(PreActBlock(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


_SMALL = dict(width=16, num_classes=10)


def build_train_resnet18() -> nn.Module:
    """ResNet-18 with base width 16 (registry size; input 64x64)."""
    return resnet18(**_SMALL, seed=17)


def build_plain_resnet18() -> nn.Module:
    """RMNet plain ResNet-18, base width 16."""
    return resnet18(**_SMALL, plain=True, seed=17)


def build_train_resnet50() -> nn.Module:
    """ResNet-50 with base width 16 (registry size; input 64x64)."""
    return resnet50(**_SMALL, seed=18)


def build_plain_resnet50() -> nn.Module:
    """RMNet plain ResNet-50, base width 16."""
    return resnet50(**_SMALL, plain=True, seed=18)


def build_train_preact() -> nn.Module:
    """Pre-activation ResNet (3 stages of 2 blocks, width 16, input 32x32)."""
    return build_seeded(lambda: PreActResNet(), seed=19)


def build_plain_preact() -> nn.Module:
    """A pre-activation ResNet cannot lose its residuals: the plain reference is itself."""
    return build_train_preact()
