"""normalize: no-op removal, constant and shape folding, CastLike."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import onnxrep
from tests.helpers import (
    assert_same_outputs,
    binary,
    bn,
    chain,
    const,
    dims,
    expect_fused,
    fuse_model,
    initializer,
    make_model,
    misses_for,
    node,
    op_counts,
    rand,
)


def normalized(model: onnx.ModelProto) -> onnxrep.Result:
    """Normalize only (no rules), verified against the input."""
    result = fuse_model(model, rules=[])
    assert result.report.applied == []
    assert result.verified, result.report.verification
    return result


NEUTRAL = {
    "Identity": None,
    "Add(t, 0)": ("Add", np.float32(0), False),
    "Add(0[1,C,1,1], t)": ("Add", np.zeros((1, 4, 1, 1), np.float32), True),
    "Sub(t, 0[C,1,1])": ("Sub", np.zeros((4, 1, 1), np.float32), False),
    "Mul(t, 1)": ("Mul", np.float32(1), False),
    "Mul(1[1], t)": ("Mul", np.ones(1, np.float32), True),
    "Div(t, 1)": ("Div", np.ones((1, 4, 1, 1), np.float32), False),
}


@pytest.mark.parametrize("neutral", NEUTRAL.values(), ids=NEUTRAL.keys())
@pytest.mark.parametrize("at_output", [False, True], ids=["inside", "at-output"])
def test_normalize_removes_noops(neutral: tuple | None, at_output: bool) -> None:
    out = "y" if at_output else "t"
    nodes = [node("Relu", ["x"], ["r"], "relu")]
    inits = []
    if neutral is None:
        nodes.append(node("Identity", ["r"], [out], "noop"))
    else:
        op, value, const_first = neutral
        n, inits = binary(op, "noop", "r", np.asarray(value), out=out, const_first=const_first)
        nodes.append(n)
    if not at_output:
        nodes.append(node("Sigmoid", ["t"], ["y"], "sigmoid"))
    model = make_model(nodes, [("x", ["N", 4, 3, 3])], [("y", None)], inits)
    result = normalized(model)
    expected = Counter({"Relu": 1} if at_output else {"Relu": 1, "Sigmoid": 1})
    assert op_counts(result.model) == expected
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert dims(result.model.graph.output[0]) == ["N", 4, 3, 3]


def test_normalize_removes_inference_dropout() -> None:
    nodes = [node("Relu", ["x"], ["r"], "relu"), node("Dropout", ["r"], ["d"], "dropout"),
             node("Sigmoid", ["d"], ["y"], "sigmoid")]
    model = make_model(nodes, [("x", ["N", 4])], [("y", None)])
    assert op_counts(normalized(model).model) == Counter({"Relu": 1, "Sigmoid": 1})


@pytest.mark.parametrize(("op", "value"), [
    ("Add", np.zeros((1, 3, 1, 1), np.float32)),  # [N,1,4,4] + [1,3,1,1] -> [N,3,4,4]
    ("Mul", np.ones((2, 1, 4, 4), np.float32)),  # [N,1,4,4] * [2,1,4,4]: N broadcasts to 2
    ("Add", np.zeros((1, 1, 1, 1, 1), np.float32)),  # adds a dimension
], ids=["zeros-widen-channels", "ones-widen-batch", "zeros-add-rank"])
def test_normalize_keeps_a_neutral_constant_that_widens_the_shape(op: str,
                                                                  value: np.ndarray) -> None:
    n, inits = binary(op, "widen", "r", value, out="y")
    model = make_model([node("Relu", ["x"], ["r"], "relu"), n], [("x", [1, 1, 4, 4])],
                       [("y", None)], inits)
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Relu": 1, op: 1})
    out_dims = dims(result.model.graph.output[0])
    assert out_dims == dims(model.graph.output[0]) and out_dims != [1, 1, 4, 4]


def test_normalize_folds_static_shape_arithmetic_and_keeps_the_dynamic_batch() -> None:
    """Flatten as TorchScript writes it: Shape -> Gather -> Mul -> Unsqueeze -> Concat ->
    Reshape. The static part (C*H*W) folds; the chain on the dynamic batch dim stays."""
    scalar = lambda name, v: const(name, np.int64(v), np.int64)  # noqa: E731
    nodes = [
        node("Shape", ["x"], ["s"], "shape"),
        node("Gather", ["s", "i1"], ["c"], "gather_c", axis=0),
        node("Gather", ["s", "i2"], ["h"], "gather_h", axis=0),
        node("Gather", ["s", "i3"], ["w"], "gather_w", axis=0),
        node("Mul", ["c", "h"], ["ch"], "mul_ch"),
        node("Mul", ["ch", "w"], ["chw"], "mul_chw"),
        node("Unsqueeze", ["chw", "axes0"], ["chw1"], "unsqueeze_chw"),
        node("Concat", ["minus1", "chw1"], ["shape_flat"], "concat_flat", axis=0),
        node("Reshape", ["x", "shape_flat"], ["y1"], "reshape_flat"),
        node("Gather", ["s", "i0"], ["n"], "gather_n", axis=0),
        node("Unsqueeze", ["n", "axes0"], ["n1"], "unsqueeze_n"),
        node("Concat", ["n1", "chw1"], ["shape_batch"], "concat_batch", axis=0),
        node("Reshape", ["x", "shape_batch"], ["y2"], "reshape_batch"),
    ]
    inits = [scalar(f"i{k}", k) for k in range(4)] + [
        const("axes0", np.array([0]), np.int64), const("minus1", np.array([-1]), np.int64)]
    model = make_model(nodes, [("x", ["N", 3, 4, 5])], [("y1", ["N", 60]), ("y2", ["N", 60])],
                       inits)
    result = normalized(model)
    assert op_counts(result.model) == Counter(
        {"Reshape": 2, "Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1})
    flat = next(n for n in result.model.graph.node if n.output[0] == "y1")
    np.testing.assert_array_equal(initializer(result.model, flat.input[1]), [-1, 60])
    assert dims(result.model.graph.input[0]) == ["N", 3, 4, 5]
    assert [dims(o) for o in result.model.graph.output] == [["N", 60], ["N", 60]]
    x = rand(3, 3, 4, 5)
    assert_same_outputs(model, result.model, {"x": x}, rtol=0)


def test_castlike_of_a_constant_like_a_dynamic_input_folds() -> None:
    """CastLike(c, x) reads only x's dtype: it folds to a float32 constant, and the
    dynamo-style zero bias Expand(CastLike(0, x), Shape(W)[0]) disappears from the Conv."""
    nodes = [
        node("CastLike", ["u64", "x"], ["u"], "castlike_u"),
        node("Relu", ["x"], ["r"], "relu"),
        node("Add", ["r", "u"], ["y1"], "add_u"),
        node("CastLike", ["zero64", "x"], ["zero"], "castlike_zero"),
        node("Shape", ["W"], ["ws"], "shape_w"),
        node("Gather", ["ws", "i0"], ["o"], "gather_o", axis=0),
        node("Unsqueeze", ["o", "axes0"], ["o1"], "unsqueeze_o"),
        node("Expand", ["zero", "o1"], ["b"], "expand_b"),
        node("Conv", ["x", "W", "b"], ["y2"], "conv"),
    ]
    inits = [const("u64", rand(1, 3, 1, 1, seed=3, dtype=np.float64), np.float64),
             const("zero64", np.float64(0), np.float64), const("W", rand(5, 3, 1, 1)),
             const("i0", np.int64(0), np.int64), const("axes0", np.array([0]), np.int64)]
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], [("y1", None), ("y2", None)], inits)
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Relu": 1, "Add": 1, "Conv": 1})
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    folded = initializer(result.model, next(i for i in add.input if i != "r"))
    assert folded.dtype == np.float32
    np.testing.assert_allclose(folded, rand(1, 3, 1, 1, seed=3, dtype=np.float64), rtol=1e-7)
    conv_node = next(n for n in result.model.graph.node if n.op_type == "Conv")
    bias_inputs = list(conv_node.input[2:])
    assert all(not np.any(initializer(result.model, name)) for name in bias_inputs if name)
    assert_same_outputs(model, result.model, {"x": rand(2, 3, 4, 4, seed=4)}, rtol=0)


def test_fold_bn_after_dynamo_style_zero_bias() -> None:
    """The zero bias built at run time folds first, then the BN folds into the Conv."""
    nodes, inits = chain(bn("bn", "c", 5, out="y"))
    nodes = [
        node("CastLike", ["zero64", "x"], ["zero"], "castlike_zero"),
        node("Expand", ["zero", "five"], ["b"], "expand_b"),
        node("Conv", ["x", "W", "b"], ["c"], "conv", pads=[1, 1, 1, 1]),
        *nodes,
    ]
    inits += [const("zero64", np.float64(0), np.float64), const("W", rand(5, 3, 3, 3)),
              const("five", np.array([5]), np.int64)]
    model = make_model(nodes, [("x", ["N", 3, 6, 6])], [("y", None)], inits)
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {"fold-bn": 1})
    assert not misses_for(result, "fold-bn")


