"""OREPA (Hu et al., CVPR 2022), following ``OREPA`` in JUGGHM/OREPA_CVPR2022 ``blocks.py``.

The kernel is computed in forward from parameters (RULES-SPEC §0, §9): a KxK origin weight, an
avg-based kernel (1x1 weight x constant KxK average), a 1x1 weight with a frequency prior,
a 1x1 -> KxK product (identity-based 1x1 + KxK, via einsum), a padded 1x1 kernel (``F.pad``) and a
depthwise-separable product; each branch scaled per output channel by a row of ``vector``
(``torch.einsum('oihw,o->oihw', ...)``), summed, then one conv with the computed weight and
one BN, then ReLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from models.common import Head, build_seeded

INPUT_SHAPE = (1, 3, 32, 32)


def trans_vi_multiscale(kernel: torch.Tensor, target_kernel_size: int) -> torch.Tensor:
    """Zero-pad a small kernel to ``target_kernel_size`` (``transVI_multiscale``)."""
    h_pad = (target_kernel_size - kernel.size(2)) // 2
    w_pad = (target_kernel_size - kernel.size(3)) // 2
    return F.pad(kernel, [w_pad, w_pad, h_pad, h_pad])


class OREPA(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        internal_channels_1x1_3x3: int | None = None,
        deploy: bool = False,
        act: bool = True,
        pad_free: bool = False,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.pad_free = pad_free
        self.nonlinear: nn.Module = nn.ReLU() if act else nn.Identity()
        self.in_channels, self.out_channels = cin, cout
        self.kernel_size, self.stride, self.groups = k, stride, groups
        self.padding = k // 2 if padding is None else padding
        if deploy:
            self.orepa_reparam = nn.Conv2d(cin, cout, k, stride, self.padding, groups=groups)
            return
        ig = cin // groups
        self.weight_orepa_origin = nn.Parameter(torch.empty(cout, ig, k, k))
        init.kaiming_uniform_(self.weight_orepa_origin, a=math.sqrt(0.0))
        self.weight_orepa_avg_conv = nn.Parameter(torch.empty(cout, ig, 1, 1))
        self.weight_orepa_pfir_conv = nn.Parameter(torch.empty(cout, ig, 1, 1))
        init.kaiming_uniform_(self.weight_orepa_avg_conv, a=0.0)
        init.kaiming_uniform_(self.weight_orepa_pfir_conv, a=0.0)
        self.register_buffer("weight_orepa_avg_avg", torch.ones(k, k).mul(1.0 / k / k))
        self.weight_orepa_1x1 = nn.Parameter(torch.empty(cout, ig, 1, 1))
        init.kaiming_uniform_(self.weight_orepa_1x1, a=0.0)

        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = cin if groups <= 4 else 2 * cin
        t = internal_channels_1x1_3x3
        if t == cin:
            # identity-based 1x1 (weight + id); the original zero-inits weight, a trained
            # model has moved away from identity
            self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(torch.randn(cin, ig, 1, 1) * 0.1)
            id_value = torch.zeros(cin, ig, 1, 1)
            for i in range(cin):
                id_value[i, i % ig, 0, 0] = 1
            self.register_buffer("id_tensor", id_value)
        else:
            self.weight_orepa_1x1_kxk_conv1 = nn.Parameter(torch.empty(t, ig, 1, 1))
            init.kaiming_uniform_(self.weight_orepa_1x1_kxk_conv1, a=math.sqrt(0.0))
        self.weight_orepa_1x1_kxk_conv2 = nn.Parameter(torch.empty(cout, t // groups, k, k))
        init.kaiming_uniform_(self.weight_orepa_1x1_kxk_conv2, a=math.sqrt(0.0))

        expand_ratio = 8
        self.weight_orepa_gconv_dw = nn.Parameter(torch.empty(cin * expand_ratio, 1, k, k))
        self.weight_orepa_gconv_pw = nn.Parameter(
            torch.empty(cout, cin * expand_ratio // groups, 1, 1)
        )
        init.kaiming_uniform_(self.weight_orepa_gconv_dw, a=math.sqrt(0.0))
        init.kaiming_uniform_(self.weight_orepa_gconv_pw, a=math.sqrt(0.0))

        # the original initialises the rows to 0.25, 0.25, 0.0, 0.5, 1.0, 0.5; a trained
        # model has per-channel values (and a non-zero prior row)
        self.vector = nn.Parameter(torch.rand(6, cout) * 0.8 + 0.2)
        self.bn = nn.BatchNorm2d(cout)
        self.register_buffer("weight_orepa_prior", self._prior(cout, k))
        if pad_free:
            one_hot = torch.zeros(k, k)
            one_hot[k // 2, k // 2] = 1.0
            self.register_buffer("center_one_hot", one_hot)

    @staticmethod
    def _prior(cout: int, k: int) -> torch.Tensor:
        """The frequency prior of ``fre_init`` (the original hard-codes k=3)."""
        prior = torch.empty(cout, k, k)
        half_fg = cout / 2
        for i in range(cout):
            for h in range(k):
                for w in range(k):
                    if i < half_fg:
                        prior[i, h, w] = math.cos(math.pi * (h + 0.5) * (i + 1) / 3)
                    else:
                        prior[i, h, w] = math.cos(math.pi * (w + 0.5) * (i + 1 - half_fg) / 3)
        return prior

    def weight_gen(self) -> torch.Tensor:
        v = self.vector
        w_origin = torch.einsum("oihw,o->oihw", self.weight_orepa_origin, v[0, :])
        w_avg = torch.einsum(
            "oihw,o->oihw",
            torch.einsum(
                "oi,hw->oihw",
                self.weight_orepa_avg_conv.squeeze(3).squeeze(2),
                self.weight_orepa_avg_avg,
            ),
            v[1, :],
        )
        w_pfir = torch.einsum(
            "oihw,o->oihw",
            torch.einsum(
                "oi,ohw->oihw",
                self.weight_orepa_pfir_conv.squeeze(3).squeeze(2),
                self.weight_orepa_prior,
            ),
            v[2, :],
        )
        if hasattr(self, "weight_orepa_1x1_kxk_idconv1"):
            conv1 = (self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor).squeeze(3).squeeze(2)
        else:
            conv1 = self.weight_orepa_1x1_kxk_conv1.squeeze(3).squeeze(2)
        conv2 = self.weight_orepa_1x1_kxk_conv2
        if self.groups > 1:
            g = self.groups
            t, ig = conv1.size()
            o, tg, h, w = conv2.size()
            conv1 = conv1.view(g, t // g, ig)
            conv2 = conv2.view(g, o // g, tg, h, w)
            w_1x1_kxk = torch.einsum("gti,gothw->goihw", conv1, conv2).reshape(o, ig, h, w)
        else:
            w_1x1_kxk = torch.einsum("ti,othw->oihw", conv1, conv2)
        w_1x1_kxk = torch.einsum("oihw,o->oihw", w_1x1_kxk, v[3, :])
        if self.pad_free:
            w_1x1 = torch.einsum(
                "oi,hw->oihw",
                self.weight_orepa_1x1.squeeze(3).squeeze(2),
                self.center_one_hot,
            )
        else:
            w_1x1 = trans_vi_multiscale(self.weight_orepa_1x1, self.kernel_size)
        w_1x1 = torch.einsum("oihw,o->oihw", w_1x1, v[4, :])
        w_gconv = self.dwsc2full(
            self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw, self.in_channels, self.groups
        )
        w_gconv = torch.einsum("oihw,o->oihw", w_gconv, v[5, :])
        return w_origin + w_avg + w_1x1 + w_1x1_kxk + w_pfir + w_gconv

    @staticmethod
    def dwsc2full(
        weight_dw: torch.Tensor, weight_pw: torch.Tensor, groups: int, groups_conv: int = 1
    ) -> torch.Tensor:
        t, ig, h, w = weight_dw.size()
        o = weight_pw.size(0)
        tg = t // groups
        i = ig * groups
        ogc = o // groups_conv
        groups_gc = groups // groups_conv
        weight_dw = weight_dw.view(groups_conv, groups_gc, tg, ig, h, w)
        weight_pw = weight_pw.squeeze().view(ogc, groups_conv, groups_gc, tg)
        weight_dsc = torch.einsum("cgtihw,ocgt->cogihw", weight_dw, weight_pw)
        return weight_dsc.reshape(o, i // groups_conv, h, w)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.nonlinear(self.orepa_reparam(inputs))
        weight = self.weight_gen()
        out = F.conv2d(inputs, weight, None, self.stride, self.padding, 1, self.groups)
        return self.nonlinear(self.bn(out))


class OREPANet(nn.Module):
    def __init__(self, deploy: bool = False, pad_free: bool = False) -> None:
        super().__init__()
        cfg = [  # cin, cout, stride, groups, internal channels
            (3, 16, 1, 1, None),  # identity-based 1x1 in the 1x1-kxk branch
            (16, 16, 1, 1, 32),  # plain 1x1 with 2x internal channels
            (16, 32, 2, 2, None),  # stride 2, groups 2 (grouped einsum)
            (32, 32, 1, 1, None),
        ]
        self.features = nn.Sequential(
            *[OREPA(a, b, 3, s, None, g, t, deploy, True, pad_free) for a, b, s, g, t in cfg]
        )
        self.head = Head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_train() -> nn.Module:
    """Training-time OREPA net (kernels computed in forward)."""
    return build_seeded(lambda: OREPANet(deploy=False), seed=13)


def build_plain() -> nn.Module:
    """Deploy OREPA net: one 3x3 conv with bias per block."""
    return build_seeded(lambda: OREPANet(deploy=True), seed=13)


def build_train_pad_free() -> nn.Module:
    """OREPA with the 1x1 -> kxk embedding as ``einsum('oi,hw->oihw', w1x1, one_hot)``.

    Identical math; the original ``F.pad`` on the weight makes the TorchScript exporter fail
    ("ONNX export of convolution for kernel of unknown shape"), this variant exports in all
    four forms.
    """
    return build_seeded(lambda: OREPANet(deploy=False, pad_free=True), seed=14)


def build_plain_pad_free() -> nn.Module:
    """Deploy counterpart of :func:`build_train_pad_free`."""
    return build_seeded(lambda: OREPANet(deploy=True), seed=14)
