"""A tree of Add / Sub / per-channel scales / inference BN read as one linear expression.

    x ─ Conv3x3 ─ Mul(s) ─┐
    x ─ Conv1x1 ──────────┼─ Add ─ Sub ─ y       y = s*c3 + c1 - (a*x + c)
    x ─ BN(a, c) ─────────┘                        = sum_j coef_j * leaf_j + bias

`expand_sum(graph, root, channels, rank)` walks up from `root` and returns every leaf with
its per-channel coefficient vector, the per-channel constant `bias`, and the `internal`
nodes the expression replaces (docs/RULES.md, merge-parallel). Expanded, per node:

    Add(t, u) / Sub(t, u)     coef_t += k,  coef_u += +-k
    Add/Sub(t, v), (v, t)     bias += +-k*v, and t with +-k     (v a per-channel constant)
    Mul(t, v), Mul(v, t)      t with k*v
    Div(t, v)                 t with k/v                          (no zero in v)
    BatchNormalization(t)     t with k*a, bias += k*c             (facts.batchnorm_affine)

A constant v is per channel when it is a finite float constant that broadcasts along the
channel axis only (facts.channel_vector: scalar, [C,1,1], [1,C,1,1]; a [C] vector scales the
last axis and is not). A tensor is expanded further only when its producer is one of these
ops and the tensor is read by the node above alone, once, and is not a graph output
(facts.sole_consumer): a partial sum read elsewhere stays a leaf, so replacing `internal`
never removes a value someone else reads. Anything else is a leaf; a leaf reached twice
(Add(t, t)) gets the sum of its coefficients.

Pure reading: nothing here changes the graph. All arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.facts import batchnorm_affine, channel_vector, float_const, sole_consumer
from onnxrep.query import constant_value, producer
from onnxrep.rule import Refusal

TREE_OPS = ("Add", "Sub", "Mul", "Div", "BatchNormalization")


@dataclass
class Term:
    """One leaf of the sum and its per-channel coefficient (float64, length = channels)."""

    leaf: gs.Tensor
    coef: np.ndarray


@dataclass
class Expression:
    """root = sum(term.coef * term.leaf) + bias, computed by the `internal` nodes."""

    terms: list[Term]  # in the order the walk first reached each leaf
    bias: np.ndarray
    internal: list[gs.Node]


def channels_and_rank(root: gs.Node) -> tuple[int, int] | None:
    """Channels and rank of the tensor `root` computes: from its shape, else from the weight
    of a Conv with a constant weight somewhere inside the tree below it; None if neither."""
    shape = root.outputs[0].shape
    if shape is not None and len(shape) >= 3 and isinstance(shape[1], int):
        return int(shape[1]), len(shape)
    stack, seen = [root], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op == "Conv" and len(n.inputs) > 1:
            w = constant_value(n.inputs[1])
            if w is not None:
                return int(w.shape[0]), w.ndim
        if n.op in TREE_OPS:
            stack.extend(p for t in n.inputs if (p := producer(t)) is not None)
    return None


def expand_sum(graph: gs.Graph, root: gs.Node, channels: int, rank: int) -> Expression:
    """The linear expression `root` computes over its leaves (module docstring). When `root`
    itself is not linear, the expression is its own output as the one leaf, coefficient 1."""
    return _Expander(graph, channels, rank).expand(root)


class _Expander:
    def __init__(self, graph: gs.Graph, channels: int, rank: int) -> None:
        self.graph, self.channels, self.rank = graph, channels, rank
        self.terms: dict[int, Term] = {}
        self.bias = np.zeros(channels)
        self.internal: list[gs.Node] = []

    def expand(self, root: gs.Node) -> Expression:
        if not self._node(root, np.ones(self.channels)):
            self._leaf(root.outputs[0], np.ones(self.channels))
        return Expression(list(self.terms.values()), self.bias, self.internal)

    def _vector(self, tensor: gs.Tensor) -> np.ndarray | None:
        value = float_const(tensor, "scale")
        if isinstance(value, Refusal):
            return None
        return channel_vector(value, self.channels, self.rank)

    def _leaf(self, tensor: gs.Tensor, coef: np.ndarray) -> None:
        term = self.terms.get(id(tensor))
        if term is None:
            self.terms[id(tensor)] = Term(tensor, coef)
        else:
            term.coef = term.coef + coef

    def _tensor(self, tensor: gs.Tensor, parent: gs.Node, coef: np.ndarray) -> None:
        node = producer(tensor)
        if (node is not None and node.op in TREE_OPS
                and sole_consumer(self.graph, tensor, parent) is None
                and self._node(node, coef)):
            return
        self._leaf(tensor, coef)

    def _node(self, node: gs.Node, coef: np.ndarray) -> bool:
        """Expand `node` with coefficient `coef`; False (and nothing added) when it is not
        linear in the sense of the module docstring."""
        ins = node.inputs
        if node.op == "BatchNormalization":
            affine = batchnorm_affine(node)
            if isinstance(affine, Refusal) or len(affine[0]) != self.channels:
                return False
            self.internal.append(node)
            self.bias = self.bias + coef * affine[1]
            self._tensor(ins[0], node, coef * affine[0])
            return True
        if node.op not in TREE_OPS or len(ins) != 2 or len(node.outputs) != 1:
            return False
        consts = [self._vector(t) for t in ins]
        variable = [constant_value(t) is None for t in ins]
        if node.op in ("Add", "Sub"):
            sign = -1.0 if node.op == "Sub" else 1.0
            if all(variable):
                self.internal.append(node)
                self._tensor(ins[0], node, coef)
                self._tensor(ins[1], node, sign * coef)
                return True
            if variable[0] and consts[1] is not None:
                self.internal.append(node)
                self.bias = self.bias + sign * coef * consts[1]
                self._tensor(ins[0], node, coef)
                return True
            if variable[1] and consts[0] is not None:
                self.internal.append(node)
                self.bias = self.bias + coef * consts[0]
                self._tensor(ins[1], node, sign * coef)
                return True
            return False
        if node.op == "Mul":
            for v, c in ((0, 1), (1, 0)):
                if variable[v] and consts[c] is not None:
                    self.internal.append(node)
                    self._tensor(ins[v], node, coef * consts[c])
                    return True
            return False
        if node.op == "Div" and variable[0] and consts[1] is not None and np.all(consts[1] != 0):
            self.internal.append(node)
            self._tensor(ins[0], node, coef / consts[1])
            return True
        return False
