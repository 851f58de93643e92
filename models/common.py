"""Shared helpers for the model builders: seeding, random BN statistics, conv-BN blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the previous RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_bn(module: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm in ``module`` random affine parameters and running statistics.

    running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.3).
    Deterministic in ``seed`` and in the module order. Returns ``module``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _BN_TYPES):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                    m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return module


def finalize(model: nn.Module, seed: int) -> nn.Module:
    """Randomize BN stats, freeze gradients and switch to eval mode."""
    randomize_bn(model, seed + 1)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Construct ``factory()`` under ``seed`` and finalize it (random BN, eval, no grad)."""
    with seeded(seed):
        model = factory()
    return finalize(model, seed)


def conv_bn(
    cin: int,
    cout: int,
    k: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    bias: bool = False,
    dilation: int = 1,
) -> nn.Sequential:
    """``Sequential(conv, bn)`` with attribute names ``conv`` and ``bn`` (as in RepVGG code)."""
    seq = nn.Sequential()
    seq.add_module(
        "conv",
        nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=bias),
    )
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def conv_bn_relu(
    cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1
) -> nn.Sequential:
    """Conv-BN-ReLU."""
    seq = conv_bn(cin, cout, k, stride, padding, groups)
    seq.add_module("relu", nn.ReLU())
    return seq


def conv_relu(
    cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1
) -> nn.Sequential:
    """Plain (deploy) Conv with bias followed by ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups), nn.ReLU())


class Head(nn.Module):
    """GlobalAveragePool + flatten + Linear."""

    def __init__(self, cin: int, num_classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class SE(nn.Module):
    """Squeeze-excite: GAP -> 1x1 conv -> ReLU -> 1x1 conv -> Sigmoid -> Mul."""

    def __init__(self, c: int, rd: int | None = None) -> None:
        super().__init__()
        rd = rd or max(4, c // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, rd, 1)
        self.expand = nn.Conv2d(rd, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))
        return x * s
