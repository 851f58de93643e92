"""Zero pads and crops in front of a Conv, read as the Conv's own (possibly negative) pads.

    x ─ Slice(crop) ─ Pad(0) ─ Conv(pads p) ─ y      ==     x ─ Conv(pads p') ─ y

A constant-mode Pad with value 0 adds zero rows to spatial borders; a Slice with step 1 (or a
Pad with negative amounts) removes rows: a crop of c is a pad of -c. Each is one step
[begins..., ends...] on the spatial axes, and the Conv's zero padding is the last step.

When a chain of steps is one pad (docs/RULES.md, merge-parallel, "input peeling"), per border:
  - a pad after a pad, or a crop of rows that an earlier step padded, adds up exactly
    (pad 2 then crop 1 is pad 1: only zeros are removed);
  - a crop of data rows followed by a pad on the SAME border is not a pad: "crop 1, pad 1"
    puts a zero row where "pad 0" keeps x's first row, and a conv window reads that row
    (on a begin border at every size; on an end border at some sizes, depending on stride
    and parity). Such a chain is refused, whatever the sizes (`compose` says where).
Crops and pads on different borders never interact.

`peel_input` follows a Conv's input up through such nodes (each read by the next alone) and
absorbs the longest chain whose composition is exact. Pure reading, no graph changes.

Accepted: Pad with pads as an input (opset >= 11) or as an attribute (opset 2-10, with the
`value` attribute), batch/channel pads 0, value 0; Slice with constant starts/ends, optional
constant axes, steps 1, batch/channel axes whole. A Slice whose crop depends on the input
size (a positive end, a negative start) needs a static dim. Not handled: Pad with an `axes`
input, opset-1 Pad (`paddings`), opset < 10 Slice (starts/ends as attributes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.facts import sole_consumer
from onnxrep.query import attr_ints, attr_str, constant_value, optional_input, producer

_WHOLE = 2**30  # a Slice end at or past this means "to the end" (torch writes INT64_MAX)


def zero_pad_amounts(pad: gs.Node, spatial: int) -> list[int] | None:
    """Spatial pads [begins..., ends...] of a constant-mode Pad with value 0 (negative ones
    crop), or None when it is not one (other mode or value, batch/channel pads, axes)."""
    if pad.op != "Pad" or attr_str(pad, "mode", "constant") != "constant":
        return None
    if optional_input(pad, 3) is not None:
        return None  # explicit axes: not absorbed
    amounts_input = optional_input(pad, 1)
    if amounts_input is not None:
        amounts = constant_value(amounts_input)
        if amounts is None:
            return None
        value_input = optional_input(pad, 2)
        if value_input is not None:
            value = constant_value(value_input)
            if value is None or np.any(value != 0):
                return None
    elif len(pad.inputs) == 1 and "pads" in pad.attrs:  # opset 2-10: attributes
        amounts = np.asarray(attr_ints(pad, "pads", []))
        if float(pad.attrs.get("value", 0.0)) != 0.0:
            return None
    else:
        return None
    flat = [int(a) for a in amounts.reshape(-1)]
    rank = len(flat) // 2
    if len(flat) % 2 or rank != spatial + 2 or any(flat[i] or flat[rank + i] for i in (0, 1)):
        return None
    return flat[2:rank] + flat[rank + 2:]


def crop_amounts(node: gs.Node, spatial: int) -> list[int] | None:
    """A Slice (step 1) that crops spatial borders, as negative pads [begins..., ends...];
    None when it is not one or its crop is not known for every input size."""
    if node.op != "Slice" or len(node.inputs) < 3:
        return None
    starts, ends = constant_value(node.inputs[1]), constant_value(node.inputs[2])
    axes_input, steps_input = optional_input(node, 3), optional_input(node, 4)
    axes = constant_value(axes_input) if axes_input is not None else None
    steps = constant_value(steps_input) if steps_input is not None else None
    if (starts is None or ends is None or (axes_input is not None and axes is None)
            or (steps_input is not None and steps is None)):
        return None
    starts, ends = starts.reshape(-1).tolist(), ends.reshape(-1).tolist()
    if steps is not None and np.any(steps != 1):
        return None
    rank = spatial + 2
    axes = list(range(len(starts))) if axes is None else axes.reshape(-1).tolist()
    if not len(axes) == len(starts) == len(ends):
        return None
    shape = node.inputs[0].shape
    begins, finals = [0] * spatial, [0] * spatial
    for axis, start, end in zip(axes, starts, ends, strict=True):
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank:
            return None
        dim = shape[axis] if shape is not None and len(shape) == rank else None
        dim = dim if isinstance(dim, int) else None
        if axis < 2:
            if start != 0 or not (end >= _WHOLE or (dim is not None and end >= dim)):
                return None
            continue
        if start < 0:
            if dim is None:
                return None
            start += dim
        if end >= _WHOLE:
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


@dataclass(frozen=True)
class Clash:
    """Step `pad` zero-pads a border whose data rows step `crop` cut (steps in data order)."""

    crop: int
    pad: int
    axis: int  # spatial axis
    end: bool  # False: the begin border (top / left), True: the end border

    @property
    def border(self) -> str:
        return f"{'end' if self.end else 'begin'} border of spatial axis {self.axis}"


def compose(steps: Sequence[Sequence[int]]) -> list[int] | Clash:
    """The one pad [begins..., ends...] equal to applying `steps` (each [begins..., ends...],
    negative = crop) in order, for every input size; a Clash when a border is cropped into
    its data and then padded again (module docstring)."""
    if not steps:
        return []
    net = []
    for border in range(len(steps[0])):
        zeros, cut, last_crop = 0, 0, -1
        for i, step in enumerate(steps):
            amount = step[border]
            if amount > 0:
                if cut:
                    spatial = len(step) // 2
                    return Clash(last_crop, i, border % spatial, border >= spatial)
                zeros += amount
            elif amount < 0:
                taken = min(-amount, zeros)
                zeros -= taken
                if -amount > taken:
                    cut += -amount - taken
                    last_crop = i
        net.append(zeros - cut)
    return net


@dataclass
class Peeled:
    """A Conv's input after peeling: it reads `source` with `pads` once `absorbed` (nearest
    to the Conv first) are gone. `clash` says why peeling stopped short of a node it could
    otherwise have read through, and `clash_source` is the tensor the longer chain reads."""

    source: gs.Tensor
    absorbed: list[gs.Node]
    pads: list[int]
    clash: str = ""
    clash_source: gs.Tensor | None = None


def _step_amounts(node: gs.Node, spatial: int) -> list[int] | None:
    if node.op == "Pad":
        return zero_pad_amounts(node, spatial)
    if node.op == "Slice":
        return crop_amounts(node, spatial)
    return None


def _empties(source: gs.Tensor, net: list[int]) -> bool:
    """Whether the chain's data cut (a negative net pad) could exceed the source on some input
    size the model admits: a crop of c is a pad of -c only while the input has at least c
    rows - on a smaller one a Slice clamps to an empty tensor (not to -k rows), which the Conv
    may pad back and a broadcasting Add accept, where the merged conv computes something else.
    Every size is at least 1, so a cut of 1 is always safe; a larger one needs a static size
    at least as large."""
    spatial = len(net) // 2
    shape = source.shape
    for axis in range(spatial):
        cut = max(0, -net[axis]) + max(0, -net[axis + spatial])
        if cut <= 1:
            continue
        dim = shape[axis + 2] if shape is not None and len(shape) == spatial + 2 else None
        if not isinstance(dim, int) or dim < cut:
            return True
    return False


def peel_input(graph: gs.Graph, conv: gs.Node, pads: list[int]) -> Peeled:
    """Follow `conv`'s input up through zero Pads and spatial crops, each read by the next
    node alone, and absorb the longest chain that is one pad together with the Conv's own
    `pads` [begins..., ends...] (module docstring)."""
    spatial = len(pads) // 2
    chain: list[tuple[gs.Node, list[int]]] = []  # nearest to the conv first
    x, reader = conv.inputs[0], conv
    while True:
        node = producer(x)
        if node is None or sole_consumer(graph, x, reader) is not None:
            break
        amounts = _step_amounts(node, spatial)
        if amounts is None:
            break
        chain.append((node, amounts))
        x, reader = node.inputs[0], node
    full = compose([amounts for _, amounts in reversed(chain)] + [list(pads)])
    for n in range(len(chain), -1, -1):  # n = 0 (the Conv's own pads alone) always composes
        net = compose([amounts for _, amounts in reversed(chain[:n])] + [list(pads)])
        if isinstance(net, Clash):
            continue
        source = chain[n - 1][0].inputs[0] if n else conv.inputs[0]
        if n and _empties(source, net):
            continue
        peeled = Peeled(source, [node for node, _ in chain[:n]], net)
        if isinstance(full, Clash):
            names = [node.name for node, _ in reversed(chain)] + [f"{conv.name} (own pads)"]
            peeled.clash = (f"{names[full.crop]} crops data at the {full.border} and "
                            f"{names[full.pad]} zero-pads it again: a crop then a pad is not "
                            "one padding")
            peeled.clash_source = x
        return peeled
    raise AssertionError("unreachable: the Conv's own pads compose")
