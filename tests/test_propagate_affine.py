"""propagate-affine: a per-channel affine map folds into the linear ops around it through
layout ops, pools and fan-out; and refuses, naming the path, where that is not exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import (
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

RULE = "propagate-affine"
I64 = np.int64


def shape_const(name: str, dims: list[int]) -> onnx.TensorProto:
    return const(name, np.array(dims, I64), I64)


def levit_linear_bn(bias: bool = True, flatten: bool = True) -> onnx.ModelProto:
    """x[B, N, 6] -> MatMul(W) [-> Add(b)] -> Flatten(2) / Reshape[-1, 8] -> BN -> Reshape back
    (to Shape of the MatMul's output) -> y: LeViT's Linear_BN."""
    nodes = [node("MatMul", ["x", "W"], ["mm"], "mm")]
    inits = [const("W", rand(6, 8, seed=2))]
    t = "mm"
    if bias:
        nodes.append(node("Add", ["mm", "b"], ["mm_b"], "bias"))
        inits.append(const("b", rand(8, seed=3)))
        t = "mm_b"
    if flatten:
        nodes.append(node("Flatten", [t], ["flat"], "flat", axis=2))
    else:
        nodes.append(node("Reshape", [t, "tokens"], ["flat"], "flat"))
        inits.append(shape_const("tokens", [-1, 8]))
    b, i = bn("bn", "flat", 8)
    nodes += [b, node("Shape", [t], ["shape"], "shape"),
              node("Reshape", ["bn_out", "shape"], ["y"], "back")]
    inits += i
    return make_model(nodes, [("x", ["B", "N", 6])], [("y", None)], inits)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("flatten", [True, False])
def test_linear_bn_on_tokens_folds_back_into_the_matmul(bias: bool, flatten: bool) -> None:
    result = fuse_model(levit_linear_bn(bias, flatten),
                        input_shapes={"x": [2, 5, 6]})
    # then reshape-chain: the pair of reshapes the BN sat between does nothing
    expect_fused(result, {"MatMul": 1, "Add": 1}, {RULE: 1, "reshape-chain": 2})
    assert "folded back into mm" in result.report.applied[0].why


def nextvit_block(c: int = 8) -> onnx.ModelProto:
    """x[N, C, H, W] -> BN -> Reshape[0, C, -1] -+-> Transpose -> MatMul(Wq) + bq -> q
                                                 +-> AveragePool(4, 4) -> Transpose -+-> MatMul(Wk)
                                                                                      +-> MatMul(Wv)
    (NextViT's pre-norm E-MHSA projections; q, k, v are outputs)."""
    nodes, inits = chain(bn("bn", "x", c))
    nodes += [
        node("Reshape", ["bn_out", "tok"], ["t"], "flat"),
        node("Transpose", ["t"], ["tq"], "tq", perm=[0, 2, 1]),
        node("MatMul", ["tq", "Wq"], ["q0"], "q"), node("Add", ["q0", "bq"], ["q"], "q_bias"),
        node("AveragePool", ["t"], ["p"], "sr", kernel_shape=[4], strides=[4]),
        node("Transpose", ["p"], ["tk"], "tk", perm=[0, 2, 1]),
        node("MatMul", ["tk", "Wk"], ["k"], "k"), node("MatMul", ["tk", "Wv"], ["v"], "v"),
    ]
    inits += [shape_const("tok", [0, c, -1]), const("Wq", rand(c, 4, seed=5)),
              const("bq", rand(4, seed=6)), const("Wk", rand(c, 4, seed=7)),
              const("Wv", rand(c, 4, seed=8))]
    return make_model(nodes, [("x", ["N", c, "H", "W"])], [("q", None), ("k", None),
                                                           ("v", None)], inits)


def test_pre_norm_bn_folds_forward_into_q_k_v_through_reshape_transpose_and_pool() -> None:
    result = fuse_model(nextvit_block(), input_shapes={"x": [2, 8, 4, 6]})
    expect_fused(result, {"Reshape": 1, "Transpose": 2, "AveragePool": 1, "MatMul": 3,
                          "Add": 3}, {RULE: 1})
    assert "into q, k, v" in result.report.applied[0].why


def head_model(pool: str = "GlobalAveragePool", **pool_attrs: object) -> onnx.ModelProto:
    """x -> Conv -> Relu -> BN -> pool (to 1x1) -> Flatten -> Gemm -> y: the BN cannot go back
    (Relu)."""
    nodes, inits = chain(conv("conv", "x", rand(8, 3, 3, 3, seed=1), rand(8, seed=2),
                              pads=[1, 1, 1, 1]))
    nodes.append(node("Relu", ["conv_out"], ["r"], "relu"))
    b, i = bn("bn", "r", 8)
    nodes += [b, node(pool, ["bn_out"], ["p"], "pool", **pool_attrs),
              node("Flatten", ["p"], ["f"], "flat"),
              node("Gemm", ["f", "B", "Cb"], ["y"], "fc", transB=1)]
    inits += i + [const("B", rand(5, 8, seed=3)),
                  const("Cb", rand(5, seed=4))]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None)], inits)


def test_bn_before_global_pool_folds_into_the_head_gemm() -> None:
    result = fuse_model(head_model(), input_shapes={"x": [2, 3, 8, 8]})
    expect_fused(result, {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1,
                          "Gemm": 1}, {RULE: 1})


def test_average_pool_that_counts_padding_keeps_the_bn() -> None:
    model = head_model("AveragePool", kernel_shape=[3, 3], strides=[8, 8], pads=[1, 1, 1, 1],
                       count_include_pad=1)
    result = fuse_model(model, input_shapes={"x": [2, 3, 8, 8]})
    expect_refused(result, RULE, "pool", "count_include_pad=1")
    assert op_counts(result.model)["BatchNormalization"] == 1


def test_average_pool_that_does_not_count_padding_passes_the_bn() -> None:
    model = head_model("AveragePool", kernel_shape=[3, 3], strides=[8, 8], pads=[1, 1, 1, 1],
                       count_include_pad=0)
    result = fuse_model(model, input_shapes={"x": [2, 3, 8, 8]})
    expect_fused(result, {"Conv": 1, "Relu": 1, "AveragePool": 1, "Flatten": 1, "Gemm": 1},
                 {RULE: 1})


def fan_out(second: str, c: int = 4, **attrs: object) -> onnx.ModelProto:
    """x -> BN -+-> Conv 1x1 pad 0 -> y1
                +-> <second> -> y2"""
    nodes, inits = chain(bn("bn", "x", c),
                         conv("c1", "bn_out", rand(6, c, 1, 1, seed=3), rand(6, seed=4),
                              out="y1"))
    if second == "Conv":
        n, i = conv("c2", "bn_out", rand(6, c, 3, 3, seed=5), rand(6, seed=6), out="y2",
                    **attrs)
        nodes.append(n)
        inits += i
    else:
        nodes.append(node(second, ["bn_out"], ["y2"], "other", **attrs))
    return make_model(nodes, [("x", ["N", c, 7, 6])], [("y1", None), ("y2", None)], inits)


def test_bn_folds_into_every_consumer() -> None:
    result = fuse_model(fan_out("Conv", pads=[0, 0, 0, 0], strides=[2, 2]),
                        input_shapes={"x": [2, 4, 7, 6]})
    expect_fused(result, {"Conv": 2}, {RULE: 1})


def test_a_nonlinearity_on_one_path_keeps_the_bn_and_names_the_path() -> None:
    result = fuse_model(fan_out("Relu"))
    expect_refused(result, RULE, "bn -> other (Relu)", "not linear")
    assert op_counts(result.model)["BatchNormalization"] == 1


def test_a_padded_conv_does_not_absorb_a_shift() -> None:
    result = fuse_model(fan_out("Conv", pads=[1, 1, 1, 1]))
    expect_refused(result, RULE, "c2", "pads its input")
    result = fuse_model(fan_out("Conv", auto_pad="SAME_UPPER"))
    expect_refused(result, RULE, "c2", "pads its input")


def test_a_padded_conv_absorbs_a_pure_scale() -> None:
    """Mul by a per-channel constant (c = 0): zero padding of a*x is a times zero padding."""
    c = 4
    nodes = [node("Mul", ["x", "s"], ["m"], "scale")]
    inits = [const("s", rand(c, 1, 1, seed=1))]
    for name, pads in (("c1", [0, 0, 0, 0]), ("c2", [1, 1, 1, 1])):
        n, i = conv(name, "m", rand(6, c, 3, 3, seed=len(name)), rand(6, seed=2),
                    out=f"{name}_y", pads=pads)
        nodes.append(n)
        inits += i
    model = make_model(nodes, [("x", ["N", c, 7, 6])], [("c1_y", None), ("c2_y", None)], inits)
    result = fuse_model(model, input_shapes={"x": [2, 4, 7, 6]})
    expect_fused(result, {"Conv": 2}, {RULE: 1})


def test_a_reshape_that_splits_the_channel_axis_keeps_the_bn() -> None:
    """[N, 8, H, W] -> Transpose -> [N, H, W, 8] -> Reshape [N, H, W, 2, 4] -> MatMul([4, 3]):
    the MatMul contracts half of the channel axis."""
    nodes, inits = chain(bn("bn", "x", 8))
    nodes += [node("Transpose", ["bn_out"], ["t"], "nhwc", perm=[0, 2, 3, 1]),
              node("Reshape", ["t", "split"], ["r"], "split"),
              node("MatMul", ["r", "W"], ["y"], "mm")]
    inits += [shape_const("split", [0, 0, 0, 2, 4]), const("W", rand(4, 3, seed=3))]
    model = make_model(nodes, [("x", ["N", 8, 3, 5])], [("y", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "split (Reshape)", "does not provably keep")


def test_a_symbolic_reshape_is_proved_by_its_kept_batch_dim() -> None:
    """Reshape to Concat(Shape(x)[0:1], [C], [-1]): data propagation gives [N, C, ?]; the
    batch dim N before the channel axis is the same symbol on both sides."""
    nodes, inits = chain(bn("bn", "x", 8))
    nodes += [node("Shape", ["bn_out"], ["s"], "shape", start=0, end=1),
              node("Concat", ["s", "rest"], ["target"], "target", axis=0),
              node("Reshape", ["bn_out", "target"], ["t"], "flat"),
              node("Transpose", ["t"], ["tt"], "tt", perm=[0, 2, 1]),
              node("MatMul", ["tt", "W"], ["y"], "mm")]
    inits += [shape_const("rest", [8, -1]), const("W", rand(8, 3, seed=3))]
    model = make_model(nodes, [("x", ["N", 8, "H", "W"])], [("y", None)], inits)
    result = fuse_model(model, input_shapes={"x": [2, 8, 3, 5]})
    assert result.verified
    assert op_counts(result.model)["BatchNormalization"] == 0, result.report.misses
    assert op_counts(result.model)["MatMul"] == 1


def test_a_uniform_scale_in_attention_folds_back_into_the_query_projection() -> None:
    """q = Transpose(Reshape(MatMul(x, Wq) + bq)) / sqrt(d) -> MatMul(q, k^T): the scalar Div
    goes back into Wq and bq through the layout ops."""
    nodes = [node("MatMul", ["x", "Wq"], ["q0"], "q"), node("Add", ["q0", "bq"], ["q1"], "qb"),
             node("Reshape", ["q1", "heads"], ["q2"], "heads"),
             node("Transpose", ["q2"], ["q3"], "qt", perm=[0, 2, 1, 3]),
             node("Div", ["q3", "scale"], ["q4"], "scale"),
             node("MatMul", ["x", "Wk"], ["k0"], "k"),
             node("Reshape", ["k0", "heads"], ["k1"], "kheads"),
             node("Transpose", ["k1"], ["k2"], "kt", perm=[0, 2, 3, 1]),
             node("MatMul", ["q4", "k2"], ["y"], "attn")]
    inits = [const("Wq", rand(8, 8, seed=1)), const("bq", rand(8, seed=2)),
             const("Wk", rand(8, 8, seed=3)), shape_const("heads", [0, 0, 2, 4]),
             const("scale", np.float32(2.0))]
    model = make_model(nodes, [("x", ["B", "N", 8])], [("y", None)], inits)
    result = fuse_model(model, input_shapes={"x": [2, 5, 8]})
    assert result.verified
    assert op_counts(result.model)["Div"] == 0
    assert any("folded back into q" in a.why for a in result.report.applied)


def test_a_graph_output_on_the_way_keeps_the_bn() -> None:
    nodes, inits = chain(bn("bn", "x", 4))
    nodes += [node("Transpose", ["bn_out"], ["t"], "t", perm=[0, 2, 3, 1]),
              node("MatMul", ["t", "W"], ["y"], "mm")]
    inits.append(const("W", rand(4, 3, seed=3)))
    model = make_model(nodes, [("x", ["N", 4, 3, 5])], [("y", None), ("t", None)], inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "t is a graph output")


def test_the_map_on_the_weight_side_of_a_matmul_is_refused() -> None:
    nodes, inits = chain(bn("bn", "x", 4))
    nodes += [node("Transpose", ["bn_out"], ["t"], "t", perm=[0, 2, 1, 3]),
              node("MatMul", ["a", "t"], ["y"], "mm")]
    model = make_model(nodes, [("x", ["N", 4, 3, 5]), ("a", ["N", 3, 2, 4])], [("y", None)],
                       inits)
    result = fuse_model(model)
    expect_refused(result, RULE, "weight input")


def test_a_shared_consumer_weight_is_copied_within_the_growth_bound_only() -> None:
    """Two MatMuls share W; the BN before one of them folds into a copy of W."""
    nodes, inits = chain(bn("bn", "x", 16))
    nodes += [node("MatMul", ["bn_out", "W"], ["y1"], "mm1"),
              node("MatMul", ["z", "W"], ["y2"], "mm2")]
    inits.append(const("W", rand(16, 16, seed=3)))
    model = make_model(nodes, [("x", ["N", 16]), ("z", ["N", 16])], [("y1", None),
                                                                     ("y2", None)], inits)
    loose = fuse_model(model, max_growth=2.0)
    assert op_counts(loose.model)["BatchNormalization"] == 0
    tight = fuse_model(model)  # default 1.05: a second 16x16 copy is +~80%
    assert op_counts(tight.model)["BatchNormalization"] == 1
    expect_refused(tight, RULE, "max-growth")


def test_every_batchnorm_left_is_explained(tmp_path) -> None:  # noqa: ANN001
    """The console says how many BNs stay; --explain and the JSON report give each a reason."""
    import json

    from tests.helpers import cli

    path, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(fan_out("Relu"), str(path))
    proc = cli("fuse", path, out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "BatchNormalization left: 1 (--explain says why)" in proc.stdout
    misses = json.loads(report.read_text())["near_misses"]
    assert any(m["node"] == "bn" and m["rule"] == RULE and "Relu" in m["reason"]
               for m in misses), misses


def test_a_flatten_that_merges_the_channel_axis_repeats_the_map() -> None:
    """BN -> AveragePool to 2x2 -> Flatten -> Gemm: feature 4*ch + s of the Gemm's input is
    channel ch, so the map reaches the Gemm with a and c each repeated 4 times."""
    nodes, inits = chain(conv("conv", "x", rand(8, 3, 3, 3, seed=1), rand(8, seed=2),
                              pads=[1, 1, 1, 1]))
    nodes.append(node("Relu", ["conv_out"], ["r"], "relu"))
    b, i = bn("bn", "r", 8)
    nodes += [b, node("AveragePool", ["bn_out"], ["p"], "pool", kernel_shape=[4, 4],
                      strides=[4, 4]),
              node("Flatten", ["p"], ["f"], "flat"),
              node("Gemm", ["f", "B", "Cb"], ["y"], "fc", transB=1)]
    inits += i + [const("B", rand(5, 32, seed=3)), const("Cb", rand(5, seed=4))]
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None)], inits)
    result = fuse_model(model, input_shapes={"x": [2, 3, 8, 8]})
    expect_fused(result, {"Conv": 1, "Relu": 1, "AveragePool": 1, "Flatten": 1, "Gemm": 1},
                 {RULE: 1})


def test_a_reshape_that_merges_the_channel_axis_with_the_batch_keeps_the_bn() -> None:
    """[N, 4, 3, 5] -> Reshape [-1, 15] -> MatMul: rows mix batch and channel; the MatMul
    contracts the spatial positions, not the channels."""
    nodes, inits = chain(bn("bn", "x", 4))
    nodes += [node("Reshape", ["bn_out", "rows"], ["r"], "rows"),
              node("MatMul", ["r", "W"], ["y"], "mm")]
    inits += [shape_const("rows", [-1, 15]), const("W", rand(15, 3, seed=3))]
    model = make_model(nodes, [("x", ["N", 4, 3, 5])], [("y", None)], inits)
    result = fuse_model(model, input_shapes={"x": [2, 4, 3, 5]})
    expect_refused(result, RULE, "rows (Reshape)")
    assert result.verified
