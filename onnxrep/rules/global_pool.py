"""global-pool: a ReduceMean over exactly the spatial axes becomes a GlobalAveragePool.

Before (the dynamo exporter's global pooling, axes as an input from opset 18 on):
    x[N, C, D1..Dk] -> ReduceMean(axes = {2..r-1}, keepdims=1) -> y[N, C, 1..1]
    x[N, C, D1..Dk] -> ReduceMean(axes = {2..r-1}, keepdims=0) -> y[N, C]
After:
    x -> GlobalAveragePool -> y                               (keepdims=1)
    x -> GlobalAveragePool -> Flatten(axis=1) -> y            (keepdims=0)

Formula (docs/RULES.md, global-pool): both compute y[n, c] = mean over the spatial positions
of x[n, c]; GlobalAveragePool keeps the spatial axes as size 1 (keepdims=1), and Flatten(axis=1)
of [N, C, 1..1] is [N, C] with the same values (keepdims=0). Some runtimes ignore an axes
input (TensorRT parsers before 10.0 reduce every axis) or spend extra layers on it.

Preconditions (each refusal names the node or tensor):
  1. x has a known rank r >= 3 and dtype float32 or float16 (GlobalAveragePool also allows
     double, but onnxruntime's CPU kernels have none: the output must run where it is checked);
  2. the axes are known: a constant integer input (opset 18) or the `axes` attribute (opset
     < 18); absent or empty axes reduce every axis (or nothing with noop_with_empty_axes=1):
     refused;
  3. the axes, negative ones counted from the end, are exactly {2, ..., r-1}, each once.
Not handled: a ReduceMean over other axes (channel, or a part of the spatial axes); ReduceSum
or ReduceMax (no global pool is their exact twin without a scale or a GlobalMaxPool check).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.query import reduce_axes
from onnxrep.rule import Match, NewNode, NewValue, Refusal, Replacement

_POOL_DTYPES = (np.float16, np.float32)


@dataclass
class ReduceMeanMatch(Match):
    reduce: gs.Node


@dataclass
class GlobalPoolPlan:
    match: ReduceMeanMatch
    keepdims: bool


class ReduceMeanToGlobalPool:
    id = "global-pool"
    summary = "ReduceMean over exactly the spatial axes into GlobalAveragePool (+ Flatten)"
    anchors = ("ReduceMean",)
    opt_in = False

    def match(self, graph: gs.Graph, node: gs.Node) -> ReduceMeanMatch | None:
        if not node.inputs or len(node.outputs) != 1:
            return None
        return ReduceMeanMatch(node, [node], node)

    def check(self, graph: gs.Graph, m: ReduceMeanMatch) -> GlobalPoolPlan | Refusal:
        node, x = m.reduce, m.reduce.inputs[0]
        # 1. rank and dtype
        if x.shape is None or len(x.shape) < 3:
            return Refusal(f"{node.name} reads '{x.name}' of shape {x.shape}: not a known "
                           "rank >= 3")
        if x.dtype is None or np.dtype(x.dtype) not in [np.dtype(d) for d in _POOL_DTYPES]:
            return Refusal(f"{node.name} reads '{x.name}' of dtype {x.dtype}: "
                           "onnxruntime's GlobalAveragePool takes float16/32")
        rank = len(x.shape)
        # 2. known, non-empty axes
        axes = reduce_axes(node)
        if isinstance(axes, Refusal):
            return axes
        if not axes:
            noop = int(node.attrs.get("noop_with_empty_axes", 0))
            return Refusal(f"{node.name} has no axes: it "
                           + ("passes its input through" if noop else "reduces every axis"))
        # 3. exactly the spatial axes
        if any(not -rank <= a < rank for a in axes):
            return Refusal(f"{node.name} has axes {axes} out of range for rank {rank}")
        normalized = sorted(a % rank for a in axes)
        if normalized != list(range(2, rank)):
            return Refusal(f"{node.name} reduces axes {axes} of a rank-{rank} tensor, not "
                           f"exactly the spatial axes {list(range(2, rank))}")
        return GlobalPoolPlan(m, bool(int(node.attrs.get("keepdims", 1))))

    def rewrite(self, graph: gs.Graph, plan: GlobalPoolPlan) -> Replacement:
        node = plan.match.reduce
        x, y = node.inputs[0], node.outputs[0]
        if plan.keepdims:
            nodes = [NewNode("GlobalAveragePool", node.name, [x], [y])]
        else:
            pooled = NewValue(f"{node.name}_pooled", x.dtype)
            nodes = [NewNode("GlobalAveragePool", f"{node.name}_pool", [x], [pooled]),
                     NewNode("Flatten", node.name, [pooled], [y], {"axis": 1})]
        return Replacement([node], nodes, f"{node.name} (ReduceMean over the spatial axes) "
                                          "is a GlobalAveragePool"
                                          + ("" if plan.keepdims else " + Flatten"))
