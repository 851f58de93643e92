"""Registry of the training-time families: builders, deploy reference, input shape, forms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models import (
    acnet,
    bnhead,
    convbn,
    csla,
    dbb,
    fastvit,
    inception,
    levit,
    mobilenetv2,
    mobileone,
    nextvit,
    orepa,
    qarepvgg,
    repghost,
    replknet,
    repvgg,
    repvit,
    resnet,
)
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
_SHAPE64 = (1, 3, 64, 64)
_DYNAMO = ("dynamo", "dynamo-noopt")

_DBB_NOTE = (
    "BNAndPad border fill, per padded BN: Pad(constant, value 0) then 4 ScatterND on the data "
    "path (top, bottom, left, right) whose updates Expand a per-channel fill to the border shape "
    "through Shape/Gather/Range/... index subgraphs (dynamic in N). ts-folded: the fill is a "
    "(C,1,1) initializer (equal to the folded bias of the Conv before it, or BN(0) where the BN "
    "stays); Pad's pads input is a Cast(Reshape(Transpose(Slice(Reshape(Concat(Constant, "
    "ConstantOfShape)))))) constant chain, not an initializer; the avg branch's BN is folded into"
    " its 1x1 conv but the 1x1-KxK branch's BN after an identity-based 1x1 (a conv2d with a "
    "computed weight) stays a BatchNormalization before the Pad. ts-unfolded: every BN kept; the "
    "fill computed in-graph as bias - mean*weight/sqrt(var+eps) (Sub/Mul/Div/Sqrt on "
    "initializers); the identity-based 1x1 weight is Add(weight, id_tensor) on initializers. "
    "dynamo: pads is an initializer [0,0,p,p,0,0,p,p], the fill a (C,1,1) initializer, the "
    "ScatterNDs work on Transposed views (slice_scatter lowering), every Conv-BN folded (only the"
    " BN after AveragePool stays). dynamo-noopt: as dynamo but every BN kept, the fill computed "
    "with Sub/Mul/Div/Sqrt, W+I as an Add, and 4 more ScatterND per BNAndPad build the updates"
)

_FAMILIES: list[Family] = [
    Family(
        "convbn",
        convbn.build_train,
        convbn.build_plain,
        _SHAPE32,
        FORMS,
        "Conv-BN-ReLU incl. stride 2, groups 4, bias+BN, ConvTranspose+BN, Linear+BN1d. "
        "ts-folded keeps the BN after ConvTranspose and the BN1d after Gemm; the dynamo "
        "optimizer folds both (no BN left)",
    ),
    Family(
        "repvgg",
        repvgg.build_train,
        repvgg.build_plain,
        _SHAPE32,
        FORMS,
        "7 blocks (3 with identity BN); groups=2 in 3 blocks (one stride 2). The original's "
        "Python `+ 0` for a missing identity is dropped by TorchScript and by the dynamo "
        "optimizer; dynamo-noopt keeps it as Add(t, Cast(Constant 0))",
    ),
    Family(
        "acnet",
        acnet.build_train,
        acnet.build_plain,
        _SHAPE32,
        FORMS,
        "k3 p1, k3 p0 with CropLayer Slice inputs, k5 p2, stride 2, groups 2",
    ),
    Family(
        "mobileone",
        mobileone.build_train,
        mobileone.build_plain,
        _SHAPE32,
        FORMS,
        "k=4 branches; dw 3x3 + pw 1x1 stages; stem has 1 branch",
    ),
    Family(
        "mobileone_se",
        mobileone.build_train_se,
        mobileone.build_plain_se,
        _SHAPE32,
        FORMS,
        "SE (GlobalAveragePool, 1x1, ReLU, 1x1, Sigmoid, Mul) after the branch sum; the "
        "original SE's avg_pool2d(kernel=[h, w]) fails the TorchScript export with a dynamic "
        "batch, so an equivalent adaptive pool is used",
    ),
    Family(
        "csla",
        csla.build_train,
        csla.build_plain,
        _SHAPE32,
        FORMS,
        "Mul(conv, s) + Mul(conv1x1, t) + Mul(x, u), per-channel constant buffers",
    ),
    Family(
        "qarepvgg",
        qarepvgg.build_train,
        qarepvgg.build_plain,
        _SHAPE32,
        FORMS,
        "BN(conv3x3) + conv1x1 + x, BN after the sum",
    ),
    Family(
        "repvit",
        repvit.build_train,
        repvit.build_plain,
        _SHAPE32,
        FORMS,
        "RepVGGDW bn(dwconv3x3_bn + dwconv1x1 + x); channel mixer residual stays",
    ),
    Family(
        "repghost",
        repghost.build_train,
        repghost.build_plain,
        _SHAPE32,
        FORMS,
        "cheap op dw3x3-BN + BN(x1) (+ x1 in the last module), ReLU",
    ),
    Family(
        "fastvit",
        fastvit.build_train,
        fastvit.build_plain,
        _SHAPE32,
        FORMS,
        "RepMixer x + ls*(mixer - norm); norm = BN only, then BN + dw1x1 conv-BN; "
        "stem has a stride-2 dw 7x7 + 3x3 pair",
    ),
    Family(
        "dbb",
        dbb.build_train,
        dbb.build_plain,
        _SHAPE32,
        FORMS,
        "k3, k5, stride 2, groups 2; identity-based 1x1 (kernel = W + I in forward). " + _DBB_NOTE,
    ),
    Family(
        "dbb_dense",
        dbb.build_train_dense,
        dbb.build_plain_dense,
        _SHAPE32,
        FORMS,
        "dense 1x1 (internal != cin) in the 1x1-KxK branch; depthwise blocks whose avg "
        "branch is AvgPool(K, s, pad p)+BN with no 1x1 branch. " + _DBB_NOTE,
    ),
    Family(
        "orepa",
        orepa.build_train,
        orepa.build_plain,
        _SHAPE32,
        _DYNAMO,
        "original OREPA code: the padded 1x1 branch (F.pad on a weight) makes the "
        "TorchScript exporter fail ('ONNX export of convolution for kernel of unknown "
        "shape'), see orepa_ts. dynamo: the optimizer folds the computed kernels of the "
        "first three blocks to initializers (BN folded too) but leaves 7 Einsum + Add/Reshape "
        "on initializers feeding Conv + BN for the last (32->32) block (presumably over the "
        "optimizer's constant-folding size limit); dynamo-noopt: the whole "
        "Einsum/Squeeze/Pad/Add/Reshape weight subgraph of every block",
    ),
    Family(
        "orepa_ts",
        orepa.build_train_pad_free,
        orepa.build_plain_pad_free,
        _SHAPE32,
        FORMS,
        "OREPA with the 1x1 embedding as einsum('oi,hw->oihw', w, one_hot) (same math): "
        "exports in all forms; ts-folded keeps 44 Einsum (TorchScript constant folding "
        "does not fold Einsum) feeding the Conv weights, each Conv followed by a BN",
    ),
    Family(
        "inception",
        inception.build_train,
        inception.build_plain,
        _SHAPE32,
        FORMS,
        "1x1, 3x3, 5x5, 1x3, 3x1 conv-BN branches concatenated, ReLU; one stride-2 block",
    ),
    Family(
        "replknet",
        replknet.build_train,
        replknet.build_plain,
        _SHAPE32,
        FORMS,
        "dw 13x13 + 5x5 conv-BN pairs in RepLKBlocks (pre-BN before a 1x1, residual); "
        "FastViT-style stride-2 dw 7x7 + 3x3 pair + GELU",
    ),
    Family(
        "resnet18",
        resnet.build_train_resnet18,
        resnet.build_plain_resnet18,
        _SHAPE64,
        FORMS,
        "base width 16; plain = RMNet chain (residuals removed by widening)",
    ),
    Family(
        "resnet50",
        resnet.build_train_resnet50,
        resnet.build_plain_resnet50,
        _SHAPE64,
        FORMS,
        "v1.5 (stride in the 3x3), base width 16; plain = RMNet chain",
    ),
    Family(
        "mobilenetv2",
        mobilenetv2.build_train,
        mobilenetv2.build_plain,
        _SHAPE64,
        FORMS,
        "x0.25, last channel 128; plain = RM chain with per-channel Min/Max bounds on "
        "identity channels and merged 1x1s (MobileNetV1-like)",
    ),
    Family(
        "preact_resnet",
        resnet.build_train_preact,
        resnet.build_plain_preact,
        _SHAPE32,
        FORMS,
        "pre-activation blocks: block input not provably >= 0, RM must not fire; plain = itself",
    ),
    Family(
        "levit",
        levit.build_train,
        levit.build_plain,
        _SHAPE64,
        FORMS,
        "LeViT stage (16 tokens at 64x64, no attention biases): 4 Linear_BN + BN_Linear head. "
        "Linear_BN: ts forms MatMul -> Flatten(axis=2) -> BN -> Reshape(shape = Shape(MatMul "
        "output)), then for qkv a second Reshape (Concat of Shape/Gather) to the heads; "
        "dynamo: MatMul -> Reshape(const [-1, C]) -> BN -> Reshape(const [-1, 16, C]) (qkv: "
        "one merged Reshape(const [-1, 16, 2, 32]) that splits the channel axis); "
        "dynamo-noopt: both Reshapes take Concat shapes computed from Shape(input). Head: "
        "ReduceMean(axes [1], keepdims 0) -> BN on [N, 32] -> Gemm (dynamo-noopt: the axes "
        "input is Reshape(Constant)). MatMul weights are initializers in ts-folded and dynamo, "
        "Transpose(initializer) in ts-unfolded and dynamo-noopt. Neither TorchScript folding nor "
        "the dynamo optimizer folds any of these 5 BNs (only the Conv-BNs)",
    ),
    Family(
        "nextvit",
        nextvit.build_train,
        nextvit.build_plain,
        _SHAPE32,
        FORMS,
        "2 NTB-like blocks (8x8 = 64 tokens, sr_ratio 2 then 1): pre-BN2d -> Transpose(0,2,3,1)"
        " -> Reshape[B, HW, C] (ts: Concat of Shape/Gather, also read by 3 Shape nodes; dynamo: "
        "const [-1, 64, 32]; dynamo-noopt: computed Concat) -> MatMul q, and (sr 2) -> "
        "Transpose(0,2,1) -> AveragePool(k 4, s 4, pads 0, count_include_pad 1) -> BN1d on "
        "[N, 32, 16] -> Transpose(0,2,1) -> MatMul k, v, or (sr 1) -> MatMul q, k, v; the first "
        "pre-BN follows the stem's Relu. pre-BN2d -> Conv 1x1 (MLP). Every form keeps these 5 "
        "BNs (+ 2 stem Conv-BNs in ts-unfolded/dynamo-noopt). MatMul weights as in levit",
    ),
    Family(
        "bnhead",
        bnhead.build_train,
        bnhead.build_plain,
        _SHAPE32,
        FORMS,
        "Conv-BN-ReLU x3, then Relu -> BN -> GAP -> Flatten -> Gemm. ts: GlobalAveragePool -> "
        "Flatten(axis=1); dynamo: ReduceMean(axes [-1, -2], keepdims 1) -> Reshape(const "
        "[-1, 24]); dynamo-noopt: ReduceMean(axes = Reshape(Constant)) -> Reshape(computed "
        "Concat). The final BN stays in every form (the dynamo optimizer does not fold it)",
    ),
]

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}
