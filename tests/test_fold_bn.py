"""fold-bn: BatchNormalization into the Conv / ConvTranspose / Gemm / MatMul(+Add) before it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxrep
from tests.helpers import (
    assert_same_outputs,
    bn,
    bn_params,
    chain,
    const,
    conv,
    dims,
    expect_fused,
    expect_refused,
    fuse_model,
    initializer,
    make_model,
    node,
    op_counts,
    rand,
)

RULE = "fold-bn"


def conv_bn_model(cin: int, cout: int, k: int, *, bias: bool = True, dtype=np.float32,
                  hw: tuple[int, int] = (11, 9), **attrs) -> onnx.ModelProto:
    group = attrs.get("group", 1)
    weight = rand(cout, cin // group, k, k, seed=3, dtype=dtype)
    b = rand(cout, seed=4, dtype=dtype) if bias else None
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = chain(conv("conv", "x", weight, b, **attrs),
                         bn("bn", "conv_out", cout, out="y", dtype=dtype))
    return make_model(nodes, [("x", ["N", cin, *hw], elem)], [("y", None, elem)], inits)


CONV_CASES = {
    "k1-nobias": dict(cin=4, cout=8, k=1, bias=False),
    "k3-bias-pad1": dict(cin=4, cout=8, k=3, pads=[1, 1, 1, 1]),
    "k5-stride2-pad2": dict(cin=4, cout=6, k=5, strides=[2, 2], pads=[2, 2, 2, 2]),
    "k3-dilation2": dict(cin=4, cout=8, k=3, bias=False, dilations=[2, 2], pads=[2, 2, 2, 2]),
    "k3-groups2": dict(cin=4, cout=8, k=3, group=2, pads=[1, 1, 1, 1]),
    "k3-depthwise-stride2": dict(cin=8, cout=8, k=3, group=8, strides=[2, 2], pads=[1, 1, 1, 1],
                                 bias=False),
    "k3-asymmetric-pads": dict(cin=3, cout=5, k=3, pads=[0, 1, 2, 0]),
}


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_bn_folds(case: dict) -> None:
    model = conv_bn_model(**case)
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    (fused,) = result.model.graph.node
    before = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    after = {a.name: helper.get_attribute_value(a) for a in fused.attribute}
    for key, value in before.items():
        assert after[key] == value, key
    assert len(fused.input) == 3  # a bias is created when the Conv had none
    assert fused.output[0] == "y"
    assert dims(result.model.graph.input[0])[0] == "N"


def test_conv_bn_own_onnxruntime_run_batch3() -> None:
    model = conv_bn_model(6, 10, 3, group=2, strides=[2, 1], pads=[1, 0, 1, 2], hw=(17, 13))
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    x = rand(3, 6, 17, 13, seed=11)
    assert_same_outputs(model, result.model, {"x": x}, rtol=1e-6)


def test_conv_bn_expected_weights() -> None:
    """The folded weight and bias are W*a and a*b + c, computed here independently."""
    model = conv_bn_model(3, 4, 3, pads=[1, 1, 1, 1])
    result = fuse_model(model)
    gamma, beta, mean, var = (p.astype(np.float64) for p in bn_params(4))
    a = gamma / np.sqrt(var + 1e-3)
    weight = initializer(model, "conv.W").astype(np.float64)
    bias = initializer(model, "conv.b").astype(np.float64)
    (fused,) = result.model.graph.node
    np.testing.assert_allclose(initializer(result.model, fused.input[1]),
                               weight * a[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(initializer(result.model, fused.input[2]),
                               a * bias + beta - mean * a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_folds(group: int, bias: bool) -> None:
    cin, cout = 4, 6
    weight = rand(cin, cout // group, 3, 3, seed=5)
    b = rand(cout, seed=6) if bias else None
    nodes, inits = chain(
        conv("deconv", "x", weight, b, op="ConvTranspose", group=group, strides=[2, 2],
             pads=[1, 1, 1, 1], output_padding=[1, 1]),
        bn("bn", "deconv_out", cout, out="y"))
    model = make_model(nodes, [("x", ["N", cin, 5, 7])], [("y", None)], inits)
    result = fuse_model(model)
    expect_fused(result, {"ConvTranspose": 1}, {RULE: 1})
    assert_same_outputs(model, result.model, {"x": rand(2, cin, 5, 7, seed=7)})


GEMM_CASES = {
    "transB0-noC": dict(trans_b=0, c_shape=None),
    "transB1-noC": dict(trans_b=1, c_shape=None),
    "transB0-C": dict(trans_b=0, c_shape=(4,)),
    "transB1-C-1x4": dict(trans_b=1, c_shape=(1, 4)),
    "transB1-C-alpha-beta": dict(trans_b=1, c_shape=(4,), alpha=0.5, beta=2.0),
    "transB0-noC-alpha": dict(trans_b=0, c_shape=None, alpha=-1.5),
}


@pytest.mark.parametrize("case", GEMM_CASES.values(), ids=GEMM_CASES.keys())
def test_gemm_bn_folds(case: dict) -> None:
    trans_b, c_shape = case["trans_b"], case["c_shape"]
    attrs = {k: case[k] for k in ("alpha", "beta") if k in case}
    b_matrix = rand(*((4, 5) if trans_b else (5, 4)), seed=8)
    inits = [const("B", b_matrix)]
    inputs = ["x", "B"]
    if c_shape is not None:
        inits.append(const("C", rand(*c_shape, seed=9)))
        inputs.append("C")
    gemm = node("Gemm", inputs, ["g"], "gemm", transB=trans_b, **attrs)
    norm, more = bn("bn", "g", 4, out="y")
    model = make_model([gemm, norm], [("x", ["N", 5])], [("y", ["N", 4])], inits + more)
    result = fuse_model(model)
    expect_fused(result, {"Gemm": 1}, {RULE: 1})
    assert_same_outputs(model, result.model, {"x": rand(3, 5, seed=10)})


@pytest.mark.parametrize("form", ["MatMul", "MatMul+Add", "Add(bias, MatMul)"])
def test_matmul_bn_folds(form: str) -> None:
    nodes = [node("MatMul", ["x", "W"], ["mm"], "matmul")]
    inits = [const("W", rand(5, 4, seed=12))]
    t = "mm"
    if form != "MatMul":
        inits.append(const("bias", rand(4, seed=13)))
        operands = ["mm", "bias"] if form == "MatMul+Add" else ["bias", "mm"]
        nodes.append(node("Add", operands, ["mm_b"], "add"))
        t = "mm_b"
    norm, more = bn("bn", t, 4, out="y")
    model = make_model([*nodes, norm], [("x", ["N", 5])], [("y", ["N", 4])], inits + more)
    result = fuse_model(model)
    expect_fused(result, {"MatMul": 1, "Add": 1}, {RULE: 1})
    assert_same_outputs(model, result.model, {"x": rand(3, 5, seed=14)})


def test_float16_conv_bn_folds() -> None:
    model = conv_bn_model(4, 8, 3, group=2, pads=[1, 1, 1, 1], dtype=np.float16)
    result = fuse_model(model, rtol=2e-3)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    (fused,) = result.model.graph.node
    assert initializer(result.model, fused.input[1]).dtype == np.float16
    assert initializer(result.model, fused.input[2]).dtype == np.float16
    assert result.model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


# --- negatives: the rule does not fire, and says why ---------------------------------------


def test_training_mode_bn_is_refused() -> None:
    nodes, inits = chain(conv("conv", "x", rand(8, 3, 3, 3), rand(8)),
                         bn("bn", "conv_out", 8, out=["y", "running_mean", "running_var"],
                            training_mode=1))
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "bn", "training_mode=1")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_conv_output_with_second_consumer_is_refused() -> None:
    nodes, inits = chain(conv("conv", "x", rand(8, 3, 3, 3), rand(8)),
                         bn("bn", "conv_out", 8, out="y"))
    nodes.append(node("Relu", ["conv_out"], ["z"], "relu"))
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None), ("z", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "conv_out", "2 consumers")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_conv_output_that_is_a_graph_output_is_refused() -> None:
    nodes, inits = chain(conv("conv", "x", rand(8, 3, 3, 3), rand(8)),
                         bn("bn", "conv_out", 8, out="y"))
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None), ("conv_out", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "conv_out", "graph output")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_weight_that_is_a_graph_input_is_refused() -> None:
    conv_node = node("Conv", ["x", "W"], ["conv_out"], "conv")
    norm, inits = bn("bn", "conv_out", 8, out="y")
    model = make_model([conv_node, norm], [("x", ["N", 3, 8, 8]), ("W", [8, 3, 3, 3])],
                       [("y", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "'W'", "not a constant")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_bn_parameter_that_is_a_graph_input_is_refused() -> None:
    nodes, inits = chain(conv("conv", "x", rand(8, 3, 3, 3), rand(8)),
                         bn("bn", "conv_out", 8, out="y"))
    inits = [t for t in inits if t.name != "bn.scale"]
    model = make_model(nodes, [("x", ["N", 3, 8, 8]), ("bn.scale", [8])], [("y", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "bn.scale", "not a constant")
    assert op_counts(result.model) == op_counts(model)


def test_matmul_with_3d_input_is_refused() -> None:
    mm = node("MatMul", ["x", "W"], ["mm"], "matmul")
    norm, inits = bn("bn", "mm", 7, out="y")  # channel axis 1 of [N, 7, 4] is not a feature
    model = make_model([mm, norm], [("x", ["N", 7, 5])], [("y", None)],
                       [const("W", rand(5, 4)), *inits])
    result = fuse_model(model)
    expect_refused(result, RULE, "matmul", "input rank is 3")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_matmul_output_read_beside_its_bias_add_is_refused() -> None:
    nodes = [node("MatMul", ["x", "W"], ["mm"], "matmul"), node("Add", ["mm", "bias"], ["t"]),
             node("Relu", ["mm"], ["z"], "relu")]
    norm, inits = bn("bn", "t", 4, out="y")
    model = make_model([*nodes, norm], [("x", ["N", 5])], [("y", None), ("z", None)],
                       [const("W", rand(5, 4)), const("bias", rand(4, seed=2)), *inits])
    result = fuse_model(model)
    expect_refused(result, RULE, "mm has 2 consumers")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_gemm_c_not_per_feature_is_refused() -> None:
    gemm = node("Gemm", ["x", "B", "C"], ["g"], "gemm")
    norm, inits = bn("bn", "g", 4, out="y")
    model = make_model([gemm, norm], [("x", [2, 5])], [("y", None)],
                       [const("B", rand(5, 4)), const("C", rand(2, 4, seed=2)), *inits])
    result = fuse_model(model)
    expect_refused(result, RULE, "gemm C", "not per output feature")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


# --- a weight shared by two Convs -----------------------------------------------------------


@pytest.mark.parametrize("second_bn", [True, False], ids=["both-bn", "one-bn"])
def test_shared_weight_is_copied_never_mutated(second_bn: bool) -> None:
    weight, bias = rand(6, 3, 3, 3, seed=20), rand(6, seed=21)
    inits = [const("W", weight), const("b", bias)]
    nodes = [node("Conv", ["x", "W", "b"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             node("Conv", ["x", "W", "b"], ["c2"], "conv2", pads=[1, 1, 1, 1])]
    n1, i1 = bn("bn1", "c1", 6, out="y1", seed=30)
    nodes.append(n1)
    inits += i1
    if second_bn:
        n2, i2 = bn("bn2", "c2", 6, out="y2", seed=31)
        nodes.append(n2)
        inits += i2
    outputs = [("y1", None), ("y2" if second_bn else "c2", None)]
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], outputs, inits)
    pristine = model.SerializeToString()

    result = onnxrep.fuse(model)

    assert model.SerializeToString() == pristine  # the caller's model is untouched
    expect_fused(result, {"Conv": 2}, {RULE: 2 if second_bn else 1})
    onnx.checker.check_model(result.model)
    by_output = {n.output[0]: n for n in result.model.graph.node}
    for out, seed in (("y1", 30), ("y2", 31)) if second_bn else (("y1", 30),):
        gamma, beta, mean, var = (p.astype(np.float64) for p in bn_params(6, seed))
        a = gamma / np.sqrt(var + 1e-3)
        conv_node = by_output[out]
        np.testing.assert_allclose(initializer(result.model, conv_node.input[1]),
                                   weight.astype(np.float64) * a[:, None, None, None], rtol=1e-6)
        np.testing.assert_allclose(initializer(result.model, conv_node.input[2]),
                                   a * bias + beta - mean * a, rtol=1e-6, atol=1e-6)
    if not second_bn:  # the plain conv still reads the original, unchanged weight and bias
        plain = by_output["c2"]
        np.testing.assert_array_equal(initializer(result.model, plain.input[1]), weight)
        np.testing.assert_array_equal(initializer(result.model, plain.input[2]), bias)
    assert_same_outputs(model, result.model, {"x": rand(2, 3, 8, 8, seed=22)})


# --- soundness (issue 12) -------------------------------------------------------------------

SAME_CASES = [(auto_pad, hw, stride) for auto_pad in ("SAME_UPPER", "SAME_LOWER")
              for hw in ((9, 7), (10, 8)) for stride in (1, 2)]


@pytest.mark.parametrize(("auto_pad", "hw", "stride"), SAME_CASES,
                         ids=[f"{a}-{h}x{w}-s{s}" for a, (h, w), s in SAME_CASES])
def test_conv_with_same_auto_pad_folds(auto_pad: str, hw: tuple[int, int], stride: int) -> None:
    """A BN only scales and shifts the producer's output channels: where the padding goes
    does not matter (hole 7). Odd and even sizes, stride 1 and 2 (SAME_UPPER and SAME_LOWER
    then pad differently)."""
    model = conv_bn_model(4, 6, 3, hw=hw, auto_pad=auto_pad, strides=[stride, stride])
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    (fused,) = result.model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.attribute}
    assert attrs["auto_pad"] == auto_pad.encode()
    assert_same_outputs(model, result.model, {"x": rand(2, 4, *hw, seed=15)}, rtol=1e-6)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_conv_transpose_with_same_auto_pad_folds(auto_pad: str) -> None:
    nodes, inits = chain(
        conv("deconv", "x", rand(4, 6, 3, 3, seed=5), rand(6, seed=6), op="ConvTranspose",
             strides=[2, 2], auto_pad=auto_pad),
        bn("bn", "deconv_out", 6, out="y"))
    model = make_model(nodes, [("x", ["N", 4, 5, 6])], [("y", None)], inits)
    result = fuse_model(model)
    expect_fused(result, {"ConvTranspose": 1}, {RULE: 1})
    assert_same_outputs(model, result.model, {"x": rand(2, 4, 5, 6, seed=7)})


def test_spatial0_bn_is_refused() -> None:
    """opset < 9 spatial=0: per-element [C, H, W] statistics are no per-channel map."""
    c, h, w = 4, 5, 6
    rng = np.random.default_rng(0)
    names = [f"bn.{p}" for p in ("scale", "bias", "mean", "var")]
    nodes, inits = chain(
        conv("conv", "x", rand(c, 3, 1, 1, seed=2), rand(c, seed=3)),
        (node("BatchNormalization", ["conv_out", *names], ["y"], "bn", spatial=0),
         [const(n, rng.uniform(0.5, 1.5, (c, h, w))) for n in names]))
    model = make_model(nodes, [("x", ["N", 3, h, w])], [("y", ["N", c, h, w])], inits,
                       opset=8, ir_version=4)
    result = fuse_model(model)
    expect_refused(result, RULE, "bn has spatial=0 (per-element statistics)")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified
