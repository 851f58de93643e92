"""merge-parallel: branches that read one tensor and are summed become one Conv.

Before (RepVGG):                          After:
    x ─┬─ Conv3x3 ─ BN ─┐                      x ─ Conv3x3(W, b) ─ y
       ├─ Conv1x1 ─ BN ─┼─ Add ─ Add ─ y
       └──────────── BN ┘
(after fold-bn the BNs of the conv branches are already inside their convs)

The Add tree is read as a linear expression over its leaves: Add/Sub of two tensors,
Add/Sub/Mul/Div by a per-channel constant, and inference BatchNormalization (a*t + c) are
expanded, so y = sum_j coef_j * leaf_j + bias with per-channel vectors coef_j, bias.
This covers RepVGG, ACNet, MobileOne, QARepVGG, RepViT, RepGhost, RepOptimizer's CSLA
(`s*conv3 + t*conv1 + u*x`) and FastViT's RepMixer (`x + ls*(mixer(x) - norm(x))`).

A leaf is a *conv branch* when it is a Conv's output with constant weights whose every
reader is inside the tree; its input may pass through a constant zero Pad (pads add up)
or a Slice that crops spatial borders (ACNet with padding < k//2: a crop of c is pad -c).
Any other leaf is an *identity branch* on itself. Branches are grouped by the tensor x
they read; in a group the convs with the same strides, dilations, group and channels, and
the identity (only with stride 1 and Cin == Cout), become one Conv:

    W = sum_j embed(coef_j * W_j),  b = sum_j coef_j * b_j + bias
    identity: K[o, o mod (C/g), centre] = 1   (kernels.identity_kernel)
    embedding offsets and merged pads from kernels.align_kernels (RULES-SPEC §4).

Leaves that do not merge stay, summed with the merged Conv (scaled by a Mul when their
coefficient is not 1).

Preconditions (each refusal names the branch):
  1. every tensor inside the tree (partial sums, branch outputs) is read only by the tree
     and is not a graph output - otherwise it is a leaf of its own, never absorbed;
  2. conv weights and biases are finite float constants (auto_pad NOTSET/VALID);
  3. merged convs have equal strides, dilations, group and output channels, and read the
     same input tensor (a branch behind a Pad(reflect/edge) of x does not merge with branches
     reading x: padding modes differ);
  4. an identity branch needs stride 1 and input channels == output channels;
  5. padding aligns: the merged kernel's padding covers every branch and every branch gives
     the same output size for every input size (kernels.align_kernels);
  6. scaling constants broadcast per channel only ([1,C,1,1], [C,1,1], scalar).
A nonlinear op inside a branch makes it read a different tensor: it does not merge.
Not handled: Pad(reflect) absorbed into a merge with an identity branch; Convs of
different groups (would need per-group bookkeeping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import batchnorm_affine, channel_vector, conv_params, sole_consumer
from onnxrep.rule import Applied, Match
from onnxrep.surgery import (
    add_node,
    constant_value,
    conv_attrs,
    conv_weight_bias,
    is_graph_output,
    new_constant,
    new_variable,
    producer,
    replace_with_conv,
    retire,
)

_TREE_OPS = ("Add", "Sub", "Mul", "Div", "BatchNormalization")


@dataclass
class Branch:
    """One leaf of the sum, as a conv on `source` (identity = 1x1 kernel of ones)."""

    kind: str  # "conv" | "identity" | "blocked"
    leaf: gs.Tensor
    source: gs.Tensor
    coef: np.ndarray
    conv: gs.Node | None = None
    absorbed: list[gs.Node] = field(default_factory=list)
    pads: tuple[list[int], list[int]] = ([], [])
    reason: str = ""
    blocked_on: gs.Node | None = None  # a Conv that could not be absorbed (reason says why)
    weight: np.ndarray | None = None  # conv branches: the kernel (an AveragePool's is 1/k^2)
    bias: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.conv.name if self.conv is not None else f"identity({self.leaf.name})"


@dataclass
class Expression:
    terms: dict[int, tuple[gs.Tensor, np.ndarray]]
    bias: np.ndarray
    internal: list[gs.Node]


def _channels_and_rank(node: gs.Node) -> tuple[int, int] | None:
    """Channels and rank of the sum: from its shape, else from a Conv somewhere below."""
    shape = node.outputs[0].shape
    if shape is not None and len(shape) >= 3 and isinstance(shape[1], int):
        return int(shape[1]), len(shape)
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op == "Conv" and constant_value(n.inputs[1]) is not None:
            w = constant_value(n.inputs[1])
            return int(w.shape[0]), w.ndim
        if n.op in _TREE_OPS:
            stack.extend(p for t in n.inputs if (p := producer(t)) is not None)
    return None


class _Expander:
    """Reads the linear expression of a tree rooted at one node."""

    def __init__(self, graph: gs.Graph, channels: int, rank: int) -> None:
        self.graph, self.channels, self.rank = graph, channels, rank

    def vector(self, tensor: gs.Tensor) -> np.ndarray | None:
        value = constant_value(tensor)
        if value is None or value.dtype.kind != "f" or not np.all(np.isfinite(value)):
            return None
        return channel_vector(value, self.channels, self.rank)

    def expand(self, root: gs.Node) -> Expression:
        expr = Expression({}, np.zeros(self.channels), [])
        self._node(root, np.ones(self.channels), expr)
        return expr

    def _tensor(self, tensor: gs.Tensor, parent: gs.Node, coef: np.ndarray,
                expr: Expression) -> None:
        node = producer(tensor)
        if (node is not None and node.op in _TREE_OPS
                and sole_consumer(self.graph, tensor, parent) is None
                and self._node(node, coef, expr)):
            return
        key = id(tensor)
        prev = expr.terms.get(key)
        expr.terms[key] = (tensor, coef if prev is None else prev[1] + coef)

    def _node(self, node: gs.Node, coef: np.ndarray, expr: Expression) -> bool:
        """Expand `node` into expr; False (and nothing added) when it is not linear."""
        ins = node.inputs
        if node.op == "BatchNormalization":
            affine = batchnorm_affine(node)
            if isinstance(affine, str) or len(affine[0]) != self.channels:
                return False
            expr.internal.append(node)
            expr.bias += coef * affine[1]
            self._tensor(ins[0], node, coef * affine[0], expr)
            return True
        if len(ins) != 2:
            return False
        consts = [self.vector(t) for t in ins]
        variable = [constant_value(t) is None for t in ins]
        if node.op in ("Add", "Sub"):
            sign = -1.0 if node.op == "Sub" else 1.0
            if all(variable):
                expr.internal.append(node)
                self._tensor(ins[0], node, coef, expr)
                self._tensor(ins[1], node, sign * coef, expr)
                return True
            if variable[0] and consts[1] is not None:
                expr.internal.append(node)
                expr.bias += sign * coef * consts[1]
                self._tensor(ins[0], node, coef, expr)
                return True
            if variable[1] and consts[0] is not None:
                expr.internal.append(node)
                expr.bias += coef * consts[0]
                self._tensor(ins[1], node, sign * coef, expr)
                return True
            return False
        if node.op == "Mul":
            for v, c in ((0, 1), (1, 0)):
                if variable[v] and consts[c] is not None:
                    expr.internal.append(node)
                    self._tensor(ins[v], node, coef * consts[c], expr)
                    return True
            return False
        if node.op == "Div" and variable[0] and consts[1] is not None and np.all(consts[1] != 0):
            expr.internal.append(node)
            self._tensor(ins[0], node, coef / consts[1], expr)
            return True
        return False


def _peel_input(
    graph: gs.Graph, conv: gs.Node, pads: list[int]
) -> tuple[gs.Tensor, list[gs.Node], list[int]]:
    """Follow a conv's input back through zero Pads and spatial crops read by it alone."""
    x, absorbed = conv.inputs[0], []
    spatial = len(pads) // 2
    while True:
        node = producer(x)
        if node is None or sole_consumer(graph, x, absorbed[-1] if absorbed else conv):
            return x, absorbed, pads
        extra = _zero_pad_amounts(node, spatial) if node.op == "Pad" else (
            _crop_amounts(node, spatial) if node.op == "Slice" else None)
        if extra is None:
            return x, absorbed, pads
        pads = [p + e for p, e in zip(pads, extra, strict=True)]
        absorbed.append(node)
        x = node.inputs[0]


def _zero_pad_amounts(pad: gs.Node, spatial: int) -> list[int] | None:
    """Spatial pads of a constant-mode Pad with value 0 (batch/channel pads must be 0)."""
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or len(pad.inputs) < 2:
        return None
    amounts = constant_value(pad.inputs[1])
    if amounts is None:
        return None
    if len(pad.inputs) > 2 and pad.inputs[2].name:
        value = constant_value(pad.inputs[2])
        if value is None or np.any(value != 0):
            return None
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        return None  # explicit axes: keep it simple, do not absorb
    amounts = [int(a) for a in amounts.reshape(-1)]
    rank = len(amounts) // 2
    if rank != spatial + 2 or any(amounts[i] or amounts[rank + i] for i in (0, 1)):
        return None
    return amounts[2:rank] + amounts[rank + 2:]


def _crop_amounts(node: gs.Node, spatial: int) -> list[int] | None:
    """A Slice that crops spatial borders, as negative pads [begins..., ends...]."""
    ins = node.inputs
    if len(ins) < 3:
        return None
    starts, ends = constant_value(ins[1]), constant_value(ins[2])
    axes = constant_value(ins[3]) if len(ins) > 3 and ins[3].name else None
    steps = constant_value(ins[4]) if len(ins) > 4 and ins[4].name else None
    if starts is None or ends is None or (len(ins) > 3 and ins[3].name and axes is None):
        return None
    if steps is not None and np.any(steps != 1):
        return None
    shape = ins[0].shape
    rank = spatial + 2
    if axes is None:
        axes = np.arange(len(starts))
    begins, finals = [0] * spatial, [0] * spatial
    for axis, start, end in zip(axes.tolist(), starts.tolist(), ends.tolist(), strict=True):
        axis = axis + rank if axis < 0 else axis
        dim = shape[axis] if shape is not None and len(shape) == rank else None
        dim = dim if isinstance(dim, int) else None
        if axis < 2:
            if start != 0 or not (end >= 2**30 or (dim is not None and end >= dim)):
                return None
            continue
        if start < 0:
            if dim is None:
                return None
            start += dim
        if end >= 2**30:
            crop_end = 0
        elif end < 0:
            crop_end = -end
        elif dim is not None:
            crop_end = dim - min(end, dim)
        else:
            return None
        if start < 0 or crop_end < 0:
            return None
        begins[axis - 2] -= start
        finals[axis - 2] -= crop_end
    return begins + finals


def _pool_as_depthwise(pool: gs.Node, channels: int) -> tuple[np.ndarray, dict] | None:
    """AveragePool(k, s, pads, count_include_pad=1 or pads 0, ceil_mode=0) as the depthwise
    conv K[c, 0] = 1/(kh*kw) (RULES-SPEC §7); None when it is not one."""
    kernel = [int(k) for k in pool.attrs.get("kernel_shape", [])]
    pads = [int(p) for p in pool.attrs.get("pads", [0] * 2 * len(kernel))]
    auto = pool.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if (len(kernel) != 2 or int(pool.attrs.get("ceil_mode", 0)) or auto not in ("NOTSET", "VALID")
            or (any(pads) and not int(pool.attrs.get("count_include_pad", 0)))):
        return None
    weight = np.full((channels, 1, *kernel), 1.0 / float(np.prod(kernel)), dtype=np.float32)
    attrs = {"strides": [int(s) for s in pool.attrs.get("strides", [1, 1])], "pads": pads,
             "dilations": [int(d) for d in pool.attrs.get("dilations", [1, 1])],
             "group": channels}
    return weight, attrs


def _classify(graph: gs.Graph, tensor: gs.Tensor, coef: np.ndarray,
              internal: set[int]) -> Branch:
    conv = producer(tensor)
    if (conv is not None and conv.op == "AveragePool" and len(conv.outputs) == 1
            and not is_graph_output(graph, tensor)
            and all(id(r) in internal for r in tensor.outputs)):
        spec = _pool_as_depthwise(conv, len(coef))
        if spec is not None:
            x = conv.inputs[0]
            spatial = len(spec[1]["pads"]) // 2
            return Branch("conv", tensor, x, coef, conv=conv,
                          pads=(spec[1]["pads"][:spatial], spec[1]["pads"][spatial:]),
                          weight=spec[0], bias=np.zeros(len(coef)), attrs=spec[1])
    if conv is None or conv.op != "Conv" or len(conv.outputs) != 1:
        return Branch("identity", tensor, tensor, coef)
    reason = conv_params(conv)
    if reason is None and is_graph_output(graph, tensor):
        reason = f"{tensor.name} (output of {conv.name}) is a graph output"
    if reason is None and any(id(r) not in internal for r in tensor.outputs):
        reason = f"{tensor.name} (output of {conv.name}) has {len(tensor.outputs)} consumers"
    if reason:
        # The conv stays; its output is an ordinary leaf (it may be the x of other branches).
        # `blocked_on` lets the caller say why it did not join the branches reading its input.
        branch = Branch("identity", tensor, tensor, coef, reason=reason)
        branch.blocked_on = conv
        return branch
    attrs = conv_attrs(conv)
    x, absorbed, pads = _peel_input(graph, conv, attrs["pads"])
    spatial = len(pads) // 2
    weight, bias = conv_weight_bias(conv)
    branch = Branch("conv", tensor, x, coef, conv=conv, absorbed=absorbed,
                    pads=(pads[:spatial], pads[spatial:]), weight=weight,
                    bias=np.zeros(weight.shape[0]) if bias is None else bias, attrs=attrs)
    pad = producer(x)
    if pad is not None and pad.op == "Pad":
        branch.reason = f"reads {pad.name} (Pad mode={pad.attrs.get('mode', 'constant')!s})"
    return branch


@dataclass
class MergePlan:
    source: gs.Tensor
    members: list[Branch]
    kernel: tuple[int, ...]
    pads: list[int]
    offsets: list[tuple[int, ...]]
    attrs: dict


def _plan_group(branches: list[Branch], channels: int) -> tuple[MergePlan | None, list[str]]:
    """Which branches of one group (same input) merge, and why the others do not."""
    reasons = [f"{b.label}: {b.reason}" for b in branches if b.kind == "blocked"]
    convs = [b for b in branches if b.kind == "conv"]
    if not convs:
        return None, reasons

    def key(b: Branch) -> tuple:
        a, w = b.attrs, b.weight
        return (tuple(a["strides"]), tuple(a["dilations"]), a["group"], w.shape[0],
                w.shape[1] * a["group"], w.dtype.str)

    for b in list(convs):
        out_c = b.weight.shape[0]
        if out_c != channels:
            reasons.append(f"{b.label} outputs {out_c} channels, the sum has {channels}")
            convs.remove(b)
    if not convs:
        return None, reasons
    keys = [key(b) for b in convs]
    best = max(keys, key=keys.count)
    members = [b for b, k in zip(convs, keys, strict=True) if k == best]
    for b, k in zip(convs, keys, strict=True):
        if k != best:
            reasons.append(f"{b.label} has strides/dilations/group/channels/dtype {k[:5]}, "
                           f"{members[0].label} has {best[:5]}")
    strides, dilations, group, out_c, in_c, _ = best
    for b in branches:
        if b.kind != "identity":
            continue
        if any(s != 1 for s in strides):
            reasons.append(f"{b.label}: identity branch cannot join convs with strides "
                           f"{list(strides)}")
        elif in_c != out_c or out_c != channels:
            reasons.append(f"{b.label}: identity needs input channels {in_c} == output "
                           f"channels {out_c}")
        else:
            members.append(b)
    if len(members) < 2:
        return None, reasons
    if not any(b.conv is not None and b.conv.op == "Conv" for b in members):
        return None, reasons + ["no Conv among the branches (an AveragePool stays a pool)"]
    spatial = len(strides)
    shapes = [tuple(b.weight.shape[2:]) if b.kind == "conv"
              else (1,) * spatial for b in members]
    pads = [b.pads if b.kind == "conv" else ([0] * spatial, [0] * spatial) for b in members]
    aligned = kernels.align_kernels(shapes, pads, dilations)
    if isinstance(aligned, str):
        labels = ", ".join(b.label for b in members)
        return None, reasons + [f"padding of {labels} cannot align: {aligned}"]
    kernel, merged_pads, offsets = aligned
    attrs = {"strides": list(strides), "dilations": list(dilations), "group": group,
             "pads": merged_pads}
    return MergePlan(members[0].source, members, kernel, merged_pads, offsets, attrs), reasons


def _merged_weights(plan: MergePlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum of embedded, scaled kernels, cast to the dtype of the first Conv's weight, and the
    float64 bias; returns (W, b, dtype-giving weight)."""
    first_conv = next(b for b in plan.members if b.kind == "conv")
    like = next((b.weight for b in plan.members if b.conv is not None and b.conv.op == "Conv"),
                first_conv.weight)
    channels, group, spatial = like.shape[0], plan.attrs["group"], len(plan.kernel)
    total_b = np.zeros(channels)
    for b in plan.members:
        total_b = total_b + kernels.scale_bias(b.bias if b.kind == "conv" else None, b.coef,
                                               np.zeros(channels))

    def rows_of(rows: slice) -> np.ndarray:
        total = np.zeros((len(range(channels)[rows]), like.shape[1]) + tuple(plan.kernel))
        for b, offset in zip(plan.members, plan.offsets, strict=True):
            w = (b.weight[rows] if b.kind == "conv"
                 else kernels.identity_kernel(channels, group, spatial, rows))
            if not np.all(b.coef == 1.0):  # a unit coefficient (the usual case) is exact as is
                w = kernels.scale_conv_weight(w, b.coef[rows])
            kernels.add_embedded(total, w, offset)
        return total

    return kernels.by_output_rows(channels, rows_of, like.dtype), total_b, like


def _feeds_larger_sum(graph: gs.Graph, node: gs.Node) -> bool:
    """The node's output is read only by an Add/Sub of two tensors, which is an anchor of
    its own and expands this node as part of its tree (later in topological order)."""
    out = node.outputs[0]
    readers = list(out.outputs)
    if len(readers) != 1 or is_graph_output(graph, out):
        return False
    parent = readers[0]
    return (parent.op in ("Add", "Sub") and len(parent.inputs) == 2
            and all(constant_value(t) is None for t in parent.inputs)
            and sum(1 for t in parent.inputs if t is out) == 1)


class MergeParallelBranches:
    id = "merge-parallel"
    summary = "summed branches (convs, scaled convs, identity, BN) on one input into one Conv"
    anchors = ("Add", "Sub")
    opt_in = False

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        if len(node.inputs) != 2 or any(constant_value(t) is not None for t in node.inputs):
            return None  # Add(t, const) is fold-affine's
        if _feeds_larger_sum(graph, node):
            return None  # the Add above expands this one: merge the whole tree once
        shape = _channels_and_rank(node)
        if shape is None:
            return None
        channels, rank = shape
        expr = _Expander(graph, channels, rank).expand(node)
        if len(expr.terms) < 2:
            return None
        internal = {id(n) for n in expr.internal}
        branches = [_classify(graph, t, c, internal) for t, c in expr.terms.values()]
        groups: dict[int, list[Branch]] = {}
        for b in branches:
            groups.setdefault(id(b.source), []).append(b)
        # A conv that cannot be absorbed, or that reads a Pad(reflect) of x, would have
        # joined the branches on its input: refuse it there, saying why (a stand-in entry
        # that only carries the reason; the real leaf stays in its own group).
        for b in branches:
            conv = b.blocked_on
            if conv is not None and id(conv.inputs[0]) in groups:
                groups[id(conv.inputs[0])].append(
                    Branch("blocked", b.leaf, conv.inputs[0], b.coef, conv=conv, reason=b.reason))
        for b in branches:
            pad = producer(b.source) if b.kind == "conv" else None
            if pad is not None and pad.op == "Pad" and id(pad.inputs[0]) in groups:
                reason = (f"{b.reason} while other branches read {pad.inputs[0].name}: "
                          "padding modes differ")
                groups[id(pad.inputs[0])].append(
                    Branch("blocked", b.leaf, pad.inputs[0], b.coef, conv=b.conv, reason=reason))
        interesting = [g for g in groups.values()
                       if len(g) >= 2 and any(b.kind != "identity" for b in g)]
        if not interesting:
            return None
        m = Match(anchor=node, nodes=list(expr.internal), output=node.outputs[0])
        m.roles.update(graph=graph, expr=expr, branches=branches, groups=interesting,
                       channels=channels, rank=rank)
        return m

    def check(self, m: Match) -> list[str]:
        plans, reasons = [], []
        for group in m["groups"]:
            plan, why = _plan_group(group, m["channels"])
            reasons += why
            if plan is not None:
                plans.append(plan)
        if not plans:
            return reasons or ["no two branches can merge"]
        m["plans"] = plans
        merged = {id(b) for p in plans for b in p.members}
        m["leftovers"] = [b for b in m["branches"] if id(b) not in merged]
        m.nodes = list(m["expr"].internal) + [
            n for p in plans for b in p.members if b.kind == "conv" for n in [b.conv, *b.absorbed]
        ]
        m["notes"] = reasons
        return []

    def rewrite(self, graph: gs.Graph, m: Match) -> Applied:
        expr, plans, leftovers = m["expr"], m["plans"], m["leftovers"]
        computed = []
        for i, plan in enumerate(plans):
            w, b, like = _merged_weights(plan)
            if i == 0:
                b = b + expr.bias
            first = next(x for x in plan.members if x.kind == "conv").conv.name
            computed.append((plan, w, b, like, first))
        channels, rank = m["channels"], m["rank"]
        root_name = m.anchor.name or "sum"
        removed = retire(m.nodes)
        added: list[str] = []
        terms: list[gs.Tensor] = []
        single = len(plans) + len(leftovers) == 1
        for plan, w, b, like, name in computed:
            out = m.output if single else new_variable(graph, f"{name}.merged", like.dtype)
            conv = replace_with_conv(graph, name, plan.source, out, w,  # cast already
                                     kernels.cast_like(b, like), plan.attrs)
            added.append(conv.name)
            terms.append(out)
        for b in leftovers:
            if np.all(b.coef == 1.0):
                terms.append(b.leaf)
                continue
            dtype = b.leaf.dtype if b.leaf.dtype is not None else computed[0][3].dtype
            scale = new_constant(graph, f"{b.leaf.name}.scale",
                                 b.coef.reshape((1, channels) + (1,) * (rank - 2)).astype(dtype))
            out = new_variable(graph, f"{b.leaf.name}.scaled", dtype)
            added.append(add_node(graph, "Mul", f"{b.leaf.name}.scale", [b.leaf, scale],
                                  [out]).name)
            terms.append(out)
        acc = terms[0]
        for k, t in enumerate(terms[1:], start=1):
            out = m.output if k == len(terms) - 1 else new_variable(graph, f"{m.output.name}.sum")
            added.append(add_node(graph, "Add", f"{root_name}.{k}", [acc, t],
                                  [out]).name)
            acc = out
        merged = "; ".join(", ".join(b.label for b in p.members) for p, *_ in computed)
        why = f"merged {merged}"
        if m["notes"]:
            why += f" (kept apart: {'; '.join(m['notes'])})"
        return Applied(self.id, removed, added, why)
