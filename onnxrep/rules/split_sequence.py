"""split-sequence: a SplitToSequence read only by constant SequenceAt becomes one Split.

Before (the dynamo exporter without optimization, torch's split_with_sizes):
    x -> SplitToSequence(split = [s0..s(n-1)], axis=a) -> seq
    seq -> SequenceAt(p) -> y_p          (one per chunk used; p constant, maybe negative or
                                          repeated)
After:
    x -> Split(x, [s0..s(n-1)], axis=a) -> (out_0, ..., out_(n-1))
    y_p is out_(p mod n); a second SequenceAt of the same chunk becomes Identity(out_p); a chunk
    nobody reads is a fresh unused output.

Formula (ONNX spec, SplitToSequence): with `split` a 1-D tensor of n entries the input is
split into n chunks along `axis`, chunk i holding positions s0 + .. + s(i-1) up to
s0 + .. + si (exclusive) - exactly Split's i-th output for the same sizes and axis (and both
require the sizes to sum to the axis' dim); `keepdims` "is ignored if input 'split' is
specified" (it only drops the axis of the size-1 chunks of an absent split). SequenceAt(seq, p)
returns element p, counted from the end when p < 0 (element p + n), so it is Split output
p mod n. Runtimes gain from it: ncnn/pnnx cannot convert sequences at all, and every runtime
spends more layers on a sequence and its readers than on one Split.

Preconditions (each refusal names the node):
  1. the model's default-domain opset is >= 13 (Split takes its sizes as an input from 13 on;
     before, they were an attribute);
  2. `split` is present and a constant 1-D integer tensor with n >= 1 entries, all >= 0 (written
     as int64, the one type Split takes);
  3. the sequence is not a graph output, and every node reading it is a SequenceAt whose
     position is a constant integer scalar p with -n <= p < n (at least one such reader).
Not handled: an absent or scalar `split` (chunk count depends on the input's size, and
keepdims applies to an absent one), a computed `split` or position, a sequence read by any other
op (SequenceLength, ConcatFromSequence, a Loop, ...) or inside a subgraph, a sequence that is a
graph output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.query import constant_value, is_graph_output, optional_input
from onnxrep.rule import Input, Match, NewNode, NewValue, NewWeight, Refusal, Replacement

_MIN_OPSET = 13


@dataclass
class SplitToSequenceMatch(Match):
    split: gs.Node
    readers: list[gs.Node]


@dataclass
class SequenceToSplitPlan:
    match: SplitToSequenceMatch
    sizes: np.ndarray  # int64, 1-D
    chunks: list[int]  # per reader (in `match.readers` order): the Split output it takes


class SequenceToSplit:
    id = "split-sequence"
    summary = "SplitToSequence read only by constant SequenceAt into one Split"
    anchors = ("SplitToSequence",)
    opt_in = False

    def match(self, graph: gs.Graph, node: gs.Node) -> SplitToSequenceMatch | None:
        if not node.inputs or len(node.outputs) != 1:
            return None
        readers = list(node.outputs[0].outputs)
        return SplitToSequenceMatch(node, [node, *readers], node, readers)

    def check(self, graph: gs.Graph, m: SplitToSequenceMatch) -> SequenceToSplitPlan | Refusal:
        node, seq = m.split, m.split.outputs[0]
        # 1. Split with sizes as an input
        opset = graph.opset
        if opset is None or int(opset) < _MIN_OPSET:
            return Refusal(f"{node.name}: the model's opset {opset} is below {_MIN_OPSET} "
                           "(Split takes its sizes as an attribute there)")
        # 2. constant 1-D sizes
        given = optional_input(node, 1)
        if given is None:
            return Refusal(f"{node.name} has no split input (chunks of 1; not handled)")
        sizes = constant_value(given)
        if sizes is None or sizes.dtype.kind not in "iu":
            return Refusal(f"{node.name} takes its split from '{given.name}', not a constant "
                           "integer tensor")
        if sizes.ndim != 1:
            return Refusal(f"{node.name} has a split of shape {list(sizes.shape)}, not 1-D "
                           "(a scalar split: chunk count depends on the input; not handled)")
        n = int(sizes.shape[0])
        if n < 1 or any(int(s) < 0 for s in sizes):
            return Refusal(f"{node.name} has split {sizes.tolist()}: not n >= 1 sizes >= 0")
        # 3. only read by SequenceAt at constant in-range positions
        if is_graph_output(graph, seq):
            return Refusal(f"{node.name} writes '{seq.name}', a graph output")
        if not m.readers:
            return Refusal(f"{node.name}: nothing reads '{seq.name}'")
        here = {id(n) for n in graph.nodes}
        chunks = []
        for reader in m.readers:
            if id(reader) not in here:
                return Refusal(f"{node.name}: '{seq.name}' is read inside a subgraph "
                               f"({reader.name})")
            if reader.op != "SequenceAt" or len(reader.inputs) != 2 or reader.inputs[0] is not seq:
                return Refusal(f"{node.name}: '{seq.name}' is read by {reader.name} "
                               f"({reader.op}), not only by SequenceAt")
            position = constant_value(reader.inputs[1])
            if position is None or position.dtype.kind not in "iu" or position.ndim != 0:
                return Refusal(f"{reader.name} reads '{seq.name}' at '{reader.inputs[1].name}', "
                               "not a constant integer scalar")
            p = int(position)
            if not -n <= p < n:
                return Refusal(f"{reader.name} reads position {p} of the {n} chunks of "
                               f"{node.name}")
            chunks.append(p + n if p < 0 else p)
        return SequenceToSplitPlan(m, np.asarray(sizes, np.int64).reshape(n), chunks)

    def rewrite(self, graph: gs.Graph, plan: SequenceToSplitPlan) -> Replacement:
        node = plan.match.split
        x, given = node.inputs[0], node.inputs[1]
        n = len(plan.sizes)
        outputs: list[gs.Tensor | NewValue | None] = [None] * n
        copies: list[NewNode] = []
        for reader, p in zip(plan.match.readers, plan.chunks, strict=True):
            y = reader.outputs[0]
            if outputs[p] is None:
                outputs[p] = y
            else:  # a second reader of the same chunk: a copy of the first one's tensor
                copies.append(NewNode("Identity", reader.name, [outputs[p]], [y]))
        for i in range(n):
            if outputs[i] is None:
                outputs[i] = NewValue(f"{node.name}_unused{i}", x.dtype)
        sizes: Input = given if constant_value(given).dtype == np.int64 else NewWeight(
            f"{node.name}.split", plan.sizes)
        split = NewNode("Split", node.name, [x, sizes], outputs,
                        {"axis": int(node.attrs.get("axis", 0))})
        used = sorted(set(plan.chunks))
        return Replacement([node, *plan.match.readers], [split, *copies],
                           f"{node.name} (SplitToSequence of {n} constant sizes, read at chunks "
                           f"{used} only) is a Split")
