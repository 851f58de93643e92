"""fold-bn-forward: a BatchNormalization folds into the pad-0 Conv (or the Gemm) after it.

Before:  x -> BatchNormalization -> t -> Conv(W, b, pads 0) -> y
After:   x -> Conv(W', b', pads 0) -> y
(also RepViT's BN_Linear head:  x[N,K] -> BatchNormalization -> Gemm -> y)

Formula (docs/RULES.md, fold-bn-forward): t = a*x + c per input channel (a = gamma/sigma,
c = beta - mean*a), so with the Conv's groups (input channel gi*I/g + i of output channel o):
  W'[o, i] = W[o, i] * a[gi*I/g + i],   b'[o] = b[o] + sum_{i,k} W[o, i, k] * c[gi*I/g + i]

Preconditions:
  1. the BN reads as a fixed per-channel affine map (facts.batchnorm_affine: spatial=1,
     inference mode, running-stat outputs unused, finite float constant parameters,
     var + epsilon > 0);
  2. the BN output t is read by the Conv alone, once (as its data input), and is not a graph
     output;
  3. the Conv pads nothing (all pads 0, auto_pad NOTSET/VALID): zero padding of t is not zero
     padding of x, so a padded Conv would see c at the border where the fold gives 0;
  4. the Conv's weight and bias are finite float constants and its input channels match.
  5. Gemm: transA = 0 and the BN input is 2-D [N, K], so that the BN's channel axis is the
     Gemm's input-feature axis; B and C are float constants, C per output feature:
     B'[k, :] = a[k] * B[k, :], C' = beta*C + alpha * c @ B, beta' = 1.
Runs after fold-bn, so a BN between two Convs folds backwards first.
Not handled: a padded Conv (the border would need c, not 0), a BN before a MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import (
    GemmParams,
    batchnorm_affine,
    conv_group,
    conv_params,
    gemm_params,
    sole_consumer,
)
from onnxrep.query import attr_ints, constant_value, conv_weight_bias
from onnxrep.rule import Match, Refusal, Replacement, conv_node, gemm_node


@dataclass
class ForwardMatch(Match):
    bn: gs.Node


@dataclass
class BnConvMatch(ForwardMatch):
    conv: gs.Node


@dataclass
class BnGemmMatch(ForwardMatch):
    gemm: gs.Node


@dataclass
class ConvForwardPlan:
    match: BnConvMatch
    a: np.ndarray
    c: np.ndarray
    group: int


@dataclass
class GemmForwardPlan:
    match: BnGemmMatch
    gemm: GemmParams
    a: np.ndarray
    c: np.ndarray


ForwardPlan = ConvForwardPlan | GemmForwardPlan


class FoldBatchNormIntoNextConv:
    id = "fold-bn-forward"
    summary = "BatchNormalization into the pad-0 Conv or the Gemm after it"
    anchors = ("BatchNormalization",)
    opt_in = False

    def match(self, graph: gs.Graph, node: gs.Node) -> ForwardMatch | None:
        t = node.outputs[0] if node.outputs else None
        if t is None:
            return None
        readers = [r for r in t.outputs
                   if r.op in ("Conv", "Gemm") and r.inputs and r.inputs[0] is t]
        if not readers:
            return None
        reader = readers[0]  # other readers: check() says so (sole_consumer)
        if reader.op == "Gemm":
            return BnGemmMatch(node, [node, reader], node, reader)
        return BnConvMatch(node, [node, reader], node, reader)

    def check(self, graph: gs.Graph, m: ForwardMatch) -> ForwardPlan | Refusal:
        affine = batchnorm_affine(m.bn)
        if isinstance(affine, Refusal):
            return affine
        a, c = affine
        if isinstance(m, BnGemmMatch):
            return self._check_gemm(graph, m, a, c)
        assert isinstance(m, BnConvMatch)
        bn, conv = m.bn, m.conv
        refusal = sole_consumer(graph, bn.outputs[0], conv) or conv_params(conv)
        if refusal:
            return refusal
        pads = attr_ints(conv, "pads", [])
        if any(p != 0 for p in pads):
            return Refusal(f"{conv.name} pads {pads}: zero padding after {bn.name} is not zero "
                           "padding before it")
        group = conv_group(conv)
        if isinstance(group, Refusal):
            return group
        weight = constant_value(conv.inputs[1])
        if weight.shape[1] * group != a.shape[0]:
            return Refusal(f"{bn.name} has {a.shape[0]} channels, {conv.name} reads "
                           f"{weight.shape[1] * group}")
        return ConvForwardPlan(m, a, c, group)

    @staticmethod
    def _check_gemm(graph: gs.Graph, m: BnGemmMatch, a: np.ndarray, c: np.ndarray
                    ) -> GemmForwardPlan | Refusal:
        bn, gemm = m.bn, m.gemm
        refusal = sole_consumer(graph, bn.outputs[0], gemm)
        if refusal:
            return refusal
        params = gemm_params(gemm)
        if isinstance(params, Refusal):
            return params
        if int(gemm.attrs.get("transA", 0)) != 0:
            return Refusal(f"{gemm.name} has transA=1: the BN's channel axis is not its input "
                           "features")
        shape = bn.inputs[0].shape
        if shape is None or len(shape) != 2:
            return Refusal(f"{bn.name} input rank is "
                           f"{'unknown' if shape is None else len(shape)}, expected 2-D [N, K] "
                           "before a Gemm")
        if params.in_features != a.shape[0]:
            return Refusal(f"{bn.name} has {a.shape[0]} channels, {gemm.name} reads "
                           f"{params.in_features}")
        return GemmForwardPlan(m, params, a, c)

    def rewrite(self, graph: gs.Graph, plan: ForwardPlan) -> Replacement:
        m = plan.match
        x = m.bn.inputs[0]
        if isinstance(plan, GemmForwardPlan):
            gemm, p = plan.match.gemm, plan.gemm
            matrix, bias = kernels.fold_input_affine_gemm(p.matrix, p.c_bias, p.trans_b,
                                                          p.alpha, p.beta, plan.a, plan.c)
            new = gemm_node(gemm.name, x, gemm.outputs[0], matrix, bias, dict(gemm.attrs),
                            p.matrix.dtype)
        else:
            conv = plan.match.conv
            weight, bias = conv_weight_bias(conv)
            w, b = kernels.fold_input_affine(weight, bias, plan.a, plan.c, plan.group)
            new = conv_node(conv.name, x, conv.outputs[0], kernels.cast_like(w, weight),
                            kernels.cast_like(b, weight), dict(conv.attrs))
        return Replacement(list(m.nodes), [new],
                           f"{m.bn.name} folded forward into {m.nodes[1].name}")
