"""fold-affine: a per-channel constant Mul / Div / Add / Sub after a Conv folds into it.

Before:  x -> Conv(W, b) -> t -> Mul(t, s) -> y        (also Div(t, s), Add(t, u),
                                                         Add(u, t), Sub(t, u), Sub(u, t))
After:   x -> Conv(W', b') -> y

Formula (RULES-SPEC §3): y = a * conv(x) + c per output channel with
  Mul: a = s, c = 0;  Div: a = 1/s, c = 0;  Add: a = 1, c = u;
  Sub(t, u): a = 1, c = -u;  Sub(u, t): a = -1, c = u
so W'[o] = a[o] * W[o] and b' = a * b + c (kernels.scale_conv_output).
This is the CSLA / OREPA branch scale and FastViT's layer scale once the branches merged.

Preconditions:
  1. the Conv's output t is read by this node alone, once, and is not a graph output;
  2. the Conv's weight and bias are finite float constants, auto_pad NOTSET/VALID;
  3. the other operand is a finite float constant that broadcasts along the channel axis
     only: scalar, [1], [C,1,1], [1,C,1,1] (a [C] vector scales the last axis: refused),
     and never widens t's rank;
  4. Div: no zero divisor.
Not handled: a constant that varies over spatial positions; the same after Gemm.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import channel_vector, conv_params, float_const, sole_consumer
from onnxrep.rule import Applied, Match
from onnxrep.surgery import constant_value, conv_weight_bias, producer, replace_with_conv, retire


class FoldChannelAffineIntoConv:
    id = "fold-affine"
    summary = "per-channel constant Mul/Div/Add/Sub after a Conv into its weight and bias"
    anchors = ("Mul", "Div", "Add", "Sub")
    opt_in = False

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        if len(node.inputs) != 2:
            return None
        for side in (0, 1):
            if node.op in ("Div",) and side == 1:
                break
            conv = producer(node.inputs[side])
            other = node.inputs[1 - side]
            if conv is not None and conv.op == "Conv" and constant_value(other) is not None:
                m = Match(anchor=node, nodes=[conv, node], output=node.outputs[0])
                m.roles.update(graph=graph, conv=conv, op=node, const=other, side=side)
                return m
        return None

    def check(self, m: Match) -> list[str]:
        conv, op, graph = m["conv"], m["op"], m["graph"]
        reason = (sole_consumer(graph, conv.outputs[0], op) or conv_params(conv)
                  or float_const(m["const"], f"{op.name} operand"))
        if reason:
            return [reason]
        weight = constant_value(conv.inputs[1])
        value = constant_value(m["const"])
        vec = channel_vector(value, weight.shape[0], rank=weight.ndim)
        if vec is None:
            return [f"{op.name} constant {list(value.shape)} is not per output channel of "
                    f"{conv.name} ({weight.shape[0]} channels, rank {weight.ndim})"]
        if op.op == "Div" and np.any(vec == 0):
            return [f"{op.name} divides by zero"]
        m["vec"] = vec
        return []

    def rewrite(self, graph: gs.Graph, m: Match) -> Applied:
        conv, op, vec, side = m["conv"], m["op"], m["vec"], m["side"]
        ones = np.ones_like(vec)
        a, c = {
            "Mul": (vec, 0 * vec),
            "Div": (1.0 / vec, 0 * vec),
            "Add": (ones, vec),
            "Sub": (ones, -vec) if side == 0 else (-ones, vec),
        }[op.op]
        weight, bias = conv_weight_bias(conv)
        w, b = kernels.scale_conv_output_as(weight, bias, a, c)
        x, name, attrs = conv.inputs[0], conv.name, dict(conv.attrs)
        why = f"{op.op} {op.name} folded into {conv.name}"
        removed = retire(m.nodes)
        new = replace_with_conv(graph, name, x, m.output, w, b, attrs)
        return Applied(self.id, removed, [new.name], why)
