"""fold-affine: a per-channel constant Mul / Div / Add / Sub after a Conv folds into it.

Before:  x -> Conv(W, b) -> t -> Mul(t, s) -> y        (also Div(t, s), Add(t, u),
                                                         Add(u, t), Sub(t, u), Sub(u, t))
After:   x -> Conv(W', b') -> y

Formula (docs/RULES.md, fold-affine): y = a * conv(x) + c per output channel with
  Mul: a = s, c = 0;  Div: a = 1/s, c = 0;  Add: a = 1, c = u;
  Sub(t, u): a = 1, c = -u;  Sub(u, t): a = -1, c = u
so W'[o] = a[o] * W[o] and b' = a * b + c (kernels.scale_conv_output_as).
This is the CSLA / OREPA branch scale and FastViT's layer scale once the branches merged.

Preconditions:
  1. the Conv's output t is read by this node alone, once, and is not a graph output;
  2. the Conv's weight and bias are finite float constants (any padding, auto_pad SAME_*
     too: a per-output-channel map does not care where the padding goes);
  3. the other operand is a finite float constant that broadcasts along the channel axis
     only: scalar, [1], [C,1,1], [1,C,1,1] (a [C] vector scales the last axis: refused),
     and never widens t's rank;
  4. Div: no zero divisor.
Not handled: a constant that varies over spatial positions; the same after Gemm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import channel_vector, conv_constants, float_const, sole_consumer
from onnxrep.query import constant_value, conv_weight_bias, producer
from onnxrep.rule import Match, Refusal, Replacement, conv_node


@dataclass
class AffineMatch(Match):
    conv: gs.Node
    op: gs.Node
    const: gs.Tensor
    side: int  # the input position of the Conv's output in `op`


@dataclass
class AffinePlan:
    match: AffineMatch
    a: np.ndarray
    c: np.ndarray


class FoldChannelAffineIntoConv:
    id = "fold-affine"
    summary = "per-channel constant Mul/Div/Add/Sub after a Conv into its weight and bias"
    anchors = ("Mul", "Div", "Add", "Sub")
    opt_in = False

    def match(self, graph: gs.Graph, node: gs.Node) -> AffineMatch | None:
        if len(node.inputs) != 2:
            return None
        for side in (0, 1) if node.op != "Div" else (0,):
            conv = producer(node.inputs[side])
            other = node.inputs[1 - side]
            if conv is not None and conv.op == "Conv" and constant_value(other) is not None:
                return AffineMatch(node, [conv, node], conv, node, other, side)
        return None

    def check(self, graph: gs.Graph, m: AffineMatch) -> AffinePlan | Refusal:
        value = float_const(m.const, f"{m.op.name} operand")
        refusal = Refusal.first(sole_consumer(graph, m.conv.outputs[0], m.op),
                                conv_constants(m.conv),
                                value if isinstance(value, Refusal) else None)
        if refusal:
            return refusal
        weight = constant_value(m.conv.inputs[1])
        vec = channel_vector(value, weight.shape[0], rank=weight.ndim)
        if vec is None:
            return Refusal(f"{m.op.name} constant {list(value.shape)} is not per output "
                           f"channel of {m.conv.name} ({weight.shape[0]} channels, rank "
                           f"{weight.ndim})")
        if m.op.op == "Div" and np.any(vec == 0):
            return Refusal(f"{m.op.name} divides by zero")
        ones = np.ones_like(vec)
        a, c = {
            "Mul": (vec, 0 * vec),
            "Div": (1.0 / vec, 0 * vec),
            "Add": (ones, vec),
            "Sub": (ones, -vec) if m.side == 0 else (-ones, vec),
        }[m.op.op]
        return AffinePlan(m, a, c)

    def rewrite(self, graph: gs.Graph, plan: AffinePlan) -> Replacement:
        m = plan.match
        weight, bias = conv_weight_bias(m.conv)
        w, b = kernels.scale_conv_output_as(weight, bias, plan.a, plan.c)
        new = conv_node(m.conv.name, m.conv.inputs[0], m.op.outputs[0], w, b, dict(m.conv.attrs))
        return Replacement([m.conv, m.op], [new], f"{m.op.op} {m.op.name} folded into "
                                                  f"{m.conv.name}")
