"""reshape-chain: a reshape of a reshape is one reshape, and a reshape to the shape its input
already has is no reshape at all.

Before:  t -> Flatten / Reshape / Squeeze / Unsqueeze -> z -> Reshape(s) -> y
After:   t -> Reshape(s) -> y                                   (collapse)
Before:  t -> Reshape(s) -> y,  s provably the shape of t
After:   t -> Identity -> y            (removed after the rules, graph.drop_identities)

What leaves these behind: a BN folded away between LeViT's Flatten(axis=2) and its
Reshape(Shape(t)) back to [B, N, C] (ts exports), or between the dynamo export's
Reshape([-1, C]) and Reshape([-1, N, C]); the runtimes then spend layers on two reshapes
that do nothing (docs/RULES.md, reshape-chain).

Formula: every reshape-like op keeps the row-major order of the elements and only changes
the dims, so Reshape(R(t), s) = Reshape(t, s) whenever s does not depend on R's output
dims; and Reshape(t, s) = t when s is t's shape.

Preconditions:
  collapse
  1. z is read by the outer Reshape alone (once) and is not a graph output;
  2. s is a constant with no 0 entry (with allowzero=0 a 0 copies a dim of z, not of t), or
     the outer Reshape has allowzero=1, or s is Shape(t) of the inner op's own input t (its
     entries are t's dims; a 0 among them means t is empty, and so is every tensor here);
  identity
  3. s is Shape(t) of t itself (no start/end), or has t's rank and, entry by entry, matches
     t's dims (the same static size, a 0 copying the dim with allowzero=0, the same
     graph-input symbol) at all places but at most one; that one is -1, or any other value
     when the matched dims are static and non-zero: the element count then makes it t's dim
     whenever the Reshape runs. s is a constant, or computed by batchwise's arithmetic from
     constants and the shapes of tensors that share their dim 0 (LeViT's dynamo-noopt
     `view(B, N, C)` of a tensor whose batch onnx inference could not name);
  4. y is not a graph output read straight from a graph input (the Identity would stay).
Not handled: computed shapes the arithmetic cannot read, a collapse onto a computed shape
with allowzero=0 (its entries could be 0 at run time), a Flatten as the outer op.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.batchwise import BATCH, shape_in_batch, shape_subgraph
from onnxrep.channel_axis import RESHAPES
from onnxrep.query import constant_value, input_symbols, is_graph_output, producer
from onnxrep.rule import Match, NewNode, Refusal, Replacement


@dataclass
class ReshapeMatch(Match):
    reshape: gs.Node
    inner: gs.Node | None  # the reshape-like op before it, if any


@dataclass
class ReshapePlan:
    match: ReshapeMatch
    collapse: bool  # True: read t directly; False: the Reshape is an identity
    why: str


def _is_shape_of(shape: gs.Tensor, t: gs.Tensor) -> bool:
    node = producer(shape)
    return (node is not None and node.op == "Shape" and node.inputs[0] is t
            and "start" not in node.attrs and "end" not in node.attrs)


def _target_entries(shape: gs.Tensor) -> list[int | str] | None:
    """The entries of a Reshape's target shape: ints where known, and for a shape computed
    from the shapes of tensors that share their dim 0 (batchwise's arithmetic), that dim
    (its symbol, or its size) where an entry is exactly it; None when it cannot be read."""
    value = constant_value(shape)
    if value is not None:
        return [int(v) for v in value] if value.ndim == 1 else None
    found = shape_subgraph(shape)
    if isinstance(found, Refusal):
        return None
    order, sources = found
    batches = {tuple(s.shape or [None])[:1] for s in sources}
    if len(batches) != 1 or not next(iter(batches)):
        return None
    (batch,) = batches.pop()
    if not isinstance(batch, (str, int, np.integer)) or batch == "":
        return None
    entries = shape_in_batch(shape, order, batch, sources)
    if isinstance(entries, Refusal):
        return None
    return [batch if e == BATCH else e for e in entries]


def _keeps_shape(graph: gs.Graph, node: gs.Node, t: gs.Tensor) -> str | None:
    """Why Reshape(t, s) gives t's own shape for every admitted size, or None.

    Each entry of s either provably equals t's dim at its place (the same static size, a 0
    that copies it with allowzero=0, the same graph-input symbol), or is free (-1, or a
    computed entry such as another tensor's batch). With no free entry the shapes are equal;
    with one, the element count fixes it to t's dim whenever the Reshape runs. A -1 beside a
    zero-sized dim cannot be inferred (the Reshape fails, onnxruntime and the ONNX reference
    alike); a computed free entry beside one fits any value, so it needs the matched dims
    static and non-zero."""
    shape = node.inputs[1]
    if _is_shape_of(shape, t):
        return f"to Shape({t.name})"
    entries = _target_entries(shape)
    if entries is None or t.shape is None or len(entries) != len(t.shape):
        return None
    allowzero = int(node.attrs.get("allowzero", 0))
    own = input_symbols(graph)
    free, computed_free, may_be_zero = 0, False, False
    for value, dim in zip(entries, t.shape, strict=True):
        static = int(dim) if isinstance(dim, (int, np.integer)) else None
        if value == 0 and not allowzero:
            may_be_zero |= static is None or static == 0  # copies the dim
        elif isinstance(value, (int, np.integer)) and value >= 0 and static == value:
            may_be_zero |= static == 0
        elif isinstance(value, str) and value == dim and value in own:
            may_be_zero = True  # a symbol's size may be 0
        else:
            free += 1
            computed_free |= value != -1
    if free > 1 or (computed_free and may_be_zero):
        return None
    return f"to {entries}, the shape of {t.name}"


class CollapseReshapes:
    id = "reshape-chain"
    summary = "a reshape of a reshape into one; a reshape to its input's own shape removed"
    anchors = ("Reshape",)
    opt_in = False

    def match(self, graph: gs.Graph, node: gs.Node) -> ReshapeMatch | None:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        inner = producer(node.inputs[0])
        if inner is not None and inner.op not in RESHAPES:
            inner = None
        return ReshapeMatch(node, [node] if inner is None else [inner, node], node, inner)

    def check(self, graph: gs.Graph, m: ReshapeMatch) -> ReshapePlan | Refusal:
        node, t = m.reshape, m.reshape.inputs[0]
        why = _keeps_shape(graph, node, t)
        if why is not None:
            if is_graph_output(graph, node.outputs[0]) and producer(t) is None:
                return Refusal(f"{node.name} maps a graph input to a graph output")
            return ReshapePlan(m, False, f"{node.name} reshapes {why}: removed")
        if m.inner is None:
            return Refusal(f"{node.name} does not provably keep its input's shape")
        z = t
        if is_graph_output(graph, z) or len(z.outputs) != 1 or sum(
                1 for i in node.inputs if i is z) != 1:
            return Refusal(f"{z.name} is read by more than {node.name}")
        target = constant_value(node.inputs[1])
        back = _is_shape_of(node.inputs[1], m.inner.inputs[0])  # LeViT's reshape_as
        if not int(node.attrs.get("allowzero", 0)) and not back and (
                target is None or np.any(target == 0)):
            return Refusal(f"{node.name}'s shape is computed or copies a dim of {z.name} "
                           "(a 0 entry)")
        return ReshapePlan(m, True, f"{m.inner.name} ({m.inner.op}) and {node.name} are one "
                                    "reshape")

    def rewrite(self, graph: gs.Graph, plan: ReshapePlan) -> Replacement:
        node = plan.match.reshape
        if plan.collapse:
            source = plan.match.inner.inputs[0]
            new = NewNode("Reshape", node.name, [source, node.inputs[1]], [node.outputs[0]],
                          dict(node.attrs))
            return Replacement([plan.match.inner, node], [new], plan.why)
        new = NewNode("Identity", node.name, [node.inputs[0]], [node.outputs[0]])
        return Replacement([node], [new], plan.why)
