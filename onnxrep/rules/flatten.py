"""flatten: a Reshape that provably gives [dim0(x), product of x's other dims] is a Flatten.

Before (exports of `x.flatten(1)` / `x.view(x.size(0), -1)`):
    x[N, d1..dk] ─────────────────────────────────┐
    s[N, ...] ─ Shape ─ Gather/Slice(0) ─ ... ─ Concat([N], [-1] or [d1*..*dk]) ─ Reshape ─ y
    x ─ Reshape([-1, d1*..*dk]) ─ y                    (the same with a constant shape)
After:
    x ─ Flatten(axis=1) ─ y                              (the shape subgraph dies with it)

Formula (docs/RULES.md, flatten): Flatten(axis=1) gives [dim0(x), d1*..*dk] with the elements
in row-major order, as Reshape does for any target shape. So the Reshape is the Flatten
exactly when its target shape is [dim0(x), d1*..*dk] for every size the model admits:
  [N, -1]      N = dim0(x): the -1 is d1*..*dk (when N > 0; at N = 0 the Reshape cannot infer
               it and fails, the Flatten runs);
  [N, P]       P = d1*..*dk, static;
  [-1, P]      P = d1*..*dk > 0 static: the -1 is dim0(x);
  [0, -1|P]    with allowzero = 0, the 0 copies dim0(x).
The target shape is read by onnxrep.batchwise's shape arithmetic (entries a*N + b, N the
batch): it must come out as one of these for every N, from constants and the shapes of
tensors whose dim 0 is x's own (x itself, or a tensor that onnx shape inference gives the
same dim 0: the same symbolic name of a graph input - not one that shape inference made up,
docs/RULES.md - or the same static size).

Preconditions (each refusal names the node or tensor):
  1. x has a known rank >= 2 (a GlobalAveragePool output without inferred dims takes its
     input's [N, C, 1..1]), and its dims after the first are static where a P is compared;
  2. the target shape is a constant, or computed by at most 16 nodes of batchwise's table
     from constants and Shape nodes, each reading a tensor [N, static...] with N = dim0(x);
  3. it has exactly two entries, one of the forms above (no 0 entry with allowzero = 1, no
     P that differs from d1*..*dk, no entry that depends on N other than N itself).
Not handled: a target shape from the shape of a tensor with symbolic dims other than the
batch (a dynamic-resolution detector's flatten); Flatten(axis != 1) forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.batchwise import BATCH, shape_in_batch, shape_subgraph
from onnxrep.query import constant_value, dims_of, input_symbols
from onnxrep.rule import Match, NewNode, Refusal, Replacement


@dataclass
class ReshapeMatch(Match):
    reshape: gs.Node


@dataclass
class FlattenPlan:
    match: ReshapeMatch
    why: str


def _static_product(dims: list) -> int | None:
    if not all(isinstance(d, (int, np.integer)) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


class ReshapeToFlatten:
    id = "flatten"
    summary = "Reshape to [dim0(x), prod(rest)] (constant or computed shape) into Flatten(axis=1)"
    anchors = ("Reshape",)
    opt_in = False
    cache_refusals = False  # the shape proof reads upstream of the match

    def match(self, graph: gs.Graph, node: gs.Node) -> ReshapeMatch | None:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        return ReshapeMatch(node, [node], node)

    def check(self, graph: gs.Graph, m: ReshapeMatch) -> FlattenPlan | Refusal:
        node = m.reshape
        x, shape = node.inputs
        # 1. a known rank >= 2
        dims = dims_of(x)
        if dims is None or len(dims) < 2:
            return Refusal(f"{node.name} reads '{x.name}' of shape {x.shape}: not a known "
                           "rank >= 2")
        batch = dims[0]
        rest = _static_product(list(dims[1:]))
        # 2. the target shape, entry by entry
        value = constant_value(shape)
        if value is not None:
            entries: list = [int(v) for v in np.ravel(value)]
        else:
            if not isinstance(batch, (str, int, np.integer)) or batch == "":
                return Refusal(f"{node.name}: dim 0 of '{x.name}' is unknown")
            if isinstance(batch, str) and batch not in input_symbols(graph):
                return Refusal(f"{node.name}: dim 0 of '{x.name}' is '{batch}', a name onnx "
                               "shape inference made up, which proves no equality")
            found = shape_subgraph(shape)
            if isinstance(found, Refusal):
                return found
            order, sources = found
            entries = shape_in_batch(shape, order, batch, sources)
            if isinstance(entries, Refusal):
                return entries
        # 3. [N | 0 | -1, -1 | P]
        if len(entries) != 2:
            return Refusal(f"{node.name} reshapes to {len(entries)} dims, not 2")
        first, second = entries
        allowzero = int(node.attrs.get("allowzero", 0))
        if 0 in entries and allowzero:
            return Refusal(f"{node.name} has a 0 in its target shape with allowzero=1")
        keeps_dim0 = first == BATCH or (first == 0 and not allowzero) or (
            isinstance(batch, (int, np.integer)) and first == int(batch) and first > 0)
        if keeps_dim0 and second == -1:
            return FlattenPlan(m, f"[dim0, -1] of '{x.name}'")
        if rest is None or rest <= 0 or second != rest:
            return Refusal(f"{node.name} reshapes '{x.name}' {dims} to {entries}: not "
                           f"[dim 0, product of the other dims]")
        if keeps_dim0 or first == -1:
            return FlattenPlan(m, f"[{'-1' if first == -1 else 'dim0'}, {rest}] of "
                                  f"'{x.name}'")
        return Refusal(f"{node.name} reshapes '{x.name}' {dims} to {entries}: the first "
                       "entry is not dim 0")

    def rewrite(self, graph: gs.Graph, plan: FlattenPlan) -> Replacement:
        node = plan.match.reshape
        return Replacement([node], [NewNode("Flatten", node.name, [node.inputs[0]],
                                            [node.outputs[0]], {"axis": 1})],
                           f"{node.name} reshapes to {plan.why}: a Flatten")
