"""onnxrep.nonnegative: the proofs that a tensor is >= 0 (remove-residual's hard precondition),
and for every op of the proof table a counterexample attribute value that the proof must
refuse (issue 12, hole 2): onnxruntime shows each break is real."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxrep.nonnegative import Proof, nonnegative
from onnxrep.rule import Refusal
from tests.helpers import const, make_model, node, rand, run


def _graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
           outputs: list[str]) -> gs.Graph:
    model = make_model(nodes, [("x", [1, 4, 6, 6])], [(o, None) for o in outputs], inits,
                       check=False)
    return gs.import_onnx(model)


def _prove(graph: gs.Graph, name: str = "y") -> Proof | Refusal:
    return nonnegative(graph, graph.tensors()[name])


@pytest.mark.parametrize("nodes,inits,chain", [
    ([node("Relu", ["x"], ["a"]), node("MaxPool", ["a"], ["y"], kernel_shape=[2, 2])], [],
     "y >= 0 via MaxPool(y) <- Relu(a)"),
    ([node("Clip", ["x", "lo"], ["y"])], [const("lo", 0.5)], "y >= 0 via Clip(y, min 0.5)"),
    ([node("Sigmoid", ["x"], ["s"]), node("Abs", ["x"], ["a"]),
      node("Concat", ["s", "a"], ["c"], axis=1), node("Flatten", ["c"], ["y"])], [],
     "y >= 0 via Flatten(y) <- Concat(c) of (Sigmoid(s); Abs(a))"),
    ([node("Max", ["x", "z"], ["y"])], [const("z", np.zeros((1, 4, 1, 1)))],
     "y >= 0 via Max(y) <- constant z >= 0"),
    ([node("Exp", ["x"], ["e"]), node("Pad", ["e", "p"], ["y"])],
     [const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)], "y >= 0 via Pad(y) <- Exp(e)"),
    ([node("Softmax", ["x"], ["s"]), node("Mul", ["s", "s"], ["y"])], [],
     "y >= 0 via Mul(y) of (Softmax(s); Softmax(s))"),
])
def test_nonnegative_proofs(nodes: list, inits: list, chain: str) -> None:
    proof = _prove(_graph(nodes, inits, ["y"]))
    assert isinstance(proof, Proof) and str(proof) == chain


@pytest.mark.parametrize("nodes,inits,words", [
    ([node("Conv", ["x", "w"], ["y"])], [const("w", rand(4, 4, 1, 1))],
     "Conv(y) is not known"),
    ([node("Clip", ["x", "lo"], ["y"])], [const("lo", -1.0)], "x is a graph input"),
    ([node("Relu", ["x"], ["r"]), node("Pad", ["r", "p", "v"], ["y"])],
     [const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64), const("v", -1.0)], "pad value"),
    ([node("Relu", ["x"], ["r"]), node("Resize", ["r", "", "s"], ["y"], mode="linear")],
     [const("s", [1, 1, 2, 2])], "interpolates (linear)"),
    ([node("Relu", ["x"], ["r"]), node("Add", ["r", "x"], ["y"])], [], "Add(y) <- x is a graph"),
    ([node("Relu", ["x"], ["r"]), node("Sub", ["r", "r"], ["y"])], [], "Sub(y) is not known"),
])
def test_nonnegative_refuses_unknowns(nodes: list, inits: list, words: str) -> None:
    proof = _prove(_graph(nodes, inits, ["y"]))
    assert isinstance(proof, Refusal)
    assert "'y' is not provably non-negative" in proof.reason and words in proof.reason, proof


def test_nonnegative_is_memoised() -> None:
    """40 levels of Add(t, t): 2^40 paths, one visit per tensor."""
    nodes = [node("Relu", ["x"], ["t0"])]
    nodes += [node("Add", [f"t{i}", f"t{i}"], [f"t{i + 1}"]) for i in range(40)]
    graph = _graph(nodes, [], ["t40"])
    start = time.perf_counter()
    proof = _prove(graph, "t40")
    assert isinstance(proof, Proof) and len(str(proof)) < 1000  # the text does not double
    assert time.perf_counter() - start < 1.0


def test_a_shared_memo_serves_several_queries() -> None:
    graph = _graph([node("Relu", ["x"], ["r"]), node("Abs", ["r"], ["a"]),
                    node("Sub", ["r", "a"], ["y"])], [], ["a", "y"])
    memo: dict = {}
    assert isinstance(nonnegative(graph, graph.tensors()["a"], memo), Proof)
    assert isinstance(nonnegative(graph, graph.tensors()["y"], memo), Refusal)
    assert len(memo) == 2  # a, y: Abs is a source, Sub stops the walk


# --- soundness: every attribute value, not only the usual ones (issue 12, hole 2) -----------
#
# Each case: x -> Relu -> r -> <op(s)> -> y. With the op's usual attributes y >= 0; with these,
# y has a negative (or nan) entry for some input, so no proof may go through the op.


def _relu_then(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: list[int],
               dtype: int = onnx.TensorProto.FLOAT, opset: int = 18) -> onnx.ModelProto:
    return make_model([node("Relu", ["x"], ["r"]), *nodes], [("x", shape, dtype)],
                      [("y", None, dtype)], inits, opset=opset, check=False)


BREAKS: dict[str, dict[str, Any]] = {
    "resize-tf-crop-extrapolates-below-zero": dict(
        nodes=[node("Resize", ["r", "roi", "s"], ["y"], mode="nearest",
                    coordinate_transformation_mode="tf_crop_and_resize",
                    extrapolation_value=-1.0)],
        inits=[const("roi", [0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5]), const("s", [1, 1, 2, 2])],
        words="extrapolates with -1"),
    "resize-cubic-overshoots": dict(
        nodes=[node("Resize", ["r", "", "s"], ["y"], mode="cubic")],
        inits=[const("s", [1, 1, 3, 3])], words="interpolates (cubic)"),
    "clip-min-above-negative-max": dict(  # ONNX: min > max gives max everywhere
        nodes=[node("Clip", ["r", "lo", "hi"], ["y"])],
        inits=[const("lo", 0.5), const("hi", -1.0)], words="max -1 < 0"),
    "maxpool-dilated-window-of-padding": dict(  # taps -1 and 2 of a 2-pixel input
        nodes=[node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], dilations=[3, 3],
                    pads=[1, 1, 1, 1])],
        inits=[], shape=[1, 2, 2, 2], words="dilations [3, 3]"),
    "maxpool-pads-reach-the-kernel": dict(  # onnxruntime refuses to run it, others need not
        nodes=[node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], pads=[2, 2, 2, 2])],
        inits=[], runs=False, words="pads [2, 2, 2, 2]"),
    "maxpool-ceil-window-past-the-end": dict(  # onnxruntime drops that window, ONNX < 19 not
        nodes=[node("MaxPool", ["r"], ["y"], kernel_shape=[1, 1], strides=[2, 2],
                    ceil_mode=1)],
        inits=[], runs=False, words="ceil_mode=1"),
    "averagepool-dilated-window-of-padding": dict(  # 0 / 0 for count_include_pad=0
        nodes=[node("AveragePool", ["r"], ["y"], kernel_shape=[2, 2], dilations=[3, 3],
                    pads=[1, 1, 1, 1])],
        inits=[], runs=False, opset=19, words="dilations [3, 3]"),
    "pad-unknown-mode": dict(
        nodes=[node("Pad", ["r", "p"], ["y"], mode="mirror")],
        inits=[const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)], runs=False,
        words="mode 'mirror'"),
    "pad-attribute-value-nan": dict(  # opset < 11: the value is an attribute
        nodes=[node("Pad", ["r"], ["y"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=float("nan"))],
        inits=[], opset=10, words="value nan"),
    "clip-nan-bound": dict(
        nodes=[node("Clip", ["r", "lo", "hi"], ["y"])],
        inits=[const("lo", float("nan")), const("hi", 6.0)], runs=False, words="nan bound"),
    "int8-add-wraps": dict(  # 100 + 100 = -56 in int8
        nodes=[node("Add", ["r", "r"], ["y"])], inits=[], dtype=onnx.TensorProto.INT8,
        feed=np.full((1, 2, 4, 4), 100, np.int8), words="not floating point"),
    "int8-abs-of-the-minimum": dict(  # |-128| = -128 in int8
        nodes=[node("Abs", ["x8"], ["y"])], inits=[], dtype=onnx.TensorProto.INT8,
        runs=False, words="not floating point"),
}


@pytest.mark.parametrize("case", BREAKS)
def test_counterexample_attributes_are_refused(case: str) -> None:
    spec = BREAKS[case]
    shape = spec.get("shape", [1, 2, 4, 4])
    nodes = list(spec["nodes"])
    if case == "int8-abs-of-the-minimum":
        nodes = [node("Identity", ["r"], ["x8"]), *nodes]
    model = _relu_then(nodes, spec["inits"], shape, spec.get("dtype", onnx.TensorProto.FLOAT),
                       spec.get("opset", 18))
    if spec.get("runs", True):  # the break is real, not only on paper
        feed = spec.get("feed", rand(*shape, seed=3))
        (y,) = run(model, {"x": feed})
        assert not np.all(y >= 0), y
    proof = _prove(gs.import_onnx(model))
    assert isinstance(proof, Refusal), proof
    assert spec["words"] in proof.reason, proof.reason


@pytest.mark.parametrize("nodes,inits", [
    ([node("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
     []),  # the ResNet stem
    ([node("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
           ceil_mode=1)], []),
    ([node("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
           auto_pad="SAME_UPPER")], []),
    ([node("AveragePool", ["r"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], []),
    ([node("GlobalAveragePool", ["r"], ["y"])], []),
    ([node("Resize", ["r", "roi", "s"], ["y"], mode="nearest",
           coordinate_transformation_mode="tf_crop_and_resize")],
     [const("roi", [0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5]), const("s", [1, 1, 2, 2])]),
    ([node("Resize", ["r", "", "s"], ["y"], mode="nearest")], [const("s", [1, 1, 2, 2])]),
    ([node("Clip", ["r", "lo", "hi"], ["y"])], [const("lo", 0.0), const("hi", 6.0)]),
    ([node("Clip", ["r", "lo", "hi"], ["y"])], [const("lo", -1.0), const("hi", 6.0)]),
    ([node("Clip", ["r", "", "hi"], ["y"])], [const("hi", 6.0)]),
    ([node("Pad", ["r", "p"], ["y"], mode="edge")],
     [const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)]),
    ([node("Pad", ["r", "p"], ["y"], mode="reflect")],
     [const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)]),
    ([node("Pad", ["r", "p"], ["y"], mode="wrap")],
     [const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)]),
])
def test_usual_attributes_stay_proven(nodes: list, inits: list) -> None:
    model = _relu_then(nodes, inits, [1, 2, 5, 5], opset=19)
    (y,) = run(model, {"x": rand(1, 2, 5, 5, seed=3)})
    assert np.all(y >= 0)
    proof = _prove(gs.import_onnx(model))
    assert isinstance(proof, Proof), proof
