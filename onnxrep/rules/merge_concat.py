"""merge-concat: convs that read one tensor and are concatenated on channels become one Conv.

Before (Inception-style linear block, DBB depth concat):
    x ─┬─ Conv1x1 ─┐
       ├─ Conv3x3 ─┼─ Concat(axis=1) ─ y
       └─ Conv5x5 ─┘
After:
    x ─ Conv5x5(W = [embed(W1); embed(W3); W5], b = [b1; b3; b5]) ─ y

Formula (RULES-SPEC §8): output channels are independent, so concatenating outputs is
concatenating kernels along O; each kernel is first embedded into the common kernel size at
the offset kernels.align_kernels gives (RULES-SPEC §4), biases concatenate (0 when absent).
A contiguous run of two or more such convs merges; other Concat inputs stay where they are.

Preconditions (each refusal names the conv):
  1. the Concat is on the channel axis (axis 1, or -3 on a 4-D tensor... any axis that is 1
     after normalising by the output rank);
  2. each merged input is a Conv output read by this Concat alone, once, not a graph output;
  3. the convs read the same tensor, with finite float constant weights/biases, group 1,
     equal strides and dilations and dtype;
  4. their padding aligns: same output size for every input size (kernels.align_kernels).
Not handled: grouped convs (per-group channel bookkeeping), convs behind a zero Pad.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import conv_params, sole_consumer
from onnxrep.rule import Applied, Match
from onnxrep.surgery import (
    add_node,
    constant_value,
    conv_attrs,
    conv_weight_bias,
    new_variable,
    producer,
    replace_with_conv,
    retire,
)


def _conv_key(conv: gs.Node) -> tuple:
    a = conv_attrs(conv)
    return (id(conv.inputs[0]), tuple(a["strides"]), tuple(a["dilations"]), a["group"],
            constant_value(conv.inputs[1]).dtype.str)


class MergeConcatenatedConvs:
    id = "merge-concat"
    summary = "convs on one input concatenated on channels into one Conv"
    anchors = ("Concat",)
    opt_in = False

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        convs = [producer(t) for t in node.inputs]
        readers: dict[int, list[int]] = {}
        for i, c in enumerate(convs):
            if c is not None and c.op == "Conv":
                readers.setdefault(id(c.inputs[0]), []).append(i)
        if not any(len(v) >= 2 for v in readers.values()):
            return None
        m = Match(anchor=node, nodes=[node], output=node.outputs[0])
        m.roles.update(graph=graph, concat=node, convs=convs)
        return m

    def check(self, m: Match) -> list[str]:
        concat, graph, convs = m["concat"], m["graph"], m["convs"]
        out_shape = concat.outputs[0].shape
        axis = int(concat.attrs.get("axis", 0))
        weights = [constant_value(c.inputs[1]) for c in convs
                   if c is not None and c.op == "Conv" and constant_value(c.inputs[1]) is not None]
        rank = len(out_shape) if out_shape is not None else (weights[0].ndim if weights else None)
        if rank is None:
            return [f"{concat.name}: output rank unknown"]
        if axis % rank != 1:
            return [f"{concat.name} concatenates on axis {axis}, not the channel axis"]
        reasons: list[str] = []
        usable: list[bool] = []
        for t, c in zip(concat.inputs, convs, strict=True):
            why = None
            if c is None or c.op != "Conv":
                why = "-"
            else:
                why = sole_consumer(graph, t, concat) or conv_params(c)
                if why is None and int(c.attrs.get("group", 1)) != 1:
                    why = f"{c.name} has group {c.attrs.get('group')} (only group 1 merges)"
            if why and why != "-":
                reasons.append(why)
            usable.append(why is None)
        runs: list[list[int]] = []
        i = 0
        while i < len(convs):
            if not usable[i]:
                i += 1
                continue
            j = i + 1
            while j < len(convs) and usable[j] and _conv_key(convs[j]) == _conv_key(convs[i]):
                j += 1
            if j - i >= 2:
                plan = self._plan([convs[k] for k in range(i, j)])
                if isinstance(plan, str):
                    reasons.append(plan)
                else:
                    runs.append(list(range(i, j)))
            elif i + 1 < len(convs) and usable[i + 1]:
                a, b = convs[i], convs[i + 1]
                if a.inputs[0] is b.inputs[0]:
                    reasons.append(f"{a.name} and {b.name} differ in strides/dilations/dtype")
            i = j
        if not runs:
            return reasons or [f"{concat.name}: no two adjacent convs on one input"]
        m["runs"] = runs
        m.nodes = [concat] + [convs[k] for run in runs for k in run]
        return []

    @staticmethod
    def _plan(convs: list[gs.Node]) -> tuple | str:
        shapes = [tuple(constant_value(c.inputs[1]).shape[2:]) for c in convs]
        spatial = len(shapes[0])
        pads = [(conv_attrs(c)["pads"][:spatial], conv_attrs(c)["pads"][spatial:]) for c in convs]
        aligned = kernels.align_kernels(shapes, pads, tuple(conv_attrs(convs[0])["dilations"]))
        if isinstance(aligned, str):
            return f"{', '.join(c.name for c in convs)}: padding cannot align: {aligned}"
        return aligned

    def rewrite(self, graph: gs.Graph, m: Match) -> Applied:
        concat, convs = m["concat"], m["convs"]
        inputs = list(concat.inputs)
        merged = []
        for run in m["runs"]:
            group = [convs[k] for k in run]
            kernel, pads, offsets = self._plan(group)
            ws, bs = [], []
            for c, offset in zip(group, offsets, strict=True):
                w, b = conv_weight_bias(c)
                ws.append(kernels.embed_kernel(w, kernel, offset))
                bs.append(kernels.bias_or_zeros(b, w.shape[0]))
            like = constant_value(group[0].inputs[1])
            attrs = {**conv_attrs(group[0]), "pads": pads}
            merged.append((run, group[0].inputs[0], group[0].name, np.concatenate(ws),
                           np.concatenate(bs), like, attrs))
        axis, name, out = concat.attrs.get("axis", 1), concat.name, m.output
        why = "concatenated " + "; ".join(", ".join(convs[k].name for k in r) for r in m["runs"])
        removed = retire(m.nodes)
        added: list[str] = []
        whole = len(m["runs"]) == 1 and len(m["runs"][0]) == len(inputs)
        new_inputs: list[gs.Tensor | None] = list(inputs)
        for run, x, conv_name, w, b, like, attrs in merged:
            t = out if whole else new_variable(graph, f"{conv_name}.concat", like.dtype)
            node = replace_with_conv(graph, conv_name, x, t, kernels.cast_like(w, like),
                                     kernels.cast_like(b, like), attrs)
            added.append(node.name)
            new_inputs[run[0]] = t
            for k in run[1:]:
                new_inputs[k] = None
        if not whole:
            kept = [t for t in new_inputs if t is not None]
            added.append(add_node(graph, "Concat", name, kept, [out], {"axis": axis}).name)
        return Applied(self.id, removed, added, why)
