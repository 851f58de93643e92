"""Next-ViT (Li et al. 2022) NTB-like blocks: pre-BN E-MHSA and pre-BN MLP (docs/RULES.md).

Stem: two stride-2 Conv-BN-ReLU. Each block on [B, C, H, W]:
``x = x + E_MHSA(BN2d(x))`` with the tokens laid out as einops' ``b c h w -> b (h w) c``
(permute, reshape) and back; E_MHSA: q = Linear(x) (bias); with ``sr_ratio`` 2 the keys and
values come from ``AvgPool1d(4, 4)`` over the tokens (on x transposed to [B, C, N]), then
BatchNorm1d, transposed back, k = Linear, v = Linear (bias); softmax attention; proj Linear.
Then ``x = x + MLP(BN2d(x))``, MLP = Conv1x1 -> ReLU -> Conv1x1 (bias). The first block has
``sr_ratio`` 2, the second 1 (k and v straight from the pre-BN tokens). Head: GAP, Linear.

The NTB's MHCA branch and channel concat are left out. Next-ViT's own code skips the BNs when
``torch.onnx.is_in_onnx_export()`` (it expects ``merge_bn`` first); here they always run.

Deploy (``build_plain``): Next-ViT's ``merge_bn`` - every pre-BN (and the BatchNorm1d after the
AvgPool1d) merged into q, k, v and the first MLP conv, which gain a bias; stem Conv-BN fused.
Token counts (H/4 * W/4) must be divisible by 4 for the AvgPool1d to cover every token.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import Head, build_seeded, conv_bn_relu, conv_relu

INPUT_SHAPE = (1, 3, 32, 32)


class EMHSA(nn.Module):
    """Next-ViT's E_MHSA (efficient multi-head self-attention with spatial reduction)."""

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, deploy: bool) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            n_ratio = sr_ratio**2
            self.sr = nn.AvgPool1d(kernel_size=n_ratio, stride=n_ratio)
            self.norm = nn.Identity() if deploy else nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = self.norm(self.sr(x.transpose(1, 2))).transpose(1, 2)
        else:
            x_ = x
        k = self.k(x_).reshape(b, -1, h, c // h).permute(0, 2, 3, 1)
        v = self.v(x_).reshape(b, -1, h, c // h).permute(0, 2, 1, 3)
        attn = ((q @ k) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class NTB(nn.Module):
    """Next-ViT transformer block reduced to its pre-BN E-MHSA and pre-BN MLP paths."""

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, deploy: bool) -> None:
        super().__init__()
        self.norm1 = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        self.e_mhsa = EMHSA(dim, head_dim, sr_ratio, deploy)
        self.norm2 = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = self.norm1(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # b c h w -> b (h w) c
        out = self.e_mhsa(out)
        x = x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)  # b (h w) c -> b c h w
        return x + self.mlp(self.norm2(x))


class NextViTTiny(nn.Module):
    def __init__(self, dim: int = 32, deploy: bool = False) -> None:
        super().__init__()
        block = conv_relu if deploy else conv_bn_relu
        self.stem = nn.Sequential(block(3, dim // 2, 3, 2, 1), block(dim // 2, dim, 3, 2, 1))
        self.blocks = nn.Sequential(
            NTB(dim, 16, sr_ratio=2, deploy=deploy), NTB(dim, 16, sr_ratio=1, deploy=deploy)
        )
        self.head = Head(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build_train() -> nn.Module:
    """Training-time Next-ViT-like net (pre-BNs and the spatial-reduction BN1d random)."""
    return build_seeded(lambda: NextViTTiny(deploy=False), seed=23)


def build_plain() -> nn.Module:
    """Deploy: the BNs merged into q/k/v and the first MLP conv (arbitrary weights)."""
    return build_seeded(lambda: NextViTTiny(deploy=True), seed=23)
