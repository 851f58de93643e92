"""onnxrep.batchwise: a subgraph from t [N, 2, 3, 3] to u is proven to treat every batch
element alike at every batch size, or refused with the node at fault."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxrep.batchwise import batchwise
from tests.helpers import const, make_model

I64 = np.int64


def _prove(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> str | None:
    model = make_model(nodes, [("t", ["N", 2, 3, 3])], [("u", None)], inits, check=False)
    graph = gs.import_onnx(model)
    graph.toposort()
    tensors = graph.tensors()
    refusal = batchwise(tensors["t"], tensors["u"], graph.nodes, [])
    return None if refusal is None else refusal.reason


def _n() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """n = Shape(t)[0] as a scalar, and the constant zero/one scalars."""
    return ([helper.make_node("Shape", ["t"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="n")],
            [const("zero", 0, I64), const("one", 1, I64)])


def _pad() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    return ([helper.make_node("Pad", ["t", "pads"], ["p"], name="pad")],
            [const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1]), I64)])


def _batch_indices(start: str = "zero") -> list[onnx.NodeProto]:
    """idx = Unsqueeze(Range(start, n, 1), -1): index tuples (n,)."""
    return [helper.make_node("Range", [start, "n", "one"], ["r"], name="range"),
            helper.make_node("Unsqueeze", ["r", "last"], ["idx"], name="idx")]


def test_pad_then_scatter_of_every_batch_element_is_proven() -> None:
    nodes, inits = _n()
    pad, more = _pad()
    nodes += pad + _batch_indices()
    nodes.append(helper.make_node("ScatterND", ["p", "idx", "p"], ["u"], name="write"))
    assert _prove(nodes, inits + more + [const("last", np.array([-1]), I64)]) is None


@pytest.mark.parametrize(("value", "op", "proven"), [
    (-1, "Equal", True),  # the exporter's "dim == -1 ?": never, for any batch size
    (0, "Greater", True),  # N > 0: always
    (4, "Equal", False),
    (3, "Greater", False),
    (1, "LessOrEqual", False),
])
def test_comparisons_of_the_batch_size(value: int, op: str, proven: bool) -> None:
    nodes, inits = _n()
    pad, more = _pad()
    nodes += pad + [
        helper.make_node(op, ["n", "k"], ["c"], name="compare"),
        helper.make_node("Where", ["c", "p", "fill"], ["u"], name="choose"),
    ]
    inits += more + [const("k", value, I64), const("fill", np.zeros((1, 2, 1, 1)))]
    reason = _prove(nodes, inits)
    assert (reason is None) == proven, reason
    if not proven:
        assert "compare" in reason and "batch size" in reason


@pytest.mark.parametrize(("nodes", "inits", "words"), [
    ([helper.make_node("Slice", ["t", "zero1", "one1", "zero1"], ["u"], name="s")],
     [const("zero1", [0], I64), const("one1", [1], I64)], ("s (Slice)", "batch axis")),
    ([helper.make_node("Gather", ["t", "zero1"], ["u"], name="g", axis=0)],
     [const("zero1", [0], I64)], ("g (Gather)", "picks batch elements")),
    ([helper.make_node("Reshape", ["t", "shape"], ["u"], name="r")],
     [const("shape", [2, -1, 3, 3], I64)], ("r (Reshape)",)),
    ([helper.make_node("ScatterND", ["t", "first", "upd"], ["u"], name="w")],
     [const("first", [[0]], I64), const("upd", np.zeros((1, 2, 3, 3)))],
     ("w (ScatterND)", "constant indices")),
    ([helper.make_node("Squeeze", ["t"], ["u"], name="q")], [], ("q (Squeeze)",)),
    ([helper.make_node("Div", ["t", "two"], ["u"], name="d")], [const("two", 2.0)],
     ("d (Div)", "not an op")),
])
def test_ops_that_treat_batch_elements_differently(nodes: list, inits: list,
                                                   words: tuple[str, ...]) -> None:
    reason = _prove(nodes, inits)
    assert reason is not None and all(w in reason for w in words), reason


def test_indices_shifted_along_the_batch_are_refused() -> None:
    """Range(1, N + 1): element n written to element n + 1."""
    nodes, inits = _n()
    pad, more = _pad()
    nodes += pad + [helper.make_node("Add", ["n", "one"], ["n1"], name="n_plus_1"),
                    helper.make_node("Range", ["one", "n1", "one"], ["r"], name="range"),
                    helper.make_node("Unsqueeze", ["r", "last"], ["idx"], name="idx"),
                    helper.make_node("ScatterND", ["p", "idx", "p"], ["u"], name="write")]
    reason = _prove(nodes, inits + more + [const("last", np.array([-1]), I64)])
    assert reason is not None and "write (ScatterND)" in reason, reason


def test_reversed_batch_is_refused() -> None:
    """Range(N - 1, -1, -1): element n written to element N - 1 - n."""
    nodes, inits = _n()
    pad, more = _pad()
    nodes += pad + [helper.make_node("Sub", ["n", "one"], ["top"], name="top"),
                    helper.make_node("Range", ["top", "minus1", "minus1"], ["r"], name="range"),
                    helper.make_node("Unsqueeze", ["r", "last"], ["idx"], name="idx"),
                    helper.make_node("ScatterND", ["p", "idx", "p"], ["u"], name="write")]
    inits += more + [const("last", np.array([-1]), I64), const("minus1", -1, I64)]
    reason = _prove(nodes, inits)
    assert reason is not None and "range (Range)" in reason, reason


def test_a_value_of_the_batch_size_written_into_the_data_is_refused() -> None:
    """u = Where(mask, Cast(N), p): the border holds the batch size."""
    nodes, inits = _n()
    pad, more = _pad()
    nodes += pad + [helper.make_node("Cast", ["n"], ["nf"], name="nf", to=1),
                    helper.make_node("Where", ["mask", "nf", "p"], ["u"], name="choose")]
    inits += more + [const("mask", np.ones((1, 1, 5, 5)), bool)]
    reason = _prove(nodes, inits)
    assert reason is not None and ("nf (Cast)" in reason or "choose (Where)" in reason), reason
