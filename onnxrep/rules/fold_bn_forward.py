"""fold-bn-forward: a BatchNormalization folds into the pad-0 Conv (or the Gemm) after it.

Before:  x -> BatchNormalization -> t -> Conv(W, b, pads 0) -> y
After:   x -> Conv(W', b', pads 0) -> y
(also RepViT's BN_Linear head:  x[N,K] -> BatchNormalization -> Gemm -> y)

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
  5. Gemm: transA = 0 and the BN input is 2-D [N, K], so that the BN's channel axis is the
     Gemm's input-feature axis; B and C are float constants, C per output feature:
     B'[k, :] = a[k] * B[k, :], C' = beta*C + alpha * c @ B, beta' = 1.
Runs after fold-bn, so a BN between two Convs folds backwards first.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import (
    batchnorm_affine,
    channel_vector,
    conv_params,
    float_const,
    sole_consumer,
)
from onnxrep.rule import Applied, Match
from onnxrep.surgery import (
    add_node,
    constant_value,
    conv_weight_bias,
    new_constant,
    replace_with_conv,
    retire,
)


class FoldBatchNormIntoNextConv:
    id = "fold-bn-forward"
    summary = "BatchNormalization into the pad-0 Conv or the Gemm after it"
    anchors = ("BatchNormalization",)
    opt_in = False

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        convs = [r for r in node.outputs[0].outputs
                 if r.op in ("Conv", "Gemm") and r.inputs[0] is node.outputs[0]]
        if not convs:
            return None
        conv = convs[0]  # other readers: check() says so (sole_consumer)
        m = Match(anchor=node, nodes=[node, conv], output=conv.outputs[0])
        m.roles.update(graph=graph, bn=node, conv=conv)
        return m

    def _check_gemm(self, m: Match, affine: tuple[np.ndarray, np.ndarray]) -> list[str]:
        bn, gemm, graph = m["bn"], m["conv"], m["graph"]
        reason = (sole_consumer(graph, bn.outputs[0], gemm)
                  or float_const(gemm.inputs[1], f"{gemm.name} B"))
        if reason:
            return [reason]
        if int(gemm.attrs.get("transA", 0)) != 0:
            return [f"{gemm.name} has transA=1: the BN's channel axis is not its input features"]
        shape = bn.inputs[0].shape
        if shape is None or len(shape) != 2:
            return [f"{bn.name} input rank is {'unknown' if shape is None else len(shape)}, "
                    "expected 2-D [N, K] before a Gemm"]
        b_matrix = constant_value(gemm.inputs[1])
        trans_b = bool(gemm.attrs.get("transB", 0))
        k, out = (b_matrix.shape[1], b_matrix.shape[0]) if trans_b else b_matrix.shape
        if k != affine[0].shape[0]:
            return [f"{bn.name} has {affine[0].shape[0]} channels, {gemm.name} reads {k}"]
        c_bias = np.zeros(out)
        if len(gemm.inputs) > 2 and gemm.inputs[2].name:
            reason = float_const(gemm.inputs[2], f"{gemm.name} C")
            if reason:
                return [reason]
            c_bias = channel_vector(constant_value(gemm.inputs[2]), out, rank=2)
            if c_bias is None:
                return [f"{gemm.name} C is not per output feature"]
        m["a"], m["c"], m["c_bias"], m["trans_b"] = affine[0], affine[1], c_bias, trans_b
        return []

    def _rewrite_gemm(self, graph: gs.Graph, m: Match) -> Applied:
        bn, gemm = m["bn"], m["conv"]
        b_matrix = constant_value(gemm.inputs[1])
        has_c = len(gemm.inputs) > 2 and gemm.inputs[2].name
        matrix, bias = kernels.fold_input_affine_gemm(
            b_matrix, m["c_bias"], m["trans_b"], float(gemm.attrs.get("alpha", 1.0)),
            float(gemm.attrs.get("beta", 1.0)) if has_c else 0.0, m["a"], m["c"])
        x, name, attrs = bn.inputs[0], gemm.name, {**gemm.attrs, "beta": 1.0}
        why = f"{bn.name} folded forward into {gemm.name}"
        removed = retire(m.nodes)
        b_t = new_constant(graph, f"{name}.B", kernels.cast_like(matrix, b_matrix))
        c_t = new_constant(graph, f"{name}.C", kernels.cast_like(bias, b_matrix))
        node = add_node(graph, "Gemm", name, [x, b_t, c_t], [m.output], attrs)
        return Applied(self.id, removed, [node.name], why)

    def check(self, m: Match) -> list[str]:
        bn, conv, graph = m["bn"], m["conv"], m["graph"]
        affine = batchnorm_affine(bn)
        if isinstance(affine, str):
            return [affine]
        if conv.op == "Gemm":
            return self._check_gemm(m, affine)
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
        if conv.op == "Gemm":
            return self._rewrite_gemm(graph, m)
        weight, bias = conv_weight_bias(conv)
        w, b = kernels.fold_input_affine(weight, bias, m["a"], m["c"], m["group"])
        x, name, attrs = bn.inputs[0], conv.name, dict(conv.attrs)
        why = f"{bn.name} folded forward into {conv.name}"
        removed = retire(m.nodes)
        new = replace_with_conv(graph, name, x, m.output, kernels.cast_like(w, weight),
                                kernels.cast_like(b, weight), attrs)
        return Applied(self.id, removed, [new.name], why)
