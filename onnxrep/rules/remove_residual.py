"""remove-residual: a residual Add disappears into widened convs (RMNet's Reserve-and-Merge).

Opt-in (`onnxrep fuse --remove-residuals`): RM makes the network plain (no Add, no tensor kept
alive across a block) at the price of wider convs, i.e. more FLOPs and parameters.

Before (ResNet basic block; bottleneck: three convs; MobileNetV2: Clip(0, 6) activations, no
activation after the Add):
    x ─┬─ Conv1 ─ Relu ─ Conv2 ─┐
       └─────── [Conv1x1_down] ─┴─ Add ─ y
After:
    x ─ Conv1' ─ Relu ─ Conv2' ─ y

Formula (docs/RULES.md, remove-residual), the chain's convs widened so that they also carry x,
C channels:
  first conv   W1' = [W1; Dirac] (per group: its own outputs, then copies of its inputs),
               bias 0 on the copies; it keeps its stride, so the copies are x subsampled;
  middle conv  W' = [[W, 0], [0, Dirac]] on [own | carried] (grouped: C/k extra groups of k);
  last conv    Wn' = [Wn | Dirac] (identity shortcut) or [Wn | embed(W_down)] (1x1
               downsample), bias bn (+ b_down);
  Relu         unchanged: the carried copies are x, and x >= 0 is PROVEN (onnxrep.nonnegative);
  Clip(lo, hi) Min(Max(t, lo'), hi') with per-channel bounds: (lo, hi) on the chain's own
               channels, (-inf, +inf) on the carried ones - exact for every x (MobileNetV2);
               ONNX defines Clip as Min(hi, Max(t, lo)), so this holds for lo > hi too.
The Dirac sits at tap pads_begin / dilation of each kernel: output i reads input i*stride.
The rewrite is exact (0/1 weights); onnxrep verifies it numerically.

Preconditions (each refusal names the node or tensor):
  1. the Add's operands are a chain of Convs (with Relu / Clip between them) starting at a
     tensor x, and exactly x (identity) or a Conv1x1(x) (group 1, pads 0) - nothing else;
  2. the chain holds at least two Convs, starts with a Conv reading x, ends with a Conv, and
     each of its nodes reads the previous tensor as its data input (input 0);
  3. every Conv has float constant weights and 'same' padding (pads_begin + pads_end ==
     dilation * (kernel - 1), pads_begin a multiple of dilation; auto_pad NOTSET, or VALID
     without pads), so that the carried copy lines up for every input size; strides multiply
     to the shortcut's stride (1 for x);
  4. groups: the last Conv has group 1; a grouped middle Conv needs I/g == O/g =: k, k
     dividing C, and its input laid out [own | carried] (not after a grouped first Conv);
  5. channels agree: x has the first Conv's input channels, the shortcut gives the last
     Conv's output channels;
  6. every tensor inside (Conv and activation outputs, the shortcut conv's output) is read
     only by the next node and is not a graph output;
  7. a Relu in the chain needs x >= 0, proven by onnxrep.nonnegative; otherwise the rule
     refuses with the proof's first unknown link. This is asked right after (1): no other
     change to the block would lift it. (A Clip without upper bound and min <= 0 stays a Clip
     when x >= 0 is proven; otherwise it becomes a per-channel Max.) Clip bounds are constant
     scalars, not NaN.
The proof looks at the whole graph upstream of x, further than the match: refusals are not
cached (`cache_refusals = False`), so a block is tried again once an earlier rewrite changed
what x is computed from.
Not handled: a single Conv plus shortcut (merge-parallel's case); other activations (PReLU,
SiLU, ...; the PReLU-slope-1 trick for a plain-ReLU chain on an unproven x is not used); a
BatchNormalization or pooling inside the chain (pre-activation blocks); a shortcut other than
x or one 1x1 Conv (ResNet-D's AvgPool + Conv); a grouped last Conv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import conv_group, conv_params, sole_consumer
from onnxrep.nonnegative import Proof, clip_bounds, nonnegative
from onnxrep.query import (
    attr_str,
    constant_value,
    conv_attrs,
    conv_weight_bias,
    data_inputs,
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
)

_ACTIVATIONS = ("Relu", "Clip")
_MAX_WALK = 24  # nodes walked back from the Add's main operand
_MAX_SHORTCUT = 2  # nodes walked back from the other operand


def _variable_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The present, non-constant inputs of a node."""
    return [t for t in data_inputs(node) if constant_value(t) is None]


def _walk_back(tensor: gs.Tensor, limit: int) -> tuple[list[gs.Tensor], list[gs.Node]]:
    """Tensors [tensor, t1, t2, ...] and nodes [producer(tensor), ...] back through nodes
    with exactly one non-constant input, at most `limit` nodes."""
    tensors, nodes = [tensor], []
    while len(nodes) < limit:
        node = producer(tensors[-1])
        if node is None:
            break
        data = _variable_inputs(node)
        if len(data) != 1:
            break
        nodes.append(node)
        tensors.append(data[0])
    return tensors, nodes


def _same_padding(node: gs.Node, weight: np.ndarray) -> tuple[int, ...] | Refusal:
    """The Dirac tap of a Conv, or the reason its padding does not keep x aligned."""
    attrs = conv_attrs(node)
    if attr_str(node, "auto_pad", "NOTSET") == "VALID" and any(attrs["pads"]):
        return Refusal(f"{node.name} has auto_pad=VALID and pads {attrs['pads']}")
    kernel = weight.shape[2:]
    spatial = len(kernel)
    begins, ends = attrs["pads"][:spatial], attrs["pads"][spatial:]
    taps = []
    for axis, (k, d, b, e) in enumerate(zip(kernel, attrs["dilations"], begins, ends,
                                            strict=True)):
        if b + e != d * (k - 1) or b % d:
            return Refusal(f"{node.name} pads {attrs['pads']} with kernel {list(kernel)} and "
                           f"dilations {attrs['dilations']} are not 'same' padding on spatial "
                           f"axis {axis}: the carried copy of the block input would not line "
                           "up")
        taps.append(b // d)
    return tuple(taps)


@dataclass
class ResidualMatch(Match):
    add: gs.Node
    x: gs.Tensor  # the block input
    chain: list[gs.Node]  # x -> ... -> the Add's main operand, in order
    shortcut: list[gs.Node]  # x -> ... -> the Add's other operand, in order ([] = identity)
    short: gs.Tensor  # the Add's other operand


@dataclass
class _Step:
    """One node of the widened chain, computed in check() and built in rewrite()."""

    name: str  # of the node it replaces
    op: str  # "Conv" | "Relu" | "Clip" (kept as is) | "MinMax"
    bounds: list[gs.Tensor] = field(default_factory=list)  # a kept Clip's bound inputs
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    low: np.ndarray | None = None
    high: np.ndarray | None = None


@dataclass
class ResidualPlan:
    match: ResidualMatch
    down: gs.Node | None  # the 1x1 shortcut conv, None for the identity
    steps: list[_Step]
    channels: int  # of x, carried through the chain
    proof: Proof | None  # x >= 0, when a Relu or a kept Clip relies on it


class RemoveResidual:
    id = "remove-residual"
    summary = "residual Add into widened convs with Dirac channels (RMNet; opt-in)"
    anchors = ("Add",)
    opt_in = True
    cache_refusals = False  # the proof of x >= 0 reads far upstream of the match

    def match(self, graph: gs.Graph, node: gs.Node) -> ResidualMatch | None:
        if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
            return None
        best = None
        for main, short in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            found = self._bind(main, short)
            if found is not None and (best is None or len(found[2]) < len(best[2])):
                best = (*found, short)
        if best is None:
            return None
        x, chain, shortcut, short = best
        if sum(1 for n in chain if n.op == "Conv") < 2:
            return None  # one conv plus a shortcut is merge-parallel's case
        return ResidualMatch(node, [*chain, *shortcut, node], node, x, chain, shortcut, short)

    @staticmethod
    def _bind(main: gs.Tensor, short: gs.Tensor
              ) -> tuple[gs.Tensor, list[gs.Node], list[gs.Node]] | None:
        """(block input x, chain nodes x -> main in order, shortcut nodes x -> short in order):
        the shortest walk back from `short` that meets the walk back from `main`."""
        tensors, nodes = _walk_back(main, _MAX_WALK)
        position = {id(t): i for i, t in enumerate(tensors)}
        short_tensors, short_nodes = _walk_back(short, _MAX_SHORTCUT)
        for depth, t in enumerate(short_tensors):
            i = position.get(id(t))
            if i is not None and i > 0:
                return t, nodes[:i][::-1], short_nodes[:depth][::-1]
        return None

    def check(self, graph: gs.Graph, m: ResidualMatch) -> ResidualPlan | Refusal:
        down = self._check_shortcut(graph, m)
        if isinstance(down, Refusal):
            return down
        # 7. a Relu passes the carried copies of x unchanged only if x >= 0
        relu = next((n for n in m.chain if n.op == "Relu"), None)
        proof = None
        if relu is not None:
            proof = nonnegative(graph, m.x)
            if isinstance(proof, Refusal):
                return Refusal(f"block input {proof.reason}: {relu.name} (Relu) would not pass "
                               "its identity channels unchanged")
        refusal = self._check_chain(graph, m)
        if refusal:
            return refusal
        return self._plan(graph, m, down, proof)

    @staticmethod
    def _check_chain(graph: gs.Graph, m: ResidualMatch) -> Refusal | None:
        """Preconditions 2 and 6, and the constant parameters of 3."""
        chain, x, add = m.chain, m.x, m.add
        if chain[0].op in _ACTIVATIONS:
            return Refusal(f"{chain[0].name} ({chain[0].op}) reads the block input '{x.name}': "
                           "the chain must start with a Conv")
        if chain[-1].op in _ACTIVATIONS:
            return Refusal(f"{chain[-1].name} ({chain[-1].op}) feeds the residual {add.name}: "
                           "the chain must end with a Conv")
        for node in chain:
            if node.op not in ("Conv", *_ACTIVATIONS):
                return Refusal(f"{node.name} ({node.op}) between the block input '{x.name}' "
                               f"and {add.name} cannot carry identity channels (only Conv, "
                               "Relu, Clip)")
        for node, tensor in zip(chain, [x, *(n.outputs[0] for n in chain[:-1])], strict=True):
            if node.inputs[0] is not tensor:
                return Refusal(f"{node.name} ({node.op}) does not read '{tensor.name}' as its "
                               "data input")
        for node, reader in zip(chain, [*chain[1:], add], strict=True):
            refusal = sole_consumer(graph, node.outputs[0], reader)
            if refusal:
                return refusal
        for conv in (n for n in chain if n.op == "Conv"):
            group = conv_params(conv) or conv_group(conv)
            if isinstance(group, Refusal):
                return group
        return None

    @staticmethod
    def _check_shortcut(graph: gs.Graph, m: ResidualMatch) -> gs.Node | None | Refusal:
        """The 1x1 shortcut conv (None for the identity), or why the shortcut is neither."""
        if not m.shortcut:
            return None
        path = " -> ".join(f"{n.op}({n.name})" for n in m.shortcut)
        if len(m.shortcut) != 1 or m.shortcut[0].op != "Conv":
            return Refusal(f"residual operand '{m.short.name}' of {m.add.name} is not the block "
                           f"input '{m.x.name}' nor a 1x1 Conv of it: {m.x.name} -> {path}")
        down = m.shortcut[0]
        refusal = Refusal.first(conv_params(down), sole_consumer(graph, m.short, m.add))
        group = refusal or conv_group(down)
        if isinstance(group, Refusal):
            return group
        weight, _ = conv_weight_bias(down)
        attrs = conv_attrs(down)
        if any(k != 1 for k in weight.shape[2:]) or any(attrs["pads"]) or attrs["group"] != 1 \
                or down.inputs[0] is not m.x:
            return Refusal(f"shortcut {down.name} is not a 1x1 Conv with pads 0 and group 1 "
                           f"(kernel {list(weight.shape[2:])}, pads {attrs['pads']}, group "
                           f"{attrs['group']}): residual operand '{m.short.name}' is not the "
                           f"block input '{m.x.name}' nor a 1x1 Conv of it")
        return down

    def _plan(self, graph: gs.Graph, m: ResidualMatch, down: gs.Node | None,
              proof: Proof | Refusal | None) -> ResidualPlan | Refusal:
        """Preconditions 3-5 and 7 while computing the widened chain."""
        x, chain = m.x, m.chain
        convs = [n for n in chain if n.op == "Conv"]
        first_w, _ = conv_weight_bias(convs[0])
        group0 = conv_attrs(convs[0])["group"]
        channels = first_w.shape[1] * group0
        x_channels = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
        if isinstance(x_channels, int) and x_channels != channels:
            return Refusal(f"block input '{x.name}' has {x_channels} channels, {convs[0].name} "
                           f"reads {channels}")
        stride = np.ones(first_w.ndim - 2, dtype=np.int64)
        taps: dict[int, tuple[int, ...]] = {}
        for conv in convs:
            weight, _ = conv_weight_bias(conv)
            tap = _same_padding(conv, weight)
            if isinstance(tap, Refusal):
                return tap
            taps[id(conv)] = tap
            stride = stride * np.asarray(conv_attrs(conv)["strides"], dtype=np.int64)
        last_w, _ = conv_weight_bias(convs[-1])
        out_channels = last_w.shape[0]
        if conv_attrs(convs[-1])["group"] != 1:
            return Refusal(f"{convs[-1].name} (last conv of the chain) has group "
                           f"{conv_attrs(convs[-1])['group']}, only group 1 is widened")
        if down is None:
            if np.any(stride != 1):
                return Refusal(f"the chain from '{x.name}' has strides {stride.tolist()} but "
                               "the shortcut is the identity")
            if out_channels != channels:
                return Refusal(f"{convs[-1].name} outputs {out_channels} channels, the "
                               f"identity shortcut '{x.name}' has {channels}")
        else:
            down_w, _ = conv_weight_bias(down)
            down_stride = np.asarray(conv_attrs(down)["strides"], dtype=np.int64)
            if down_stride.shape != stride.shape or np.any(down_stride != stride):
                return Refusal(f"shortcut {down.name} has strides {down_stride.tolist()}, the "
                               f"chain {stride.tolist()}")
            if down_w.shape[:2] != (out_channels, channels):
                return Refusal(f"shortcut {down.name} maps {down_w.shape[1]} -> "
                               f"{down_w.shape[0]} channels, the chain {channels} -> "
                               f"{out_channels}")
        # 7. activations: Relu needs x >= 0 (proven in check); Clip becomes per-channel bounds
        relies_on_proof = any(n.op == "Relu" for n in chain)
        steps: list[_Step] = []
        main = carry = None
        width = 0
        dtype = first_w.dtype
        for node in chain:
            if node.op == "Conv":
                weight, bias = conv_weight_bias(node)
                attrs = conv_attrs(node)
                tap = taps[id(node)]
                if node is convs[0]:
                    w, b, main, carry = kernels.widen_first_conv(weight, bias, attrs["group"], tap)
                elif node is convs[-1]:
                    down_w, down_b = conv_weight_bias(down) if down is not None else (None, None)
                    w, b = kernels.widen_last_conv(weight, bias, main, carry, tap, down_w, down_b)
                else:
                    refusal = self._grouped_middle(node, weight, attrs["group"], main, carry)
                    if refusal:
                        return refusal
                    w, b, attrs["group"], main, carry = kernels.widen_middle_conv(
                        weight, bias, attrs["group"], main, carry, tap)
                width = w.shape[0]
                steps.append(_Step(node.name, "Conv", weight=kernels.cast_like(w, weight),
                                   bias=kernels.cast_like(b, weight), attrs=attrs))
            elif node.op == "Relu":
                steps.append(_Step(node.name, "Relu"))
            else:  # Clip
                bounds = clip_bounds(node)
                if isinstance(bounds, Refusal):
                    return bounds
                low, high = bounds
                if np.isnan(low) or np.isnan(high):
                    return Refusal(f"{node.name} has a nan bound")
                if high == np.inf and low <= 0:
                    if proof is None:
                        proof = nonnegative(graph, x)
                    if isinstance(proof, Proof):
                        # a Relu in disguise: the carried x >= 0 passes it unchanged
                        steps.append(_Step(node.name, "Clip", attrs=dict(node.attrs),
                                           bounds=list(node.inputs[1:])))
                        relies_on_proof = True
                        continue
                lo, hi = kernels.carried_bounds(width, main, low, high)
                shape = (1, width) + (1,) * (first_w.ndim - 2)
                steps.append(_Step(node.name, "MinMax", low=lo.reshape(shape).astype(dtype),
                                   high=hi.reshape(shape).astype(dtype)))
        kept_proof = proof if relies_on_proof and isinstance(proof, Proof) else None
        return ResidualPlan(m, down, steps, channels, kept_proof)

    @staticmethod
    def _grouped_middle(node: gs.Node, weight: np.ndarray, group: int, main: np.ndarray,
                        carry: np.ndarray) -> Refusal | None:
        if group == 1:
            return None
        per_in, per_out = weight.shape[1], weight.shape[0] // group
        if per_in != per_out:
            return Refusal(f"{node.name} has group {group} with {per_in} inputs and {per_out} "
                           "outputs per group: the carried channels need square groups")
        if len(carry) % per_in:
            return Refusal(f"{node.name}: {len(carry)} carried channels do not fill groups of "
                           f"{per_in}")
        own = len(main)
        if not (np.array_equal(main, np.arange(own))
                and np.array_equal(carry, own + np.arange(len(carry)))):
            return Refusal(f"{node.name} is grouped but its input interleaves carried channels "
                           "(after a grouped first conv)")
        return None

    def rewrite(self, graph: gs.Graph, plan: ResidualPlan) -> Replacement:
        m = plan.match
        out = m.add.outputs[0]
        nodes: list[NewNode] = []
        current: Input = m.x
        for i, step in enumerate(plan.steps):
            target = out if i == len(plan.steps) - 1 else NewValue(f"{step.name}_rm", m.x.dtype)
            if step.op == "Conv":
                nodes.append(conv_node(step.name, current, target, step.weight, step.bias,
                                       step.attrs))
            elif step.op in ("Relu", "Clip"):
                nodes.append(NewNode(step.op, step.name, [current, *step.bounds], [target],
                                     step.attrs))
            elif np.all(step.high == np.inf):  # Clip(lo) without an upper bound
                nodes.append(NewNode("Max", step.name,
                                     [current, NewWeight(f"{step.name}.low", step.low)],
                                     [target]))
            elif np.all(step.low == -np.inf):  # Clip(max=hi) without a lower bound
                nodes.append(NewNode("Min", step.name,
                                     [current, NewWeight(f"{step.name}.high", step.high)],
                                     [target]))
            else:
                mid = NewValue(f"{step.name}_max", m.x.dtype)
                nodes.append(NewNode("Max", f"{step.name}_max",
                                     [current, NewWeight(f"{step.name}.low", step.low)], [mid]))
                nodes.append(NewNode("Min", step.name,
                                     [mid, NewWeight(f"{step.name}.high", step.high)],
                                     [target]))
            current = target
        kind = "identity" if plan.down is None else f"1x1 downsample {plan.down.name}"
        convs = sum(1 for s in plan.steps if s.op == "Conv")
        why = (f"{kind} residual {m.add.name} of '{m.x.name}' ({plan.channels} channels) "
               f"carried through {convs} widened convs")
        if plan.proof is not None:
            why += f"; {plan.proof}"
        # exact for x >= 0 only when a Relu (or a kept Clip) relies on the proof
        assumed = [m.x] if plan.proof is not None else []
        return Replacement([*m.chain, *m.shortcut, m.add], nodes, why,
                           nonnegative_inputs=assumed)
