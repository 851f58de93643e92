"""merge-sequential: two convs in a row, one of them 1x1, become one Conv (DBB, RULES-SPEC §6-7).

Before (Diverse Branch Block's 1x1-KxK and avg branches, after fold-bn):
    x ─ Conv1x1(W1, b1) ─ t ─ [border fill of t with b1, p pixels] ─ u ─ ConvKxK(W2, b2, pads 0)
    x ─ Conv1x1(W1, b1) ─ t ─ [border fill] ─ u ─ AveragePool(k, s, pads 0)
    x ─ ConvKxK(W1, b1) ─ t ─ Conv1x1(W2, b2, pads 0, stride 1)
After:
    x ─ ConvKxK(K, b, pads p, stride and dilation of the KxK stage)

Formula: with the 1x1 factor as a matrix, K[o, i] = sum_d W2[o, d] * W1[d, i] and
b[o] = b2[o] + sum_{d,h,w} W2[o, d, h, w] * b1[d] (kernels.compose_convs; groups: the coarser of
the two groupings when one refines the other, else dense). AveragePool(k) is the depthwise conv
W2[c, 0] = 1/(kh*kw) (count_include_pad is irrelevant: it pads nothing). The merged conv pads
x with zeros, so conv1 sees b1 at the border: exact only when the KxK stage sees b1 there too -
DBB's "BN-and-pad" - or when there is no border (KxK pads 0, no fill) or b1 == 0.

The fill between t and u is recognised by what it computes, whatever the exporter wrote (Pad
then ScatterND writes of the bias, transposes, shape arithmetic on the dynamic batch):
  a. every node between t and u reads only t, constants, or each other, and nothing outside
     reads them (the engine's escape guard);
  b. t's values flow only through data-movement ops (Pad, ScatterND data/updates, Transpose,
     Reshape, Slice, Concat, Expand, Gather, Squeeze/Unsqueeze, Identity, Where branches);
     Shape of t is free. So every element of u is an element of t or does not depend on t;
  c. a numeric probe of that subgraph (onnxruntime) for batch 1, 2 and 3 on distinct random
     values equals t padded by p with b1 per channel: the interior bit-exact, the border within
     1e-6 relative of b1 (the exporter computed the fill in float32; b1 here is float64-folded).

Preconditions (each refusal names the node):
  1. conv1 is a Conv with constant finite weights; the 1x1 side has stride 1, pads 0,
     dilation 1; conv1's output t is read only inside the match;
  2. the KxK stage (Conv or AveragePool) pads nothing; AveragePool ceil_mode 0;
  3. without a fill the KxK stage pads nothing, or b1 is all zero;
  4. with a fill: (a)-(c) above, t has static C, H, W, the fill is symmetric per axis;
  5. cost: the merged conv costs no more MACs per output pixel than the two it replaces, or x
     is also read by a conv with a kernel at least as large (a DBB sibling branch: the merged
     conv will merge with it) - merging a bottleneck 256->64->256 would slow a network down.
Not handled: fills that are not symmetric pads; a KxK->KxK pair.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxrep import kernels
from onnxrep.facts import conv_params
from onnxrep.rule import Applied, Match
from onnxrep.surgery import (
    constant_value,
    conv_attrs,
    conv_weight_bias,
    producer,
    replace_with_conv,
    retire,
)

_MAX_FILL_NODES = 600
# op -> input positions through which t's values may flow (a selection of t's elements)
_DATA_INPUTS = {
    "Pad": (0,), "ScatterND": (0, 2), "Transpose": (0,), "Reshape": (0,), "Slice": (0,),
    "Concat": None, "Expand": (0,), "Gather": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "Identity": (0,), "Where": (1, 2),
}


def _is_pointwise(weight: np.ndarray, attrs: dict) -> bool:
    return (all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in attrs["strides"])
            and not any(attrs["pads"]))


def _fill_region(t: gs.Tensor, u: gs.Tensor) -> tuple[list, list, list] | str:
    """Nodes computing u from t, constants and the *shapes* of other tensors (Shape nodes are
    leaves: the dynamic batch reaches the fill's indices that way), or a reason.
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
            return f"{u.name} depends on {tensor.name}, not only on {t.name}"
        if id(node) not in region:
            region[id(node)] = node
            if len(region) > _MAX_FILL_NODES:
                return f"the subgraph between {t.name} and {u.name} is too large"
            if node.op == "Shape" and id(node.inputs[0]) not in cone:
                shape_sources[id(node.inputs[0])] = node.inputs[0]
                continue
            stack.extend(i for i in node.inputs if i.name)
    # nodes that do not depend on t (shape arithmetic, maybe shared with other blocks) stay;
    # only the ones computing on t are replaced
    inside = [n for n in region.values() if any(id(i) in cone for i in n.inputs)]
    return list(region.values()), list(shape_sources.values()), inside


def _ordered(nodes: list[gs.Node]) -> list[gs.Node]:
    """The nodes in an order where producers come first (the engine sorts the whole graph
    only at the end of a pass)."""
    inside = {id(n): n for n in nodes}
    done: set[int] = set()
    order: list[gs.Node] = []

    def visit(node: gs.Node) -> None:
        if id(node) in done:
            return
        done.add(id(node))
        for tensor in node.inputs:
            p = producer(tensor)
            if p is not None and id(p) in inside:
                visit(p)
        order.append(node)

    for node in nodes:
        visit(node)
    return order


def _taint_reason(t: gs.Tensor, region: list[gs.Node], order: list[gs.Node]) -> str | None:
    """t's values may only move (never be computed on, compared, or used as an index)."""
    tainted = {id(t)}
    for node in order:
        hot = [i for i, x in enumerate(node.inputs) if id(x) in tainted]
        if not hot:
            continue
        if node.op == "Shape":
            continue
        allowed = _DATA_INPUTS.get(node.op, ())
        bad = [i for i in hot if allowed is not None and i not in allowed]
        if bad or node.op not in _DATA_INPUTS:
            return (f"{node.name} ({node.op}) computes on the values of {t.name}: not a "
                    "border fill")
        tainted.update(id(o) for o in node.outputs)
    return None


def _probe_fill(t: gs.Tensor, u: gs.Tensor, order: list[gs.Node], shape_sources: list,
                graph: gs.Graph, b1: np.ndarray) -> tuple[int, ...] | str:
    """Run the fill subgraph; it must be `t` padded with b1 per channel. Returns the pads.
    Tensors read only by Shape nodes are fed zeros of their shape, with t's batch."""
    shape = t.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return f"{t.name} has no static channel/spatial shape to probe"
    extra: list[tuple[gs.Tensor, list]] = []
    for src in shape_sources:
        dims = src.shape
        if dims is None or src.dtype is None:
            return f"the fill reads the shape of {src.name}, which is unknown"
        mapped = []
        for d in dims:
            if isinstance(d, int):
                mapped.append(d)
            elif d == shape[0]:
                mapped.append(None)  # t's batch
            else:
                return f"the fill reads dim {d!r} of {src.name}, not tied to {t.name}'s batch"
        extra.append((src, mapped))
    dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
    sub = gs.Graph(nodes=list(order), inputs=[gs.Variable(t.name, dtype, ["N", *shape[1:]])],
                   outputs=[gs.Variable(u.name, dtype)], opset=graph.opset)
    # The Variables above are fresh objects: the nodes still point at t/u, which carry names
    # only, so the exported subgraph reads and writes the right names.
    model = gs.export_onnx(sub, do_type_check=False)
    model.ir_version = min(model.ir_version, 9)
    del model.graph.input[:]
    model.graph.input.append(onnx.helper.make_tensor_value_info(
        t.name, onnx.helper.np_dtype_to_tensor_dtype(dtype), ["N", *shape[1:]]))
    for src, mapped in extra:
        model.graph.input.append(onnx.helper.make_tensor_value_info(
            src.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(src.dtype)),
            ["N" if d is None else d for d in mapped]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return f"the fill subgraph does not run on its own: {str(exc).splitlines()[0]}"
    rng = np.random.default_rng(1234)
    pads = None
    for batch in (1, 2, 3):
        probe = rng.permutation(batch * int(np.prod(shape[1:]))).astype(dtype)
        probe = (probe + 0.5).reshape(batch, *shape[1:])  # distinct values, none equal to b1
        feeds = {t.name: probe}
        for src, mapped in extra:
            feeds[src.name] = np.zeros([batch if d is None else d for d in mapped],
                                       dtype=np.dtype(src.dtype))
        try:
            (out,) = sess.run([u.name], feeds)
        except Exception as exc:  # noqa: BLE001
            return f"the fill subgraph fails on batch {batch}: {str(exc).splitlines()[0]}"
        if out.ndim != 4 or out.shape[:2] != probe.shape[:2]:
            return f"the fill changes the shape {probe.shape} -> {out.shape}"
        ph, pw = (out.shape[2] - probe.shape[2]), (out.shape[3] - probe.shape[3])
        if ph < 0 or pw < 0 or ph % 2 or pw % 2:
            return f"the fill is not a symmetric pad ({probe.shape} -> {out.shape})"
        pads = (ph // 2, pw // 2)
        expected = np.empty(out.shape, dtype=np.float64)
        expected[:] = kernels.f64(b1).reshape(1, -1, 1, 1)
        expected[:, :, pads[0]:pads[0] + probe.shape[2], pads[1]:pads[1] + probe.shape[3]] = probe
        inner = (slice(None), slice(None), slice(pads[0], pads[0] + probe.shape[2]),
                 slice(pads[1], pads[1] + probe.shape[3]))
        if not np.array_equal(out[inner], probe):
            return "the fill's interior is not the tensor itself"
        if not np.allclose(out, expected, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(b1).max()))):
            worst = float(np.max(np.abs(out - expected)))
            return f"the border fill differs from the conv bias b1 (max diff {worst:.3g})"
    return pads


def _sibling_kernel(x: gs.Tensor, exclude: gs.Node) -> int:
    """The largest kernel of another Conv that reads x (a DBB sibling branch), else 0."""
    best = 0
    for reader in x.outputs:
        if reader is not exclude and reader.op == "Conv" and constant_value(reader.inputs[1]) \
                is not None:
            best = max(best, int(np.prod(constant_value(reader.inputs[1]).shape[2:])))
    return best


class MergeSequentialConvs:
    id = "merge-sequential"
    summary = "Conv1x1 -> [bias border fill] -> ConvKxK/AveragePool, and ConvKxK -> Conv1x1"
    anchors = ("Conv", "AveragePool")
    opt_in = False

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        u = node.inputs[0]
        first = producer(u)
        if first is not None and first.op == "Conv":
            m = Match(anchor=node, nodes=[first, node], output=node.outputs[0])
            m.roles.update(graph=graph, first=first, second=node, region=[], t=u, u=u)
            return m
        # look for a fill subgraph between a Conv's output and u
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
                frontier.extend(i for i in p.inputs if i.name)
        if t is None:
            return None
        found = _fill_region(t, u)
        if isinstance(found, str) or not any(n.op == "Pad" for n in found[0]):
            return None
        region, shape_sources, dependent = found
        m = Match(anchor=node, nodes=[producer(t), *dependent, node], output=node.outputs[0])
        m.roles.update(graph=graph, first=producer(t), second=node, region=region, t=t, u=u,
                       shape_sources=shape_sources)
        return m

    def check(self, m: Match) -> list[str]:
        first, second, graph = m["first"], m["second"], m["graph"]
        reason = conv_params(first)
        if reason:
            return [reason]
        w1, b1 = conv_weight_bias(first)
        b1 = kernels.bias_or_zeros(b1, w1.shape[0])
        a1 = conv_attrs(first)
        if second.op == "Conv":
            reason = conv_params(second)
            if reason:
                return [reason]
            w2, b2 = conv_weight_bias(second)
            b2 = kernels.bias_or_zeros(b2, w2.shape[0])
            a2 = conv_attrs(second)
        else:
            pool = self._pool_as_conv(second, w1.shape[0])
            if isinstance(pool, str):
                return [pool]
            w2, b2, a2 = pool
        pointwise_first = _is_pointwise(w1, a1) and all(d == 1 for d in a1["dilations"])
        pointwise_second = _is_pointwise(w2, a2)
        if m["region"]:
            if not pointwise_first:
                return [f"{first.name} is not a stride-1 pad-0 1x1 conv before a border fill"]
            if any(a2["pads"]):
                return [f"{second.name} pads {a2['pads']} after the fill: zero pad is not b1"]
            order = _ordered(m["region"])
            reason = _taint_reason(m["t"], m["region"], order)
            if reason:
                return [reason]
            pads = _probe_fill(m["t"], m["u"], order, m["shape_sources"], graph, b1)
            if isinstance(pads, str):
                return [pads]
            merged_pads = [pads[0], pads[1], pads[0], pads[1]]
            attrs = {**a2, "pads": merged_pads}
        elif pointwise_first:
            if any(a2["pads"]) and np.any(b1 != 0):
                return [f"{second.name} zero-pads the output of {first.name}, whose bias is not "
                        "zero: the merged conv would see the bias at the border"]
            attrs = a2
        elif pointwise_second:
            attrs = a1
        else:
            return [f"neither {first.name} nor {second.name} is a 1x1 that can be composed"]
        if w1.shape[0] != w2.shape[1] * a2["group"]:
            return [f"{second.name} reads {w2.shape[1] * a2['group']} channels, {first.name} "
                    f"gives {w1.shape[0]}"]
        kernel, bias, group = kernels.compose_convs(w1, b1, a1["group"], w2, b2, a2["group"])
        cost_before = (w1.shape[0] * w1.shape[1] * np.prod(w1.shape[2:])
                       + w2.shape[0] * w2.shape[1] * np.prod(w2.shape[2:]))
        cost_after = kernel.shape[0] * kernel.shape[1] * np.prod(kernel.shape[2:])
        x = first.inputs[0]
        if cost_after > cost_before and _sibling_kernel(x, first) < np.prod(kernel.shape[2:]):
            return [f"merging {first.name} and {second.name} costs more ({cost_after} vs "
                    f"{cost_before} MACs per pixel) and no sibling conv on {x.name} absorbs it"]
        m.roles.update(kernel=kernel, bias=bias, attrs={**attrs, "group": group}, like=w1)
        return []

    @staticmethod
    def _pool_as_conv(pool: gs.Node, channels: int) -> tuple | str:
        kernel = list(pool.attrs.get("kernel_shape", []))
        if len(kernel) != 2:
            return f"{pool.name} is not a 2-D pool"
        if int(pool.attrs.get("ceil_mode", 0)):
            return f"{pool.name} has ceil_mode=1"
        pads = [int(p) for p in pool.attrs.get("pads", [0, 0, 0, 0])]
        auto = pool.attrs.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            return f"{pool.name} uses auto_pad={auto}"
        if any(pads) and not int(pool.attrs.get("count_include_pad", 0)):
            return (f"{pool.name} pads {pads} with count_include_pad=0: border averages divide "
                    "by fewer pixels than a conv does")
        w = np.full((channels, 1, *kernel), 1.0 / float(np.prod(kernel)))
        attrs = {"strides": list(pool.attrs.get("strides", [1, 1])), "pads": pads,
                 "dilations": list(pool.attrs.get("dilations", [1, 1])), "group": channels}
        return w, np.zeros(channels), attrs

    def rewrite(self, graph: gs.Graph, m: Match) -> Applied:
        first, second = m["first"], m["second"]
        like, x, name = m["like"], first.inputs[0], second.name
        why = f"{first.name} composed with {second.name}" + (
            f" through a {len(m['region'])}-node border fill" if m["region"] else "")
        removed = retire(m.nodes)
        node = replace_with_conv(graph, name, x, m.output, kernels.cast_like(m["kernel"], like),
                                 kernels.cast_like(m["bias"], like), m["attrs"])
        return Applied(self.id, removed, [node.name], why)
