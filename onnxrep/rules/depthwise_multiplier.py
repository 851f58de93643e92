"""depthwise-multiplier: a grouped Conv with k outputs per input channel
becomes a plain depthwise Conv by repeating each output channel of the Conv that feeds it.

Before (mobilenetv2's first block after --remove-residuals, k = 2):
    x -> P: Conv(W_P [g, Ci/G_P, ..], b_P [g], group G_P) -> t[g]
      -> chain (Relu, Clip, ...) -> u[g]
      -> D: Conv(W_D [k*g, 1, kh, kw], group g) -> y[k*g]
After:
    x -> P': Conv(repeat(W_P, k, 0) [k*g, ..], repeat(b_P, k, 0), group G_P) -> t'[k*g]
      -> the same chain -> u'[k*g]
      -> D': Conv(W_D unchanged, group k*g) -> y[k*g]
with repeat = np.repeat (interleaved: new channel j is old channel j // k).

Formula and why it is exact: in an ONNX Conv with group G and Cout outputs, output channel o
reads the input channels of group o // (Cout / G). D (group g, g input channels, weight
[k*g, 1, ..]) has output o read input channel o // k with kernel W_D[o]. P' writes at channel
j what P wrote at channel j // k (the same weight row and bias). The chain is elementwise and
the same on every channel (no per-channel constant), so u'[j] = u[j // k]. D'
(group k*g, one input channel per group) has output o read u'[o] = u[o // k] with the same
kernel W_D[o]: the same products and sums as D, hence the same y (up to the order in which a
runtime's kernel for each group size adds them: float rounding only). P' keeps
its group G_P: its new output o lies in group (o // k) // (g / G_P), the group of old channel
o // k, and uses that channel's weight row. D's strides, pads, dilations and kernel are not
touched (only group changes), so any of them is fine.

Preconditions (each refusal names the node or tensor):
  1. D is a Conv with a constant floating-point weight of shape [k*g, 1, kh, ...] with k > 1
     and group g (so its input has g channels); Convs with k = 1 (already depthwise) or
     group 1 are not matched at all;
  2. the path from D's input back to P is a chain of zero or more of Relu, LeakyRelu,
     HardSigmoid, HardSwish, Sigmoid and Clip with min/max absent, attributes (opset < 11) or
     constant tensors of one element: elementwise, channel-independent, no per-channel
     constant. Each tensor on the chain (P's output included) is read by exactly one node,
     once, and is not a graph output;
  3. P is a Conv (any group, kernel, strides, pads) with a constant floating-point weight of
     g output channels and an absent or constant bias;
  4. nothing else is needed of P's weight and bias: the repeated copies are new weights and
     the old ones stay for any other reader (the engine frees them when P was the only one);
  5. floating-point data (P's and D's weights are floating point).
Not handled: other activations (Tanh, Elu, Gelu, ... could join the chain list), PRelu or a
per-channel Mul/Add between P and D (their constants would have to be repeated too), a
HardSwish written as HardSigmoid + Mul (the chain tensor is read twice), a ConvTranspose or
MatMul as P, a producer shared with other readers (repeating it would change them).

Why it runs by default: the depthwise form is what runtimes have fast kernels for.
onnxruntime's NCHWc kernels take depthwise Convs only: MobileNetV2 after residual removal ran
4-6% slower than the RMNet plain form built in PyTorch with the multiplier Conv, 3% faster
with the rule. MNN's converter splits the multiplier Conv into 17 ops (its
TransformSmallGroupConvolutionToDepthwise pass; 107 layers against the plain form's 91, 91
with the rule). The cost is P's outputs, k times as many - the layout the plain form has -
and a copy of P's weights, so the engine's --max-growth bound applies: a large P, where
the repeat would cost more than it saves, is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.facts import sole_consumer
from onnxrep.query import constant_value, optional_input, producer
from onnxrep.rule import Match, NewNode, NewValue, NewWeight, Refusal, Replacement

# elementwise ops that compute the same function on every channel, from their attributes alone
# (Clip's min/max inputs are checked to be one-element constants)
_CHAIN_OPS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid")


@dataclass
class MultiplierMatch(Match):
    depthwise: gs.Node  # D
    chain: list[gs.Node]  # the elementwise nodes between P and D, P's side first
    top: gs.Node | None  # where the walk up stopped: P when it is a Conv; None at a graph input
    start: gs.Tensor  # the tensor `top` writes (or the graph input): the chain's first input
    k: int


@dataclass
class MultiplierPlan:
    match: MultiplierMatch
    weight: np.ndarray  # P's weight, repeated
    bias: np.ndarray | None  # P's bias, repeated


def _multiplier(node: gs.Node) -> int | None:
    """k when `node` is a Conv with group g > 1 and a constant weight [k*g, ...], k > 1."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    group = int(node.attrs.get("group", 1))
    if weight is None or weight.ndim < 3 or group <= 1 or weight.shape[0] % group:
        return None
    k = weight.shape[0] // group
    return k if k > 1 else None


def _chain_refusal(node: gs.Node) -> Refusal | None:
    """An elementwise node whose map is the same on every channel."""
    if len(node.outputs) != 1:
        return Refusal(f"{node.name} has {len(node.outputs)} outputs")
    if node.op == "Clip":
        for index, what in ((1, "min"), (2, "max")):
            bound = optional_input(node, index)
            if bound is None:
                continue
            value = constant_value(bound)
            if value is None:
                return Refusal(f"{node.name} takes its {what} from '{bound.name}', not a "
                               "constant")
            if value.size != 1:
                return Refusal(f"{node.name} {what} '{bound.name}' has shape "
                               f"{list(value.shape)}, not one value for every channel")
    elif len([t for t in node.inputs if t is not None and t.name]) != 1:
        return Refusal(f"{node.name} ({node.op}) has {len(node.inputs)} inputs")
    return None


class WidenIntoDepthwise:
    id = "depthwise-multiplier"
    summary = ("a Conv with k outputs per input channel into a depthwise Conv, its producer "
               "Conv's channels repeated k times")
    anchors = ("Conv",)
    opt_in = False
    # P's weight and bias grow k times: the engine bounds the growth (--max-growth)
    copies_weights = True

    def match(self, graph: gs.Graph, node: gs.Node) -> MultiplierMatch | None:
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return None
        k = _multiplier(node)
        if k is None:
            return None  # group 1, already depthwise, or a weight that is not a constant
        # walk up through the chain ops; check() says why the walk did not end at a Conv
        chain: list[gs.Node] = []
        t = node.inputs[0]
        top = producer(t)
        while top is not None and top.op in _CHAIN_OPS and top.inputs:
            chain.insert(0, top)
            t = top.inputs[0]
            top = producer(t)
        return MultiplierMatch(node, [n for n in (top, *chain, node) if n is not None],
                               node, chain, top, t, k)

    def check(self, graph: gs.Graph, m: MultiplierMatch) -> MultiplierPlan | Refusal:
        d, k = m.depthwise, m.k
        group = int(d.attrs.get("group", 1))
        weight_d = constant_value(d.inputs[1])
        # 1. D: [k*g, 1, ...] with group g (match: constant, k > 1)
        if weight_d.shape[1] != 1:
            return Refusal(f"{d.name} weight {list(weight_d.shape)} with group {group} reads "
                           f"{weight_d.shape[1]} channels per group, not 1")
        if weight_d.dtype.kind != "f":
            return Refusal(f"{d.name} weight is {weight_d.dtype}, not floating point")
        bias_d = optional_input(d, 2)
        if bias_d is not None and constant_value(bias_d) is None:
            return Refusal(f"{d.name} takes its bias from '{bias_d.name}', not a constant")
        # 2. the chain: elementwise, channel-independent, each tensor read once
        for i, n in enumerate(m.chain):
            reader = m.chain[i + 1] if i + 1 < len(m.chain) else d
            refusal = _chain_refusal(n) or sole_consumer(graph, n.outputs[0], reader)
            if refusal:
                return refusal
        p = m.top
        if p is None:
            return Refusal(f"{d.name} reads '{m.start.name}', which no Conv computes (a graph "
                           "input or a constant)")
        if p.op != "Conv":
            return Refusal(f"{d.name} reads {p.name} ({p.op}) through "
                           f"{len(m.chain)} elementwise ops: not a Conv")
        refusal = sole_consumer(graph, m.start, m.chain[0] if m.chain else d)
        if refusal:
            return refusal
        if len(p.outputs) != 1 or p.outputs[0] is not m.start:
            return Refusal(f"{p.name} has {len(p.outputs)} outputs")
        # 3. P: constant weight of g outputs, optional constant bias; 5. floating point
        weight_p = constant_value(p.inputs[1]) if len(p.inputs) > 1 else None
        if weight_p is None:
            return Refusal(f"{p.name} does not take its weight from a constant")
        if weight_p.dtype.kind != "f":
            return Refusal(f"{p.name} weight is {weight_p.dtype}, not floating point")
        if weight_p.ndim < 3 or weight_p.shape[0] != group:
            return Refusal(f"{p.name} weight {list(weight_p.shape)} has not the {group} output "
                           f"channels that {d.name} (group {group}) reads")
        group_p = int(p.attrs.get("group", 1))
        if group_p < 1 or weight_p.shape[0] % group_p:
            return Refusal(f"{p.name} weight {list(weight_p.shape)} does not fit group "
                           f"{group_p}")
        bias_p = optional_input(p, 2)
        bias = None
        if bias_p is not None:
            bias = constant_value(bias_p)
            if bias is None:
                return Refusal(f"{p.name} takes its bias from '{bias_p.name}', not a constant")
            if bias.dtype.kind != "f" or bias.shape != (group,):
                return Refusal(f"{p.name} bias '{bias_p.name}' is {bias.dtype} "
                               f"{list(bias.shape)}, not a float vector of {group}")
        # 4. new weights: whoever else reads P's weight and bias keeps the old ones
        return MultiplierPlan(m, np.repeat(weight_p, k, axis=0),
                              None if bias is None else np.repeat(bias, k, axis=0))

    def rewrite(self, graph: gs.Graph, plan: MultiplierPlan) -> Replacement:
        m = plan.match
        d, p, k = m.depthwise, m.top, m.k
        assert p is not None
        group = int(d.attrs.get("group", 1))
        out = NewValue(f"{m.start.name}_x{k}", m.start.dtype)
        p_inputs = [p.inputs[0], NewWeight(f"{p.name}.weight", plan.weight)]
        if plan.bias is not None:
            p_inputs.append(NewWeight(f"{p.name}.bias", plan.bias))
        nodes = [NewNode("Conv", p.name, p_inputs, [out], dict(p.attrs))]
        for n in m.chain:
            new = NewValue(f"{n.outputs[0].name}_x{k}", n.outputs[0].dtype)
            nodes.append(NewNode(n.op, n.name, [out, *n.inputs[1:]], [new], dict(n.attrs)))
            out = new
        nodes.append(NewNode("Conv", d.name, [out, *d.inputs[1:]], [d.outputs[0]],
                             {**d.attrs, "group": group * k}))
        return Replacement(
            [p, *m.chain, d], nodes,
            f"{d.name} (group {group}, {k} outputs per channel) is depthwise with group "
            f"{group * k}: {p.name}'s {group} output channels repeated {k} times")
