"""rm-merge-pointwise: Conv1x1 -> Conv1x1 with nothing between becomes one Conv1x1 (opt-in,
with remove-residual).

Before (MobileNetV2 after remove-residual: block k's projection feeds block k+1's expansion
directly, no activation between):
    x ─ Conv1x1(W1, b1, stride s1) ─ t ─ Conv1x1(W2, b2, stride s2) ─ y
After:
    x ─ Conv1x1(W, b, stride s1*s2) ─ y            (named after the second conv)

Formula (docs/RULES.md, rm-merge-pointwise; merge-sequential's 1x1 -> 1x1 case): W = W2 @ W1,
b = W2 @ b1 + b2 (kernels.compose_convs, the one composition of two convs); a pads-0 1x1 conv
with stride s reads input i*s, so the pair reads x[i*s1*s2] and gives
floor((L-1)/(s1*s2)) + 1 outputs, as the merged conv does. Dilation does nothing on a 1x1.

This is merge-sequential's 1x1 -> 1x1 case without its cost guard: merging may cost MACs
(C_in*C_out against M*(C_in + C_out)), which merge-sequential refuses - but the plain
MobileNetV1-like chain without any tensor between two blocks is what residual removal asks
for, so this rule fires on every such pair once --remove-residuals (or the rule by name) is
given, and only then.

Preconditions (each refusal names the node or tensor):
  1. both convs have 1x1 kernels and finite float constant weights (and bias), auto_pad
     NOTSET or VALID;
  2. both have group 1 and pads 0;
  3. the first conv's output is read by the second alone, once, and is not a graph output;
  4. the second reads as many channels as the first gives.
Not handled: grouped or padded 1x1 convs (merge-sequential's general case); anything between
the two convs.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import conv_params, sole_consumer
from onnxrep.query import constant_value, conv_attrs, conv_weight_bias, producer
from onnxrep.rule import Match, Refusal, Replacement, conv_node


@dataclass
class PointwisePairMatch(Match):
    first: gs.Node
    second: gs.Node


@dataclass
class PointwisePairPlan:
    match: PointwisePairMatch
    strides: list[int]  # the product of the two convs' strides, per spatial axis


def _is_1x1(conv: gs.Node) -> bool:
    weight = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
    return weight is not None and weight.ndim > 2 and all(k == 1 for k in weight.shape[2:])


class MergePointwisePair:
    id = "rm-merge-pointwise"
    summary = "Conv1x1 -> Conv1x1 with nothing between into one Conv1x1 (after RM; opt-in)"
    anchors = ("Conv",)
    opt_in = True

    def match(self, graph: gs.Graph, node: gs.Node) -> PointwisePairMatch | None:
        first = producer(node.inputs[0])
        if first is None or first.op != "Conv" or not (_is_1x1(first) and _is_1x1(node)):
            return None
        return PointwisePairMatch(node, [first, node], first, node)

    def check(self, graph: gs.Graph, m: PointwisePairMatch) -> PointwisePairPlan | Refusal:
        refusal = Refusal.first(conv_params(m.first), conv_params(m.second),
                                sole_consumer(graph, m.first.outputs[0], m.second))
        if refusal:
            return refusal
        attrs = []
        for conv in (m.first, m.second):
            attrs.append(conv_attrs(conv))
            if attrs[-1]["group"] != 1 or any(attrs[-1]["pads"]):
                return Refusal(f"{conv.name} has group {attrs[-1]['group']} and pads "
                               f"{attrs[-1]['pads']}: only group 1, pads 0 1x1 convs compose "
                               "here")
        w1, _ = conv_weight_bias(m.first)
        w2, _ = conv_weight_bias(m.second)
        if w1.ndim != w2.ndim or w2.shape[1] != w1.shape[0]:
            return Refusal(f"{m.second.name} reads {w2.shape[1]} channels of rank {w2.ndim - 2}, "
                           f"{m.first.name} gives {w1.shape[0]} of rank {w1.ndim - 2}")
        strides = [a * b for a, b in zip(attrs[0]["strides"], attrs[1]["strides"], strict=True)]
        return PointwisePairPlan(m, strides)

    def rewrite(self, graph: gs.Graph, plan: PointwisePairPlan) -> Replacement:
        m = plan.match
        w1, b1 = conv_weight_bias(m.first)
        w2, b2 = conv_weight_bias(m.second)
        weight, bias, group = kernels.compose_convs(
            w1, kernels.bias_or_zeros(b1, w1.shape[0]), 1,
            w2, kernels.bias_or_zeros(b2, w2.shape[0]), 1)
        spatial = len(plan.strides)
        attrs = {"strides": plan.strides, "pads": [0] * (2 * spatial),
                 "dilations": [1] * spatial, "group": group}
        new = conv_node(m.second.name, m.first.inputs[0], m.second.outputs[0],
                        kernels.cast_like(weight, w2), kernels.cast_like(bias, w2), attrs)
        return Replacement([m.first, m.second], [new],
                           f"{m.first.name} (1x1) composed into {m.second.name} (1x1)")
