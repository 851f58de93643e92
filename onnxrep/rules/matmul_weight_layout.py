"""matmul-weight-layout (`--target openvino` only): a MatMul's constant 2-D weight is written
as the Transpose of its [out, in] form, the layout PyTorch's own Linear export has.

Before:  x[..., K] -> MatMul(W[K, M]) -> y
After:   x[..., K] -> MatMul(Transpose(V, perm=[1, 0])) -> y        V = W^T, stored [M, K]

Why: OpenVINO's CPU plugin turns a MatMul with a constant weight into a FullyConnected layer
that keeps its weights as [out, in]. Given W [K, M] it inserts a Transpose layer of its own
("MatMul/transpose_b") and keeps it in the compiled model; given Transpose(V) the two
transposes cancel. Measured on the LeViT and NextViT families: 4 and 8 such layers, and the
fused model had more layers than the plain form PyTorch exports with its weight
Transposes left in (32 against 28, 65 against 57); single-thread latency was the same
(0.153 ms either way: the plugin runs the constant Transpose once). docs/DESIGN.md, "Targets".

Formula: Transpose(W^T, perm=[1, 0]) = W element for element, so the MatMul reads the same
matrix; nothing is computed differently (data movement only, no rounding).

Preconditions:
  1. the MatMul's second input is a constant of rank 2 (a rank-1 or batched weight has no
     FullyConnected form);
  2. its dtype is floating point (OpenVINO compresses integer weights by other rules).
Not handled: a constant first input (W @ x has no FullyConnected form either way); Gemm
(transB already states the layout).
Not in the default rule list: every other runtime folds a constant Transpose back, so the
node would only lengthen the file; `onnxrep.rules.TARGET_RULES` runs it for openvino.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.rule import Match, NewNode, NewValue, NewWeight, Refusal, Replacement


@dataclass
class MatMulMatch(Match):
    matmul: gs.Node


@dataclass
class LayoutPlan:
    match: MatMulMatch
    weight: np.ndarray


class TransposedMatMulWeight:
    id = "matmul-weight-layout"
    summary = "a MatMul's constant [in, out] weight as Transpose([out, in])"
    anchors = ("MatMul",)
    opt_in = True

    def match(self, graph: gs.Graph, node: gs.Node) -> MatMulMatch | None:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        if not isinstance(node.inputs[1], gs.Constant):
            return None  # activations times activations (attention): not a candidate
        return MatMulMatch(node, [node], node)

    def check(self, graph: gs.Graph, m: MatMulMatch) -> LayoutPlan | Refusal:
        node = m.matmul
        weight = node.inputs[1]
        # 1. a rank-2 constant (match: a constant)
        values = np.asarray(weight.values)
        if values.ndim != 2:
            return Refusal(f"{node.name}'s weight '{weight.name}' has rank {values.ndim}, not 2")
        # 2. floating point
        if not np.issubdtype(values.dtype, np.floating):
            return Refusal(f"{node.name}'s weight '{weight.name}' is {values.dtype}, not "
                           "floating point")
        return LayoutPlan(m, values)

    def rewrite(self, graph: gs.Graph, plan: LayoutPlan) -> Replacement:
        node = plan.match.matmul
        stored = NewWeight(f"{node.inputs[1].name}_out_in",
                           np.ascontiguousarray(plan.weight.T))
        weight = NewValue(f"{node.inputs[1].name}_in_out", plan.weight.dtype)
        return Replacement(
            [node],
            [NewNode("Transpose", f"{node.name}_weight", [stored], [weight], {"perm": [1, 0]}),
             NewNode("MatMul", node.name, [node.inputs[0], weight], [node.outputs[0]],
                     dict(node.attrs))],
            f"{node.name}: weight stored [out, in] behind a Transpose (OpenVINO's "
            "FullyConnected layout)")
