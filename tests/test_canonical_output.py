"""Canonical plain output and never slower than the input (issue 13, items 2 and 5): identical
initializers stored once, short node doc_strings, a zero bias kept after a MatMul."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto

from tests.helpers import (
    G,
    const,
    fuse_model,
    make_model,
    node,
    op_counts,
    rand,
)


def _initializer_names(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer]


def _clip_chain() -> onnx.ModelProto:
    """x -> Conv -> Clip(lo1, hi1) -> Conv -> Clip(lo2, hi2): lo1 == lo2 and hi1 == hi2 are
    separate initializers, as the TorchScript exporter writes a ReLU6's bounds per node."""
    g = G()
    a = g.conv("c1", "x", 4, 3)
    g.const("lo1", np.float32(0))
    g.const("hi1", np.float32(6))
    g.const("lo2", np.float32(0))
    g.const("hi2", np.float32(6))
    g.const("other", np.float32(5))  # same dtype and shape, other bytes: stays
    b = g.op("Clip", [a, "lo1", "hi1"], "clip1")
    c = g.conv("c2", b, 4, 3)
    d = g.op("Clip", [c, "lo2", "hi2"], "clip2")
    e = g.op("Clip", [d, "lo2", "other"], "clip3")
    return g.model(e)


def test_identical_initializers_are_stored_once() -> None:
    result = fuse_model(_clip_chain())
    assert result.verified
    model = result.model
    scalars = [t for t in model.graph.initializer if not t.dims]
    values = sorted(float(onnx.numpy_helper.to_array(t)) for t in scalars)
    assert values == [0.0, 5.0, 6.0], values
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips[0].input[1] == clips[1].input[1] == clips[2].input[1]
    assert clips[0].input[2] == clips[1].input[2] != clips[2].input[2]


def test_initializers_of_other_dtype_or_shape_or_sign_are_not_shared() -> None:
    g = G()
    a = g.conv("c1", "x", 4, 1)
    g.const("z32", np.float32(0))
    g.const("z64", np.float64(0))  # other dtype
    g.const("z1", np.zeros([1], np.float32))  # other shape
    g.const("negz", np.float32(-0.0))  # other bytes (equal as numbers)
    g.const("six", np.float32(6))
    b = g.op("Clip", [a, "z32", "six"], "clip1")
    c = g.op("Max", [b, "z1"], "max1")
    d = g.op("Clip", [c, "negz", "six"], "clip2")
    e = g.op("Cast", [d], "cast", to=TensorProto.DOUBLE)
    f = g.op("Max", [e, "z64"], "max2")
    model = make_model(g.nodes, [("x", ["N", g.cin, *g.hw])], [(f, None, TensorProto.DOUBLE)],
                       g.inits)
    result = fuse_model(model)
    assert result.verified
    assert len([t for t in result.model.graph.initializer if t.name != "c1.W"
                and t.name != "c1.b"]) == 5


def test_an_overridable_input_is_never_merged() -> None:
    """An initializer that is also a graph input is a default the caller may override: it
    stays its own tensor even when another constant has the same bytes."""
    nodes = [node("Clip", ["x", "lo", "hi"], ["t"], "clip1"),
             node("Clip", ["t", "lo_fixed", "hi"], ["y"], "clip2")]
    inits = [const("lo", np.float32(0)), const("lo_fixed", np.float32(0)),
             const("hi", np.float32(6))]
    model = make_model(nodes, [("x", ["N", 4]), ("lo", [])], [("y", None)], inits)
    result = fuse_model(model)
    assert result.verified
    assert {"lo", "lo_fixed"} <= set(_initializer_names(result.model))
    assert [i.name for i in result.model.graph.input] == ["x", "lo"]


def _matmul_bias(bias: np.ndarray) -> onnx.ModelProto:
    nodes = [node("MatMul", ["x", "W"], ["t"], "mm"), node("Add", ["t", "b"], ["y"], "add")]
    return make_model(nodes, [("x", ["N", 5, 8])], [("y", None)],
                      [const("W", rand(8, 6)), const("b", bias)])


def test_zero_bias_after_matmul_is_kept() -> None:
    """onnxruntime fuses MatMul + Add into one Gemm; dropping the zero Add would lose that."""
    result = fuse_model(_matmul_bias(np.zeros(6, np.float32)))
    assert result.verified
    assert op_counts(result.model) == Counter({"MatMul": 1, "Add": 1})


def test_zero_add_elsewhere_is_still_removed() -> None:
    nodes = [node("Relu", ["x"], ["t"], "relu"), node("Add", ["t", "b"], ["y"], "add")]
    model = make_model(nodes, [("x", ["N", 6])], [("y", None)],
                       [const("b", np.zeros(6, np.float32))])
    result = fuse_model(model)
    assert op_counts(result.model) == Counter({"Relu": 1})


def test_node_doc_strings_stay_short() -> None:
    """A node standing for many input nodes names its rules and a count, not every node."""
    g = G()
    x = "x"
    branches = [g.conv(f"b{i}", x, 4, 3) for i in range(12)]
    total = branches[0]
    for i, b in enumerate(branches[1:]):
        total = g.op("Add", [total, b], f"sum{i}")
    result = fuse_model(g.model(total))
    assert result.verified
    (merged,) = result.model.graph.node
    assert merged.doc_string.startswith("onnxrep: merge-parallel x")
    assert merged.doc_string.endswith("; 23 input nodes")
    assert len(merged.doc_string) < 80



def _written_dims(model: onnx.ModelProto, name: str) -> list:
    (info,) = [v for v in model.graph.value_info if v.name == name]
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in info.type.tensor_type.shape.dim]


def test_a_constant_view_with_minus_one_keeps_the_batch_name() -> None:
    """The dynamo export's `view` with a constant [-1, 64, 32]: onnx inference does not divide
    N*2048 by 2048, so the batch name was lost from there on (NextViT: onnxruntime then could
    not fuse a residual Add into its Conv, 61 .ort nodes against the plain model's 59). The
    element count proves the -1 is N; a second view carries it on."""
    nodes = [node("Reshape", ["x", "s1"], ["v1"], "view1"),
             node("Relu", ["v1"], ["r1"], "relu1"),
             node("Reshape", ["r1", "s2"], ["v2"], "view2", allowzero=1),
             node("Relu", ["v2"], ["out"], "relu2")]
    inits = [const("s1", np.array([-1, 64, 32]), np.int64),
             const("s2", np.array([-1, 8, 8, 32]), np.int64)]
    model = make_model(nodes, [("x", ["N", 8, 8, 32])], [("out", None)], inits)
    result = fuse_model(model, input_shapes={"x": [2, 8, 8, 32]})
    assert result.verified
    assert _written_dims(result.model, "v1") == ["N", 64, 32]
    assert _written_dims(result.model, "r1") == ["N", 64, 32]
    assert _written_dims(result.model, "v2") == ["N", 8, 8, 32]


def test_a_view_whose_static_parts_differ_names_nothing() -> None:
    """[N, 6, 4] -> [-1, 8]: the -1 is 3N, not N - no name is written for it."""
    nodes = [node("Reshape", ["x", "s"], ["v"], "view"), node("Relu", ["v"], ["out"], "relu")]
    model = make_model(nodes, [("x", ["N", 6, 4])], [("out", None)],
                       [const("s", np.array([-1, 8]), np.int64)])
    result = fuse_model(model, input_shapes={"x": [2, 6, 4]})
    assert result.verified
    assert _written_dims(result.model, "v")[0] in (None, "")
