"""LeViT (Graham et al. 2021) stage: BatchNorm on tokens after every Linear (docs/RULES.md).

Patch embedding: four stride-2 Conv-BN layers with Hardswish between (LeViT's ``b16``), then
tokens ``x.flatten(2).transpose(1, 2)`` of shape [B, N, C]. ``LinearBN`` is LeViT's
``Linear_BN``: a Linear without bias, then ``bn(x.flatten(0, 1)).reshape_as(x)`` (BatchNorm1d
over the B*N tokens). One attention block (qkv LinearBN, heads, softmax, Hardswish, proj
LinearBN) and one MLP (LinearBN, Hardswish, LinearBN), each with a residual; head: mean over
tokens, then LeViT's ``BN_Linear`` (BatchNorm1d, Linear).

Unlike LeViT, the attention has no ``attention_biases``: they fix the resolution, and this
model takes any input whose H and W are multiples of 16 and any batch.

Deploy (``build_plain``): LeViT's ``replace_batchnorm`` with each ``fuse()`` - Conv2d_BN ->
Conv2d with bias, Linear_BN -> Linear with bias, BN_Linear -> Linear; no BatchNorm left.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import build_seeded, conv_bn
from models.repvit import Residual  # x + m(x), as LeViT's Residual in eval mode

INPUT_SHAPE = (1, 3, 64, 64)


class LinearBN(nn.Module):
    """LeViT's ``Linear_BN``: Linear (no bias) then BatchNorm1d over the flattened tokens."""

    def __init__(self, a: int, b: int, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        self.c = nn.Linear(a, b, bias=deploy)
        if not deploy:
            self.bn = nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        if self.deploy:
            return x
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class BNLinear(nn.Module):
    """LeViT's ``BN_Linear`` classifier: BatchNorm1d then Linear."""

    def __init__(self, a: int, b: int, deploy: bool = False) -> None:
        super().__init__()
        self.bn = nn.Identity() if deploy else nn.BatchNorm1d(a)
        self.l = nn.Linear(a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.bn(x))


class Attention(nn.Module):
    """LeViT's Attention without attention biases (resolution-free)."""

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, deploy: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.d = attn_ratio * key_dim
        self.dh = self.d * num_heads
        self.qkv = LinearBN(dim, self.dh + 2 * key_dim * num_heads, deploy)
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(self.dh, dim, deploy))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], 3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.dh)
        return self.proj(x)


class LeViTStage(nn.Module):
    def __init__(self, dim: int = 32, deploy: bool = False) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> nn.Module:
            if deploy:
                return nn.Conv2d(cin, cout, 3, 2, 1, bias=True)
            return conv_bn(cin, cout, 3, 2, 1)

        self.patch_embed = nn.Sequential(
            conv(3, dim // 8),
            nn.Hardswish(),
            conv(dim // 8, dim // 4),
            nn.Hardswish(),
            conv(dim // 4, dim // 2),
            nn.Hardswish(),
            conv(dim // 2, dim),
        )
        self.blocks = nn.Sequential(
            Residual(Attention(dim, key_dim=8, num_heads=2, attn_ratio=2, deploy=deploy)),
            Residual(
                nn.Sequential(
                    LinearBN(dim, 2 * dim, deploy), nn.Hardswish(), LinearBN(2 * dim, dim, deploy)
                )
            ),
        )
        self.head = BNLinear(dim, 10, deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def build_train() -> nn.Module:
    """Training-time LeViT stage (every Linear_BN / BN_Linear / Conv2d_BN with random BN)."""
    return build_seeded(lambda: LeViTStage(deploy=False), seed=21)


def build_plain() -> nn.Module:
    """Deploy LeViT stage: every BN fused into the Linear/Conv beside it (arbitrary weights)."""
    return build_seeded(lambda: LeViTStage(deploy=True), seed=21)
