"""rm-merge-pointwise (opt-in with remove-residual; docs/RULES.md, rm-merge-pointwise):
Conv1x1 -> Conv1x1 into one Conv1x1 by kernels.compose_convs, where merge-sequential's cost
guard refuses the pair (the hand-built pairs widen 16 -> 4 -> 12 or 16, so that the merged
conv costs more and merge-sequential leaves them to this rule)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.helpers import (
    applied_rules,
    assert_same_outputs,
    conv,
    expect_fused,
    expect_refused,
    fuse_model,
    initializer,
    inverted_block,
    make_model,
    rand,
)

RM = "remove-residual"
PW = "rm-merge-pointwise"


def pointwise_pair(cin: int = 16, mid: int = 4, cout: int = 16, strides: tuple[int, int] = (1, 1),
                   group: int = 1, pads: int = 0, bias: bool = True) -> onnx.ModelProto:
    """x -> Conv1x1(cin -> mid, stride s1) -> t -> Conv1x1(mid -> cout, stride s2) -> y."""
    first, i1 = conv("first", "x", rand(mid, cin // group, 1, 1, seed=1),
                     rand(mid, seed=2) if bias else None, out="t", strides=[strides[0]] * 2,
                     group=group, pads=[pads] * 4)
    second, i2 = conv("second", "t", rand(cout, mid, 1, 1, seed=3), rand(cout, seed=4),
                      out="y", strides=[strides[1]] * 2)
    return make_model([first, second], [("x", ["N", cin, 9, 9])], [("y", None)], i1 + i2)


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    cin = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return {"x": rand(2, cin, 9, 9, seed=5)}


def _attr(model: onnx.ModelProto, node: str, name: str) -> object:
    found = next(n for n in model.graph.node if n.name == node)
    return helper.get_attribute_value(next(a for a in found.attribute if a.name == name))


@pytest.mark.parametrize("strides,bias", [((1, 1), True), ((2, 2), True), ((1, 2), False)])
def test_pair_becomes_one_pointwise_conv(strides: tuple[int, int], bias: bool) -> None:
    model = pointwise_pair(cin=16, mid=4, cout=12, strides=strides, bias=bias)
    result = fuse_model(model, remove_residuals=True)
    expect_fused(result, {"Conv": 1}, {PW: 1})
    fused = result.model
    merged = fused.graph.node[0]
    assert merged.name == "second"
    assert initializer(fused, merged.input[1]).shape == (12, 16, 1, 1)
    assert _attr(fused, "second", "strides") == [strides[0] * strides[1]] * 2
    assert result.report.applied[0].why == "first (1x1) composed into second (1x1)"
    assert_same_outputs(model, fused, _feeds(model))


def test_merges_what_merge_sequential_refuses_for_cost() -> None:
    """16 -> 4 -> 16: the merged 16x16 conv costs 256 MACs a pixel against 128. merge-sequential
    keeps the pair (no sibling absorbs it); with residual removal asked for, this rule merges
    it all the same - the plain chain is what RM wants."""
    model = pointwise_pair(cin=16, mid=4, cout=16)
    plain = fuse_model(model)
    assert applied_rules(plain) == Counter()
    assert [n.op_type for n in plain.model.graph.node] == ["Conv", "Conv"]
    result = fuse_model(model, remove_residuals=True)
    expect_fused(result, {"Conv": 1}, {PW: 1})
    assert_same_outputs(model, result.model, _feeds(model))


def test_pointwise_merge_needs_a_sole_reader() -> None:
    model = inverted_block()
    model.graph.output.append(helper.make_tensor_value_info("sum", onnx.TensorProto.FLOAT,
                                                            ["N", 4, 8, 8]))
    result = fuse_model(model, remove_residuals=True)
    assert applied_rules(result) == Counter({RM: 1})
    expect_refused(result, PW, "graph output")
    assert result.verified


@pytest.mark.parametrize("group,pads", [(2, 0), (1, 1)])
def test_refused_for_grouped_or_padded_convs(group: int, pads: int) -> None:
    model = pointwise_pair(group=group, pads=pads)
    result = fuse_model(model, remove_residuals=True)
    expect_refused(result, PW, "first has group", "only group 1, pads 0 1x1 convs compose")
    assert result.verified
