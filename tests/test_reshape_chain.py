"""reshape-chain: a reshape of a reshape is one reshape; a reshape to its input's own shape
goes. Each precondition has a graph where the rule must not fire."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import const, expect_fused, expect_refused, fuse_model, make_model, node

RULE = "reshape-chain"
I64 = np.int64


def shape_const(name: str, dims: list[int]) -> onnx.TensorProto:
    return const(name, np.array(dims, I64), I64)


def relu_in_out(middle: list[onnx.NodeProto], inits: list, x_shape: list,
                extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x -> Relu -> t -> <middle> -> y -> Relu -> out (so that t and y are inner tensors)."""
    nodes = [node("Relu", ["x"], ["t"], "pre"), *middle, node("Relu", ["y"], ["out"], "post")]
    return make_model(nodes, [("x", x_shape)], [("out", None), *((o, None) for o in
                                                                  extra_outputs)], inits)


def test_flatten_then_reshape_back_to_its_shape_goes() -> None:
    """LeViT's Linear_BN once the BN is folded: Flatten(axis=2) -> Reshape(Shape(t))."""
    model = relu_in_out([node("Flatten", ["t"], ["z"], "flat", axis=2),
                         node("Shape", ["t"], ["s"], "shape"),
                         node("Reshape", ["z", "s"], ["y"], "back")], [], ["B", "N", 8])
    result = fuse_model(model, input_shapes={"x": [2, 5, 8]})
    expect_fused(result, {"Relu": 2}, {RULE: 2})


def test_two_constant_reshapes_back_to_the_shape_go() -> None:
    """The dynamo export: Reshape([-1, 8]) -> Reshape([-1, 16, 8]) of a [B, 16, 8] tensor."""
    model = relu_in_out([node("Reshape", ["t", "a"], ["z"], "flat"),
                         node("Reshape", ["z", "b"], ["y"], "back")],
                        [shape_const("a", [-1, 8]), shape_const("b", [-1, 16, 8])],
                        ["B", 16, 8])
    result = fuse_model(model, input_shapes={"x": [3, 16, 8]})
    expect_fused(result, {"Relu": 2}, {RULE: 2})


def test_two_reshapes_to_a_new_shape_become_one() -> None:
    model = relu_in_out([node("Reshape", ["t", "a"], ["z"], "flat"),
                         node("Reshape", ["z", "b"], ["y"], "split")],
                        [shape_const("a", [-1, 8]), shape_const("b", [-1, 4, 2, 16])],
                        ["B", 16, 8])
    result = fuse_model(model, input_shapes={"x": [3, 16, 8]})
    expect_fused(result, {"Relu": 2, "Reshape": 1}, {RULE: 1})


def test_a_zero_that_copies_the_middle_dim_is_not_collapsed() -> None:
    """[B, 16, 8] -> [-1, 2, 32] -> [0, 4, -1]: the 0 copies z's 2B, not t's B."""
    model = relu_in_out([node("Reshape", ["t", "a"], ["z"], "mid"),
                         node("Reshape", ["z", "b"], ["y"], "copy0")],
                        [shape_const("a", [-1, 2, 32]), shape_const("b", [0, 4, -1])],
                        ["B", 16, 8])
    result = fuse_model(model, input_shapes={"x": [3, 16, 8]})
    expect_refused(result, RULE, "copies a dim")
    assert result.verified


def test_a_middle_tensor_read_elsewhere_is_not_collapsed() -> None:
    model = relu_in_out([node("Reshape", ["t", "a"], ["z"], "flat"),
                         node("Reshape", ["z", "b"], ["y"], "split")],
                        [shape_const("a", [-1, 8]), shape_const("b", [-1, 4, 2, 16])],
                        ["B", 16, 8], extra_outputs=("z",))
    result = fuse_model(model, input_shapes={"x": [3, 16, 8]})
    expect_refused(result, RULE, "z is read by more than")


@pytest.mark.parametrize("target", [[-1, 8, 16], [0, 0, 4, 2]])
def test_a_reshape_that_changes_the_shape_stays(target: list[int]) -> None:
    model = relu_in_out([node("Reshape", ["t", "a"], ["y"], "r")],
                        [shape_const("a", target)], ["B", 16, 8])
    result = fuse_model(model, input_shapes={"x": [3, 16, 8]})
    expect_refused(result, RULE, "does not provably keep")


def test_a_reshape_to_its_own_shape_writing_a_graph_output_goes() -> None:
    nodes = [node("Relu", ["x"], ["t"], "pre"), node("Reshape", ["t", "a"], ["y"], "r")]
    model = make_model(nodes, [("x", ["B", 16, 8])], [("y", None)], [shape_const("a",
                                                                                [0, 16, -1])])
    result = fuse_model(model, input_shapes={"x": [3, 16, 8]})
    expect_fused(result, {"Relu": 1}, {RULE: 1})
    assert [o.name for o in result.model.graph.output] == ["y"]
