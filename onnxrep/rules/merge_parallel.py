"""merge-parallel: branches that read one tensor and are summed become one Conv.

Before (RepVGG):                          After:
    x ─┬─ Conv3x3 ─ BN ─┐                      x ─ Conv3x3(W, b) ─ y
       ├─ Conv1x1 ─ BN ─┼─ Add ─ Add ─ y
       └──────────── BN ┘
(after fold-bn the BNs of the conv branches are already inside their convs)

The Add tree is read as a linear expression over its leaves (onnxrep.linear_sum): Add/Sub
of two tensors, Add/Sub/Mul/Div by a per-channel constant and inference BatchNormalization
expand, so y = sum_j coef_j * leaf_j + bias with per-channel vectors coef_j, bias. This
covers RepVGG, ACNet, MobileOne, QARepVGG, RepViT, RepGhost, RepOptimizer's CSLA
(`s*conv3 + t*conv1 + u*x`) and FastViT's RepMixer (`x + ls*(mixer(x) - norm(x))`).

A leaf is a *conv branch* when it is the output of a Conv with constant weights (or of an
AveragePool, read as a depthwise conv: facts.pool_as_depthwise) whose every reader is inside
the tree; a Conv's input may pass through constant zero Pads and spatial crops (Slice, or Pad
with negative amounts) that compose into its padding exactly (onnxrep.borders). Any other
leaf is an *identity branch* on itself. Branches are grouped by the tensor x they read; in a
group the convs with the same strides, dilations, group, channels and dtype, and the identity
(only with stride 1 and Cin == Cout), become one Conv (docs/RULES.md, merge-parallel):

    W = sum_j embed(coef_j * W_j),  b = sum_j coef_j * b_j + bias
    identity: K[o, o mod (C/g), centre] = 1   (kernels.identity_kernel)
    embedding offsets and merged pads from kernels.align_kernels.

Leaves that do not merge stay, summed with the merged Conv by a chain of Adds (scaled by a
Mul when their coefficient is not 1); the last node writes the sum's own output tensor. The
merged Conv keeps the name of the first Conv it stands for.

Preconditions (each refusal names the branch):
  1. every tensor inside the tree (partial sums, branch outputs, absorbed pads and crops) is
     read only by the tree and is not a graph output - otherwise it is a leaf of its own
     (or the peeling stops there), never absorbed;
  2. conv weights and biases are finite float constants (auto_pad NOTSET/VALID) and the
     weight fits the group (facts.conv_group); an AveragePool branch is a depthwise conv
     only with ceil_mode 0 and no uncounted padding;
  3. merged convs have equal strides, dilations, group, output channels and dtype, and read
     the same input tensor (a branch behind a Pad(reflect/edge) of x does not merge with
     branches reading x: padding modes differ);
  4. a crop followed by a zero pad on the same border (Slice, then Pad or the Conv's own
     pads) is not one padding: that branch does not join the branches reading x;
  5. an identity branch needs stride 1 and input channels == output channels;
  6. padding aligns: the merged kernel's padding covers every branch and every branch gives
     the same output size for every input size (kernels.align_kernels);
  7. size bound: branches offset from each other (behind opposite pad shifts) widen the
     merged kernel beyond the box B of the branch kernels (per axis the largest extent), up
     to a kernel far larger than any branch; its number of taps may be at most
     max(4 * taps(B), taps(B) + 8) (_MAX_GROWTH, _MAX_EXTRA_TAPS). A centred merge (every
     family above) has exactly the box B; measuring against B rather than the largest
     kernel keeps 1xk + kx1 (a kxk box) merging as before;
  8. scaling constants broadcast per channel only ([1,C,1,1], [C,1,1], scalar).
At least one merged branch is a Conv (AveragePools alone stay pools). A nonlinear op inside
a branch makes it read a different tensor: it does not merge.
Not handled: Pad(reflect) absorbed into a merge with an identity branch; Convs of different
groups (would need per-group bookkeeping); an AveragePool behind a Pad or crop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.borders import peel_input
from onnxrep.facts import conv_group, conv_params, pool_as_depthwise
from onnxrep.linear_sum import Expression, channels_and_rank, expand_sum
from onnxrep.query import (
    attr_str,
    constant_value,
    conv_attrs,
    conv_weight_bias,
    is_graph_output,
    producer,
)
from onnxrep.rule import Input, Match, NewNode, NewValue, NewWeight, Refusal, Replacement, conv_node

# Size bound (precondition 7): merged area <= max(_MAX_GROWTH * box, box + _MAX_EXTRA_TAPS).
_MAX_GROWTH = 4
_MAX_EXTRA_TAPS = 8


@dataclass
class Branch:
    """One leaf of the sum, as a conv on `source` (identity = 1x1 kernel of ones).

    kind "blocked" is a stand-in in the group of the tensor a branch would have read: it only
    carries the reason why that branch does not join it (the real leaf stays in its own group).
    """

    kind: str  # "conv" | "identity" | "blocked"
    leaf: gs.Tensor
    source: gs.Tensor
    coef: np.ndarray
    node: gs.Node | None = None  # the Conv (or AveragePool) of a conv branch
    absorbed: list[gs.Node] = field(default_factory=list)  # pads / crops, nearest node first
    pads: tuple[list[int], list[int]] = ([], [])
    weight: np.ndarray | None = None  # conv branches: the kernel (an AveragePool's is 1/k^2)
    bias: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""  # numpy dtype string of the kernel the branch computes in
    reason: str = ""
    # the tensor whose group should hear `reason` (why this branch does not read it)
    would_read: gs.Tensor | None = None

    @property
    def label(self) -> str:
        return self.node.name if self.node is not None else f"identity({self.leaf.name})"


@dataclass
class ParallelMatch(Match):
    expr: Expression
    branches: list[Branch]  # one per leaf
    groups: list[list[Branch]]  # branches by the tensor they read, with blocked stand-ins
    channels: int
    rank: int


@dataclass
class GroupMerge:
    """Branches of one group that become one Conv on `source`."""

    source: gs.Tensor
    members: list[Branch]
    kernel: tuple[int, ...]
    offsets: list[tuple[int, ...]]
    attrs: dict[str, Any]  # strides, dilations, group, pads of the merged Conv


@dataclass
class ParallelPlan:
    match: ParallelMatch
    merges: list[GroupMerge]
    leftovers: list[Branch]  # leaves summed with the merged Convs as they are
    notes: list[str]  # why the other branches were kept apart


def _dtype_str(tensor: gs.Tensor, default: str) -> str:
    try:
        return np.dtype(tensor.dtype).str if tensor.dtype is not None else default
    except TypeError:
        return default


def _inside(graph: gs.Graph, tensor: gs.Tensor, internal: set[int]) -> bool:
    return not is_graph_output(graph, tensor) and all(id(r) in internal for r in tensor.outputs)


def _pool_branch(graph: gs.Graph, tensor: gs.Tensor, coef: np.ndarray,
                 internal: set[int]) -> Branch | None:
    pool = producer(tensor)
    if len(pool.outputs) != 1 or not _inside(graph, tensor, internal):
        return None
    spec = pool_as_depthwise(pool, len(coef))
    if isinstance(spec, Refusal):
        return None  # the pool's output stays a leaf of its own
    weight, bias, attrs = spec
    spatial = len(attrs["pads"]) // 2
    x = pool.inputs[0]
    return Branch("conv", tensor, x, coef, node=pool,
                  pads=(attrs["pads"][:spatial], attrs["pads"][spatial:]), weight=weight,
                  bias=bias, attrs=attrs, dtype=_dtype_str(x, np.dtype(np.float32).str))


def _classify(graph: gs.Graph, tensor: gs.Tensor, coef: np.ndarray,
              internal: set[int]) -> Branch:
    conv = producer(tensor)
    if conv is not None and conv.op == "AveragePool":
        pool = _pool_branch(graph, tensor, coef, internal)
        if pool is not None:
            return pool
    if conv is None or conv.op != "Conv" or len(conv.outputs) != 1:
        return Branch("identity", tensor, tensor, coef)
    refusal = conv_params(conv)
    if refusal is None:
        group = conv_group(conv)
        refusal = group if isinstance(group, Refusal) else None
    reason = refusal.reason if refusal else ""
    if not reason and is_graph_output(graph, tensor):
        reason = f"{tensor.name} (output of {conv.name}) is a graph output"
    if not reason and any(id(r) not in internal for r in tensor.outputs):
        reason = f"{tensor.name} (output of {conv.name}) has {len(tensor.outputs)} consumers"
    if reason:
        # The conv stays; its output is an ordinary leaf (it may be the x of other branches).
        # The group on its input hears why it did not join.
        return Branch("identity", tensor, tensor, coef, reason=f"{conv.name}: {reason}",
                      would_read=conv.inputs[0])
    attrs = conv_attrs(conv)
    peeled = peel_input(graph, conv, attrs["pads"])
    spatial = len(peeled.pads) // 2
    weight, bias = conv_weight_bias(conv)
    branch = Branch("conv", tensor, peeled.source, coef, node=conv, absorbed=peeled.absorbed,
                    pads=(peeled.pads[:spatial], peeled.pads[spatial:]), weight=weight,
                    bias=kernels.bias_or_zeros(bias, weight.shape[0]), attrs=attrs,
                    dtype=weight.dtype.str)
    pad = producer(peeled.source)
    if peeled.clash:
        branch.reason = f"{conv.name}: {peeled.clash}"
        branch.would_read = peeled.clash_source
    elif pad is not None and pad.op == "Pad":
        branch.reason = (f"{conv.name}: reads {pad.name} (Pad mode="
                         f"{attr_str(pad, 'mode', 'constant')}) while other branches read "
                         f"{pad.inputs[0].name}: padding modes differ")
        branch.would_read = pad.inputs[0]
    return branch


def _size_bound(members: list[Branch], shapes: list[tuple[int, ...]],
                kernel: tuple[int, ...]) -> str:
    """Precondition 7: why the merged kernel is too large, or ''."""
    box = tuple(max(s[axis] for s in shapes) for axis in range(len(kernel)))
    area, box_area = int(np.prod(kernel)), int(np.prod(box))
    limit = max(_MAX_GROWTH * box_area, box_area + _MAX_EXTRA_TAPS)
    if area <= limit:
        return ""
    labels = ", ".join(b.label for b in members)
    return (f"merged kernel {list(kernel)} of {labels} has {area} taps, more than {limit} "
            f"(the branches' own kernels fit in {list(box)}: they are offset from each other)")


def _plan_group(branches: list[Branch], channels: int) -> tuple[GroupMerge | None, list[str]]:
    """Which branches of one group (same input) merge, and why the others do not."""
    reasons = [b.reason for b in branches if b.kind == "blocked"]
    convs = [b for b in branches if b.kind == "conv"]
    for b in list(convs):
        out_c = b.weight.shape[0]
        if out_c != channels:
            reasons.append(f"{b.label} outputs {out_c} channels, the sum has {channels}")
            convs.remove(b)
    if not convs:
        return None, reasons

    def key(b: Branch) -> tuple:
        a, w = b.attrs, b.weight
        return (tuple(a["strides"]), tuple(a["dilations"]), a["group"], w.shape[0],
                w.shape[1] * a["group"], b.dtype)

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
    if not any(b.node is not None and b.node.op == "Conv" for b in members):
        return None, reasons + ["no Conv among the branches (an AveragePool stays a pool)"]
    spatial = len(strides)
    shapes = [tuple(b.weight.shape[2:]) if b.kind == "conv" else (1,) * spatial
              for b in members]
    pads = [b.pads if b.kind == "conv" else ([0] * spatial, [0] * spatial) for b in members]
    aligned = kernels.align_kernels(shapes, pads, dilations)
    if isinstance(aligned, str):
        labels = ", ".join(b.label for b in members)
        return None, reasons + [f"padding of {labels} cannot align: {aligned}"]
    kernel, merged_pads, offsets = aligned
    too_large = _size_bound(members, shapes, kernel)
    if too_large:
        return None, reasons + [too_large]
    attrs = {"strides": list(strides), "dilations": list(dilations), "group": group,
             "pads": merged_pads}
    return GroupMerge(members[0].source, members, kernel, offsets, attrs), reasons


def _merged_weights(merge: GroupMerge) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum of embedded, scaled kernels, cast to the dtype of the first Conv's weight, and the
    float64 bias; returns (W, b, dtype-giving weight)."""
    like = next(b.weight for b in merge.members if b.node is not None and b.node.op == "Conv")
    channels, group, spatial = like.shape[0], merge.attrs["group"], len(merge.kernel)
    total_b = np.zeros(channels)
    for b in merge.members:
        total_b = total_b + kernels.scale_bias(b.bias if b.kind == "conv" else None, b.coef,
                                               np.zeros(channels))

    def rows_of(rows: slice) -> np.ndarray:
        total = np.zeros((len(range(channels)[rows]), like.shape[1]) + tuple(merge.kernel))
        for b, offset in zip(merge.members, merge.offsets, strict=True):
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

    def match(self, graph: gs.Graph, node: gs.Node) -> ParallelMatch | None:
        if len(node.inputs) != 2 or any(constant_value(t) is not None for t in node.inputs):
            return None  # Add(t, const) is fold-affine's
        if _feeds_larger_sum(graph, node):
            return None  # the Add above expands this one: merge the whole tree once
        shape = channels_and_rank(node)
        if shape is None:
            return None
        channels, rank = shape
        expr = expand_sum(graph, node, channels, rank)
        if len(expr.terms) < 2:
            return None
        internal = {id(n) for n in expr.internal}
        branches = [_classify(graph, t.leaf, t.coef, internal) for t in expr.terms]
        groups: dict[int, list[Branch]] = {}
        for b in branches:
            groups.setdefault(id(b.source), []).append(b)
        # A branch that would have joined the branches on another tensor (a conv that cannot
        # be absorbed, a conv behind a Pad(reflect) or a crop-then-pad of x) is refused
        # there, saying why: identity leaves first, then conv branches (the report's order).
        for b in sorted(branches, key=lambda b: b.kind != "identity"):
            if b.would_read is not None and id(b.would_read) in groups:
                node_of = b.node if b.node is not None else producer(b.leaf)
                groups[id(b.would_read)].append(
                    Branch("blocked", b.leaf, b.would_read, b.coef, node=node_of,
                           reason=b.reason))
        interesting = [g for g in groups.values()
                       if len(g) >= 2 and any(b.kind != "identity" for b in g)]
        if not interesting:
            return None
        nodes = list(expr.internal) + [n for b in branches if b.kind == "conv"
                                       for n in (b.node, *b.absorbed)]
        return ParallelMatch(node, nodes, expr, branches, interesting, channels, rank)

    def check(self, graph: gs.Graph, m: ParallelMatch) -> ParallelPlan | Refusal:
        merges, reasons = [], []
        for group in m.groups:
            merge, why = _plan_group(group, m.channels)
            reasons += why
            if merge is not None:
                merges.append(merge)
        if not merges:
            return Refusal("; ".join(reasons) or "no two branches can merge")
        merged = {id(b) for g in merges for b in g.members}
        leftovers = [b for b in m.branches if id(b) not in merged]
        return ParallelPlan(m, merges, leftovers, reasons)

    def rewrite(self, graph: gs.Graph, plan: ParallelPlan) -> Replacement:
        m = plan.match
        output = m.anchor.outputs[0]
        single = len(plan.merges) + len(plan.leftovers) == 1
        new: list[NewNode] = []
        removes = list(m.expr.internal)
        terms: list[Input] = []
        like = None
        for i, merge in enumerate(plan.merges):
            w, b, like_i = _merged_weights(merge)
            like = like if like is not None else like_i
            if i == 0:
                b = b + m.expr.bias
            name = next(x for x in merge.members if x.kind == "conv").node.name
            out = output if single else NewValue(f"{name}.merged", like_i.dtype)
            new.append(conv_node(name, merge.source, out, w, kernels.cast_like(b, like_i),
                                 merge.attrs))
            removes += [n for x in merge.members if x.kind == "conv"
                        for n in (x.node, *x.absorbed)]
            terms.append(out)
        for b in plan.leftovers:
            if np.all(b.coef == 1.0):
                terms.append(b.leaf)
                continue
            dtype = b.leaf.dtype if b.leaf.dtype is not None else like.dtype
            scale = b.coef.reshape((1, m.channels) + (1,) * (m.rank - 2)).astype(dtype)
            out = NewValue(f"{b.leaf.name}.scaled", dtype)
            new.append(NewNode("Mul", f"{b.leaf.name}.scale",
                               [b.leaf, NewWeight(f"{b.leaf.name}.scale", scale)], [out]))
            terms.append(out)
        root_name = m.anchor.name or "sum"
        acc = terms[0]
        for k, t in enumerate(terms[1:], start=1):
            out = output if k == len(terms) - 1 else NewValue(f"{output.name}.sum")
            new.append(NewNode("Add", f"{root_name}.{k}", [acc, t], [out]))
            acc = out
        merged = "; ".join(", ".join(b.label for b in g.members) for g in plan.merges)
        why = f"merged {merged}"
        if plan.notes:
            why += f" (kept apart: {'; '.join(plan.notes)})"
        return Replacement(removes, new, why)
