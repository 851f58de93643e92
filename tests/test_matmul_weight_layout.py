"""matmul-weight-layout, the rule that runs for `--target openvino` only
(onnxrep.rules.TARGET_RULES): it fires for that target alone, keeps the model exact, and
refuses what it cannot write."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.helpers import cli, const, expect_fused, fuse_model, make_model, misses_for, node

LAYOUT = "matmul-weight-layout"


def _linear(weight: np.ndarray, twice: bool = False) -> onnx.ModelProto:
    """x[N, 16, 8] -> Relu -> MatMul(w) -> Add(b) -> out (and a second MatMul on w)."""
    nodes = [node("Relu", ["x"], ["t"], "pre"), node("MatMul", ["t", "w"], ["m"], "mm"),
             node("Add", ["m", "b"], ["out"], "bias")]
    outputs = [("out", None)]
    if twice:
        nodes.append(node("MatMul", ["t", "w"], ["out2"], "mm2"))
        outputs.append(("out2", None))
    bias = np.linspace(-1, 1, weight.shape[-1])
    return make_model(nodes, [("x", ["N", 16, 8])], outputs, [const("w", weight),
                                                             const("b", bias)])


def _weight(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_openvino_gets_the_weight_as_a_transpose_of_out_in() -> None:
    w = _weight(8, 4)
    result = fuse_model(_linear(w), target="openvino", input_shapes={"x": [2, 16, 8]})
    expect_fused(result, {"Relu": 1, "MatMul": 1, "Add": 1, "Transpose": 1}, {LAYOUT: 1})
    (stored,) = [t for t in result.model.graph.initializer if t.name != "b"]
    np.testing.assert_array_equal(numpy_helper.to_array(stored), w.T)
    transpose = next(n for n in result.model.graph.node if n.op_type == "Transpose")
    assert list(transpose.attribute[0].ints) == [1, 0]


@pytest.mark.parametrize("target", [None, "onnxruntime", "mnn", "ncnn"])
def test_other_targets_keep_the_in_out_weight(target: str | None) -> None:
    result = fuse_model(_linear(_weight(8, 4)), target=target, input_shapes={"x": [2, 16, 8]})
    expect_fused(result, {"Relu": 1, "MatMul": 1, "Add": 1}, {})


def test_a_shared_weight_is_stored_once_transposed() -> None:
    result = fuse_model(_linear(_weight(8, 4), twice=True), target="openvino",
                        input_shapes={"x": [2, 16, 8]})
    expect_fused(result, {"Relu": 1, "MatMul": 2, "Add": 1, "Transpose": 2}, {LAYOUT: 2})
    assert len(result.model.graph.initializer) == 2  # w^T once, and b


def test_a_batched_weight_is_refused() -> None:
    result = fuse_model(_linear(_weight(1, 8, 4)), target="openvino",
                        input_shapes={"x": [2, 16, 8]})
    expect_fused(result, {"Relu": 1, "MatMul": 1, "Add": 1}, {})
    assert any("rank 3, not 2" in r for r in misses_for(result, LAYOUT))


def test_activations_times_activations_are_no_candidate() -> None:
    nodes = [node("Transpose", ["x"], ["xt"], "t", perm=[0, 2, 1]),
             node("MatMul", ["x", "xt"], ["out"], "attn")]
    model = make_model(nodes, [("x", ["N", 16, 8])], [("out", None)])
    result = fuse_model(model, target="openvino", input_shapes={"x": [2, 16, 8]})
    expect_fused(result, {"Transpose": 1, "MatMul": 1}, {})
    assert misses_for(result, LAYOUT) == []


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
@pytest.mark.parametrize("form", ["ts-folded", "ts-unfolded"])
def test_levit_on_openvino_has_no_more_layers_than_the_plain_export(form: str,
                                                                   tmp_path: Path) -> None:
    """The LeViT family fused for openvino builds no more OpenVINO layers than the plain
    model PyTorch exports (which writes its Linear weights behind Transposes): 28 each at
    ts-unfolded; without the rule the fused one had 32."""
    from models.export import export
    from models.registry import FAMILIES
    from onnxrep import runtimes

    family = FAMILIES["levit"]
    src, plain, out = tmp_path / "train.onnx", tmp_path / "plain.onnx", tmp_path / "out.onnx"
    export(family.build_train(), family.input_shape, src, form)
    export(family.build_plain(), family.input_shape, plain, form)
    proc = cli("fuse", src, out, "-q", "--target", "openvino")
    assert proc.returncode == 0, proc.stderr
    fused, plain_check = runtimes.check_many([out, plain], "openvino",
                                             {"input": list(family.input_shape)})
    assert fused.passed and plain_check.passed
    assert fused.layers <= plain_check.layers, (fused.layers, plain_check.layers)


def test_an_integer_weight_is_refused() -> None:
    """Precondition 2: OpenVINO compresses integer weights by rules of its own."""
    nodes = [node("MatMul", ["x", "w"], ["out"], "mm")]
    weight = np.arange(32, dtype=np.int32).reshape(8, 4)
    model = make_model(nodes, [("x", ["N", 16, 8], onnx.TensorProto.INT32)],
                       [("out", None, onnx.TensorProto.INT32)],
                       [const("w", weight, np.int32)])
    result = fuse_model(model, target="openvino", input_shapes={"x": [2, 16, 8]})
    assert [n.op_type for n in result.model.graph.node] == ["MatMul"]
    assert any("int32, not floating point" in r for r in misses_for(result, LAYOUT)), \
        misses_for(result, LAYOUT)
