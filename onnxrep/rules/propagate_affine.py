"""propagate-affine: a per-channel affine map reaches the linear ops around it through layout
ops, pools and fan-out, and folds into them.

Backward (LeViT's Linear + BatchNorm1d on tokens):
  x -> MatMul(W) [-> Add(b)] -> Reshape -> BatchNormalization -> Reshape -> y
  x -> MatMul(W') -> Add(b') -> Reshape -> Reshape -> y
Forward (NextViT's pre-norm BN before q, k, v; a BN before GlobalAveragePool and the head):
  x -> BN -> Reshape -> Transpose -+-> MatMul(Wq)
                                   +-> AveragePool -> MatMul(Wk)
  =>  x -> Reshape -> Transpose -+-> MatMul(Wq') -> Add(bq')
                                 +-> AveragePool -> MatMul(Wk') -> Add(bk')
  x -> BN -> GlobalAveragePool -> Flatten -> Gemm   =>   x -> GlobalAveragePool -> Flatten -> Gemm'

The affine map y = a*x + c per channel (docs/RULES.md, "propagate-affine") is a
BatchNormalization in inference mode (a = gamma/sqrt(var+eps), c = beta - mean*a, channel
axis 1) or a Mul / Div / Add / Sub by a constant that varies along at most one axis (a scalar
is uniform: every axis is its channel axis). The layout ops between (onnxrep.channel_axis:
Identity, Transpose, Reshape / Flatten / Squeeze / Unsqueeze that provably keep the channel
axis, GlobalAveragePool, AveragePool, ReduceMean off the channel axis, max pools for a > 0)
carry it unchanged along a tracked axis. Then
  backward  producer Conv / ConvTranspose / Gemm / MatMul(+Add), output channel o:
            W'[o] = a[o] W[o], b' = a b + c                         (the fold-bn formulas)
  forward   every consumer, input channel k:
            Conv   W'[o, k] = W[o, k] a[k],  b' = b + sum_{k, taps} W[o, k] c[k]
            Gemm / MatMul  B'[k, :] = a[k] B[k, :],  bias' = bias + c @ B
Backward needs no copy of any weight, so it is tried first; forward rewrites each consumer
with its own folded weights (a weight shared with another node is copied; the engine bounds
the growth with --max-growth).

Preconditions (each refusal names the node and the path):
  1. the map is exact: facts.batchnorm_affine for a BN; for a Mul/Div/Add/Sub, a finite float
     constant operand that varies along one axis at most and never widens the data tensor, no
     zero divisor; an Add/Sub on the output of a Conv/Gemm/MatMul is that op's bias, not a map
     to move (fold-affine and fold-bn own those); and the constant map's data input comes
     from a linear op, a layout op or the graph input: a constant inside an activation or a
     norm (GELU's 0.5, LayerNorm's gamma) stays, since runtimes fuse those patterns whole;
  1b. a fold backward with nothing in between, which fold-bn or fold-affine own, is left to
     them (so that --skip of one of them keeps the map);
  2. every layout op on the way passes the map exactly for every admitted shape
     (channel_axis.carried_axis: the channel axis provably stays one axis of size C; pools
     average real values only when c != 0);
  3. backward: each tensor from the producer to the map is read by the next op alone (Shape /
     Size readers aside: they see the same shape) and is not a graph output; the producer's
     weights are finite float constants and its output channel axis is the tracked axis;
  4. forward: every path from the map ends in an absorbing input - Conv input 0 on axis 1,
     with no padding unless c = 0 (the border of a padded Conv sees zeros, not c); Gemm input
     0 on its feature axis (axis 1, or 0 with transA); MatMul input 0 on its last axis with a
     2-D constant weight - each reached once; no tensor on the way is a graph output or read
     by anything else but Shape / Size;
  5. the channel counts agree with the weights.
A reshape that merges the channel axis with the static dims after it (BN -> pool -> Flatten
-> Gemm) carries the map on with a and c repeated (channel_axis.merged_axis); each consumer
gets the map as it reaches it.
Not handled: ConvTranspose as a consumer, MatMul with the map on its weight side or with
batched weights, Slice / Split / Concat / Gather on the way, a reshape that merges the
channel axis with the dims before it, a padded Conv with a shift (a split into a scale and an
Add would leave the Add where the BN was).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.channel_axis import LAYOUT_OPS, SHAPE_READERS, carried_axis, merged_axis
from onnxrep.facts import (
    GemmParams,
    batchnorm_affine,
    channel_vector,
    conv_constants,
    conv_group,
    explicit_padding,
    float_const,
    gemm_params,
)
from onnxrep.query import (
    attr_ints,
    constant_value,
    conv_weight_bias,
    input_symbols,
    is_graph_output,
    matmul_of_bias,
    producer,
)
from onnxrep.rule import (
    Input,
    Match,
    NewNode,
    NewValue,
    NewWeight,
    Refusal,
    Replacement,
    conv_node,
    gemm_node,
)

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class AffineMatch(Match):
    x: gs.Tensor  # the map's data input
    y: gs.Tensor  # its output
    operand: gs.Tensor | None  # the constant of a Mul/Div/Add/Sub (None for a BN)


@dataclass
class Affine:
    a: np.ndarray  # [C] float64 ([1] when uniform)
    c: np.ndarray
    axis: int | None  # channel axis of x and y; None: uniform

    @property
    def shifted(self) -> bool:
        return bool(np.any(self.c != 0))

    @property
    def positive(self) -> bool:
        return bool(np.all(self.a > 0))

    def per(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(a, c) as [channels] vectors (a uniform map broadcasts)."""
        return (np.broadcast_to(self.a, (channels,)).astype(np.float64),
                np.broadcast_to(self.c, (channels,)).astype(np.float64))


@dataclass
class Linear:
    """A producer (backward) or a consumer (forward) the map folds into."""

    node: gs.Node
    bias_add: gs.Node | None = None  # MatMul: the Add(MatMul, bias) that follows, if any
    bias: np.ndarray | None = None  # its per-feature bias (float64)
    affine: Affine | None = None  # the map as it reaches this op (a merging reshape repeats it)


@dataclass
class Plan:
    match: AffineMatch
    affine: Affine
    backward: bool
    layout: list[gs.Node]  # the layout ops on the way, in graph order
    readers: list[gs.Node]  # Shape / Size readers of tensors on the way (rewired, same values)
    linear: list[Linear] = field(default_factory=list)


def _other_readers(graph: gs.Graph, tensor: gs.Tensor, allowed: gs.Node,
                   readers: list[gs.Node]) -> Refusal | None:
    """`tensor` is read by `allowed` (once) and otherwise only by Shape / Size readers, which
    go to `readers`; it is not a graph output."""
    if is_graph_output(graph, tensor):
        return Refusal(f"{tensor.name} is a graph output")
    for reader in tensor.outputs:
        if reader is allowed:
            continue
        if reader.op in SHAPE_READERS:
            readers.append(reader)
            continue
        return Refusal(f"{tensor.name} is also read by {reader.name} ({reader.op})")
    if sum(1 for t in allowed.inputs if t is tensor) != 1:
        return Refusal(f"{tensor.name} is read twice by {allowed.name}")
    return None


def _matmul_bias(graph: gs.Graph, mm: gs.Node, channels: int) -> tuple[gs.Node, np.ndarray] | None:
    """The Add(MatMul, bias) after `mm` that reads its output alone, with a finite constant
    bias per output feature (last axis), or None."""
    out = mm.outputs[0]
    if len(out.outputs) != 1 or is_graph_output(graph, out):
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2 or sum(t is out for t in add.inputs) != 1:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    value = constant_value(other)
    rank = len(add.outputs[0].shape) if add.outputs[0].shape is not None else None
    if value is None or value.dtype.kind != "f" or not np.all(np.isfinite(value)) or not rank:
        return None
    vec = channel_vector(value, channels, rank=rank, channel_axis=rank - 1)
    return None if vec is None else (add, vec)


def _matmul_weight(mm: gs.Node) -> np.ndarray | Refusal:
    weight = float_const(mm.inputs[1], f"{mm.name} weight")
    if isinstance(weight, Refusal):
        return weight
    if weight.ndim != 2:
        return Refusal(f"{mm.name} weight is {weight.ndim}-D, expected 2-D")
    return weight


def _in_order(nodes: list[NewNode]) -> list[NewNode]:
    """The new nodes in an order where each comes after the nodes whose outputs it reads."""
    made_by = {id(t): n for n in nodes for t in n.outputs}
    done: set[int] = set()
    ordered: list[NewNode] = []

    def visit(node: NewNode) -> None:
        if id(node) in done:
            return
        done.add(id(node))
        for t in node.inputs:
            if id(t) in made_by:
                visit(made_by[id(t)])
        ordered.append(node)

    for node in nodes:
        visit(node)
    return ordered


def _step(node: gs.Node, affine: Affine, forward: bool, trusted: frozenset[str]
          ) -> Affine | Refusal:
    """The map on the other side of a layout op: the same a and c along the carried axis,
    or, where a reshape merges the channel axis with the static dims after it, a and c
    repeated along the merged axis (channel_axis.merged_axis)."""
    channels = affine.a.shape[0]
    axis = carried_axis(node, affine.axis, channels, forward=forward, shifted=affine.shifted,
                        positive=affine.positive, trusted=trusted)
    if not isinstance(axis, Refusal):
        return Affine(affine.a, affine.c, axis)
    if affine.axis is None:
        return axis
    merged = merged_axis(node, affine.axis, channels, forward, trusted)
    if merged is None:
        return axis
    j, repeat = merged
    return Affine(np.repeat(affine.a, repeat), np.repeat(affine.c, repeat), j)


def _left_to_owner(plan: Plan) -> Refusal | None:
    """A fold with nothing in between that a simpler rule owns (fold-bn, fold-affine,
    fold-bn-forward run first): refused here, so that --skip of that rule keeps the map."""
    if plan.layout or plan.readers or len(plan.linear) != 1:
        return None
    anchor, node = plan.match.anchor, plan.linear[0].node
    bn = anchor.op == "BatchNormalization"
    if plan.backward:
        two_d = node.op != "MatMul" or (node.outputs[0].shape is not None
                                         and len(node.outputs[0].shape) == 2)
        owner = ("fold-bn" if bn and two_d else
                 "fold-affine" if not bn and node.op == "Conv" and plan.linear[0].bias_add is None
                 else None)
    else:
        owner = None  # fold-bn-forward asks more (a known 2-D input for a Gemm): not deferred
    if owner is None:
        return None
    return Refusal(f"{anchor.name} folds into {node.name} directly: {owner}'s rewrite")


def _fresh(nodes: Iterable[gs.Node]) -> dict[int, Input | gs.Tensor]:
    """A new tensor for each output of `nodes` (id of the old tensor -> NewValue)."""
    return {id(t): NewValue(t.name, dtype=t.dtype) for n in nodes for t in n.outputs
            if t is not None}


def _copy(node: gs.Node, inputs: Iterable[Input], outputs: Iterable[object]) -> NewNode:
    return NewNode(node.op, node.name, list(inputs), list(outputs), dict(node.attrs))


class PropagateAffine:
    id = "propagate-affine"
    summary = ("per-channel affine (BatchNormalization, constant Mul/Div/Add/Sub) through "
               "layout ops, pools and fan-out into the linear ops around it")
    anchors = ("BatchNormalization", "Mul", "Div", "Add", "Sub")
    opt_in = False
    # the walk looks past the match's own tensors: another map folding further down the path
    # (NextViT's second BN after the pool) can make a refused map foldable
    cache_refusals = False
    # a consumer whose weight another node shares gets a copy: the engine bounds the growth
    copies_weights = True

    # -- match ----------------------------------------------------------------------------
    def match(self, graph: gs.Graph, node: gs.Node) -> AffineMatch | None:
        if not node.outputs or not node.inputs:
            return None
        if node.op == "BatchNormalization":
            return AffineMatch(node, [node], node.inputs[0], node.outputs[0], None)
        if len(node.inputs) != 2:
            return None
        sides = (0,) if node.op == "Div" else (0, 1)
        for side in sides:
            x, operand = node.inputs[side], node.inputs[1 - side]
            value = constant_value(operand)
            if value is None or value.dtype.kind != "f" or constant_value(x) is not None:
                continue  # shape arithmetic on integers, or constant folding's business
            prod = producer(x)
            if node.op in ("Add", "Sub") and prod is not None and prod.op in LINEAR_OPS:
                return None  # a bias (precondition 1)
            if prod is not None and prod.op not in (*LINEAR_OPS, *LAYOUT_OPS):
                return None  # inside an activation or a norm (precondition 1)
            if sum(1 for s in value.shape if s != 1) > 1:
                return None  # not a per-channel map: not ours to explain
            return AffineMatch(node, [node], x, node.outputs[0], operand)
        return None

    # -- check ----------------------------------------------------------------------------
    def _affine(self, m: AffineMatch) -> Affine | Refusal:
        node = m.anchor
        if node.op == "BatchNormalization":
            affine = batchnorm_affine(node)
            if isinstance(affine, Refusal):
                return affine
            return Affine(affine[0], affine[1], 1)
        value = float_const(m.operand, f"{node.name} operand")
        if isinstance(value, Refusal):
            return value
        shape = m.x.shape
        if shape is None:
            return Refusal(f"{node.name} input rank is unknown")
        rank = len(shape)
        if value.ndim > rank:
            return Refusal(f"{node.name} operand {list(value.shape)} widens {m.x.name}")
        full = value.reshape((1,) * (rank - value.ndim) + value.shape)
        varying = [i for i, s in enumerate(full.shape) if s != 1]  # at most one (match)
        if varying:
            axis = varying[0]
            if shape[axis] != full.shape[axis]:
                return Refusal(f"{node.name} operand {list(value.shape)} broadcasts {m.x.name} "
                               f"axis {axis} of size {shape[axis]}")
            vec = full.reshape(-1).astype(np.float64)
        else:
            axis, vec = None, full.reshape(1).astype(np.float64)
        if node.op == "Div" and np.any(vec == 0):
            return Refusal(f"{node.name} divides by zero")
        if m.x.dtype is not None and np.dtype(m.x.dtype).kind != "f":
            return Refusal(f"{node.name} works on {np.dtype(m.x.dtype)}, not floating point")
        ones, zeros = np.ones_like(vec), np.zeros_like(vec)
        sub_from = node.op == "Sub" and node.inputs[1] is m.x
        a, c = {
            "Mul": (vec, zeros), "Div": (1.0 / vec, zeros), "Add": (ones, vec),
            "Sub": (-ones, vec) if sub_from else (ones, -vec),
        }[node.op]
        return Affine(a, c, axis)

    def check(self, graph: gs.Graph, m: AffineMatch) -> Plan | Refusal:
        affine = self._affine(m)
        if isinstance(affine, Refusal):
            return affine
        back = self._backward(graph, m, affine)
        if isinstance(back, Plan):
            return _left_to_owner(back) or back
        forward = self._forward(graph, m, affine)
        if isinstance(forward, Plan):
            return _left_to_owner(forward) or forward
        return Refusal(f"{m.anchor.name} stays: not into a producer ({back.reason}); not into "
                       f"its consumers ({forward.reason})")

    def _backward(self, graph: gs.Graph, m: AffineMatch, affine: Affine) -> Plan | Refusal:
        layout: list[gs.Node] = []
        readers: list[gs.Node] = []
        tensor, reader = m.x, m.anchor
        while True:
            refusal = _other_readers(graph, tensor, reader, readers)
            if refusal:
                return refusal
            prod = producer(tensor)
            if prod is None:
                return Refusal(f"{tensor.name} is a graph input")
            if prod.op in LAYOUT_OPS and prod.inputs and prod.inputs[0] is not None:
                affine = _step(prod, affine, False, input_symbols(graph))
                if isinstance(affine, Refusal):
                    return affine
                layout.append(prod)
                tensor, reader = prod.inputs[0], prod
                continue
            break
        linear = self._producer(graph, prod, tensor, affine.axis, affine.a.shape[0])
        if isinstance(linear, Refusal):
            return linear
        linear.affine = affine
        return Plan(m, affine, True, layout[::-1], readers, [linear])

    def _producer(self, graph: gs.Graph, prod: gs.Node, out: gs.Tensor, axis: int | None,
                  channels: int) -> Linear | Refusal:
        """The linear op that computes `out` with output channels on `axis` (precondition 3)."""
        rank = None if out.shape is None else len(out.shape)
        if prod.op == "Add":
            found = matmul_of_bias(prod)
            weight = None if found is None else _matmul_weight(found[0])
            if isinstance(weight, Refusal):
                return weight
            bias = None if weight is None else _matmul_bias(graph, found[0], weight.shape[1])
            if bias is None or bias[0] is not prod:
                return Refusal(f"{prod.name} (Add) is not a MatMul's bias")
            linear = self._producer(graph, found[0], found[0].outputs[0], axis, channels)
            if isinstance(linear, Refusal):
                return linear
            return Linear(found[0], prod, bias[1])
        if prod.op not in LINEAR_OPS:
            return Refusal(f"{out.name} comes from {prod.name} ({prod.op}), not a linear op")
        if prod.op in ("Conv", "ConvTranspose"):
            refusal = conv_constants(prod)
            group = refusal or conv_group(prod)
            if isinstance(group, Refusal):
                return group
            weight = constant_value(prod.inputs[1])
            out_channels = weight.shape[0] if prod.op == "Conv" else weight.shape[1] * group
            want = 1
        elif prod.op == "Gemm":
            params = gemm_params(prod)
            if isinstance(params, Refusal):
                return params
            out_channels, want = params.out_features, 1
        else:
            weight = _matmul_weight(prod)
            if isinstance(weight, Refusal):
                return weight
            if rank is None:
                return Refusal(f"{prod.name} output rank is unknown")
            out_channels, want = weight.shape[1], rank - 1
        if axis is not None and axis != want:
            return Refusal(f"the channel axis reaches {prod.name} ({prod.op}) as axis {axis}, "
                           f"its output channels are axis {want}")
        if axis is not None and out_channels != channels:
            return Refusal(f"{prod.name} outputs {out_channels} channels, the map has "
                           f"{channels}")
        return Linear(prod)

    def _forward(self, graph: gs.Graph, m: AffineMatch, affine: Affine) -> Plan | Refusal:
        layout: list[gs.Node] = []
        readers: list[gs.Node] = []
        linear: list[Linear] = []
        seen: set[int] = set()
        todo: list[tuple[gs.Tensor, Affine, str]] = [(m.y, affine, m.anchor.name)]
        while todo:
            tensor, here, path = todo.pop()
            if is_graph_output(graph, tensor):
                return Refusal(f"{path}: {tensor.name} is a graph output")
            for reader in tensor.outputs:
                route = f"{path} -> {reader.name} ({reader.op})"
                if reader.op in SHAPE_READERS:
                    readers.append(reader)
                    continue
                if id(reader) in seen:
                    return Refusal(f"{route}: reached twice")
                seen.add(id(reader))
                if reader.op in LAYOUT_OPS and reader.inputs[0] is tensor:
                    if any(t is tensor for t in reader.inputs[1:]):
                        return Refusal(f"{route}: reads the map as a parameter")
                    nxt = _step(reader, here, True, input_symbols(graph))
                    if isinstance(nxt, Refusal):
                        return Refusal(f"{route}: {nxt.reason}")
                    layout.append(reader)
                    todo.append((reader.outputs[0], nxt, route))
                    continue
                found = self._consumer(graph, reader, tensor, here.axis, here.a.shape[0], here)
                if isinstance(found, Refusal):
                    return Refusal(f"{route}: {found.reason}")
                found.affine = here
                linear.append(found)
        if not linear:
            return Refusal("nothing reads the map but Shape")
        order = {id(n): i for i, n in enumerate(graph.nodes)}
        layout.sort(key=lambda n: order.get(id(n), 0))
        linear.sort(key=lambda lin: order.get(id(lin.node), 0))
        return Plan(m, affine, False, layout, readers, linear)

    def _consumer(self, graph: gs.Graph, node: gs.Node, tensor: gs.Tensor, axis: int | None,
                  channels: int, affine: Affine) -> Linear | Refusal:
        """`node` absorbs the map on its input `tensor` (precondition 4)."""
        if node.op not in ("Conv", "Gemm", "MatMul"):
            return Refusal("not linear")
        if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
            return Refusal("the map reaches a weight input")
        if node.op == "Conv":
            refusal = conv_constants(node)
            group = refusal or conv_group(node)
            if isinstance(group, Refusal):
                return group
            if affine.shifted:
                refusal = explicit_padding(node)
                pads = attr_ints(node, "pads", [])
                if refusal or any(pads):
                    return Refusal(f"{node.name} pads its input: the border sees zeros, not "
                                   "the shift")
            weight = constant_value(node.inputs[1])
            in_channels, want = weight.shape[1] * group, 1
        elif node.op == "Gemm":
            params = gemm_params(node)
            if isinstance(params, Refusal):
                return params
            in_channels = params.in_features
            want = 0 if int(node.attrs.get("transA", 0)) else 1
        else:
            weight = _matmul_weight(node)
            if isinstance(weight, Refusal):
                return weight
            if tensor.shape is None:
                return Refusal(f"{tensor.name} rank is unknown")
            in_channels, want = weight.shape[0], len(tensor.shape) - 1
        if axis is not None and axis != want:
            return Refusal(f"the channel axis is {axis}, {node.name} contracts axis {want}")
        if axis is not None and in_channels != channels:
            return Refusal(f"{node.name} reads {in_channels} channels, the map has {channels}")
        if node.op == "MatMul" and affine.shifted:
            found = _matmul_bias(graph, node, constant_value(node.inputs[1]).shape[1])
            if found is not None:
                return Linear(node, found[0], found[1])
        return Linear(node)

    # -- rewrite --------------------------------------------------------------------------
    def rewrite(self, graph: gs.Graph, plan: Plan) -> Replacement:
        m = plan.match
        removes = [m.anchor, *plan.layout, *plan.readers]
        for lin in plan.linear:
            removes.append(lin.node)
            if lin.bias_add is not None:
                removes.append(lin.bias_add)
        if plan.backward:
            nodes = self._backward_nodes(plan)
            why = f"{m.anchor.name} folded back into {plan.linear[0].node.name}"
        else:
            nodes = self._forward_nodes(plan)
            why = (f"{m.anchor.name} folded forward into "
                   f"{', '.join(lin.node.name for lin in plan.linear)}")
        if plan.layout:
            why += f" through {', '.join(n.op for n in plan.layout)}"
        unique = list({id(n): n for n in removes}.values())
        return Replacement(unique, _in_order(nodes), why)

    def _backward_nodes(self, plan: Plan) -> list[NewNode]:
        m, lin = plan.match, plan.linear[0]
        unit = lin.bias_add if lin.bias_add is not None else lin.node
        # the tensors from the producer to the map now hold mapped values: new tensors, and
        # the map's input becomes its output
        renamed = _fresh([unit, *plan.layout])
        renamed[id(m.x)] = m.y
        nodes = self._scaled_producer(lin, renamed[id(unit.outputs[0])], lin.affine)
        nodes += [_copy(n, [renamed.get(id(t), t) for t in n.inputs],
                        [renamed[id(t)] for t in n.outputs]) for n in plan.layout]
        nodes += [_copy(r, [renamed.get(id(t), t) for t in r.inputs], r.outputs)
                  for r in plan.readers]
        return nodes

    def _scaled_producer(self, lin: Linear, out: gs.Tensor, affine: Affine) -> list[NewNode]:
        node = lin.node
        if node.op in ("Conv", "ConvTranspose"):
            weight, bias = conv_weight_bias(node)
            group = int(node.attrs.get("group", 1))
            channels = weight.shape[0] if node.op == "Conv" else weight.shape[1] * group
            a, c = affine.per(channels)
            if node.op == "Conv":
                w, b = kernels.scale_conv_output_as(weight, bias, a, c)
            else:
                w, b = kernels.scale_conv_transpose_output(weight, bias, a, c, group)
                w, b = kernels.cast_like(w, weight), kernels.cast_like(b, weight)
            return [conv_node(node.name, node.inputs[0], out, w, b, dict(node.attrs),
                              op=node.op)]
        if node.op == "Gemm":
            p: GemmParams = gemm_params(node)  # type: ignore[assignment]  (checked)
            a, c = affine.per(p.out_features)
            matrix, bias = kernels.scale_gemm_output(p.matrix, p.c_bias, p.trans_b, p.alpha,
                                                     p.beta, a, c)
            return [gemm_node(node.name, node.inputs[0], out, matrix, bias, dict(node.attrs),
                              p.matrix.dtype)]
        weight = constant_value(node.inputs[1])
        a, c = affine.per(weight.shape[1])
        bias = lin.bias if lin.bias is not None else np.zeros(weight.shape[1])
        w, b = kernels.scale_gemm_output(weight, bias, False, 1.0, 1.0, a, c)
        keep_bias = lin.bias_add is not None or affine.shifted
        return self._matmul_nodes(node, node.inputs[0], out, weight, w, b if keep_bias else None)

    @staticmethod
    def _matmul_nodes(mm: gs.Node, x: Input, out: gs.Tensor, like: np.ndarray,
                      weight: np.ndarray, bias: np.ndarray | None) -> list[NewNode]:
        """MatMul(x, weight) [-> Add(., bias)] writing `out`."""
        w = NewWeight(f"{mm.name}.weight", kernels.cast_like(weight, like))
        if bias is None:
            return [NewNode("MatMul", mm.name, [x, w], [out])]
        hidden = NewValue(f"{mm.name}.out", dtype=like.dtype)
        return [NewNode("MatMul", mm.name, [x, w], [hidden]),
                NewNode("Add", f"{mm.name}.bias_add",
                        [hidden, NewWeight(f"{mm.name}.bias", kernels.cast_like(bias, like))],
                        [out])]

    def _forward_nodes(self, plan: Plan) -> list[NewNode]:
        m = plan.match

        # the tensors between the map and its consumers now hold unmapped values: new tensors
        renamed = _fresh(plan.layout)
        renamed[id(m.y)] = m.x

        def source(t: gs.Tensor) -> Input:
            return renamed.get(id(t), t)

        nodes: list[NewNode] = []
        nodes += [_copy(n, [source(t) for t in n.inputs], [renamed[id(t)] for t in n.outputs])
                  for n in plan.layout]
        nodes += [_copy(r, [source(t) for t in r.inputs], r.outputs) for r in plan.readers]
        for lin in plan.linear:
            node, affine = lin.node, lin.affine
            x = source(node.inputs[0])
            if node.op == "Conv":
                weight, bias = conv_weight_bias(node)
                group = int(node.attrs.get("group", 1))
                a, c = affine.per(weight.shape[1] * group)
                w, b = kernels.fold_input_affine(weight, bias, a, c, group)
                nodes.append(conv_node(node.name, x, node.outputs[0],
                                       kernels.cast_like(w, weight),
                                       kernels.cast_like(b, weight), dict(node.attrs)))
            elif node.op == "Gemm":
                p: GemmParams = gemm_params(node)  # type: ignore[assignment]  (checked)
                a, c = affine.per(p.in_features)
                matrix, bias = kernels.fold_input_affine_gemm(p.matrix, p.c_bias, p.trans_b,
                                                              p.alpha, p.beta, a, c)
                nodes.append(gemm_node(node.name, x, node.outputs[0], matrix, bias,
                                       dict(node.attrs), p.matrix.dtype))
            else:
                weight = constant_value(node.inputs[1])
                a, c = affine.per(weight.shape[0])
                scaled, shift = kernels.fold_input_affine_gemm(
                    weight, np.zeros(weight.shape[1]), False, 1.0, 0.0, a, c)
                if lin.bias_add is not None:
                    nodes += self._matmul_nodes(node, x, lin.bias_add.outputs[0], weight,
                                                scaled, lin.bias + shift)
                else:
                    nodes += self._matmul_nodes(node, x, node.outputs[0], weight, scaled,
                                                shift if affine.shifted else None)
        return nodes
