"""verify: comparing two models' outputs on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from onnxrep.verify import compare_outputs, verify
from tests.helpers import bn, bn_params, chain, const, conv, make_model, node, rand


def test_compare_outputs_counts_matching_inf_and_nan_as_equal() -> None:

    ref = np.array([1.0, np.inf, np.nan, -np.inf], dtype=np.float32)
    same = compare_outputs(["y"], [ref], [ref.copy()], 1e-5, 1e-6)[0]
    assert same.passed and same.max_abs == 0.0
    moved = ref.copy()
    moved[2] = 0.0  # nan in one model only
    assert not compare_outputs(["y"], [ref], [moved], 1e-5, 1e-6)[0].passed
    flipped = ref.copy()
    flipped[1] = -np.inf
    assert not compare_outputs(["y"], [ref], [flipped], 1e-5, 1e-6)[0].passed


# --- per-dtype tolerances (float16 / bfloat16 models) -----------------------------------------


def _conv_bn_fp16(fold: bool, bias_error: float = 0.0) -> onnx.ModelProto:
    """Conv3x3 -> BN in float16, or (fold=True) the exact fold of it computed in float64 and
    rounded to float16 once - what fold-bn writes - with `bias_error` added to one bias."""
    from onnxrep import kernels

    w = rand(16, 8, 3, 3, seed=1, dtype=np.float16)
    gamma, beta, mean, var = bn_params(16, seed=2, dtype=np.float16)
    if not fold:
        nodes, inits = chain(conv("conv", "x", w, None, pads=[1, 1, 1, 1]),
                             bn("bn", "conv_out", 16, out="y", seed=2, dtype=np.float16))
    else:
        a, c = kernels.bn_affine(gamma, beta, mean, var, 1e-3)
        w2, b2 = kernels.scale_conv_output(w, None, a, c)
        b2[3] += bias_error
        nodes, inits = chain(conv("conv", "x", w2.astype(np.float16), b2.astype(np.float16),
                                  out="y", pads=[1, 1, 1, 1]))
    return make_model(nodes, [("x", ["N", 8, 12, 12], TensorProto.FLOAT16)],
                      [("y", ["N", 16, 12, 12], TensorProto.FLOAT16)], inits)


def test_an_exact_float16_fusion_passes_at_the_default_tolerance() -> None:
    result = verify(_conv_bn_fp16(False), _conv_bn_fp16(True))
    assert result.passed, result.outputs


def test_a_wrong_bias_in_a_float16_model_fails_at_the_default_tolerance() -> None:
    # one of 16 channels' bias off by 0.05 (outputs ~ +-10): rel L2 1.8e-3, an exact fold 3e-4
    result = verify(_conv_bn_fp16(False), _conv_bn_fp16(True, bias_error=0.05))
    assert not result.passed, result.outputs


# --- shapes and value regimes -----------------------------------------------------------------


def _strided(pads: list[int]) -> onnx.ModelProto:
    nodes, inits = chain(conv("conv", "x", rand(4, 3, 3, 3), rand(4), out="y", pads=pads,
                              strides=[2, 2]))
    return make_model(nodes, [("x", ["N", 3, "H", "W"])], [("y", None)], inits)


def test_a_difference_only_at_odd_sizes_is_caught() -> None:
    """pads [1,1,1,1] and [1,1,0,0] agree at every even size with stride 2, not at odd ones:
    the odd-size run finds it."""
    ref, cand = _strided([1, 1, 1, 1]), _strided([1, 1, 0, 0])
    at_8 = verify(ref, cand, input_shapes={"x": [1, 3, 8, 8]})
    assert not at_8.passed
    (even, *_), odd = at_8.runs[:4], at_8.runs[-1]
    assert even.passed and even.input_shapes == {"x": [1, 3, 8, 8]}
    assert not odd.passed and odd.input_shapes == {"x": [1, 3, 9, 9]}
    assert [r.regime for r in at_8.runs] == ["normal", "large", "negative", "positive",
                                             "normal", "normal"]
    assert at_8.runs[4].input_shapes == {"x": [2, 3, 8, 8]}


def test_shape_variants_keep_symbols_consistent_and_static_dims_fixed() -> None:
    from onnxrep.verify import shape_variants

    class Arg:
        def __init__(self, name: str, shape: list) -> None:
            self.name, self.shape = name, shape

    args = [Arg("a", ["N", 3, "H", "W"]), Arg("b", ["N", "H"]), Arg("c", [5, None])]
    assert shape_variants(args, {"a": [4, 3, 32, 30]}) == [
        {"a": [4, 3, 32, 30], "b": [4, 32], "c": [5, 1]},
        {"a": [5, 3, 32, 30], "b": [5, 32], "c": [5, 1]},
        {"a": [4, 3, 33, 31], "b": [4, 33], "c": [5, 1]},
    ]
    static = [Arg("x", [1, 3, 8, 8])]
    assert shape_variants(static) == [{"x": [1, 3, 8, 8]}]


def test_a_shape_the_input_model_does_not_admit_is_skipped_and_said() -> None:
    nodes = [node("Reshape", ["x", "shape"], ["y"], "reshape")]
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", [1, 48])],
                       [const("shape", np.array([1, 48]), np.int64)])
    result = verify(model, model)
    assert result.passed
    assert len(result.runs) == 4
    (skipped,) = result.skipped
    assert skipped.startswith("x[2, 3, 4, 4]: the input model does not run there")


# --- discontinuous outputs ----------------------------------------------------------------------


def _argmax_model(fold: bool) -> onnx.ModelProto:
    """Conv -> BN -> ArgMax over channels, where channels 0 and 1 tie in real arithmetic (the
    second filter is the first times 1 + 3e-7): float rounding picks the winner. `fold`: the
    BN folded into the Conv in float64 (what fold-bn writes), an exact fusion."""
    from onnxrep import kernels

    w = rand(16, 3, 3, 3, seed=1)
    w[1] = w[0] * np.float32(1 + 3e-7)
    b = rand(16, seed=2)
    b[1] = b[0]
    b[:2] += 5  # the tied pair wins often
    gamma, beta, mean, var = (a.copy() for a in bn_params(16, seed=3))
    for a in (gamma, beta, mean, var):
        a[1] = a[0]
    if fold:
        a, c = kernels.bn_affine(gamma, beta, mean, var, 1e-3)
        w2, b2 = kernels.scale_conv_output(w, b, a, c)
        nodes, inits = chain(conv("conv", "x", w2.astype(np.float32), b2.astype(np.float32),
                                  out="bn_out", pads=[1, 1, 1, 1]))
    else:
        nodes, inits = chain(conv("conv", "x", w, b, pads=[1, 1, 1, 1]))
        names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
        inits += [const(n, v) for n, v in zip(names, (gamma, beta, mean, var), strict=True)]
        nodes.append(node("BatchNormalization", ["conv_out", *names], ["bn_out"], "bn",
                          epsilon=1e-3))
    nodes.append(node("ArgMax", ["bn_out"], ["y"], "argmax", axis=1, keepdims=1))
    nodes.append(node("Relu", ["bn_out"], ["z"], "relu"))
    return make_model(nodes, [("x", ["N", 3, 16, 16])],
                      [("y", None, TensorProto.INT64), ("z", None)], inits)


def test_an_output_after_argmax_is_judged_by_what_feeds_the_argmax() -> None:
    """The tie flips between the two exact forms (the ArgMax outputs differ), yet the models
    are equal up to rounding: the BN output is compared in the ArgMax output's place."""
    from onnxrep.verify import session

    ref, fused = _argmax_model(False), _argmax_model(True)
    feeds = {"x": rand(1, 3, 16, 16, seed=5)}
    assert not np.array_equal(session(ref).run(["y"], feeds)[0],
                              session(fused).run(["y"], feeds)[0])  # the premise
    result = verify(ref, fused)
    assert result.passed, result.outputs
    assert [o.name for o in result.outputs] == ["z", "bn_out"]
    assert result.substituted == {
        "y": "computed through ArgMax(argmax): compared bn_out (what feeds it) instead"}


def test_a_wrong_fusion_before_an_argmax_is_still_caught() -> None:
    ref, fused = _argmax_model(False), _argmax_model(True)
    bias = next(t for t in fused.graph.initializer if t.name == "conv.b")
    wrong = onnx.numpy_helper.to_array(bias).copy()
    wrong[5] += 0.01
    bias.CopyFrom(onnx.numpy_helper.from_array(wrong, "conv.b"))
    assert not verify(ref, fused).passed


def test_a_fused_model_that_fails_where_the_input_runs_fails_verification() -> None:
    """The input admits 1x1 images (pads 1); a candidate that pads nothing does not run there:
    a failed verification naming why, not bad input."""
    ref = _strided([1, 1, 1, 1])
    cand = _strided([0, 0, 0, 0])
    result = verify(ref, cand, input_shapes={"x": [1, 3, 1, 1]})
    assert not result.passed
    assert result.runs[0].error.startswith("the fused model does not run where the input does")
