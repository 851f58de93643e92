"""remove-residual: a residual Add disappears into widened convs (RMNet's Reserve-and-Merge).

Opt-in (`onnxrep fuse --remove-residuals`): RM makes the network plain (no Add, no tensor kept
alive across a block) at the price of wider convs, i.e. more FLOPs and parameters.

Before (ResNet basic block; bottleneck: three convs; MobileNetV2: Clip(0, 6) activations, no
activation after the Add):
    x ─┬─ Conv1 ─ Relu ─ Conv2 ─┐
       └─────── [Conv1x1_down] ─┴─ Add ─ y
After:
    x ─ Conv1' ─ Relu ─ Conv2' ─ y

Formula (RULES-SPEC §10), the chain's convs widened so that they also carry x, C channels:
  first conv   W1' = [W1; Dirac] (per group: its own outputs, then copies of its inputs),
               bias 0 on the copies; it keeps its stride, so the copies are x subsampled;
  middle conv  W' = [[W, 0], [0, Dirac]] on [own | carried] (grouped: C/k extra groups of k);
  last conv    Wn' = [Wn | Dirac] (identity shortcut) or [Wn | embed(W_down)] (1x1
               downsample), bias bn (+ b_down);
  Relu         unchanged: the carried copies are x, and x >= 0 is PROVEN (facts.nonnegative);
  Clip(lo, hi) Min(Max(t, lo'), hi') with per-channel bounds: (lo, hi) on the chain's own
               channels, (-inf, +inf) on the carried ones - exact for every x (MobileNetV2).
The Dirac sits at tap pads_begin / dilation of each kernel: output i reads input i*stride.
The rewrite is exact (0/1 weights); onnxrep verifies it numerically.

Preconditions (each refusal names the node or tensor):
  1. the Add's operands are a chain of Convs (with Relu / Clip between them) starting at a
     tensor x, and exactly x (identity) or a Conv1x1(x) (group 1, pads 0) - nothing else;
  2. the chain holds at least two Convs, starts with a Conv reading x, ends with a Conv;
  3. every Conv has float constant weights and 'same' padding (pads_begin + pads_end ==
     dilation * (kernel - 1), pads_begin a multiple of dilation), so that the carried copy
     lines up for every input size; strides multiply to the shortcut's stride (1 for x);
  4. groups: the last Conv has group 1; a grouped middle Conv needs I/g == O/g =: k, k
     dividing C, and its input laid out [own | carried] (not after a grouped first Conv);
  5. channels agree: x has the first Conv's input channels, the shortcut gives the last
     Conv's output channels;
  6. every tensor inside (Conv and activation outputs, the shortcut conv's output) is read
     only by the next node and is not a graph output;
  7. a Relu in the chain needs x >= 0, proven by facts.nonnegative; otherwise the rule
     refuses with the proof's first unknown link. (A Clip without upper bound and min <= 0
     stays a Clip when x >= 0 is proven; otherwise it becomes a per-channel Max.)
Not handled: a single Conv plus shortcut (merge-parallel's case); other activations (PReLU,
SiLU, ...; the PReLU-slope-1 trick for a plain-ReLU chain on an unproven x is not used); a
BatchNormalization or pooling inside the chain (pre-activation blocks); a shortcut other than
x or one 1x1 Conv (ResNet-D's AvgPool + Conv); a grouped last Conv.

rm-merge-pointwise (also opt-in): after RM, MobileNetV2's projection 1x1 of block k feeds the
expansion 1x1 of block k+1 directly (no activation between): the two become one 1x1 conv
(RULES-SPEC §6, narrow case), W = W2 @ W1, b = W2 @ b1 + b2, strides multiplied. Both group
1, pads 0, 1x1 kernels, constant weights; the first conv's output read by the second alone.
It fires on every such pair once RM is asked for, and may cost MACs (C_in*C_out against
M*(C_in + C_out)): the plain MobileNetV1-like chain is what RM asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.facts import (
    clip_bounds,
    conv_params,
    nonnegative,
    not_nonnegative_reason,
    sole_consumer,
)
from onnxrep.rule import Applied, Match
from onnxrep.surgery import (
    add_node,
    constant_value,
    conv_attrs,
    conv_weight_bias,
    new_constant,
    new_variable,
    producer,
    replace_with_conv,
    retire,
)

_ACTIVATIONS = ("Relu", "Clip")
_MAX_WALK = 24  # nodes walked back from the Add's main operand
_MAX_SHORTCUT = 2  # nodes walked back from the other operand


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The non-constant inputs of a node."""
    return [t for t in node.inputs if t is not None and t.name and constant_value(t) is None]


def _walk_back(tensor: gs.Tensor, limit: int) -> tuple[list[gs.Tensor], list[gs.Node]]:
    """Tensors [tensor, t1, t2, ...] and nodes [producer(tensor), ...] back through nodes
    with exactly one non-constant input, at most `limit` nodes."""
    tensors, nodes = [tensor], []
    while len(nodes) < limit:
        node = producer(tensors[-1])
        if node is None:
            break
        data = _data_inputs(node)
        if len(data) != 1:
            break
        nodes.append(node)
        tensors.append(data[0])
    return tensors, nodes


def _same_padding(node: gs.Node, weight: np.ndarray) -> tuple[tuple[int, ...], str | None]:
    """The Dirac tap of a Conv, and the reason its padding does not keep x aligned."""
    attrs = conv_attrs(node)
    kernel = weight.shape[2:]
    spatial = len(kernel)
    begins, ends = attrs["pads"][:spatial], attrs["pads"][spatial:]
    taps = []
    for axis, (k, d, b, e) in enumerate(zip(kernel, attrs["dilations"], begins, ends,
                                            strict=True)):
        if b + e != d * (k - 1) or b % d:
            return (), (f"{node.name} pads {attrs['pads']} with kernel {list(kernel)} and "
                        f"dilations {attrs['dilations']} are not 'same' padding on spatial "
                        f"axis {axis}: the carried copy of the block input would not line up")
        taps.append(b // d)
    return tuple(taps), None


@dataclass
class _Step:
    """One node of the widened chain, computed in check() and built in rewrite()."""

    name: str  # of the node it replaces (retire() clears names)
    op: str  # "Conv" | "Relu" | "Clip" (kept as is) | "MinMax"
    bounds: list[gs.Tensor] = field(default_factory=list)  # a kept Clip's bound inputs
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    low: np.ndarray | None = None
    high: np.ndarray | None = None


class RemoveResidual:
    id = "remove-residual"
    summary = "residual Add into widened convs with Dirac channels (RMNet; opt-in)"
    anchors = ("Add",)
    opt_in = True

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
            return None
        best = None
        for main, short in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            found = self._bind(main, short)
            if found is not None and (best is None or len(found[2]) < len(best[2])):
                best = found
        if best is None:
            return None
        x, chain, shortcut = best
        if sum(1 for n in chain if n.op == "Conv") < 2:
            return None  # one conv plus a shortcut is merge-parallel's case
        m = Match(anchor=node, nodes=[*chain, *shortcut, node], output=node.outputs[0])
        m["graph"], m["add"], m["x"], m["chain"], m["shortcut"] = graph, node, x, chain, shortcut
        return m

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

    def check(self, m: Match) -> list[str]:
        graph, add, x = m["graph"], m["add"], m["x"]
        chain: list[gs.Node] = m["chain"]
        reasons = self._check_shortcut(m)
        # 2. shape of the chain
        if chain[0].op in _ACTIVATIONS:
            reasons.append(f"{chain[0].name} ({chain[0].op}) reads the block input '{x.name}': "
                           "the chain must start with a Conv")
        if chain[-1].op in _ACTIVATIONS:
            reasons.append(f"{chain[-1].name} ({chain[-1].op}) feeds the residual {add.name}: "
                           "the chain must end with a Conv")
        for node in chain:
            if node.op not in ("Conv", *_ACTIVATIONS):
                reasons.append(f"{node.name} ({node.op}) between the block input '{x.name}' and "
                               f"{add.name} cannot carry identity channels (only Conv, Relu, "
                               "Clip)")
        # 6. nothing inside is read from outside
        for node, reader in zip(chain, [*chain[1:], add], strict=True):
            reason = sole_consumer(graph, node.outputs[0], reader)
            if reason:
                reasons.append(reason)
        # 7. a Relu passes the carried copies of x unchanged only if x >= 0
        relu = next((n for n in chain if n.op == "Relu"), None)
        if relu is not None and nonnegative(graph, x) is None:
            reasons.append(f"block input {not_nonnegative_reason(graph, x)}: {relu.name} (Relu) "
                           "would not pass its identity channels unchanged")
        if reasons:
            return reasons
        for node in chain:
            if node.op == "Conv":
                reason = conv_params(node)
                if reason:
                    reasons.append(reason)
        if reasons:
            return reasons
        return self._plan(m)

    def _check_shortcut(self, m: Match) -> list[str]:
        graph, add, x = m["graph"], m["add"], m["x"]
        shortcut: list[gs.Node] = m["shortcut"]
        if not shortcut:
            m["down"] = None
            return []
        short = add.inputs[1] if add.inputs[0] is m["chain"][-1].outputs[0] else add.inputs[0]
        path = " -> ".join(f"{n.op}({n.name})" for n in shortcut)
        if len(shortcut) != 1 or shortcut[0].op != "Conv":
            return [f"residual operand '{short.name}' of {add.name} is not the block input "
                    f"'{x.name}' nor a 1x1 Conv of it: {x.name} -> {path}"]
        down = shortcut[0]
        m["down"] = down
        reasons = [r for r in (conv_params(down), sole_consumer(graph, short, add)) if r]
        if reasons:
            return reasons
        weight, _ = conv_weight_bias(down)
        attrs = conv_attrs(down)
        if any(k != 1 for k in weight.shape[2:]) or any(attrs["pads"]) or attrs["group"] != 1:
            reasons.append(f"shortcut {down.name} is not a 1x1 Conv with pads 0 and group 1 "
                           f"(kernel {list(weight.shape[2:])}, pads {attrs['pads']}, group "
                           f"{attrs['group']}): residual operand '{short.name}' is not the "
                           f"block input '{x.name}' nor a 1x1 Conv of it")
        return reasons

    def _plan(self, m: Match) -> list[str]:
        """Preconditions 3-5 and 7 while computing the widened chain (stored as m['steps'])."""
        graph, x, down = m["graph"], m["x"], m["down"]
        chain: list[gs.Node] = m["chain"]
        convs = [n for n in chain if n.op == "Conv"]
        reasons: list[str] = []
        first_w, _ = conv_weight_bias(convs[0])
        group0 = conv_attrs(convs[0])["group"]
        channels = first_w.shape[1] * group0
        x_channels = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
        if isinstance(x_channels, int) and x_channels != channels:
            reasons.append(f"block input '{x.name}' has {x_channels} channels, {convs[0].name} "
                           f"reads {channels}")
        stride = np.ones(first_w.ndim - 2, dtype=np.int64)
        taps: dict[int, tuple[int, ...]] = {}
        for conv in convs:
            weight, _ = conv_weight_bias(conv)
            tap, reason = _same_padding(conv, weight)
            if reason:
                reasons.append(reason)
            taps[id(conv)] = tap
            stride = stride * np.asarray(conv_attrs(conv)["strides"], dtype=np.int64)
        last_w, _ = conv_weight_bias(convs[-1])
        out_channels = last_w.shape[0]
        if conv_attrs(convs[-1])["group"] != 1:
            reasons.append(f"{convs[-1].name} (last conv of the chain) has group "
                           f"{conv_attrs(convs[-1])['group']}, only group 1 is widened")
        if down is None:
            if np.any(stride != 1):
                reasons.append(f"the chain from '{x.name}' has strides {stride.tolist()} but the "
                               "shortcut is the identity")
            if out_channels != channels:
                reasons.append(f"{convs[-1].name} outputs {out_channels} channels, the identity "
                               f"shortcut '{x.name}' has {channels}")
        else:
            down_w, _ = conv_weight_bias(down)
            down_stride = np.asarray(conv_attrs(down)["strides"], dtype=np.int64)
            if down_stride.shape != stride.shape or np.any(down_stride != stride):
                reasons.append(f"shortcut {down.name} has strides {down_stride.tolist()}, the "
                               f"chain {stride.tolist()}")
            if down_w.shape[:2] != (out_channels, channels):
                reasons.append(f"shortcut {down.name} maps {down_w.shape[1]} -> {down_w.shape[0]} "
                               f"channels, the chain {channels} -> {out_channels}")
        if reasons:
            return reasons
        # 7. activations: Relu needs x >= 0; Clip becomes per-channel bounds
        needs_proof = [n for n in chain if n.op == "Relu"]
        proof = nonnegative(graph, x)
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
                    reason = self._grouped_middle(node, weight, attrs["group"], main, carry)
                    if reason:
                        return [reason]
                    w, b, attrs["group"], main, carry = kernels.widen_middle_conv(
                        weight, bias, attrs["group"], main, carry, tap)
                width = w.shape[0]
                steps.append(_Step(node.name, "Conv", weight=kernels.cast_like(w, weight),
                                   bias=kernels.cast_like(b, weight), attrs=attrs))
            elif node.op == "Relu":
                steps.append(_Step(node.name, "Relu"))
            else:  # Clip
                bounds = clip_bounds(node)
                if isinstance(bounds, str):
                    return [bounds]
                low, high = bounds
                if high == np.inf and low <= 0 and proof is not None:
                    # a Relu in disguise: the carried x >= 0 passes it unchanged
                    steps.append(_Step(node.name, "Clip", attrs=dict(node.attrs),
                                       bounds=list(node.inputs[1:])))
                    needs_proof.append(node)
                    continue
                lo, hi = kernels.carried_bounds(width, main, low, high)
                shape = (1, width) + (1,) * (first_w.ndim - 2)
                steps.append(_Step(node.name, "MinMax", low=lo.reshape(shape).astype(dtype),
                                   high=hi.reshape(shape).astype(dtype)))
        m["steps"], m["channels"] = steps, channels
        m["proof"] = str(proof) if proof is not None and needs_proof else None
        return []

    @staticmethod
    def _grouped_middle(node: gs.Node, weight: np.ndarray, group: int, main: np.ndarray,
                        carry: np.ndarray) -> str | None:
        if group == 1:
            return None
        per_in, per_out = weight.shape[1], weight.shape[0] // group
        if per_in != per_out:
            return (f"{node.name} has group {group} with {per_in} inputs and {per_out} outputs "
                    "per group: the carried channels need square groups")
        if len(carry) % per_in:
            return (f"{node.name}: {len(carry)} carried channels do not fill groups of "
                    f"{per_in}")
        own = len(main)
        if not (np.array_equal(main, np.arange(own))
                and np.array_equal(carry, own + np.arange(len(carry)))):
            return (f"{node.name} is grouped but its input interleaves carried channels (after "
                    "a grouped first conv)")
        return None

    def rewrite(self, graph: gs.Graph, m: Match) -> Applied:
        steps: list[_Step] = m["steps"]
        x, add, out, down = m["x"], m["add"], m.output, m["down"]
        kind = "identity" if down is None else f"1x1 downsample {down.name}"
        add_name = add.name
        convs = sum(1 for s in steps if s.op == "Conv")
        removed = retire(m.nodes)
        added: list[str] = []
        current = x
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            target = out if last else new_variable(graph, f"{step.name}_rm", x.dtype)
            if step.op == "Conv":
                node = replace_with_conv(graph, step.name, current, target, step.weight,
                                         step.bias, step.attrs)
            elif step.op in ("Relu", "Clip"):
                node = add_node(graph, step.op, step.name, [current, *step.bounds], [target],
                                step.attrs)
            elif np.all(step.high == np.inf):  # Clip(lo) without an upper bound
                lo = new_constant(graph, f"{step.name}.low", step.low)
                node = add_node(graph, "Max", step.name, [current, lo], [target])
            elif np.all(step.low == -np.inf):  # Clip(max=hi) without a lower bound
                hi = new_constant(graph, f"{step.name}.high", step.high)
                node = add_node(graph, "Min", step.name, [current, hi], [target])
            else:
                mid = new_variable(graph, f"{step.name}_max", x.dtype)
                lo = new_constant(graph, f"{step.name}.low", step.low)
                hi = new_constant(graph, f"{step.name}.high", step.high)
                added.append(add_node(graph, "Max", f"{step.name}_max", [current, lo],
                                      [mid]).name)
                node = add_node(graph, "Min", step.name, [mid, hi], [target])
            added.append(node.name)
            current = target
        why = (f"{kind} residual {add_name} of '{x.name}' ({m['channels']} channels) carried "
               f"through {convs} widened convs")
        if m["proof"]:
            why += f"; {m['proof']}"
        return Applied(self.id, removed, added, why)


class MergePointwisePair:
    id = "rm-merge-pointwise"
    summary = "Conv1x1 -> Conv1x1 with nothing between into one Conv1x1 (after RM; opt-in)"
    anchors = ("Conv",)
    opt_in = True

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None:
        first = producer(node.inputs[0])
        if first is None or first.op != "Conv":
            return None
        for conv in (first, node):
            weight = constant_value(conv.inputs[1])
            if weight is None or any(k != 1 for k in weight.shape[2:]):
                return None
        m = Match(anchor=node, nodes=[first, node], output=node.outputs[0])
        m["graph"], m["first"], m["second"] = graph, first, node
        return m

    def check(self, m: Match) -> list[str]:
        first, second = m["first"], m["second"]
        reasons = [r for r in (conv_params(first), conv_params(second),
                               sole_consumer(m["graph"], first.outputs[0], second)) if r]
        if reasons:
            return reasons
        for conv in (first, second):
            attrs = conv_attrs(conv)
            if attrs["group"] != 1 or any(attrs["pads"]):
                reasons.append(f"{conv.name} has group {attrs['group']} and pads "
                               f"{attrs['pads']}: only group 1, pads 0 1x1 convs compose here")
        return reasons

    def rewrite(self, graph: gs.Graph, m: Match) -> Applied:
        first, second = m["first"], m["second"]
        w1, b1 = conv_weight_bias(first)
        w2, b2 = conv_weight_bias(second)
        strides = [a * b for a, b in zip(conv_attrs(first)["strides"],
                                         conv_attrs(second)["strides"], strict=True)]
        x = first.inputs[0]
        w, b = kernels.compose_pointwise(w1, b1, w2, b2)
        removed = retire(m.nodes)
        attrs = {"strides": strides, "pads": [0] * (2 * len(strides)),
                 "dilations": [1] * len(strides), "group": 1}
        node = replace_with_conv(graph, removed[1], x, m.output, kernels.cast_like(w, w2),
                                 kernels.cast_like(b, w2), attrs)
        return Applied(self.id, removed, [node.name],
                       f"{removed[0]} (1x1) composed into {removed[1]} (1x1)")
