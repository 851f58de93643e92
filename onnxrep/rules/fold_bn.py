"""fold-bn: a BatchNormalization folds into the Conv / ConvTranspose / Gemm / MatMul before it.

Before:  x -> Conv(W, b) -> t -> BatchNormalization(gamma, beta, mean, var, eps) -> y
After:   x -> Conv(W', b') -> y

Formula (RULES-SPEC §1): a = gamma / sqrt(var + eps), c = beta - mean * a (eps read from the
node), and y = a * t + c per output channel, so
  Conv           W'[o] = a[o] * W[o],  b' = a * b + c  (b = 0 when absent)
  ConvTranspose  W[I, O/g, k]: output channel o = gi*(O/g) + j is column j of group gi
  Gemm           B' = B * a along the output features (rows when transB), C' = a*beta*C + c,
                 beta' = 1 (alpha is kept)
  MatMul(+Add)   W'[:, o] = a[o] * W[:, o], bias' = a * bias + c (an Add is created if the
                 MatMul had no bias)

Preconditions:
  1. the BN is in inference mode (training_mode absent or 0; running-stat outputs unused);
  2. the BN's parameters are finite float constants and var + epsilon > 0;
  3. the producer's output t is read by the BN alone, once, and is not a graph output;
  4. the producer's weight and bias are finite float constants (Conv: auto_pad NOTSET/VALID);
  5. Gemm / MatMul: the output is 2-D [N, O] - the BN's channel axis 1 is then the output
     feature axis - and the bias (Gemm C, or the Add constant) is per feature;
  6. the BN's channel count equals the producer's output channels.
A weight initializer shared with another node is never changed in place: the rewrite writes
new initializers and the old ones stay for their other readers.
Not handled: BN before the producer (that is fold-bn-forward), MatMul with rank > 2 outputs.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import batchnorm_affine, channel_vector, conv_params, float_const, sole_consumer
from onnxrep.rule import Applied, Match
from onnxrep.surgery import (
    add_node,
    constant_value,
    conv_weight_bias,
    new_constant,
    new_variable,
    producer,
    replace_with_conv,
    retire,
)

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


def _matmul_of(add: gs.Node) -> tuple[gs.Node, gs.Tensor] | None:
    """Add(MatMul(x, W), bias) -> (the MatMul, the bias tensor)."""
    for i in (0, 1):
        mm = producer(add.inputs[i])
        if mm is not None and mm.op == "MatMul" and constant_value(add.inputs[1 - i]) is not None:
            return mm, add.inputs[1 - i]
    return None


class FoldBatchNormIntoProducer:
    id = "fold-bn"
    summary = "BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul(+Add) before it"
    anchors = ("BatchNormalization",)
    opt_in = False

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        prod = producer(node.inputs[0])
        if prod is None or prod.op not in _PRODUCERS:
            return None
        m = Match(anchor=node, nodes=[prod, node], output=node.outputs[0])
        m["bn"], m["graph"] = node, graph
        if prod.op == "Add":
            found = _matmul_of(prod)
            if found is None:
                return None
            m["matmul"], m["bias"] = found
            m["add"] = prod
            m.nodes = [found[0], prod, node]
            m["kind"] = "MatMul"
        else:
            m["kind"] = prod.op
            m[prod.op.lower()] = prod
            if prod.op == "MatMul":
                m["matmul"], m["bias"] = prod, None
        return m

    def check(self, m: Match) -> list[str]:
        bn, graph, kind = m["bn"], m["graph"], m["kind"]
        affine = batchnorm_affine(bn)
        if isinstance(affine, str):
            return [affine]
        if int(bn.attrs.get("spatial", 1)) != 1:
            return [f"{bn.name} has spatial=0 (per-element statistics)"]
        m["a"], m["c"] = affine
        channels = affine[0].shape[0]
        first = m.nodes[-2]
        reasons = []
        reason = sole_consumer(graph, first.outputs[0], bn)
        if reason:
            reasons.append(reason)
        if kind in ("Conv", "ConvTranspose"):
            node = m[kind.lower()]
            reason = conv_params(node)
            if reason:
                return reasons + [reason]
            weight = constant_value(node.inputs[1])
            group = int(node.attrs.get("group", 1))
            out_channels = weight.shape[0] if kind == "Conv" else weight.shape[1] * group
            if out_channels != channels:
                reasons.append(f"{bn.name} has {channels} channels, {node.name} outputs "
                               f"{out_channels}")
        elif kind == "Gemm":
            reasons += self._check_gemm(m, channels)
        else:
            reasons += self._check_matmul(m, channels)
        return reasons

    def _check_gemm(self, m: Match, channels: int) -> list[str]:
        gemm = m["gemm"]
        reason = float_const(gemm.inputs[1], f"{gemm.name} B")
        if reason:
            return [reason]
        b_matrix = constant_value(gemm.inputs[1])
        out_features = b_matrix.shape[0] if gemm.attrs.get("transB", 0) else b_matrix.shape[1]
        if out_features != channels:
            return [f"{m['bn'].name} has {channels} channels, {gemm.name} outputs {out_features}"]
        if len(gemm.inputs) > 2 and gemm.inputs[2].name:
            reason = float_const(gemm.inputs[2], f"{gemm.name} C")
            if reason:
                return [reason]
            if channel_vector(constant_value(gemm.inputs[2]), channels, rank=2) is None:
                return [f"{gemm.name} C {constant_value(gemm.inputs[2]).shape} is not per "
                        "output feature"]
        return []

    def _check_matmul(self, m: Match, channels: int) -> list[str]:
        mm = m["matmul"]
        reason = float_const(mm.inputs[1], f"{mm.name} weight")
        if reason:
            return [reason]
        weight = constant_value(mm.inputs[1])
        x_shape = mm.inputs[0].shape
        if weight.ndim != 2:
            return [f"{mm.name} weight is {weight.ndim}-D, expected 2-D"]
        if x_shape is None or len(x_shape) != 2:
            return [f"{mm.name} input rank is {'unknown' if x_shape is None else len(x_shape)}: "
                    "BN's channel axis is the output feature axis only for 2-D outputs"]
        if weight.shape[1] != channels:
            return [f"{m['bn'].name} has {channels} channels, {mm.name} outputs "
                    f"{weight.shape[1]}"]
        if m["bias"] is not None:
            reason = float_const(m["bias"], f"{m['add'].name} bias")
            if reason:
                return [reason]
            if channel_vector(constant_value(m["bias"]), channels, rank=2) is None:
                return [f"{m['add'].name} bias {constant_value(m['bias']).shape} is not per "
                        "output feature"]
        if mm.inputs[0].dtype is not None and np.dtype(mm.inputs[0].dtype).kind != "f":
            return [f"{mm.name} input is not floating point"]
        return []

    def rewrite(self, graph: gs.Graph, m: Match) -> Applied:
        kind, bn, a, c = m["kind"], m["bn"], m["a"], m["c"]
        out = m.output
        why = f"{bn.name} folded into {m.nodes[0].name}"
        if kind in ("Conv", "ConvTranspose"):
            node = m[kind.lower()]
            weight, bias = conv_weight_bias(node)
            x, name, attrs = node.inputs[0], node.name, dict(node.attrs)
            removed = retire(m.nodes)
            if kind == "Conv":
                w, b = kernels.scale_conv_output_as(weight, bias, a, c)
            else:
                group = int(node.attrs.get("group", 1))
                w, b = kernels.scale_conv_transpose_output(weight, bias, a, c, group)
                w, b = kernels.cast_like(w, weight), kernels.cast_like(b, weight)
            new = replace_with_conv(graph, name, x, out, w, b, attrs, op=kind)
            added = [new.name]
        elif kind == "Gemm":
            removed, added = self._rewrite_gemm(graph, m)
        else:
            removed, added = self._rewrite_matmul(graph, m)
        return Applied(self.id, removed, added, why)

    def _rewrite_gemm(self, graph: gs.Graph, m: Match) -> tuple[list[str], list[str]]:
        gemm, a, c = m["gemm"], m["a"], m["c"]
        b_matrix = constant_value(gemm.inputs[1])
        channels = a.shape[0]
        has_c = len(gemm.inputs) > 2 and gemm.inputs[2].name
        c_bias = (channel_vector(constant_value(gemm.inputs[2]), channels, rank=2)
                  if has_c else np.zeros(channels))
        trans_b = bool(gemm.attrs.get("transB", 0))
        matrix, bias = kernels.scale_gemm_output(
            b_matrix, c_bias, trans_b, float(gemm.attrs.get("alpha", 1.0)),
            float(gemm.attrs.get("beta", 1.0)) if has_c else 0.0, a, c)
        attrs = {**gemm.attrs, "beta": 1.0}
        x, name = gemm.inputs[0], gemm.name
        removed = retire(m.nodes)
        b_t = new_constant(graph, f"{name}.B", kernels.cast_like(matrix, b_matrix))
        c_t = new_constant(graph, f"{name}.C", kernels.cast_like(bias, b_matrix))
        node = add_node(graph, "Gemm", name, [x, b_t, c_t], [m.output], attrs)
        return removed, [node.name]

    def _rewrite_matmul(self, graph: gs.Graph, m: Match) -> tuple[list[str], list[str]]:
        mm, a, c = m["matmul"], m["a"], m["c"]
        weight = constant_value(mm.inputs[1])
        channels = a.shape[0]
        bias = (np.zeros(channels) if m["bias"] is None
                else channel_vector(constant_value(m["bias"]), channels, rank=2))
        w_new = kernels.f64(weight) * a[None, :]
        b_new = a * bias + c
        x, name = mm.inputs[0], mm.name
        removed = retire(m.nodes)
        w_t = new_constant(graph, f"{name}.weight", kernels.cast_like(w_new, weight))
        b_t = new_constant(graph, f"{name}.bias", kernels.cast_like(b_new, weight))
        hidden = new_variable(graph, f"{name}.out", dtype=weight.dtype)
        new_mm = add_node(graph, "MatMul", name, [x, w_t], [hidden])
        new_add = add_node(graph, "Add", f"{name}.bias_add", [hidden, b_t], [m.output])
        return removed, [new_mm.name, new_add.name]
