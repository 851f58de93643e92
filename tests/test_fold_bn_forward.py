"""fold-bn-forward: a BatchNormalization folds into the pad-0 Conv after it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import (
    assert_same_outputs,
    bn,
    chain,
    const,
    conv,
    expect_fused,
    expect_refused,
    fuse_model,
    make_model,
    node,
    op_counts,
    rand,
)

RULE = "fold-bn-forward"


def bn_conv_model(cin: int, cout: int, k: int, bias: bool = True, extra_outputs=(),
                  hw: tuple[int, int] = (10, 8), **attrs) -> onnx.ModelProto:
    """x -> BN -> Conv -> y (the BN reads a graph input: nothing to fold it back into)."""
    group = attrs.get("group", 1)
    nodes, inits = chain(
        bn("bn", "x", cin),
        conv("conv", "bn_out", rand(cout, cin // group, k, k, seed=2),
             rand(cout, seed=3) if bias else None, out="y", **attrs))
    outputs = [("y", None)] + [(name, None) for name in extra_outputs]
    return make_model(nodes, [("x", ["N", cin, *hw])], outputs, inits)


CASES = {
    "1x1-bias": dict(cin=4, cout=8, k=1),
    "1x1-nobias": dict(cin=4, cout=8, k=1, bias=False),
    "1x1-groups2": dict(cin=4, cout=6, k=1, group=2),
    "1x1-depthwise": dict(cin=6, cout=6, k=1, group=6, bias=False),
    "3x3-pad0": dict(cin=4, cout=5, k=3),
    "3x3-pad0-groups2-stride2": dict(cin=4, cout=8, k=3, group=2, strides=[2, 2]),
    "3x3-explicit-zero-pads-dilation2": dict(cin=3, cout=4, k=3, pads=[0, 0, 0, 0],
                                             dilations=[2, 2]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bn_folds_forward(case: dict) -> None:
    model = bn_conv_model(**case)
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    (fused,) = result.model.graph.node
    assert fused.input[0] == "x" and fused.output[0] == "y"


def test_bn_folds_forward_own_onnxruntime_run() -> None:
    model = bn_conv_model(4, 8, 3, group=2, strides=[1, 2], hw=(13, 11))
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1})
    assert_same_outputs(model, result.model, {"x": rand(3, 4, 13, 11, seed=9)}, rtol=1e-6)


def test_backward_fold_is_preferred_between_two_convs() -> None:
    """Conv -> BN -> 1x1 Conv: fold-bn runs first and takes the BN."""
    nodes, inits = chain(conv("conv0", "x", rand(4, 3, 3, 3), None, pads=[1, 1, 1, 1]),
                         bn("bn", "conv0_out", 4),
                         conv("conv", "bn_out", rand(6, 4, 1, 1, seed=2), None, out="y"))
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None)], inits)
    result = fuse_model(model)
    expect_fused(result, {"Conv": 2}, {"fold-bn": 1})


# --- negatives ------------------------------------------------------------------------------


@pytest.mark.parametrize("pads", [[1, 1, 1, 1], [0, 0, 1, 0]])
def test_padded_conv_is_refused(pads: list[int]) -> None:
    model = bn_conv_model(4, 8, 3, pads=pads)
    result = fuse_model(model)
    expect_refused(result, RULE, "conv", "pads", "zero padding")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_same_upper_auto_pad_is_refused() -> None:
    model = bn_conv_model(4, 8, 3, auto_pad="SAME_UPPER")
    result = fuse_model(model)
    expect_refused(result, RULE, "conv", "auto_pad=SAME_UPPER")
    assert op_counts(result.model) == op_counts(model)


def test_bn_output_with_two_consumers_is_refused() -> None:
    model = bn_conv_model(4, 8, 1)
    model.graph.node.append(node("Relu", ["bn_out"], ["z"], "relu"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        "z", onnx.TensorProto.FLOAT, ["N", 4, 10, 8]))
    onnx.checker.check_model(model)
    result = fuse_model(model)
    expect_refused(result, RULE, "bn_out", "2 consumers")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_bn_output_that_is_a_graph_output_is_refused() -> None:
    model = bn_conv_model(4, 8, 1, extra_outputs=["bn_out"])
    result = fuse_model(model)
    expect_refused(result, RULE, "bn_out", "graph output")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_training_mode_bn_is_refused() -> None:
    nodes, inits = chain(
        bn("bn", "x", 4, out=["bn_out", "running_mean", "running_var"], training_mode=1),
        conv("conv", "bn_out", rand(8, 4, 1, 1, seed=2), rand(8, seed=3), out="y"))
    model = make_model(nodes, [("x", ["N", 4, 6, 6])], [("y", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "bn", "training_mode=1")
    assert op_counts(result.model) == op_counts(model)
    assert result.verified


def test_bn_feeding_the_conv_weight_is_not_folded() -> None:
    """A BN whose output is the Conv's weight input is no input affine map."""
    nodes, inits = chain(bn("bn", "w_raw", 4))
    nodes.append(node("Conv", ["x", "bn_out"], ["y"], "conv"))
    model = make_model(nodes, [("x", ["N", 4, 6, 6]), ("w_raw", [8, 4, 1, 1])],
                       [("y", ["N", 8, 6, 6])], inits)
    result = fuse_model(model)
    assert RULE not in {a.rule for a in result.report.applied}
    assert op_counts(result.model) == op_counts(model)


def bn_gemm_model(trans_b: int, with_c: bool, alpha: float = 1.0, beta: float = 1.0,
                  x_shape: list | None = None, trans_a: int = 0) -> onnx.ModelProto:
    """x[N, 6] -> BN -> Gemm -> y (RepViT's BN_Linear head)."""
    b_matrix = rand(5, 6, seed=4) if trans_b else rand(6, 5, seed=4)
    inits = [onnx.numpy_helper.from_array(b_matrix, "gemm.B")]
    inputs = ["bn_out", "gemm.B"]
    if with_c:
        inits.append(onnx.numpy_helper.from_array(rand(5, seed=5), "gemm.C"))
        inputs.append("gemm.C")
    nodes, bn_inits = chain(bn("bn", "x", 6))
    nodes.append(node("Gemm", inputs, ["y"], "gemm", transB=trans_b, transA=trans_a,
                      alpha=alpha, beta=beta))
    return make_model(nodes, [("x", x_shape or ["N", 6])], [("y", None)], bn_inits + inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_bn_folds_forward_into_gemm(trans_b: int, with_c: bool) -> None:
    model = bn_gemm_model(trans_b, with_c, alpha=0.7, beta=1.3)
    result = fuse_model(model, input_shapes={"x": [3, 6]})
    expect_fused(result, {"Gemm": 1}, {RULE: 1})
    feeds = {"x": rand(4, 6, seed=9)}
    assert_same_outputs(model, result.model, feeds)


def test_bn_into_gemm_with_trans_a_is_refused() -> None:
    # x[6, 6]: with transA the BN's channel axis (1) is the Gemm's batch axis, not K.
    model = bn_gemm_model(0, True, x_shape=[6, 6], trans_a=1)
    result = fuse_model(model)
    expect_refused(result, RULE, "transA")
    assert op_counts(result.model)["BatchNormalization"] == 1


# --- soundness (issue 12) -------------------------------------------------------------------


@pytest.mark.parametrize("opset", [7, 8])
def test_spatial0_bn_is_refused_and_the_rest_fuses_through_the_cli(opset: int,
                                                                   tmp_path: Path) -> None:
    """opset < 9 BatchNormalization with spatial=0 normalizes per element ([C, H, W]
    statistics), not per channel: fold-bn-forward refuses it (it used to crash on it), and
    the Conv -> BN (spatial=1) after it still folds."""
    c, h, w = 4, 5, 6
    rng = np.random.default_rng(0)
    names = [f"bn0.{p}" for p in ("scale", "bias", "mean", "var")]
    inits = [const(n, rng.uniform(0.5, 1.5, (c, h, w))) for n in names]
    nodes, more = chain(
        (node("BatchNormalization", ["x", *names], ["bn0_out"], "bn0", spatial=0,
              epsilon=1e-3), inits),
        conv("conv", "bn0_out", rand(8, c, 1, 1, seed=2), rand(8, seed=3)),
        bn("bn1", "conv_out", 8, out="y"))
    model = make_model(nodes, [("x", ["N", c, h, w])], [("y", ["N", 8, h, w])], more,
                       opset=opset, ir_version=4)
    src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, str(src))
    proc = subprocess.run([sys.executable, "-m", "onnxrep.cli", "fuse", str(src), str(dst),
                           "--report", str(report), "-q"], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    found = json.loads(report.read_text())
    assert found["verification"]["passed"] is True
    assert found["rules_applied"] == {"fold-bn": 1}
    assert {"rule": RULE, "node": "bn0",
            "reason": "bn0 has spatial=0 (per-element statistics)"} in found["near_misses"]
    fused = onnx.load(str(dst))
    assert op_counts(fused) == {"BatchNormalization": 1, "Conv": 1}
    assert_same_outputs(model, fused, {"x": rand(3, c, h, w, seed=9)})
