"""fold-bn-forward: a BatchNormalization folds into the pad-0 Conv after it.

Before:  x -> BatchNormalization -> t -> Conv(W, b, pads 0) -> y
After:   x -> Conv(W', b', pads 0) -> y

Formula (RULES-SPEC §2): t = a*x + c per input channel (a = gamma/sigma, c = beta - mean*a),
so with the Conv's groups (input channel gi*I/g + i of output channel o):
  W'[o, i] = W[o, i] * a[gi*I/g + i],   b'[o] = b[o] + sum_{i,k} W[o, i, k] * c[gi*I/g + i]

Preconditions:
  1. the BN is in inference mode with finite constant parameters;
  2. the BN output t is read by the Conv alone, once (as its data input), and is not a graph
     output;
  3. the Conv pads nothing (all pads 0, auto_pad NOTSET/VALID): zero padding of t is not zero
     padding of x, so a padded Conv would see c at the border where the fold gives 0;
  4. the Conv's weight and bias are finite float constants and its input channels match.
Runs after fold-bn, so a BN between two Convs folds backwards first.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import batchnorm_affine, conv_params, sole_consumer
from onnxrep.rule import Applied, Match
from onnxrep.surgery import constant_value, conv_weight_bias, replace_with_conv, retire


class FoldBatchNormIntoNextConv:
    id = "fold-bn-forward"
    summary = "BatchNormalization into the pad-0 Conv after it"
    anchors = ("BatchNormalization",)
    opt_in = False

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        convs = [r for r in node.outputs[0].outputs
                 if r.op == "Conv" and r.inputs[0] is node.outputs[0]]
        if not convs:
            return None
        conv = convs[0]  # other readers: check() says so (sole_consumer)
        m = Match(anchor=node, nodes=[node, conv], output=conv.outputs[0])
        m.roles.update(graph=graph, bn=node, conv=conv)
        return m

    def check(self, m: Match) -> list[str]:
        bn, conv, graph = m["bn"], m["conv"], m["graph"]
        affine = batchnorm_affine(bn)
        if isinstance(affine, str):
            return [affine]
        reason = sole_consumer(graph, bn.outputs[0], conv) or conv_params(conv)
        if reason:
            return [reason]
        pads = list(conv.attrs.get("pads", []))
        if any(int(p) != 0 for p in pads):
            return [f"{conv.name} pads {pads}: zero padding after {bn.name} is not zero padding "
                    "before it"]
        weight = constant_value(conv.inputs[1])
        group = int(conv.attrs.get("group", 1))
        if weight.shape[1] * group != affine[0].shape[0]:
            return [f"{bn.name} has {affine[0].shape[0]} channels, {conv.name} reads "
                    f"{weight.shape[1] * group}"]
        m["a"], m["c"], m["group"] = affine[0], affine[1], group
        return []

    def rewrite(self, graph: gs.Graph, m: Match) -> Applied:
        bn, conv = m["bn"], m["conv"]
        weight, bias = conv_weight_bias(conv)
        w, b = kernels.fold_input_affine(weight, bias, m["a"], m["c"], m["group"])
        x, name, attrs = bn.inputs[0], conv.name, dict(conv.attrs)
        why = f"{bn.name} folded forward into {conv.name}"
        removed = retire(m.nodes)
        new = replace_with_conv(graph, name, x, m.output, kernels.cast_like(w, weight),
                                kernels.cast_like(b, weight), attrs)
        return Applied(self.id, removed, [new.name], why)
