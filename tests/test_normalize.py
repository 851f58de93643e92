"""normalize: no-op removal, constant and shape folding, CastLike."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxrep
from tests.helpers import (
    FLOAT,
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
    run,
    session,
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




# --- issue 12: what constant folding must leave alone ------------------------------------------


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def random_source(op: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A node of a random op whose inputs are all constant, ending in a float32 `r` [1,4,4,4]."""
    shape = [1, 4, 4, 4]
    if op in ("RandomNormal", "RandomUniform"):
        return [node(op, [], ["r"], "random", shape=shape, dtype=onnx.TensorProto.FLOAT)], []
    if op in ("RandomNormalLike", "RandomUniformLike"):
        return [node(op, ["like"], ["r"], "random")], [const("like", np.zeros(shape))]
    if op == "Bernoulli":
        return [node(op, ["p"], ["r"], "random")], [const("p", np.full(shape, 0.5))]
    # Multinomial: 64 int32 draws from 8 equally likely classes, as float32 [1,4,4,4]
    return [node(op, ["logits"], ["draws"], "random", sample_size=64),
            node("Cast", ["draws"], ["flat"], "cast", to=onnx.TensorProto.FLOAT),
            node("Reshape", ["flat", "shape"], ["r"], "reshape")], [
        const("logits", np.zeros((1, 8))), const("shape", np.array(shape), np.int64)]


RANDOM_OPS = ["RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
              "Bernoulli", "Multinomial"]


@pytest.mark.parametrize("op", RANDOM_OPS)
def test_normalize_never_folds_a_random_op(op: str) -> None:
    """A random op with constant inputs, and what depends on it (Mul(r, 2)), stay computed at
    run time: two runs of the normalized model draw different values."""
    nodes, inits = random_source(op)
    nodes += [node("Mul", ["r", "two"], ["r2"], "mul"), node("Add", ["x", "r2"], ["y"], "add")]
    inits.append(const("two", np.float32(2)))
    model = make_model(nodes, [("x", ["N", 4, 4, 4])], [("y", None)], inits)
    result = fuse_model(model, rules=[], verify=False)
    assert op_counts(result.model)[op] == 1
    assert op_counts(result.model)["Mul"] == 1
    sess = session(result.model)
    x = rand(1, 4, 4, 4)
    first, second = sess.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("as_output", [False, True], ids=["value_info", "graph-output"])
def test_normalize_does_not_trust_a_declared_static_shape(as_output: bool) -> None:
    """r follows the dynamic batch of x but is declared [1,3,4,4] (in value_info, or as a
    graph output): Shape(r)[0] must stay computed, not freeze to 1."""
    nodes = [
        node("Relu", ["x"], ["r"], "relu"),
        node("Shape", ["r"], ["s"], "shape"),
        node("Gather", ["s", "i0"], ["n"], "gather_n", axis=0),
        node("Unsqueeze", ["n", "axes0"], ["n1"], "unsqueeze_n"),
        node("Concat", ["n1", "rest"], ["target"], "concat", axis=0),
        node("Reshape", ["r", "target"], ["y"], "reshape"),
    ]
    inits = [const("i0", np.int64(0), np.int64), const("axes0", np.array([0]), np.int64),
             const("rest", np.array([48]), np.int64)]
    outputs = [("y", ["N", 48])] + ([("r", [1, 3, 4, 4])] if as_output else [])
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], outputs, inits)
    if not as_output:
        model.graph.value_info.append(helper.make_tensor_value_info("r", FLOAT, [1, 3, 4, 4]))
    result = normalized(model)
    assert op_counts(result.model)["Shape"] == 1
    x = rand(2, 3, 4, 4)
    out = run(result.model, {"x": x})
    np.testing.assert_array_equal(out[0], np.maximum(x, 0).reshape(2, 48))
    assert_same_outputs(model, result.model, {"x": x}, rtol=0)
    if as_output:  # the declaration itself is the input model's: kept on export
        assert dims(result.model.graph.output[1]) == [1, 3, 4, 4]


def test_normalize_keeps_an_expand_to_a_large_constant() -> None:
    """Expand(scalar, [1,64,64,64]) would be a 1 MB weight made of one number."""
    nodes = [node("Expand", ["half", "big"], ["e"], "expand"),
             node("Add", ["x", "e"], ["y"], "add")]
    inits = [const("half", np.float32(0.5)), const("big", np.array([1, 64, 64, 64]), np.int64)]
    model = make_model(nodes, [("x", ["N", 64, 64, 64])], [("y", None)], inits)
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Expand": 1, "Add": 1})
    assert initializer_bytes(result.model) <= initializer_bytes(model)


def test_normalize_keeps_the_shape_arithmetic_of_a_kept_expand() -> None:
    """The shape of a kept Expand is small: it still folds."""
    nodes = [node("Concat", ["one", "c64"], ["shape"], "concat", axis=0),
             node("Expand", ["half", "shape"], ["e"], "expand"),
             node("Add", ["x", "e"], ["y"], "add")]
    inits = [const("half", np.float32(0.5)), const("one", np.array([1]), np.int64),
             const("c64", np.array([64, 64, 64]), np.int64)]
    model = make_model(nodes, [("x", ["N", 64, 64, 64])], [("y", None)], inits)
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Expand": 1, "Add": 1})
    assert initializer_bytes(result.model) <= initializer_bytes(model)


def test_normalize_does_not_store_a_shared_weight_twice() -> None:
    """W is read by a Conv and by Transpose -> Conv: folding the Transpose would keep W and
    add W^T beside it."""
    w = rand(16, 16, 3, 3)
    nodes = [node("Conv", ["x", "W"], ["a"], "conv_a", pads=[1] * 4),
             node("Transpose", ["W"], ["wt"], "transpose", perm=[1, 0, 2, 3]),
             node("Conv", ["x", "wt"], ["b"], "conv_b", pads=[1] * 4),
             node("Add", ["a", "b"], ["y"], "add")]
    model = make_model(nodes, [("x", ["N", 16, 8, 8])], [("y", None)], [const("W", w)])
    result = normalized(model)
    assert initializer_bytes(result.model) <= initializer_bytes(model)
    assert op_counts(result.model)["Transpose"] == 1


def test_normalize_folds_a_weight_computation_whose_inputs_die_with_it() -> None:
    """Transpose(W) with W read by nothing else folds: W^T replaces W, no bytes added."""
    w = rand(16, 16, 3, 3)
    nodes = [node("Transpose", ["W"], ["wt"], "transpose", perm=[1, 0, 2, 3]),
             node("Conv", ["x", "wt"], ["y"], "conv", pads=[1] * 4)]
    model = make_model(nodes, [("x", ["N", 16, 8, 8])], [("y", None)], [const("W", w)])
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Conv": 1})
    assert initializer_bytes(result.model) == initializer_bytes(model)


def test_normalize_does_not_bake_an_overflow_into_a_weight() -> None:
    """300 * 300 is inf in float16: the Mul stays, the model still computes inf there."""
    a = np.array([300, 1, 2, 300], np.float16).reshape(1, 4, 1, 1)
    nodes = [node("Mul", ["a", "b"], ["c"], "mul_const"), node("Mul", ["x", "c"], ["y"], "mul")]
    model = make_model(nodes, [("x", ["N", 4, 2, 2], onnx.TensorProto.FLOAT16)],
                       [("y", ["N", 4, 2, 2], onnx.TensorProto.FLOAT16)],
                       [const("a", a, np.float16), const("b", a, np.float16)])
    result = fuse_model(model, rules=[])
    assert all(np.all(np.isfinite(numpy_helper.to_array(t)))
               for t in result.model.graph.initializer)
    assert op_counts(result.model)["Mul"] == 2
    x = np.abs(rand(2, 4, 2, 2, dtype=np.float16)) + np.float16(0.5)
    expected, got = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert np.isinf(expected).any()
    np.testing.assert_array_equal(got, expected)


def test_normalize_keeps_a_dropout_whose_mask_is_a_graph_output() -> None:
    nodes = [node("Relu", ["x"], ["r"], "relu"),
             node("Dropout", ["r"], ["y", "mask"], "dropout")]
    model = make_model(nodes, [("x", ["N", 4])],
                       [("y", ["N", 4]), ("mask", ["N", 4], onnx.TensorProto.BOOL)])
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Relu": 1, "Dropout": 1})
    x = rand(3, 4)
    ref, got = run(model, {"x": x}), run(result.model, {"x": x})
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a, b)


def overridable_model() -> onnx.ModelProto:
    """W is an initializer and a graph input (IR >= 4: a default the caller may override),
    read by a Conv and by Transpose -> Add."""
    nodes = [node("Conv", ["x", "W"], ["c"], "conv"),
             node("Transpose", ["W"], ["wt"], "transpose", perm=[1, 0, 2, 3]),
             node("Add", ["c", "wt"], ["y"], "add")]
    return make_model(nodes, [("x", [4, 4, 1, 1]), ("W", [4, 4, 1, 1])], [("y", None)],
                      [const("W", rand(4, 4, 1, 1, seed=1))])


@pytest.mark.parametrize("rules", [[], None], ids=["normalize", "all-rules"])
def test_an_overridable_initializer_stays_an_input_and_is_not_folded(
        rules: list[str] | None) -> None:
    model = overridable_model()
    result = fuse_model(model, rules=rules)
    assert result.verified, result.report.verification
    assert [i.name for i in result.model.graph.input] == ["x", "W"]
    np.testing.assert_array_equal(initializer(result.model, "W"), rand(4, 4, 1, 1, seed=1))
    x, w = rand(4, 4, 1, 1, seed=2), rand(4, 4, 1, 1, seed=3)
    for feeds in ({"x": x}, {"x": x, "W": w}):
        np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def test_a_rule_does_not_fold_an_overridable_weight() -> None:
    """Conv(x, W) -> BN: fold-bn would bake W into a new weight, and a W fed at run time would
    be ignored."""
    nodes, inits = chain(bn("bn", "c", 4, out="y"))
    nodes.insert(0, node("Conv", ["x", "W"], ["c"], "conv"))
    model = make_model(nodes, [("x", ["N", 4, 3, 3]), ("W", [4, 4, 1, 1])], [("y", None)],
                       inits + [const("W", rand(4, 4, 1, 1, seed=1))])
    result = fuse_model(model)
    assert result.verified, result.report.verification
    assert [i.name for i in result.model.graph.input] == ["x", "W"]
    feeds = {"x": rand(2, 4, 3, 3, seed=2), "W": rand(4, 4, 1, 1, seed=3)}
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-6)


def test_an_overridable_input_keeps_its_declared_dynamic_shape() -> None:
    """W is declared [B, 4] with a [1, 4] default: a [3, 4] W fed at run time still runs, and
    Mul(W, 2) is not folded into a constant."""
    nodes = [node("Mul", ["W", "two"], ["w2"], "mul"), node("Add", ["x", "w2"], ["y"], "add")]
    model = make_model(nodes, [("x", ["B", 4]), ("W", ["B", 4])], [("y", ["B", 4])],
                       [const("W", rand(1, 4, seed=1)), const("two", np.float32(2))])
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Mul": 1, "Add": 1})
    assert dims(result.model.graph.input[1]) == ["B", 4]
    feeds = {"x": rand(3, 4, seed=2), "W": rand(3, 4, seed=3)}
    np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def test_an_overridable_input_read_by_nothing_stays_an_input() -> None:
    model = make_model([node("Relu", ["x"], ["y"], "relu")], [("x", ["N", 4]), ("W", [4])],
                       [("y", None)], [const("W", rand(4))])
    result = normalized(model)
    assert [i.name for i in result.model.graph.input] == ["x", "W"]
    np.testing.assert_array_equal(initializer(result.model, "W"), rand(4))


@pytest.mark.parametrize(("start", "pick"), [(1, None), (0, 2), (-2, 0)],
                         ids=["Shape(start=1)", "Shape->Gather", "Shape(start=-2)->Gather"])
def test_static_shape_folding_honours_shape_start(start: int, pick: int | None) -> None:
    """Shape(x, start) of a static x gives x's dims from `start` on (not all of them)."""
    nodes = [node("Shape", ["x"], ["s"], "shape", start=start)]
    if pick is not None:
        nodes.append(node("Gather", ["s", "i"], ["g"], "gather", axis=0))
    nodes.append(node("Cast", ["g" if pick is not None else "s"], ["y"], "cast", to=FLOAT))
    inits = [const("i", np.int64(pick or 0), np.int64)] if pick is not None else []
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", None)], inits)
    result = normalized(model)
    assert "Shape" not in op_counts(result.model)
    x = rand(2, 3, 4)
    np.testing.assert_array_equal(run(result.model, {"x": x})[0], run(model, {"x": x})[0])


@pytest.mark.parametrize("attr", [{"value_float": 2.0}, {"value_floats": [2.0, 3.0, 4.0, 5.0]},
                                  {"value_int": 3}, {"value_ints": [4, 1]}, {"value": None}],
                         ids=lambda a: next(iter(a)))
def test_constant_nodes_keep_their_type(attr: dict) -> None:
    """A Constant node's value_float(s) is float32, value_int(s) int64 (onnx-graphsurgeon
    makes float64 of the floats); `value` keeps its tensor's type."""
    name = next(iter(attr))
    if name == "value":
        attr = {"value": helper.make_tensor("v", onnx.TensorProto.FLOAT16, [4], [1, 2, 3, 4])}
        nodes = [node("Constant", [], ["c"], "c", **attr),
                 node("Cast", ["c"], ["cf"], "cast", to=FLOAT), node("Mul", ["x", "cf"], ["y"])]
    elif name.startswith("value_float"):
        nodes = [node("Constant", [], ["c"], "c", **attr), node("Mul", ["x", "c"], ["y"])]
    elif name == "value_ints":
        nodes = [node("Constant", [], ["c"], "c", **attr), node("Reshape", ["x", "c"], ["y"])]
    else:
        nodes = [node("Constant", [], ["c"], "c", **attr),
                 node("Cast", ["c"], ["cf"], "cast", to=FLOAT), node("Mul", ["x", "cf"], ["y"])]
    model = make_model(nodes, [("x", [1, 4])], [("y", None)])
    result = normalized(model)
    assert "Constant" not in op_counts(result.model)
    x = rand(1, 4)
    np.testing.assert_array_equal(run(result.model, {"x": x})[0], run(model, {"x": x})[0])


def test_an_overridable_input_read_inside_a_subgraph_is_not_shadowed() -> None:
    """If branches read W from the outer scope: the export must not copy W into them (a
    subgraph initializer W would hide the input W)."""
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph([node(op, ["W", "one"], [name], f"{name}_node")], name, [],
                                 [helper.make_tensor_value_info(name, FLOAT, [4])])
    nodes = [node("If", ["c"], ["y"], "if", then_branch=branch("t", "Add"),
                  else_branch=branch("e", "Sub"))]
    model = make_model(nodes, [("c", [], onnx.TensorProto.BOOL), ("W", [4])], [("y", [4])],
                       [const("W", rand(4)), const("one", np.float32(1))])
    result = normalized(model)
    assert [i.name for i in result.model.graph.input] == ["c", "W"]
    for c in (True, False):
        feeds = {"c": np.array(c), "W": rand(4, seed=5)}
        np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def test_a_refused_fold_does_not_hold_back_one_that_shares_only_a_weight() -> None:
    """`half` is read by a weight computation Mul(W, half) (folds: W dies with it) and by an
    Expand to 1 MB (stays): the two are judged apart."""
    nodes = [node("Mul", ["W", "half"], ["w2"], "scale_w"),
             node("Conv", ["x", "w2"], ["c"], "conv", pads=[1] * 4),
             node("Expand", ["half", "big"], ["e"], "expand"),
             node("Add", ["c", "e"], ["y"], "add")]
    inits = [const("W", rand(64, 16, 3, 3)), const("half", np.float32(0.5)),
             const("big", np.array([1, 64, 64, 64]), np.int64)]
    model = make_model(nodes, [("x", ["N", 16, 64, 64])], [("y", None)], inits)
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Conv": 1, "Expand": 1, "Add": 1})
    assert initializer_bytes(result.model) <= initializer_bytes(model)


@pytest.mark.parametrize(("starts", "ends", "steps", "kept"), [
    ([0], [np.iinfo(np.int64).max], [1], False),  # x[:, ...] as the dynamo exporter writes it
    ([0], [2**62], None, False),
    ([0], [5], [1], True),  # a crop at sizes above 5
    ([1], [np.iinfo(np.int64).max], [1], True),
    ([0], [np.iinfo(np.int64).max], [2], True),
])
def test_a_slice_of_whole_axes_is_a_noop(starts: list, ends: list, steps: list | None,
                                          kept: bool) -> None:
    i64 = np.int64
    inputs = ["x", "starts", "ends", "axes"] + (["steps"] if steps is not None else [])
    inits = [numpy_helper.from_array(np.array(v, i64), n) for n, v in
             (("starts", starts), ("ends", ends), ("axes", [0]))]
    if steps is not None:
        inits.append(numpy_helper.from_array(np.array(steps, i64), "steps"))
    nodes = [helper.make_node("Slice", inputs, ["s"], name="slice"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    model = make_model(nodes, [("x", ["N", 3, 4])], [("y", None)], inits)
    result = normalized(model)
    assert op_counts(result.model) == Counter({"Relu": 1, **({"Slice": 1} if kept else {})})
