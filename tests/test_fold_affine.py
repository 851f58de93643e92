"""fold-affine: a per-channel constant Mul / Div / Add / Sub after a Conv folds into it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import (
    assert_same_outputs,
    binary,
    chain,
    conv,
    expect_fused,
    expect_refused,
    fuse_model,
    make_model,
    node,
    op_counts,
    rand,
)

RULE = "fold-affine"
C = 6


def conv_then(op: str, value: np.ndarray, const_first: bool = False, bias: bool = True,
              hw: tuple[int, int] = (9, 7), conv_is_output: bool = False,
              **conv_attrs) -> onnx.ModelProto:
    """x[N, 3, *hw] -> Conv(3 -> C) -> op(conv, value) -> y."""
    group = conv_attrs.get("group", 1)
    nodes, inits = chain(
        conv("conv", "x", rand(C, 3 // group, 3, 3, seed=1), rand(C, seed=2) if bias else None,
             **conv_attrs),
        binary(op, "affine", "conv_out", value, out="y", const_first=const_first))
    outputs = [("y", None)] + ([("conv_out", None)] if conv_is_output else [])
    return make_model(nodes, [("x", ["N", 3, *hw])], outputs, inits)


SHAPES = {
    "scalar": (),
    "1C11": (1, C, 1, 1),
    "C11": (C, 1, 1),
    "1": (1,),
}


def away_from_zero(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values in +-[0.5, 2): no neutral element (normalize would remove it) and no zero."""
    magnitude = rand(*shape, seed=seed, low=0.5, high=2.0)
    sign = np.where(rand(*shape, seed=seed + 1) < 0, -1.0, 1.0).astype(np.float32)
    return (magnitude * sign).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(("op", "const_first"), [
    ("Mul", False), ("Mul", True), ("Div", False),
    ("Add", False), ("Add", True), ("Sub", False), ("Sub", True),
], ids=["Mul(t,s)", "Mul(s,t)", "Div(t,s)", "Add(t,u)", "Add(u,t)", "Sub(t,u)", "Sub(u,t)"])
def test_affine_folds(op: str, const_first: bool, shape: tuple[int, ...]) -> None:
    model = conv_then(op, away_from_zero(shape, seed=5), const_first, pads=[1, 1, 1, 1])
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    assert result.model.graph.node[0].output[0] == "y"


@pytest.mark.parametrize("attrs", [
    dict(bias=False, strides=[2, 2]),
    dict(group=3, pads=[1, 1, 1, 1], dilations=[2, 1]),
], ids=["nobias-stride2", "groups3-dilation"])
def test_affine_folds_conv_variants(attrs: dict) -> None:
    model = conv_then("Mul", away_from_zero((C, 1, 1), seed=6), **attrs)
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    assert_same_outputs(model, result.model, {"x": rand(3, 3, 9, 7, seed=7)})


def test_chain_of_affines_folds_completely() -> None:
    """Conv -> Mul -> Add -> Sub -> Div: each fold leaves a Conv for the next one."""
    nodes, inits = chain(
        conv("conv", "x", rand(C, 3, 3, 3, seed=1), rand(C, seed=2), pads=[1, 1, 1, 1]),
        binary("Mul", "mul", "conv_out", away_from_zero((1, C, 1, 1), 10)),
        binary("Add", "add", "mul_out", away_from_zero((C, 1, 1), 11), const_first=True),
        binary("Sub", "sub", "add_out", away_from_zero((), 12), const_first=True),
        binary("Div", "div", "sub_out", away_from_zero((1,), 13), out="y"))
    model = make_model(nodes, [("x", ["N", 3, 12, 10])], [("y", None)], inits)
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 4})
    assert_same_outputs(model, result.model, {"x": rand(4, 3, 12, 10, seed=14)}, rtol=1e-6)


# --- negatives ------------------------------------------------------------------------------


def test_c_vector_broadcasting_along_width_is_refused() -> None:
    """A [C] vector aligns with the last axis (W == C here), not with the channels."""
    model = conv_then("Mul", away_from_zero((C,), 20), hw=(5, C), pads=[1, 1, 1, 1])
    result = fuse_model(model)
    expect_refused(result, RULE, "affine", "[6]", "not per output channel")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_spatially_varying_constant_is_refused(op: str) -> None:
    model = conv_then(op, away_from_zero((1, C, 9, 7), 21), pads=[1, 1, 1, 1])
    result = fuse_model(model)
    expect_refused(result, RULE, "affine", "[1, 6, 9, 7]", "not per output channel")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_constant_that_widens_the_output_is_refused() -> None:
    """[2, C, 1, 1] against a batch-1 conv output makes the batch 2: not a fold."""
    nodes, inits = chain(conv("conv", "x", rand(C, 3, 3, 3), rand(C)),
                         binary("Add", "affine", "conv_out", away_from_zero((2, C, 1, 1), 22),
                                out="y"))
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "affine", "not per output channel")
    assert op_counts(result.model) == op_counts(model)


def test_second_consumer_is_refused() -> None:
    nodes, inits = chain(conv("conv", "x", rand(C, 3, 3, 3), rand(C)),
                         binary("Mul", "affine", "conv_out", away_from_zero((C, 1, 1), 23),
                                out="y"))
    nodes.append(node("Relu", ["conv_out"], ["z"], "relu"))
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None), ("z", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "conv_out", "2 consumers")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_conv_output_that_is_a_graph_output_is_refused() -> None:
    model = conv_then("Add", away_from_zero((C, 1, 1), 24), conv_is_output=True)
    result = fuse_model(model)
    expect_refused(result, RULE, "conv_out", "graph output")
    assert op_counts(result.model) == op_counts(model)


def test_div_by_zero_is_refused() -> None:
    divisor = away_from_zero((1, C, 1, 1), 25)
    divisor[0, 2, 0, 0] = 0.0
    model = conv_then("Div", divisor)
    # The model's own output holds inf: verification counts equal infs as equal.
    result = fuse_model(model)
    expect_refused(result, RULE, "affine", "divides by zero")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_constant_divided_by_conv_is_not_an_affine_map() -> None:
    model = conv_then("Div", away_from_zero((C, 1, 1), 26), const_first=True)
    result = fuse_model(model)
    assert RULE not in {a.rule for a in result.report.applied}
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_non_constant_operand_is_not_folded() -> None:
    nodes, inits = chain(conv("conv", "x", rand(C, 3, 3, 3), rand(C)))
    nodes.append(node("Mul", ["conv_out", "s"], ["y"], "affine"))
    model = make_model(nodes, [("x", ["N", 3, 8, 8]), ("s", [1, C, 1, 1])], [("y", None)], inits)
    result = fuse_model(model)
    assert RULE not in {a.rule for a in result.report.applied}
    assert op_counts(result.model) == op_counts(model)


# --- soundness (issue 12) -------------------------------------------------------------------

SAME_CASES = [(auto_pad, hw, stride) for auto_pad in ("SAME_UPPER", "SAME_LOWER")
              for hw in ((9, 7), (10, 8)) for stride in (1, 2)]


@pytest.mark.parametrize(("auto_pad", "hw", "stride"), SAME_CASES,
                         ids=[f"{a}-{h}x{w}-s{s}" for a, (h, w), s in SAME_CASES])
@pytest.mark.parametrize("op", ["Mul", "Sub"])
def test_affine_folds_into_conv_with_same_auto_pad(op: str, auto_pad: str,
                                                   hw: tuple[int, int], stride: int) -> None:
    """A per-channel affine map only scales and shifts the conv's output channels: where the
    padding goes does not matter (hole 7). Odd and even sizes, stride 1 and 2."""
    model = conv_then(op, away_from_zero((C, 1, 1), seed=30), hw=hw, auto_pad=auto_pad,
                      strides=[stride, stride])
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    attrs = {a.name: onnx.helper.get_attribute_value(a)
             for a in result.model.graph.node[0].attribute}
    assert attrs["auto_pad"] == auto_pad.encode()
    assert_same_outputs(model, result.model, {"x": rand(2, 3, *hw, seed=31)}, rtol=1e-6)
