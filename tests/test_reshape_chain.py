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


def _batch_shape(source: str, rest: list[int]) -> tuple[list[onnx.NodeProto], list]:
    """Concat(Shape(source)[0:1], rest): the dynamo-noopt export's computed view shape."""
    nodes = [node("Shape", [source], ["s_full"], "shape_of", start=0, end=1),
             node("Concat", ["s_full", "rest"], ["s"], "cat", axis=0)]
    return nodes, [shape_const("rest", rest)]


def test_a_computed_shape_equal_but_for_one_entry_goes() -> None:
    """LeViT dynamo-noopt once its BN is folded: Reshape(t, [N, 16, 8]) with N the graph
    input's batch and t [B', 16, 8] where B' is a name inference made up: whatever B' is, the
    element count makes it N, so the Reshape keeps t's shape (all other entries match)."""
    shape_nodes, inits = _batch_shape("x", [16, 8])
    nodes = [node("Relu", ["x"], ["x1"], "pre"),
             node("Reshape", ["x1", "flat"], ["f"], "flatten_lose_batch"),
             node("MatMul", ["f", "w"], ["t0"], "mm"),
             node("Reshape", ["t0", "back"], ["t"], "back_lose_batch"),
             *shape_nodes,
             node("Reshape", ["t", "s"], ["y"], "view", allowzero=1),
             node("Relu", ["y"], ["out"], "post")]
    inits += [shape_const("flat", [-1, 8]), shape_const("back", [-1, 16, 8]),
              const("w", np.eye(8))]
    model = make_model(nodes, [("x", ["N", 16, 8])], [("out", None)], inits)
    result = fuse_model(model, input_shapes={"x": [3, 16, 8]})
    assert result.verified
    assert "view" not in {n.name for n in result.model.graph.node}


def test_a_computed_shape_with_a_zero_sized_entry_stays() -> None:
    """[B, 0, 8] -> Reshape([C, 0, 8]) with C the batch of another input: zero elements either
    way, so the free entry is not tied to B and the shape changes."""
    shape_nodes, inits = _batch_shape("u", [0, 8])
    nodes = [node("Relu", ["x"], ["t"], "pre"), *shape_nodes,
             node("Reshape", ["t", "s"], ["y"], "view", allowzero=1),
             node("Relu", ["y"], ["out"], "post")]
    model = make_model(nodes, [("x", ["B", 0, 8]), ("u", ["C", 3])], [("out", None)], inits)
    result = fuse_model(model, input_shapes={"x": [2, 0, 8], "u": [5, 3]}, verify=False)
    expect_refused(result, RULE, "does not provably keep")


def test_a_computed_shape_that_differs_in_a_static_entry_stays() -> None:
    shape_nodes, inits = _batch_shape("x", [8, 16])
    nodes = [node("Relu", ["x"], ["t"], "pre"), *shape_nodes,
             node("Reshape", ["t", "s"], ["y"], "view"),
             node("Relu", ["y"], ["out"], "post")]
    model = make_model(nodes, [("x", ["N", 16, 8])], [("out", None)], inits)
    result = fuse_model(model, input_shapes={"x": [3, 16, 8]})
    expect_refused(result, RULE, "does not provably keep")
    assert result.verified


def test_a_dim_named_like_the_batch_marker_is_not_taken_for_the_batch() -> None:
    """x[N, 4] -> Transpose -> [4, N]; the target Concat(Shape(.)[1:2], [4]) is [N, 4]. The
    shape arithmetic's batch there is the static 4, and a graph-input dim literally named "N"
    once compared equal to its batch marker: the target read as [4, 4], the Reshape was
    removed, and the output came out [4, N] (found by tests/test_shape_names_fuzz.py)."""
    nodes = [node("Transpose", ["x"], ["t"], "swap", perm=[1, 0]),
             node("Shape", ["t"], ["n"], "shape_of", start=1, end=2),
             node("Concat", ["n", "four"], ["s"], "cat", axis=0),
             node("Reshape", ["t", "s"], ["y"], "view", allowzero=1),
             node("Relu", ["y"], ["out"], "post")]
    model = make_model(nodes, [("x", ["N", 4])], [("out", None)], [shape_const("four", [4])])
    result = fuse_model(model, input_shapes={"x": [2, 4]})
    assert result.verified
    assert "view" in {n.name for n in result.model.graph.node}
