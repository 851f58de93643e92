"""borders: zero pads and crops in front of a Conv as its own pads - the amounts read from a
Pad or Slice, when a chain of them composes into one pad, and how far peeling goes."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxrep.borders import Clash, compose, crop_amounts, peel_input, zero_pad_amounts

BIG = int(np.iinfo(np.int64).max)


_ids = itertools.count()


def i64(*values: int) -> gs.Constant:
    return gs.Constant(f"c{next(_ids)}", np.array(values, np.int64))


def node(op: str, inputs: list, shape: list | None = None, **attrs: object) -> gs.Node:
    k = next(_ids)
    return gs.Node(op, f"{op.lower()}{k}", attrs, inputs,
                   [gs.Variable(f"{op.lower()}{k}_out", np.float32, shape)])


def x_of(shape: list | None = None) -> gs.Variable:
    return gs.Variable("x", np.float32, shape or ["N", 4, "H", "W"])


# --- compose (pure arithmetic) ---------------------------------------------------------------

def test_pads_add_up_and_crops_of_zeros_are_exact() -> None:
    assert compose([[1, 0, 1, 0], [2, 1, 0, 0]]) == [3, 1, 1, 0]
    assert compose([[2, 0, 0, 0], [-1, 0, 0, 0], [1, 0, 0, 0]]) == [2, 0, 0, 0]  # 2 - 1 + 1
    assert compose([[1, 0, 0, 0], [-3, 0, 0, 0]]) == [-2, 0, 0, 0]  # crop past the zeros


def test_crop_then_pad_on_other_borders_composes() -> None:
    assert compose([[-1, 0, 0, -1], [0, 1, 1, 0], [0, 0, 0, 0]]) == [-1, 1, 1, -1]


@pytest.mark.parametrize(("steps", "clash"), [
    ([[-1, 0, 0, 0], [1, 0, 0, 0]], Clash(0, 1, 0, False)),
    ([[0, 0, 0, -2], [0, 0, 0, 0], [0, 0, 0, 1]], Clash(0, 2, 1, True)),
    ([[1, 0, 0, 0], [-2, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], Clash(1, 3, 0, False)),
])
def test_crop_of_data_then_pad_on_one_border_clashes(steps: list, clash: Clash) -> None:
    assert compose(steps) == clash


# --- amounts of one node ---------------------------------------------------------------------

def test_zero_pad_amounts_from_input_and_from_opset10_attributes() -> None:
    x = x_of()
    assert zero_pad_amounts(node("Pad", [x, i64(0, 0, 1, 2, 0, 0, 3, -1)]), 2) == [1, 2, 3, -1]
    zero = gs.Constant("zero", np.array(0.0, np.float32))
    assert zero_pad_amounts(node("Pad", [x, i64(0, 0, 1, 1, 0, 0, 1, 1), zero]), 2) == [1] * 4
    old = node("Pad", [x], pads=[0, 0, 1, 0, 0, 0, 0, 2], mode=b"constant", value=0.0)
    assert zero_pad_amounts(old, 2) == [1, 0, 0, 2]
    assert zero_pad_amounts(node("Pad", [x], pads=[0, 0, 1, 0, 0, 0, 0, 2]), 2) == [1, 0, 0, 2]


@pytest.mark.parametrize("case", ["reflect", "value", "attr_value", "channel", "axes",
                                  "rank", "variable", "paddings"])
def test_zero_pad_amounts_refuses(case: str) -> None:
    x = x_of()
    pads = i64(0, 0, 1, 1, 0, 0, 1, 1)
    one = gs.Constant("one", np.array(1.0, np.float32))
    pad = {
        "reflect": node("Pad", [x, pads], mode="reflect"),
        "value": node("Pad", [x, pads, one]),
        "attr_value": node("Pad", [x], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=1.0),
        "channel": node("Pad", [x, i64(0, 1, 1, 1, 0, 0, 1, 1)]),
        "axes": node("Pad", [x, i64(1, 1, 1, 1), gs.Variable.empty(), i64(2, 3)]),
        "rank": node("Pad", [x, i64(1, 1, 1, 1)]),
        "variable": node("Pad", [x, gs.Variable("p", np.int64, [8])]),
        "paddings": node("Pad", [x], paddings=[0, 0, 1, 1, 0, 0, 1, 1]),  # opset 1
    }[case]
    assert zero_pad_amounts(pad, 2) is None


def test_crop_amounts() -> None:
    x = x_of(["N", 4, 9, "W"])
    # ACNet's CropLayer: x[:, :, 1:-1, :]
    assert crop_amounts(node("Slice", [x, i64(1), i64(-1), i64(2)]), 2) == [-1, 0, -1, 0]
    # to the end, on W (axis -1)
    assert crop_amounts(node("Slice", [x, i64(2), i64(BIG), i64(-1)]), 2) == [0, -2, 0, 0]
    # a positive end and a negative start need the static dim (H = 9 here)
    assert crop_amounts(node("Slice", [x, i64(-8), i64(7), i64(2)]), 2) == [-1, 0, -2, 0]
    # whole batch and channel axes are fine, steps of 1 too
    assert crop_amounts(node("Slice", [x, i64(0, 0, 1), i64(BIG, 4, BIG), i64(0, 1, 2),
                                       i64(1, 1, 1)]), 2) == [-1, 0, 0, 0]


@pytest.mark.parametrize("case", ["dynamic_dim", "step", "steps_variable", "axes_variable",
                                  "channel", "lengths"])
def test_crop_amounts_refuses(case: str) -> None:
    x = x_of(["N", 4, 9, "W"])
    slice_ = {
        "dynamic_dim": node("Slice", [x, i64(0), i64(5), i64(3)]),  # W unknown
        "step": node("Slice", [x, i64(1), i64(-1), i64(2), i64(2)]),
        "steps_variable": node("Slice", [x, i64(1), i64(-1), i64(2),
                                         gs.Variable("s", np.int64, [1])]),
        "axes_variable": node("Slice", [x, i64(1), i64(-1), gs.Variable("a", np.int64, [1])]),
        "channel": node("Slice", [x, i64(1), i64(3), i64(1)]),
        "lengths": node("Slice", [x, i64(1, 1), i64(-1), i64(2)]),
    }[case]
    assert crop_amounts(slice_, 2) is None


# --- peel_input ------------------------------------------------------------------------------

def conv_on(x: gs.Tensor) -> gs.Node:
    w = gs.Constant(f"w{next(_ids)}", np.ones((4, 4, 3, 3), np.float32))
    return node("Conv", [x, w])


def test_peels_the_longest_exact_chain() -> None:
    """x -> Pad(2 top) -> Slice(crop 1 top) -> Conv(pad 1): crop then conv pad alone would
    clash, but the crop only removes zeros the Pad added: pad 2 in all."""
    x = x_of()
    pad = node("Pad", [x, i64(0, 0, 2, 0, 0, 0, 0, 0)])
    crop = node("Slice", [pad.outputs[0], i64(1), i64(BIG), i64(2)])
    conv = conv_on(crop.outputs[0])
    graph = gs.Graph(nodes=[pad, crop, conv], inputs=[x], outputs=conv.outputs)
    peeled = peel_input(graph, conv, [1, 1, 1, 1])
    assert peeled.source is x and peeled.absorbed == [crop, pad]
    assert peeled.pads == [2, 1, 1, 1] and not peeled.clash


def test_stops_before_a_crop_that_a_later_pad_would_refill() -> None:
    x = x_of()
    crop = node("Slice", [x, i64(1), i64(BIG), i64(2)])
    pad = node("Pad", [crop.outputs[0], i64(0, 0, 1, 0, 0, 0, 0, 0)])
    conv = conv_on(pad.outputs[0])
    graph = gs.Graph(nodes=[crop, pad, conv], inputs=[x], outputs=conv.outputs)
    peeled = peel_input(graph, conv, [0, 1, 2, 1])
    assert peeled.source is crop.outputs[0] and peeled.absorbed == [pad]
    assert peeled.pads == [1, 1, 2, 1]
    assert peeled.clash_source is x
    assert crop.name in peeled.clash and pad.name in peeled.clash
    assert "begin border of spatial axis 0" in peeled.clash


def test_stops_at_a_tensor_read_twice() -> None:
    x = x_of()
    pad = node("Pad", [x, i64(0, 0, 1, 1, 0, 0, 1, 1)])
    conv = conv_on(pad.outputs[0])
    other = node("Relu", [pad.outputs[0]])
    graph = gs.Graph(nodes=[pad, conv, other], inputs=[x],
                     outputs=[conv.outputs[0], other.outputs[0]])
    peeled = peel_input(graph, conv, [0, 0, 0, 0])
    assert peeled.source is pad.outputs[0] and peeled.absorbed == [] and not peeled.clash
