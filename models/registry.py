"""Registry of the training-time families: builders, deploy reference, input shape, forms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models import acnet, convbn, csla, fastvit, mobileone, qarepvgg, repghost, repvgg, repvit
from models.export import FORMS


@dataclass(frozen=True)
class Family:
    """One training-time model family.

    ``build_train`` returns the training-time structure in eval mode with seeded random weights
    and BN statistics; ``build_plain`` the deploy structure (one Conv with bias per
    re-parameterizable block, same activations and head; its weights are arbitrary).
    """

    name: str
    build_train: Callable[[], torch.nn.Module]
    build_plain: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]
    forms: tuple[str, ...]
    note: str = ""


_SHAPE32 = (1, 3, 32, 32)

_FAMILIES: list[Family] = [
    Family("convbn", convbn.build_train, convbn.build_plain, _SHAPE32, FORMS,
           "Conv-BN-ReLU incl. stride 2, groups 4, bias+BN, ConvTranspose+BN, Linear+BN1d"),
    Family("repvgg", repvgg.build_train, repvgg.build_plain, _SHAPE32, FORMS,
           "7 blocks; groups=2 in 3 blocks (one stride 2); Add(t, 0) where no identity"),
    Family("acnet", acnet.build_train, acnet.build_plain, _SHAPE32, FORMS,
           "k3 p1, k3 p0 with CropLayer Slice inputs, k5 p2, stride 2, groups 2"),
    Family("mobileone", mobileone.build_train, mobileone.build_plain, _SHAPE32, FORMS,
           "k=4 branches; dw 3x3 + pw 1x1 stages; stem has 1 branch"),
    Family("mobileone_se", mobileone.build_train_se, mobileone.build_plain_se, _SHAPE32, FORMS,
           "SE (avg_pool2d, 1x1, ReLU, 1x1, Sigmoid, Mul) after the branch sum"),
    Family("csla", csla.build_train, csla.build_plain, _SHAPE32, FORMS,
           "Mul(conv, s) + Mul(conv1x1, t) + Mul(x, u), per-channel constant buffers"),
    Family("qarepvgg", qarepvgg.build_train, qarepvgg.build_plain, _SHAPE32, FORMS,
           "BN(conv3x3) + conv1x1 + x, BN after the sum"),
    Family("repvit", repvit.build_train, repvit.build_plain, _SHAPE32, FORMS,
           "RepVGGDW bn(dwconv3x3_bn + dwconv1x1 + x); channel mixer residual stays"),
    Family("repghost", repghost.build_train, repghost.build_plain, _SHAPE32, FORMS,
           "cheap op dw3x3-BN + BN(x1) (+ x1 in the last module), ReLU"),
    Family("fastvit", fastvit.build_train, fastvit.build_plain, _SHAPE32, FORMS,
           "RepMixer x + ls*(mixer - norm); norm = BN only, then BN + dw1x1 conv-BN"),
]

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}
