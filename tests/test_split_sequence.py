"""split-sequence: SplitToSequence read only by constant SequenceAt -> one Split."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import onnxrep.rules
from onnxrep.rules.split_sequence import SequenceToSplit
from tests.helpers import (
    const,
    expect_fused,
    expect_refused,
    fuse_model,
    make_model,
    node,
    op_counts,
)

RULE = "split-sequence"
X = ("x", ["N", 16, 2, 32])


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule runs in fuse() whether or not onnxrep.rules lists it yet."""
    if all(r.id != RULE for r in onnxrep.rules.RULES):
        monkeypatch.setattr(onnxrep.rules, "RULES", [*onnxrep.rules.RULES, SequenceToSplit()])


def _split_model(sizes: list[int] | int | None, positions: list[int], axis: int = 3,
                 split_dtype: type = np.int64, keepdims: int | None = None,
                 x: tuple = X, opset: int = 18) -> onnx.ModelProto:
    """x -> SplitToSequence(sizes, axis) -> SequenceAt(p) -> Relu -> output, per position."""
    inits, inputs = [], ["x"]
    if sizes is not None:
        inits.append(const("sizes", np.asarray(sizes), split_dtype))
        inputs.append("sizes")
    attrs = {"axis": axis} if keepdims is None else {"axis": axis, "keepdims": keepdims}
    nodes = [node("SplitToSequence", inputs, ["seq"], "to_seq", **attrs)]
    outputs = []
    for k, p in enumerate(positions):
        inits.append(const(f"p{k}", np.asarray(p), np.int64))
        nodes += [node("SequenceAt", ["seq", f"p{k}"], [f"chunk{k}"], f"at{k}"),
                  node("Relu", [f"chunk{k}"], [f"y{k}"], f"relu{k}")]
        outputs.append((f"y{k}", None))
    return make_model(nodes, [x], outputs, inits, opset=opset)


def test_fires_on_three_chunks() -> None:
    result = fuse_model(_split_model([8, 8, 16], [0, 1, 2]))
    expect_fused(result, {"Split": 1, "Relu": 3}, {RULE: 1})
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert [a.i for a in split.attribute if a.name == "axis"] == [3]


@pytest.mark.parametrize(("sizes", "positions", "axis"), [
    ([8, 8, 16], [-1, -3], 3),  # negative positions, chunk 1 unused
    ([8, 8, 16], [2], -1),  # one chunk of three, negative axis
    ([4, 12], [-2, 1], 1),
    ([5, 11, 0, 16], [3, 1, 0], 3),  # a zero-size chunk, unused
    ([32], [0], 3),  # one chunk: the whole tensor
])
def test_fires_on_negative_positions_and_subsets(sizes: list[int], positions: list[int],
                                                 axis: int) -> None:
    result = fuse_model(_split_model(sizes, positions, axis=axis))
    expect_fused(result, {"Split": 1, "Relu": len(positions)}, {RULE: 1})
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert len(split.output) == len(sizes)


def test_fires_on_a_repeated_position() -> None:
    """Two SequenceAt(1) (and one SequenceAt(-2), the same chunk): all read Split output 1."""
    result = fuse_model(_split_model([8, 8, 16], [1, 0, 1, -2]))
    expect_fused(result, {"Split": 1, "Relu": 4}, {RULE: 1})
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    relus = [n for n in result.model.graph.node if n.op_type == "Relu"]
    assert sum(1 for r in relus if r.input[0] == split.output[1]) == 3


def test_repeated_position_as_graph_outputs() -> None:
    """Both SequenceAt outputs of chunk 0 are graph outputs: each stays one."""
    nodes = [node("SplitToSequence", ["x", "sizes"], ["seq"], "to_seq", axis=1),
             node("SequenceAt", ["seq", "zero"], ["a"], "at_a"),
             node("SequenceAt", ["seq", "zero"], ["b"], "at_b")]
    model = make_model(nodes, [X], [("a", None), ("b", None)],
                       [const("sizes", np.asarray([6, 10]), np.int64),
                        const("zero", np.asarray(0), np.int64)])
    result = fuse_model(model)
    assert result.verified, result.report.verification
    assert op_counts(result.model)["Split"] == 1
    assert not {"SplitToSequence", "SequenceAt"} & set(op_counts(result.model))
    assert [o.name for o in result.model.graph.output] == ["a", "b"]


def test_int32_sizes_and_keepdims_zero() -> None:
    """int32 sizes are written as int64 (Split takes only int64); keepdims is ignored when
    the split is given (ONNX spec), so keepdims=0 changes nothing."""
    result = fuse_model(_split_model([8, 8, 16], [0, 2], split_dtype=np.int32, keepdims=0))
    expect_fused(result, {"Split": 1, "Relu": 2}, {RULE: 1})


def test_idempotent() -> None:
    once = fuse_model(_split_model([8, 8, 16], [0, 1, 2]))
    again = fuse_model(once.model)
    assert not again.report.applied


def _other_reader(op: str) -> onnx.ModelProto:
    extra = {"SequenceLength": node("SequenceLength", ["seq"], ["len"], "length"),
             "ConcatFromSequence": node("ConcatFromSequence", ["seq"], ["len"], "concat",
                                        axis=3)}[op]
    nodes = [node("SplitToSequence", ["x", "sizes"], ["seq"], "to_seq", axis=3),
             node("SequenceAt", ["seq", "zero"], ["y"], "at0"), extra]
    other = ("len", [], TensorProto.INT64) if op == "SequenceLength" else ("len", ["N", 16, 2, 32])
    return make_model(nodes, [X], [("y", None), other],
                      [const("sizes", np.asarray([8, 8, 16]), np.int64),
                       const("zero", np.asarray(0), np.int64)])


@pytest.mark.parametrize("op", ["SequenceLength", "ConcatFromSequence"])
def test_other_reader_refused(op: str) -> None:
    expect_refused(fuse_model(_other_reader(op)), RULE, "to_seq", "not only by SequenceAt")


def test_sequence_erase_reader_refused() -> None:
    """SequenceErase(seq, 0) reads the sequence with a constant position, like SequenceAt."""
    nodes = [node("SplitToSequence", ["x", "sizes"], ["seq"], "to_seq", axis=3),
             node("SequenceErase", ["seq", "zero"], ["rest"], "erase"),
             node("SequenceAt", ["rest", "zero"], ["y"], "at0")]
    model = make_model(nodes, [X], [("y", None)],
                       [const("sizes", np.asarray([8, 8, 16]), np.int64),
                        const("zero", np.asarray(0), np.int64)])
    expect_refused(fuse_model(model), RULE, "to_seq", "erase (SequenceErase)")


def test_sequence_as_graph_output_refused() -> None:
    nodes = [node("SplitToSequence", ["x", "sizes"], ["seq"], "to_seq", axis=3),
             node("SequenceAt", ["seq", "zero"], ["y"], "at0")]
    seq_out = onnx.helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)
    model = make_model(nodes, [X], [("y", None), seq_out],
                       [const("sizes", np.asarray([8, 8, 16]), np.int64),
                        const("zero", np.asarray(0), np.int64)])
    expect_refused(fuse_model(model, verify=False), RULE, "to_seq", "graph output")


def test_computed_position_refused() -> None:
    """The position is a graph input (feeds of 0 stay in range)."""
    nodes = [node("SplitToSequence", ["x", "sizes"], ["seq"], "to_seq", axis=3),
             node("SequenceAt", ["seq", "p"], ["y"], "at0")]
    model = make_model(nodes, [X, ("p", [], TensorProto.INT64)], [("y", None)],
                       [const("sizes", np.asarray([8, 8, 16]), np.int64)])
    result = fuse_model(model, verify=False)
    expect_refused(result, RULE, "at0", "not a constant integer scalar")


def test_scalar_split_refused() -> None:
    result = fuse_model(_split_model(8, [0, 1]))
    expect_refused(result, RULE, "to_seq", "not 1-D")


def test_no_split_refused() -> None:
    result = fuse_model(_split_model(None, [0, 1], axis=2))
    expect_refused(result, RULE, "to_seq", "no split input")


def test_computed_split_refused() -> None:
    """The sizes come from the input's shape: Shape -> Gather(axis 3) -> Div(2) -> Concat."""
    nodes = [node("Shape", ["x"], ["shape"], "shape"),
             node("Gather", ["shape", "three"], ["w"], "w", axis=0),
             node("Div", ["w", "two"], ["half"], "half"),
             node("Concat", ["half", "half"], ["sizes"], "sizes", axis=0),
             node("SplitToSequence", ["x", "sizes"], ["seq"], "to_seq", axis=3),
             node("SequenceAt", ["seq", "zero"], ["y"], "at0")]
    model = make_model(nodes, [("x", ["N", 16, 2, "W"])], [("y", None)],
                       [const("three", np.asarray([3]), np.int64),
                        const("two", np.asarray(2), np.int64),
                        const("zero", np.asarray(0), np.int64)])
    result = fuse_model(model, input_shapes={"x": [1, 16, 2, 32]})
    expect_refused(result, RULE, "to_seq", "not a constant integer tensor")


def test_out_of_range_position_refused() -> None:
    result = fuse_model(_split_model([8, 8, 16], [0, 3]), verify=False)
    expect_refused(result, RULE, "at1", "position 3 of the 3 chunks")


def test_opset_12_refused() -> None:
    result = fuse_model(_split_model([8, 8, 16], [0, 1], opset=12))
    expect_refused(result, RULE, "to_seq", "opset 12")
