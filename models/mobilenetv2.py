"""MobileNetV2 (torchvision layout) and its RM plain counterpart (RULES-SPEC §10).

In MobileNetV2 there is no activation after the residual add and the block input is not
non-negative; RM carries it through identity channels whose activation is
``Min(Max(t, -inf), +inf)`` (per-channel bounds, ``(0, 6)`` on the other channels), then merges
each block's linear 1x1 projection with the next block's 1x1 expansion (§6). The result is a
MobileNetV1-like chain: [1x1 conv, act, dw 3x3 conv, act] per block. This module builds the
plain *structure* only (weights are random).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.common import build_seeded

INPUT_SHAPE = (1, 3, 64, 64)

SETTINGS: tuple[tuple[int, int, int, int], ...] = (  # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _cbr6(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_cbr6(inp, hidden, 1))
        layers += [
            _cbr6(hidden, hidden, 3, stride, hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def _block_configs(
    width_mult: float, settings: Sequence[tuple[int, int, int, int]]
) -> tuple[int, list[tuple[int, int, int, int]]]:
    """(stem channels, [(inp, oup, stride, t)])."""
    cin = make_divisible(32 * width_mult)
    stem = cin
    blocks = []
    for t, c, n, s in settings:
        cout = make_divisible(c * width_mult)
        for i in range(n):
            blocks.append((cin, cout, s if i == 0 else 1, t))
            cin = cout
    return stem, blocks


class MobileNetV2(nn.Module):
    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        last_channel: int = 1280,
        settings: Sequence[tuple[int, int, int, int]] = SETTINGS,
    ) -> None:
        super().__init__()
        stem, blocks = _block_configs(width_mult, settings)
        last = make_divisible(last_channel * max(1.0, width_mult))
        feats: list[nn.Module] = [_cbr6(3, stem, 3, 2)]
        feats += [InvertedResidual(i, o, s, t) for i, o, s, t in blocks]
        feats.append(_cbr6(blocks[-1][1], last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class ChannelClamp(nn.Module):
    """``Min(Max(x, lo), hi)`` with per-channel bounds: ReLU6 on the first ``n_act`` channels,
    identity (bounds -inf/+inf) on the ``n_id`` carried channels."""

    def __init__(self, n_act: int, n_id: int) -> None:
        super().__init__()
        inf = float("inf")
        lo = torch.cat([torch.zeros(n_act), torch.full((n_id,), -inf)]).view(1, -1, 1, 1)
        hi = torch.cat([torch.full((n_act,), 6.0), torch.full((n_id,), inf)]).view(1, -1, 1, 1)
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(x, self.lo), self.hi)


def _act(n_act: int, n_id: int) -> nn.Module:
    return ChannelClamp(n_act, n_id) if n_id else nn.ReLU6()


class RMPlainMobileNetV2(nn.Module):
    """Residual-free MobileNetV2: stem, then per block [merged 1x1 (previous projection x this
    expansion), act,] dw 3x3, act; the last projection merges into the final 1x1."""

    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        last_channel: int = 1280,
        settings: Sequence[tuple[int, int, int, int]] = SETTINGS,
    ) -> None:
        super().__init__()
        stem, blocks = _block_configs(width_mult, settings)
        last = make_divisible(last_channel * max(1.0, width_mult))
        feats: list[nn.Module] = []
        # block 0 has no expansion: a residual there needs the stem's output duplicated
        inp0, oup0, s0, t0 = blocks[0]
        dup = inp0 if (t0 == 1 and s0 == 1 and inp0 == oup0) else 0
        feats += [nn.Conv2d(3, stem + dup, 3, 2, 1), nn.ReLU6()]
        cur = stem + dup  # channels of the tensor feeding the next layer
        for inp, oup, s, t in blocks:
            carried = inp if (s == 1 and inp == oup) else 0
            hidden = int(round(inp * t))
            if t != 1:  # merged 1x1: previous projection then this expansion (+ identity)
                feats += [nn.Conv2d(cur, hidden + carried, 1), _act(hidden, carried)]
            c = hidden + carried
            feats += [nn.Conv2d(c, c, 3, s, 1, groups=c), _act(hidden, carried)]
            cur = c  # this block's projection is pending: it merges into the next 1x1
        feats += [nn.Conv2d(cur, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    last_channel: int = 1280,
    plain: bool = False,
    seed: int = 0,
) -> nn.Module:
    """MobileNetV2 (width 1.0: 3.5M params, input 224x224); ``plain`` gives the RM chain."""
    cls = RMPlainMobileNetV2 if plain else MobileNetV2
    return build_seeded(lambda: cls(width_mult, num_classes, last_channel), seed)


_SMALL = dict(width_mult=0.25, num_classes=10, last_channel=128)


def build_train() -> nn.Module:
    """MobileNetV2 x0.25, last channel 128 (registry size; input 64x64)."""
    return mobilenetv2(**_SMALL, seed=20)


def build_plain() -> nn.Module:
    """RM plain MobileNetV2 x0.25."""
    return mobilenetv2(**_SMALL, plain=True, seed=20)
