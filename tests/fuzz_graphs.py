"""Random multi-branch blocks for the property test (tests/test_fuzz.py, issue 12).

A model is described by small frozen dataclasses - `Spec` (input channels, blocks, weight
seed, opset) -> `Block` (branches summed by Adds, stride, optional Relu) -> `Branch` (a conv,
an identity or an AveragePool, then BatchNormalization / per-channel Mul in some order) - and
built with onnx.helper by `build`. The hypothesis strategy `specs()` draws them; a shrunk
failure prints as a `Spec(...)` literal that a regression test can paste.

    x [N, C, H, W]
    x ─┬─ [crop / zero pad] ─ Conv(k, pads, stride, dilation, group) ─ [BN] [Mul] ─┐
       ├─ [BN] [Mul]  (identity, BN-only, scale branch; stride 1) ─────────────────┼─ Add ─ [Relu]
       └─ AveragePool(3, stride, pads 1, count_include_pad 1) ─ [BN] [Mul] ────────┘

N, H and W are symbolic. Every branch of a block gives the same output size for every input
size: per spatial axis the block draws `D` (output size `floor((H + D - 1)/s) + 1`), and a
conv branch with kernel `k`, dilation `d` spreads the net padding `D + d*(k-1)` over its
begin and end borders (centred, or shifted: a crop where a border goes negative), partly as
its own pads, partly as a zero Pad in front, with crops (Slice, or Pad with negative amounts)
before or after that Pad. Shifted and dilated branches make alignments that onnxrep must
refuse (offset not a whole dilation step, a crop nothing compensates, crop-then-pad on one
border) next to ones it merges; mixed dilations and groups make partial merges. Models whose
branch sizes would differ at some input size are not generated: they do not run there.
`sizes` checks every intermediate size at the test shapes `SHAPES` (none empty), and the
strategy keeps only specs valid at all of them.

Weights come from `numpy.random.default_rng(spec.seed)`, drawn in build order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import assume
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

# (N, H, W) at which the property compares the models: batch 1 and >1, H and W of both
# parities and of every residue mod 4 between them (two stride-2 blocks), none of the sizes
# onnxrep's own checks use (verify: 1 and 3, local_check: 8, 9, 12, 13, 16, 17).
SHAPES: tuple[tuple[int, int, int], ...] = ((1, 10, 7), (3, 13, 12), (2, 15, 18))

KERNELS: tuple[tuple[int, int], ...] = ((3, 3), (1, 1), (5, 5), (1, 3), (3, 1))
Borders = tuple[int, int, int, int]  # ONNX pads order: top, left, bottom, right
NONE: Borders = (0, 0, 0, 0)
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Front:
    """What a conv branch reads through: a crop and a zero pad of x, per border."""

    crop: Borders = NONE
    pad: Borders = NONE
    crop_op: str = "slice"  # "slice", or "pad": a Pad with negative amounts
    pad_first: bool = False  # zero pad, then crop (composes) / crop, then pad (may clash)


@dataclass(frozen=True)
class Branch:
    kind: str  # "conv", "identity" (x itself: with post ops, a BN-only or scale branch), "pool"
    kernel: tuple[int, int] = (1, 1)
    pads: Borders = NONE
    dilation: int = 1
    group: int = 1
    bias: bool = True
    front: Front | None = None
    post: tuple[str, ...] = ()  # "bn", "mul", applied in this order


@dataclass(frozen=True)
class Block:
    branches: tuple[Branch, ...]
    out_channels: int
    stride: int = 1
    relu: bool = False
    balanced: bool = False  # Add tree (a+b)+(c+d) instead of ((a+b)+c)+d


@dataclass(frozen=True)
class Spec:
    channels: int
    blocks: tuple[Block, ...]
    seed: int = 0
    opset: int = 18


# ---------------------------------------------------------------------------- sizes


def _branch_size(branch: Branch, size: int, axis: int, stride: int) -> int | None:
    """Output size of `branch` along spatial `axis` (0: H, 1: W) for input `size`; None when
    some intermediate tensor would be empty."""
    front = branch.front or Front()
    crop = front.crop[axis] + front.crop[axis + 2]
    pad = front.pad[axis] + front.pad[axis + 2]
    if branch.kind == "pool":
        kernel, dilation, pads = 3, 1, 2
    elif branch.kind == "conv":
        kernel, dilation = branch.kernel[axis], branch.dilation
        pads = branch.pads[axis] + branch.pads[axis + 2]
    else:
        return size if stride == 1 else None
    if front.pad_first:
        size += pad
        if crop and size - crop < 1:
            return None
        size -= crop
    else:
        if crop and size - crop < 1:
            return None
        size += pad - crop
    reach = size + pads - dilation * (kernel - 1)
    if reach < 1:
        return None
    return (reach - 1) // stride + 1


def sizes(spec: Spec, height: int, width: int) -> list[tuple[int, int]] | None:
    """(H, W) after each block at input (height, width); None when the model does not run
    there (an empty tensor, or branches of one block of different sizes)."""
    out = []
    for block in spec.blocks:
        found = {tuple(_branch_size(b, s, axis, block.stride) for axis, s
                       in enumerate((height, width))) for b in block.branches}
        if len(found) != 1:
            return None
        (shape,) = found
        if None in shape:
            return None
        height, width = shape  # type: ignore[misc]
        out.append((height, width))
    return out


# ---------------------------------------------------------------------------- build


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, name: str, value: np.ndarray, dtype: type = np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def bn(self, name: str, x: str, channels: int) -> str:
        rng = self.rng
        params = (rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels) * 0.3,
                  rng.standard_normal(channels) * 0.5, rng.uniform(0.5, 2.0, channels))
        names = [self.const(f"{name}.{p}", v) for p, v
                 in zip(("scale", "bias", "mean", "var"), params, strict=True)]
        eps = float(rng.choice([1e-5, 1e-3]))
        return self.node("BatchNormalization", [x, *names], name, epsilon=eps)

    def mul(self, name: str, x: str, channels: int) -> str:
        v = self.rng.uniform(0.5, 1.5, channels) * self.rng.choice([-1.0, 1.0], channels)
        c = self.const(f"{name}.c", v.reshape(1, channels, 1, 1))
        return self.node("Mul", [x, c], name)

    def front(self, name: str, x: str, front: Front) -> str:
        def pad(tag: str, amounts: Borders) -> str:
            t, left, b, r = amounts
            pads = self.const(f"{name}.{tag}.pads", np.array([0, 0, t, left, 0, 0, b, r]),
                              np.int64)
            inputs = [x, pads]
            if self.rng.random() < 0.5:
                inputs.append(self.const(f"{name}.{tag}.value", np.array(0.0)))
            return self.node("Pad", inputs, f"{name}.{tag}", mode="constant")

        def crop() -> str:
            t, left, b, r = front.crop
            if front.crop_op == "pad":
                return pad("crop", (-t, -left, -b, -r))
            starts = self.const(f"{name}.crop.starts", np.array([t, left]), np.int64)
            ends = self.const(f"{name}.crop.ends", np.array(
                [-b if b else INT64_MAX, -r if r else INT64_MAX]), np.int64)
            axes = self.const(f"{name}.crop.axes", np.array([2, 3]), np.int64)
            steps = self.const(f"{name}.crop.steps", np.array([1, 1]), np.int64)
            return self.node("Slice", [x, starts, ends, axes, steps], f"{name}.crop")

        steps = ["pad", "crop"] if front.pad_first else ["crop", "pad"]
        for step in steps:
            if step == "pad" and front.pad != NONE:
                x = pad("pad", front.pad)
            elif step == "crop" and front.crop != NONE:
                x = crop()
        return x

    def conv(self, name: str, x: str, branch: Branch, cin: int, cout: int, stride: int) -> str:
        kh, kw = branch.kernel
        fan_in = cin // branch.group * kh * kw
        w = self.rng.standard_normal((cout, cin // branch.group, kh, kw)) / math.sqrt(fan_in)
        inputs = [x, self.const(f"{name}.W", w)]
        if branch.bias:
            inputs.append(self.const(f"{name}.b", self.rng.standard_normal(cout) * 0.5))
        attrs: dict[str, object] = {"kernel_shape": [kh, kw]}
        if branch.pads != NONE:
            attrs["pads"] = list(branch.pads)
        if stride != 1:
            attrs["strides"] = [stride, stride]
        if branch.dilation != 1:
            attrs["dilations"] = [branch.dilation, branch.dilation]
        if branch.group != 1:
            attrs["group"] = branch.group
        return self.node("Conv", inputs, name, **attrs)


def build(spec: Spec) -> onnx.ModelProto:
    """The ONNX model of `spec` (checked by the onnx checker), input x, output y."""
    b = _Builder(spec.seed)
    x, cin = "x", spec.channels
    for i, block in enumerate(spec.blocks):
        outs = []
        for j, branch in enumerate(block.branches):
            name = f"b{i}.{j}"
            t = x
            if branch.kind == "conv":
                if branch.front is not None:
                    t = b.front(name, t, branch.front)
                t = b.conv(f"{name}.conv", t, branch, cin, block.out_channels, block.stride)
            elif branch.kind == "pool":
                attrs: dict[str, object] = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                            "count_include_pad": 1}
                if block.stride != 1:
                    attrs["strides"] = [block.stride, block.stride]
                t = b.node("AveragePool", [t], f"{name}.pool", **attrs)
            for k, op in enumerate(branch.post):
                t = (b.bn if op == "bn" else b.mul)(f"{name}.{op}{k}", t, block.out_channels)
            outs.append(t)
        out = "y" if i == len(spec.blocks) - 1 else f"b{i}.out"
        total = _add_tree(b, f"b{i}.add" if block.relu else out, outs, block.balanced)
        if block.relu:
            total = b.node("Relu", [total], out)
        x, cin = total, block.out_channels
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", spec.channels, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                       ["N", spec.blocks[-1].out_channels, None, None])],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _add_tree(b: _Builder, name: str, terms: list[str], balanced: bool) -> str:
    """The sum of `terms` by binary Adds; the last Add writes `name`."""
    counter = iter(range(len(terms)))

    def total(parts: list[str], out: str | None) -> str:
        if len(parts) == 1:
            return parts[0]
        cut = len(parts) // 2 if balanced else len(parts) - 1
        left, right = total(parts[:cut], None), total(parts[cut:], None)
        return b.node("Add", [left, right], out or f"{name}{next(counter)}")

    return total(terms, name)


# ---------------------------------------------------------------------------- strategy

CHANNELS = (2, 3, 4, 6, 1)
POSTS = ((), ("bn",), ("mul",), ("bn", "mul"), ("mul", "bn"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _rarely(draw: st.DrawFn) -> bool:
    """True one time in eight (shrinks to False)."""
    return draw(st.sampled_from((False,) * 7 + (True,)))


@st.composite
def _conv_branch(draw: st.DrawFn, net: tuple[int, int], dilation: int, group: int,
                 groups: list[int]) -> Branch:
    """A conv branch whose net padding per axis is `D + d*(k-1)` for the block's `net` D."""
    kernel = draw(st.sampled_from(KERNELS))
    if _rarely(draw):  # a branch that cannot merge with the others
        if draw(st.booleans()):
            dilation = 3 - dilation
        else:
            group = draw(st.sampled_from(groups))
    begin, end = [0, 0], [0, 0]
    for axis in (0, 1):
        total = net[axis] + dilation * (kernel[axis] - 1)
        shift = draw(st.sampled_from((0, 0, 0, 1, -1, 2, -2)))
        begin[axis] = total // 2 + shift
        end[axis] = total - begin[axis]
    # Realise the (possibly negative) borders: conv pads, a zero Pad in front, crops.
    pads = [max(begin[0], 0), max(begin[1], 0), max(end[0], 0), max(end[1], 0)]
    crop = [max(-begin[0], 0), max(-begin[1], 0), max(-end[0], 0), max(-end[1], 0)]
    zero = [0, 0, 0, 0]
    if draw(st.booleans()):
        for i in range(4):
            moved = draw(st.integers(0, pads[i]))
            pads[i] -= moved
            zero[i] += moved
    if _rarely(draw):
        for i in range(4):
            extra = draw(st.sampled_from((0, 1, 2)))  # crop and re-pad `extra` rows
            crop[i] += extra
            zero[i] += extra
    front = None
    if any(crop) or any(zero):
        front = Front(crop=tuple(crop), pad=tuple(zero),  # type: ignore[arg-type]
                      crop_op=draw(st.sampled_from(("slice", "pad"))),
                      pad_first=draw(st.booleans()))
    return Branch("conv", kernel, tuple(pads), dilation, group,  # type: ignore[arg-type]
                  bias=draw(st.booleans()), front=front, post=draw(st.sampled_from(POSTS)))


@st.composite
def blocks(draw: st.DrawFn, cin: int) -> Block:
    """One block on `cin` channels: 2-4 branches summed."""
    stride = draw(st.sampled_from((1, 2)))
    count = draw(st.integers(2, 4))
    kinds = ("conv", "identity", "pool", "conv") if stride == 1 else ("conv", "pool", "conv")
    chosen = [draw(st.sampled_from(kinds)) for _ in range(count)]
    plain = all(k == "conv" for k in chosen)
    cout = draw(st.sampled_from((cin, 2, 4, 6, 3))) if plain else cin
    net = (0, 0)
    if plain:
        net = (draw(st.sampled_from((0, 0, 0, -1, 1, -2, 2))),
               draw(st.sampled_from((0, 0, 0, -1, 1, -2, 2))))
    groups = _divisors(math.gcd(cin, cout))
    group = draw(st.sampled_from(groups))
    dilation = draw(st.sampled_from((1, 2)))
    if "pool" in chosen and draw(st.booleans()):  # a pool merges with depthwise convs only
        group, dilation = cin, 1
    branches = []
    for kind in chosen:
        if kind == "conv":
            branches.append(draw(_conv_branch(net, dilation, group, groups)))
        else:
            branches.append(Branch(kind, post=draw(st.sampled_from(POSTS))))
    return Block(tuple(branches), cout, stride, relu=draw(st.booleans()),
                 balanced=draw(st.booleans()))


@st.composite
def specs(draw: st.DrawFn, max_blocks: int = 2) -> Spec:
    """A model of 1 to `max_blocks` chained blocks that runs at every shape of `SHAPES`."""
    channels = draw(st.sampled_from(CHANNELS))
    chain, cin = [], channels
    for _ in range(draw(st.sampled_from((1, 1, 2)[: 1 + max_blocks]))):
        block = draw(blocks(cin))
        chain.append(block)
        cin = block.out_channels
    spec = Spec(channels, tuple(chain), seed=draw(st.integers(0, 2**16)),
                opset=draw(st.sampled_from((18, 13, 17))))
    assume(all(sizes(spec, h, w) is not None for _, h, w in SHAPES))
    return spec
