"""merge-concat: convs that read one tensor and are concatenated on channels become one Conv.

Before (Inception-style linear block, DBB depth concat):
    x ─┬─ Conv1x1 ─┐
       ├─ Conv3x3 ─┼─ Concat(axis=1) ─ y
       └─ Conv5x5 ─┘
After:
    x ─ Conv5x5(W = [embed(W1); embed(W3); W5], b = [b1; b3; b5]) ─ y

Formula (docs/RULES.md, merge-concat): output channels are independent, so concatenating
outputs is concatenating kernels along O; each kernel is first embedded into the common
kernel size at the offset kernels.align_kernels gives (docs/RULES.md, merge-parallel), biases
concatenate (0 when absent). A contiguous run of two or more such convs merges; other Concat
inputs stay where they are (a new Concat, under the old one's name, joins them).

Preconditions (each refusal names the conv):
  1. the Concat is on the channel axis (axis 1, or -3 on a 4-D tensor... any axis that is 1
     after normalising by the output rank);
  2. each merged input is a Conv output read by this Concat alone, once, not a graph output;
  3. the convs read the same tensor, with finite float constant weights/biases, explicit
     padding (auto_pad NOTSET/VALID), group 1, equal strides and dilations and dtype;
  4. their padding aligns: same output size for every input size (kernels.align_kernels).
Not handled: grouped convs (per-group channel bookkeeping), convs behind a zero Pad.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import conv_params, sole_consumer
from onnxrep.query import constant_value, conv_attrs, conv_weight_bias, producer
from onnxrep.rule import Input, Match, NewNode, NewValue, Refusal, Replacement, conv_node


@dataclass
class ConcatMatch(Match):
    concat: gs.Node
    convs: list[gs.Node | None]  # per Concat input: the Conv that computes it, else None


@dataclass
class ConvRun:
    """Concat inputs `positions` (contiguous), computed by `convs`, merge into one Conv with
    this kernel size and pads; conv j's kernel sits at offsets[j] in it."""

    positions: list[int]
    convs: list[gs.Node]
    kernel: tuple[int, ...]
    pads: list[int]
    offsets: list[tuple[int, ...]]


@dataclass
class ConcatPlan:
    match: ConcatMatch
    runs: list[ConvRun]


def _conv_key(conv: gs.Node) -> tuple:
    a = conv_attrs(conv)
    return (id(conv.inputs[0]), tuple(a["strides"]), tuple(a["dilations"]), a["group"],
            constant_value(conv.inputs[1]).dtype.str)


def _align(convs: list[gs.Node], positions: list[int]) -> ConvRun | Refusal:
    shapes = [tuple(constant_value(c.inputs[1]).shape[2:]) for c in convs]
    spatial = len(shapes[0])
    attrs = [conv_attrs(c) for c in convs]
    pads = [(a["pads"][:spatial], a["pads"][spatial:]) for a in attrs]
    aligned = kernels.align_kernels(shapes, pads, tuple(attrs[0]["dilations"]))
    if isinstance(aligned, str):
        return Refusal(f"{', '.join(c.name for c in convs)}: padding cannot align: {aligned}")
    kernel, merged_pads, offsets = aligned
    return ConvRun(positions, convs, kernel, merged_pads, offsets)


class MergeConcatenatedConvs:
    id = "merge-concat"
    summary = "convs on one input concatenated on channels into one Conv"
    anchors = ("Concat",)
    opt_in = False

    def match(self, graph: gs.Graph, node: gs.Node) -> ConcatMatch | None:
        convs: list[gs.Node | None] = []
        readers: dict[int, int] = {}
        for t in node.inputs:
            c = producer(t) if t is not None else None
            convs.append(c if c is not None and c.op == "Conv" and c.inputs else None)
            if convs[-1] is not None:
                key = id(convs[-1].inputs[0])
                readers[key] = readers.get(key, 0) + 1
        if not any(n >= 2 for n in readers.values()):
            return None
        unique = list({id(c): c for c in convs if c is not None}.values())
        return ConcatMatch(node, [node, *unique], node, convs)

    def check(self, graph: gs.Graph, m: ConcatMatch) -> ConcatPlan | Refusal:
        concat, convs = m.concat, m.convs
        out_shape = concat.outputs[0].shape
        axis = int(concat.attrs.get("axis", 0))
        weights = [w for w in (constant_value(c.inputs[1]) for c in convs if c is not None)
                   if w is not None]
        rank = len(out_shape) if out_shape is not None else (weights[0].ndim if weights else None)
        if rank is None:
            return Refusal(f"{concat.name}: output rank unknown")
        if axis % rank != 1:
            return Refusal(f"{concat.name} concatenates on axis {axis}, not the channel axis")
        reasons: list[str] = []
        usable: list[bool] = []
        for t, c in zip(concat.inputs, convs, strict=True):
            refusal = None
            if c is not None:
                refusal = sole_consumer(graph, t, concat) or conv_params(c)
                if refusal is None and int(c.attrs.get("group", 1)) != 1:
                    refusal = Refusal(f"{c.name} has group {c.attrs.get('group')} (only group "
                                      "1 merges)")
                if refusal:
                    reasons.append(refusal.reason)
            usable.append(c is not None and refusal is None)
        runs: list[ConvRun] = []
        i = 0
        while i < len(convs):
            if not usable[i]:
                i += 1
                continue
            j = i + 1
            while j < len(convs) and usable[j] and _conv_key(convs[j]) == _conv_key(convs[i]):
                j += 1
            if j - i >= 2:
                run = _align(convs[i:j], list(range(i, j)))
                if isinstance(run, Refusal):
                    reasons.append(run.reason)
                else:
                    runs.append(run)
            elif i + 1 < len(convs) and usable[i + 1]:
                a, b = convs[i], convs[i + 1]
                if a.inputs[0] is b.inputs[0]:
                    reasons.append(f"{a.name} and {b.name} differ in strides/dilations/dtype")
            i = j
        if not runs:
            return Refusal("; ".join(reasons) if reasons
                           else f"{concat.name}: no two adjacent convs on one input")
        return ConcatPlan(m, runs)

    def rewrite(self, graph: gs.Graph, plan: ConcatPlan) -> Replacement:
        concat = plan.match.concat
        out = concat.outputs[0]
        whole = len(plan.runs) == 1 and len(plan.runs[0].positions) == len(concat.inputs)
        inputs: list[Input | None] = list(concat.inputs)
        nodes: list[NewNode] = []
        for run in plan.runs:
            ws, bs = [], []
            for c, offset in zip(run.convs, run.offsets, strict=True):
                w, b = conv_weight_bias(c)
                ws.append(kernels.embed_kernel(w, run.kernel, offset))
                bs.append(kernels.bias_or_zeros(b, w.shape[0]))
            first = run.convs[0]
            like = constant_value(first.inputs[1])
            t = out if whole else NewValue(f"{first.name}.concat", like.dtype)
            attrs = {**conv_attrs(first), "pads": run.pads}
            nodes.append(conv_node(first.name, first.inputs[0], t,
                                   kernels.cast_like(np.concatenate(ws), like),
                                   kernels.cast_like(np.concatenate(bs), like), attrs))
            inputs[run.positions[0]] = t
            for k in run.positions[1:]:
                inputs[k] = None
        if not whole:
            nodes.append(NewNode("Concat", concat.name, [t for t in inputs if t is not None],
                                 [out], {"axis": concat.attrs.get("axis", 1)}))
        why = "concatenated " + "; ".join(", ".join(c.name for c in r.convs) for r in plan.runs)
        removes = [concat, *(c for r in plan.runs for c in r.convs)]
        return Replacement(removes, nodes, why)
