"""fold-bn: a BatchNormalization folds into the Conv / ConvTranspose / Gemm / MatMul before it.

Before:  x -> Conv(W, b) -> t -> BatchNormalization(gamma, beta, mean, var, eps) -> y
After:   x -> Conv(W', b') -> y

Formula (docs/RULES.md, fold-bn): a = gamma / sqrt(var + eps), c = beta - mean * a (eps read
from the node), and y = a * t + c per output channel, so
  Conv           W'[o] = a[o] * W[o],  b' = a * b + c  (b = 0 when absent)
  ConvTranspose  W[I, O/g, k]: output channel o = gi*(O/g) + j is column j of group gi
  Gemm           B' = B * a along the output features (rows when transB), C' = a*beta*C + c,
                 beta' = 1 (alpha is kept)
  MatMul(+Add)   W'[:, o] = a[o] * W[:, o], bias' = a * bias + c (an Add is created if the
                 MatMul had no bias)

Preconditions:
  1. the BN reads as a fixed per-channel affine map (facts.batchnorm_affine: spatial=1,
     inference mode, running-stat outputs unused, finite float constant parameters,
     var + epsilon > 0);
  2. the producer's output t is read by the BN alone, once, and is not a graph output (and
     MatMul+Add: the MatMul's output is read by the Add alone);
  3. the producer's weight and bias are finite float constants. Its padding does not matter
     (auto_pad SAME_* included): the fold only scales and shifts output channels;
  4. Gemm / MatMul: the output is 2-D [N, O] - the BN's channel axis 1 is then the output
     feature axis - and the bias (Gemm C, or the Add constant) is per feature (transA does
     not matter: it changes the Gemm's input side only);
  5. the BN's channel count equals the producer's output channels.
A weight initializer shared with another node is never changed in place: the rewrite writes
new weights and the old ones stay for their other readers.
Not handled: BN before the producer (that is fold-bn-forward), MatMul with rank > 2 outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import (
    GemmParams,
    batchnorm_affine,
    channel_vector,
    conv_constants,
    conv_group,
    float_const,
    gemm_params,
    sole_consumer,
)
from onnxrep.query import constant_value, conv_weight_bias, matmul_of_bias, producer
from onnxrep.rule import (
    Match,
    NewNode,
    NewValue,
    NewWeight,
    Refusal,
    Replacement,
    conv_node,
    gemm_node,
)


@dataclass
class BnMatch(Match):
    bn: gs.Node


@dataclass
class ConvBnMatch(BnMatch):
    conv: gs.Node  # a Conv or a ConvTranspose


@dataclass
class GemmBnMatch(BnMatch):
    gemm: gs.Node


@dataclass
class MatMulBnMatch(BnMatch):
    matmul: gs.Node
    add: gs.Node | None  # Add(MatMul, bias) between the MatMul and the BN, if any
    bias: gs.Tensor | None  # the Add's constant operand


@dataclass
class ConvBnPlan:
    match: ConvBnMatch
    a: np.ndarray
    c: np.ndarray
    group: int


@dataclass
class GemmBnPlan:
    match: GemmBnMatch
    gemm: GemmParams
    a: np.ndarray
    c: np.ndarray


@dataclass
class MatMulBnPlan:
    match: MatMulBnMatch
    weight: np.ndarray
    bias: np.ndarray  # per output feature, float64 (zeros without an Add)
    a: np.ndarray
    c: np.ndarray


BnPlan = ConvBnPlan | GemmBnPlan | MatMulBnPlan


class FoldBatchNormIntoProducer:
    id = "fold-bn"
    summary = "BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul(+Add) before it"
    anchors = ("BatchNormalization",)
    opt_in = False

    def match(self, graph: gs.Graph, node: gs.Node) -> BnMatch | None:
        prod = producer(node.inputs[0]) if node.inputs else None
        if prod is None:
            return None
        if prod.op in ("Conv", "ConvTranspose"):
            return ConvBnMatch(node, [prod, node], node, prod)
        if prod.op == "Gemm":
            return GemmBnMatch(node, [prod, node], node, prod)
        if prod.op == "MatMul":
            return MatMulBnMatch(node, [prod, node], node, prod, None, None)
        if prod.op == "Add":
            found = matmul_of_bias(prod)
            if found is not None:
                return MatMulBnMatch(node, [found[0], prod, node], node, found[0], prod, found[1])
        return None

    def check(self, graph: gs.Graph, m: BnMatch) -> BnPlan | Refusal:
        affine = batchnorm_affine(m.bn)
        if isinstance(affine, Refusal):
            return affine
        refusal = sole_consumer(graph, m.bn.inputs[0], m.bn)
        if refusal:
            return refusal
        a, c = affine
        if isinstance(m, ConvBnMatch):
            return self._check_conv(m, a, c)
        if isinstance(m, GemmBnMatch):
            return self._check_gemm(m, a, c)
        assert isinstance(m, MatMulBnMatch)
        return self._check_matmul(graph, m, a, c)

    @staticmethod
    def _check_conv(m: ConvBnMatch, a: np.ndarray, c: np.ndarray) -> ConvBnPlan | Refusal:
        conv, channels = m.conv, a.shape[0]
        refusal = conv_constants(conv)  # padding does not matter here (docstring, 3)
        if refusal:
            return refusal
        group = conv_group(conv)
        if isinstance(group, Refusal):
            return group
        weight = constant_value(conv.inputs[1])
        out_channels = weight.shape[0] if conv.op == "Conv" else weight.shape[1] * group
        if out_channels != channels:
            return Refusal(f"{m.bn.name} has {channels} channels, {conv.name} outputs "
                           f"{out_channels}")
        return ConvBnPlan(m, a, c, group)

    @staticmethod
    def _check_gemm(m: GemmBnMatch, a: np.ndarray, c: np.ndarray) -> GemmBnPlan | Refusal:
        params = gemm_params(m.gemm)
        if isinstance(params, Refusal):
            return params
        if params.out_features != a.shape[0]:
            return Refusal(f"{m.bn.name} has {a.shape[0]} channels, {m.gemm.name} outputs "
                           f"{params.out_features}")
        return GemmBnPlan(m, params, a, c)

    @staticmethod
    def _check_matmul(graph: gs.Graph, m: MatMulBnMatch, a: np.ndarray, c: np.ndarray
                      ) -> MatMulBnPlan | Refusal:
        mm, channels = m.matmul, a.shape[0]
        weight = float_const(mm.inputs[1], f"{mm.name} weight")
        if isinstance(weight, Refusal):
            return weight
        if weight.ndim != 2:
            return Refusal(f"{mm.name} weight is {weight.ndim}-D, expected 2-D")
        x_shape = mm.inputs[0].shape
        if x_shape is None or len(x_shape) != 2:
            return Refusal(f"{mm.name} input rank is "
                           f"{'unknown' if x_shape is None else len(x_shape)}: BN's channel "
                           "axis is the output feature axis only for 2-D outputs")
        if weight.shape[1] != channels:
            return Refusal(f"{m.bn.name} has {channels} channels, {mm.name} outputs "
                           f"{weight.shape[1]}")
        bias = np.zeros(channels)
        if m.add is not None and m.bias is not None:
            refusal = sole_consumer(graph, mm.outputs[0], m.add)
            if refusal:
                return refusal
            value = float_const(m.bias, f"{m.add.name} bias")
            if isinstance(value, Refusal):
                return value
            bias = channel_vector(value, channels, rank=2)
            if bias is None:
                return Refusal(f"{m.add.name} bias {list(value.shape)} is not per output "
                               "feature")
        if mm.inputs[0].dtype is not None and np.dtype(mm.inputs[0].dtype).kind != "f":
            return Refusal(f"{mm.name} input is not floating point")
        return MatMulBnPlan(m, weight, bias, a, c)

    def rewrite(self, graph: gs.Graph, plan: BnPlan) -> Replacement:
        m = plan.match
        out = m.bn.outputs[0]
        if isinstance(plan, ConvBnPlan):
            conv = plan.match.conv
            weight, bias = conv_weight_bias(conv)
            if conv.op == "Conv":
                w, b = kernels.scale_conv_output_as(weight, bias, plan.a, plan.c)
            else:
                w, b = kernels.scale_conv_transpose_output(weight, bias, plan.a, plan.c,
                                                           plan.group)
                w, b = kernels.cast_like(w, weight), kernels.cast_like(b, weight)
            new = [conv_node(conv.name, conv.inputs[0], out, w, b, dict(conv.attrs), op=conv.op)]
        elif isinstance(plan, GemmBnPlan):
            gemm, p = plan.match.gemm, plan.gemm
            matrix, bias = kernels.scale_gemm_output(p.matrix, p.c_bias, p.trans_b, p.alpha,
                                                     p.beta, plan.a, plan.c)
            new = [gemm_node(gemm.name, gemm.inputs[0], out, matrix, bias, dict(gemm.attrs),
                             p.matrix.dtype)]
        else:
            new = self._matmul_nodes(plan, out)
        return Replacement(list(m.nodes), new, f"{m.bn.name} folded into {m.nodes[0].name}")

    @staticmethod
    def _matmul_nodes(plan: MatMulBnPlan, out: gs.Tensor) -> list[NewNode]:
        """MatMul(x, W') -> Add(., bias'): a MatMul as a Gemm without transposes and beta 1."""
        mm, weight = plan.match.matmul, plan.weight
        w, b = kernels.scale_gemm_output(weight, plan.bias, False, 1.0, 1.0, plan.a, plan.c)
        hidden = NewValue(f"{mm.name}.out", dtype=weight.dtype)
        return [
            NewNode("MatMul", mm.name,
                    [mm.inputs[0], NewWeight(f"{mm.name}.weight", kernels.cast_like(w, weight))],
                    [hidden]),
            NewNode("Add", f"{mm.name}.bias_add",
                    [hidden, NewWeight(f"{mm.name}.bias", kernels.cast_like(b, weight))], [out]),
        ]
