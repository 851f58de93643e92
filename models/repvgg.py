"""RepVGG (Ding et al. 2021): BN(conv3x3) + BN(conv1x1) + BN(x), ReLU (RULES-SPEC §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.common import build_seeded, conv_bn

INPUT_SHAPE = (1, 3, 32, 32)


class RepVGGBlock(nn.Module):
    """RepVGG block as in the original code; ``deploy=True`` gives the single fused conv."""

    def __init__(
        self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.nonlinearity = nn.ReLU()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
            self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
            self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.nonlinearity(self.rbr_reparam(x))
        # exactly the original: a Python 0 for the missing identity branch
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


class RepVGG(nn.Module):
    """RepVGG network: stage 0 is one stride-2 block, every stage starts with a stride-2 block.

    ``widths``/``depths`` list stage 0 first. ``groups_at`` holds the (1-based, stage 0 not
    counted, as in the original ``optional_groupwise_layers``) block indices that use ``groups``.
    ``strides`` overrides the first-block stride of each stage (default 2 everywhere).
    """

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        groups_at: Sequence[int] = (),
        groups: int = 2,
        num_classes: int = 1000,
        strides: Sequence[int] | None = None,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError("widths and depths must have the same length")
        strides = tuple(strides) if strides is not None else (2,) * len(widths)
        blocks: list[nn.Module] = []
        cin = 3
        layer_idx = 0
        for stage, (w, d) in enumerate(zip(widths, depths, strict=True)):
            for i in range(d):
                g = groups if stage > 0 and layer_idx in groups_at else 1
                s = strides[stage] if i == 0 else 1
                blocks.append(RepVGGBlock(cin, w, s, g, deploy))
                cin = w
                if stage > 0:
                    layer_idx += 1
            if stage == 0:
                layer_idx = 1
        self.blocks = nn.Sequential(*blocks)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gap(self.blocks(x))
        return self.linear(torch.flatten(x, 1))


def repvgg_net(
    widths: Sequence[int],
    depths: Sequence[int],
    groups_at: Sequence[int] = (),
    num_classes: int = 1000,
    groups: int = 2,
    strides: Sequence[int] | None = None,
    deploy: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Build a RepVGG (eval mode, seeded random weights and BN statistics)."""
    return build_seeded(
        lambda: RepVGG(widths, depths, groups_at, groups, num_classes, strides, deploy), seed
    )


# Full-size configurations of the paper (stage 0 included).
_A0 = ((48, 48, 96, 192, 1280), (1, 2, 4, 14, 1))
_B3 = ((64, 192, 384, 768, 2560), (1, 4, 6, 16, 1))
_G4 = tuple(range(2, 27, 2))  # optional_groupwise_layers of the paper


def repvgg_a0(deploy: bool = False, num_classes: int = 1000) -> nn.Module:
    """RepVGG-A0 (about 9.1M params train-time, 8.3M deploy); input 224x224."""
    return repvgg_net(*_A0, num_classes=num_classes, deploy=deploy)


def repvgg_b3(deploy: bool = False, num_classes: int = 1000, g4: bool = False) -> nn.Module:
    """RepVGG-B3 (about 123M params train-time, 111M deploy); ``g4`` gives RepVGG-B3g4."""
    groups_at = _G4 if g4 else ()
    return repvgg_net(*_B3, groups_at=groups_at, groups=4, num_classes=num_classes, deploy=deploy)


# Tiny registry model: stride-2 blocks, identity blocks, groups=2 blocks (with identity too).
_TINY = dict(widths=(8, 16, 16, 32), depths=(1, 2, 3, 1), groups_at=(2, 3, 5), num_classes=10)


def build_train() -> nn.Module:
    """Tiny training-time RepVGG."""
    return repvgg_net(**_TINY, seed=2)


def build_plain() -> nn.Module:
    """Tiny deploy RepVGG (one 3x3 conv with bias per block)."""
    return repvgg_net(**_TINY, deploy=True, seed=2)
