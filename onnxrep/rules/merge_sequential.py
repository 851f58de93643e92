"""merge-sequential: two convs in a row, one of them 1x1, become one Conv (DBB).

Before (Diverse Branch Block's 1x1-KxK and avg branches, after fold-bn):
    x ─ Conv1x1(W1, b1) ─ t ─ [border fill of t with b1, p pixels] ─ u ─ ConvKxK(W2, b2, pads 0)
    x ─ Conv1x1(W1, b1) ─ t ─ [border fill] ─ u ─ AveragePool(k, s, pads 0)
    x ─ ConvKxK(W1, b1) ─ t ─ Conv1x1(W2, b2, pads 0, stride 1)
After:
    x ─ ConvKxK(K, b, pads p, stride and dilation of the KxK stage)

Formula (docs/RULES.md, merge-sequential): with the 1x1 factor as a matrix,
K[o, i] = sum_d W2[o, d] * W1[d, i] and b[o] = b2[o] + sum_{d,h,w} W2[o, d, h, w] * b1[d]
(kernels.compose_convs; groups: the coarser of the two groupings when one refines the other,
else dense). AveragePool(k) is the depthwise conv W2[c, 0] = 1/(kh*kw) (facts.pool_as_depthwise;
count_include_pad is irrelevant when it pads nothing). The merged conv pads x with zeros, so
conv1 sees b1 at the border: exact only when the KxK stage sees b1 there too - DBB's
"BN-and-pad" - or when there is no border (KxK pads 0, no fill) or b1 == 0.

The fill between t and u is recognised by what it computes, whatever the exporter wrote (Pad
then ScatterND writes of the bias, transposes, shape arithmetic on the dynamic batch):
  a. every node between t and u reads only t, constants, each other, or the shape of a tensor
     whose dims are static or t's batch; nothing outside reads the ones computed from t (the
     engine's escape check);
  b. t's values flow only through data-movement ops (Pad, ScatterND data/updates without
     reduction, Transpose, Reshape, Slice, Concat, Expand, Gather, Squeeze/Unsqueeze,
     Identity, Where branches); Shape of t is free. So every element of u is an element of t
     or does not depend on t's values;
  c. the fill is the same at every batch size the model admits: with a static batch that is
     the one size; with a symbolic batch, onnxrep.batchwise proves from the nodes that
     u[n] = F(t[n]) with one F for every batch size N and element n (the batch size reaches
     the fill only through Shape nodes, and what the fill computes from it - Range(0, N)
     index tuples, Expand to the batch - treats each element alike; a comparison of N, an
     index that picks batch elements, ... is refused);
  d. a numeric probe of that subgraph (onnxruntime) on distinct random values equals t padded
     by p with b1 per channel: the interior bit-exact, the border within 1e-6 relative of b1
     (the exporter computed the fill in float32; b1 here is float64-folded). It runs at the
     static batch, or at batch 1, 2 and 3 (by (c), batch 1 stands for all).

Preconditions (each refusal names the node):
  1. conv1 is a Conv with constant finite weights, explicit padding; the 1x1 side has stride 1,
     pads 0, dilation 1; conv1's output t is read only inside the match;
  2. the KxK stage (Conv or AveragePool) pads nothing after a fill; AveragePool 2-D,
     ceil_mode 0, zero pads or count_include_pad=1;
  3. without a fill the KxK stage pads nothing, or b1 is all zero;
  4. with a fill: (a)-(d) above, t has static C, H, W, the fill is symmetric per axis;
  5. conv1's output channels are what the second stage reads, both of one spatial rank;
  6. cost: the merged conv costs no more MACs per output pixel than the two it replaces, or x
     is also read by a conv with a kernel at least as large (a DBB sibling branch: the merged
     conv will merge with it) - merging a bottleneck 256->64->256 would slow a network down.
Not handled: fills that are not symmetric pads; a KxK->KxK pair; fills whose shape arithmetic
uses ops outside onnxrep.batchwise's table (Div, Mod, ...) on a symbolic batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.batchwise import batchwise
from onnxrep.errors import OnnxrepError, first_line
from onnxrep.facts import conv_params, pool_as_depthwise
from onnxrep.query import (
    attr_str,
    constant_value,
    conv_attrs,
    conv_weight_bias,
    data_inputs,
    producer,
    producers_first,
)
from onnxrep.rule import Match, Refusal, Replacement, conv_node
from onnxrep.verify import session

_MAX_FILL_NODES = 600
# op -> input positions through which t's values may flow (a selection of t's elements)
_DATA_INPUTS = {
    "Pad": (0,), "ScatterND": (0, 2), "Transpose": (0,), "Reshape": (0,), "Slice": (0,),
    "Concat": None, "Expand": (0,), "Gather": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "Identity": (0,), "Where": (1, 2),
}


@dataclass
class SequentialMatch(Match):
    first: gs.Node  # the Conv computing t
    second: gs.Node  # the Conv or AveragePool reading u
    t: gs.Tensor
    u: gs.Tensor  # t itself when there is no fill
    region: list[gs.Node]  # the fill, producers first (empty without a fill)
    replaced: list[gs.Node]  # the fill nodes computed from t: the rewrite removes them
    shape_sources: list[gs.Tensor]  # tensors outside the fill whose shape the fill reads


@dataclass
class SequentialPlan:
    match: SequentialMatch
    kernel: np.ndarray  # float64
    bias: np.ndarray  # float64
    attrs: dict[str, Any]
    like: np.ndarray  # conv1's weight: the dtype to write
    why: str


def _is_pointwise(weight: np.ndarray, attrs: dict) -> bool:
    return (all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in attrs["strides"])
            and not any(attrs["pads"]))


def _fill_region(t: gs.Tensor, u: gs.Tensor
                 ) -> tuple[list[gs.Node], list[gs.Tensor], list[gs.Node]] | None:
    """Nodes computing u from t, constants and the *shapes* of other tensors (Shape nodes are
    leaves: the dynamic batch reaches the fill's indices that way), or None.
    Returns (nodes, shape sources, the nodes among them that depend on t)."""
    # tensors computed from t (stopping at u): a Shape of one of these is part of the fill
    cone, todo = {id(t)}, [t]
    while todo and len(cone) < 4 * _MAX_FILL_NODES:
        for reader in todo.pop().outputs:
            for out in reader.outputs:
                if id(out) not in cone and out is not u:
                    cone.add(id(out))
                    todo.append(out)
    region: dict[int, gs.Node] = {}
    shape_sources: dict[int, gs.Tensor] = {}
    stack = [u]
    seen: set[int] = set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen or tensor is t or isinstance(tensor, gs.Constant):
            continue
        seen.add(id(tensor))
        node = producer(tensor)
        if node is None:
            return None  # u depends on a graph input other than through t
        if id(node) not in region:
            region[id(node)] = node
            if len(region) > _MAX_FILL_NODES:
                return None
            if node.op == "Shape" and id(node.inputs[0]) not in cone:
                shape_sources[id(node.inputs[0])] = node.inputs[0]
                continue
            stack.extend(data_inputs(node))
    # nodes that do not depend on t (shape arithmetic, maybe shared with other blocks) stay;
    # only the ones computing on t are replaced
    inside = [n for n in region.values() if any(id(i) in cone for i in n.inputs)]
    return list(region.values()), list(shape_sources.values()), inside


def _taint_refusal(t: gs.Tensor, order: list[gs.Node]) -> Refusal | None:
    """t's values may only move (never be computed on, compared, or used as an index)."""
    tainted = {id(t)}
    for node in order:
        hot = [i for i, x in enumerate(node.inputs) if id(x) in tainted]
        if not hot or node.op == "Shape":
            continue
        allowed = _DATA_INPUTS.get(node.op, ())
        bad = [i for i in hot if allowed is not None and i not in allowed]
        if (bad or node.op not in _DATA_INPUTS
                or (node.op == "ScatterND" and attr_str(node, "reduction", "none") != "none")):
            return Refusal(f"{node.name} ({node.op}) computes on the values of {t.name}: not "
                           "a border fill")
        tainted.update(id(o) for o in node.outputs)
    return None


def _probe_model(m: SequentialMatch, graph: gs.Graph, dtype: np.dtype,
                 extra: list[tuple[gs.Tensor, list]]) -> onnx.ModelProto:
    """The fill alone as a model: t (batch symbolic) and the shape sources in, u out."""
    shape = m.t.shape
    sub = gs.Graph(nodes=list(m.region),
                   inputs=[gs.Variable(m.t.name, dtype, ["N", *shape[1:]])],
                   outputs=[gs.Variable(m.u.name, dtype)], opset=graph.opset)
    # The Variables above are fresh objects: the nodes still point at t/u, which carry names
    # only, so the exported subgraph reads and writes the right names.
    model = gs.export_onnx(sub, do_type_check=False)
    model.ir_version = min(model.ir_version, 9)
    del model.graph.input[:]
    model.graph.input.append(onnx.helper.make_tensor_value_info(
        m.t.name, onnx.helper.np_dtype_to_tensor_dtype(dtype), ["N", *shape[1:]]))
    for src, mapped in extra:
        model.graph.input.append(onnx.helper.make_tensor_value_info(
            src.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(src.dtype)),
            ["N" if d is None else d for d in mapped]))
    return model


def _probe_batches(m: SequentialMatch) -> tuple[int, ...] | Refusal:
    """The batch sizes to probe the fill at: the model's own when t's batch is static (the
    only one it admits); 1, 2 and 3 when it is symbolic, once `batchwise` proved that the
    fill does the same to every element at every batch size (else no few sizes would do)."""
    t, shape = m.t, m.t.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return Refusal(f"{t.name} has no static channel/spatial shape to probe")
    if isinstance(shape[0], int):
        return (shape[0],) if shape[0] > 0 else Refusal(f"{t.name} has batch {shape[0]}")
    return batchwise(t, m.u, m.region, m.shape_sources) or (1, 2, 3)


def _probe_fill(m: SequentialMatch, graph: gs.Graph, b1: np.ndarray
                ) -> tuple[int, int] | Refusal:
    """Run the fill subgraph; it must be `t` padded with b1 per channel. Returns the pads.
    Tensors read only by Shape nodes are fed zeros of their shape, with t's batch."""
    batches = _probe_batches(m)
    if isinstance(batches, Refusal):
        return batches
    t, shape = m.t, m.t.shape
    extra: list[tuple[gs.Tensor, list]] = []
    for src in m.shape_sources:
        dims = src.shape
        if dims is None or src.dtype is None:
            return Refusal(f"the fill reads the shape of {src.name}, which is unknown")
        mapped = []
        for d in dims:
            if isinstance(d, int):
                mapped.append(d)
            elif d == shape[0]:
                mapped.append(None)  # t's batch
            else:
                return Refusal(f"the fill reads dim {d!r} of {src.name}, not tied to "
                               f"{t.name}'s batch")
        extra.append((src, mapped))
    dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
    try:
        sess = session(_probe_model(m, graph, dtype, extra))
    except OnnxrepError as exc:
        return Refusal(f"the fill subgraph does not run on its own: {first_line(exc)}")
    rng = np.random.default_rng(1234)
    pads = (0, 0)
    for batch in batches:
        probe = rng.permutation(batch * int(np.prod(shape[1:]))).astype(dtype)
        probe = (probe + 0.5).reshape(batch, *shape[1:])  # distinct values, none equal to b1
        feeds = {t.name: probe}
        for src, mapped in extra:
            feeds[src.name] = np.zeros([batch if d is None else d for d in mapped],
                                       dtype=np.dtype(src.dtype))
        try:
            (out,) = sess.run([m.u.name], feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types
            return Refusal(f"the fill subgraph fails on batch {batch}: {first_line(exc)}")
        if out.ndim != 4 or out.shape[:2] != probe.shape[:2]:
            return Refusal(f"the fill changes the shape {probe.shape} -> {out.shape}")
        ph, pw = (out.shape[2] - probe.shape[2]), (out.shape[3] - probe.shape[3])
        if ph < 0 or pw < 0 or ph % 2 or pw % 2:
            return Refusal(f"the fill is not a symmetric pad ({probe.shape} -> {out.shape})")
        pads = (ph // 2, pw // 2)
        inner = (slice(None), slice(None), slice(pads[0], pads[0] + probe.shape[2]),
                 slice(pads[1], pads[1] + probe.shape[3]))
        expected = np.empty(out.shape, dtype=np.float64)
        expected[:] = kernels.f64(b1).reshape(1, -1, 1, 1)
        expected[inner] = probe
        if not np.array_equal(out[inner], probe):
            return Refusal("the fill's interior is not the tensor itself")
        if not np.allclose(out, expected, rtol=1e-6,
                           atol=1e-6 * max(1.0, float(np.abs(b1).max()))):
            worst = float(np.max(np.abs(out - expected)))
            return Refusal(f"the border fill differs from the conv bias b1 (max diff "
                           f"{worst:.3g})")
    return pads


def _sibling_kernel(x: gs.Tensor, exclude: gs.Node) -> int:
    """The largest kernel of another Conv that reads x (a DBB sibling branch), else 0."""
    best = 0
    for reader in x.outputs:
        weight = constant_value(reader.inputs[1]) if reader.op == "Conv" else None
        if reader is not exclude and weight is not None:
            best = max(best, int(np.prod(weight.shape[2:])))
    return best


def _find_t(u: gs.Tensor) -> gs.Tensor | None:
    """The one Conv output that the subgraph computing u starts from, else None."""
    frontier, seen, t = [u], set(), None
    while frontier and len(seen) < _MAX_FILL_NODES:
        tensor = frontier.pop()
        if id(tensor) in seen or isinstance(tensor, gs.Constant):
            continue
        seen.add(id(tensor))
        p = producer(tensor)
        if p is None:
            return None
        if p.op == "Conv" and tensor is not u:
            if t is not None and t is not tensor:
                return None
            t = tensor
            continue
        if p.op not in _DATA_INPUTS and tensor is u:
            return None
        if p.op != "Shape":
            frontier.extend(data_inputs(p))
    return t


def _conv_stage(conv: gs.Node) -> tuple[np.ndarray, np.ndarray, dict] | Refusal:
    """A Conv as (weight, float64 bias or zeros, attributes), the form pool_as_depthwise gives
    an AveragePool in."""
    refusal = conv_params(conv)
    if refusal:
        return refusal
    weight, bias = conv_weight_bias(conv)
    return weight, kernels.bias_or_zeros(bias, weight.shape[0]), conv_attrs(conv)


class MergeSequentialConvs:
    id = "merge-sequential"
    summary = "Conv1x1 -> [bias border fill] -> ConvKxK/AveragePool, and ConvKxK -> Conv1x1"
    anchors = ("Conv", "AveragePool")
    opt_in = False

    def match(self, graph: gs.Graph, node: gs.Node) -> SequentialMatch | None:
        u = node.inputs[0]
        first = producer(u)
        if first is not None and first.op == "Conv":
            return SequentialMatch(node, [first, node], first, node, u, u, [], [], [])
        # look for a fill subgraph between a Conv's output and u
        t = _find_t(u)
        if t is None:
            return None
        found = _fill_region(t, u)
        if found is None or not any(n.op == "Pad" for n in found[0]):
            return None
        region, shape_sources, replaced = found
        first, order = producer(t), producers_first(region)
        return SequentialMatch(node, [first, *order, node], first, node, t, u, order,
                               replaced, shape_sources)

    def check(self, graph: gs.Graph, m: SequentialMatch) -> SequentialPlan | Refusal:
        first, second = m.first, m.second
        stage1 = _conv_stage(first)
        if isinstance(stage1, Refusal):
            return stage1
        w1, b1, a1 = stage1
        stage2 = (_conv_stage(second) if second.op == "Conv"
                  else pool_as_depthwise(second, w1.shape[0]))
        if isinstance(stage2, Refusal):
            return stage2
        w2, b2, a2 = stage2
        if w1.ndim != w2.ndim:
            return Refusal(f"{first.name} is {w1.ndim - 2}-D, {second.name} is "
                           f"{w2.ndim - 2}-D")
        pointwise_first = _is_pointwise(w1, a1) and all(d == 1 for d in a1["dilations"])
        pointwise_second = _is_pointwise(w2, a2)
        if m.region:
            if not pointwise_first:
                return Refusal(f"{first.name} is not a stride-1 pad-0 1x1 conv before a "
                               "border fill")
            if any(a2["pads"]):
                return Refusal(f"{second.name} pads {a2['pads']} after the fill: zero pad "
                               "is not b1")
            refusal = _taint_refusal(m.t, m.region)
            if refusal:
                return refusal
            pads = _probe_fill(m, graph, b1)
            if isinstance(pads, Refusal):
                return pads
            attrs = {**a2, "pads": [pads[0], pads[1], pads[0], pads[1]]}
        elif pointwise_first:
            if any(a2["pads"]) and np.any(b1 != 0):
                return Refusal(f"{second.name} zero-pads the output of {first.name}, whose "
                               "bias is not zero: the merged conv would see the bias at the "
                               "border")
            attrs = a2
        elif pointwise_second:
            attrs = a1
        else:
            return Refusal(f"neither {first.name} nor {second.name} is a 1x1 that can be "
                           "composed")
        if w1.shape[0] != w2.shape[1] * a2["group"]:
            return Refusal(f"{second.name} reads {w2.shape[1] * a2['group']} channels, "
                           f"{first.name} gives {w1.shape[0]}")
        kernel, bias, group = kernels.compose_convs(w1, b1, a1["group"], w2, b2, a2["group"])
        cost_before = (w1.shape[0] * w1.shape[1] * np.prod(w1.shape[2:])
                       + w2.shape[0] * w2.shape[1] * np.prod(w2.shape[2:]))
        cost_after = kernel.shape[0] * kernel.shape[1] * np.prod(kernel.shape[2:])
        x = first.inputs[0]
        if cost_after > cost_before and _sibling_kernel(x, first) < np.prod(kernel.shape[2:]):
            return Refusal(f"merging {first.name} and {second.name} costs more ({cost_after} "
                           f"vs {cost_before} MACs per pixel) and no sibling conv on {x.name} "
                           "absorbs it")
        why = f"{first.name} composed with {second.name}" + (
            f" through a {len(m.region)}-node border fill" if m.region else "")
        return SequentialPlan(m, kernel, bias, {**attrs, "group": group}, w1, why)

    def rewrite(self, graph: gs.Graph, plan: SequentialPlan) -> Replacement:
        m = plan.match
        new = conv_node(m.second.name, m.first.inputs[0], m.second.outputs[0],
                        kernels.cast_like(plan.kernel, plan.like),
                        kernels.cast_like(plan.bias, plan.like), plan.attrs)
        return Replacement([m.first, *m.replaced, m.second], [new], plan.why)
