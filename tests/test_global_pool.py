"""global-pool: ReduceMean over exactly the spatial axes -> GlobalAveragePool (+ Flatten)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from tests.helpers import (
    const,
    expect_fused,
    expect_refused,
    fuse_model,
    make_model,
    misses_for,
    node,
)

RULE = "global-pool"


def _reduce(shape: list, axes: list[int] | None, keepdims: int = 1, opset: int = 18,
            noop: int | None = None, dtype: int = TensorProto.FLOAT,
            axes_as_input: bool | None = None) -> onnx.ModelProto:
    attrs: dict = {"keepdims": keepdims}
    if noop is not None:
        attrs["noop_with_empty_axes"] = noop
    inputs, inits = ["x"], []
    as_input = opset >= 18 if axes_as_input is None else axes_as_input
    if axes is not None and as_input:
        inputs.append("axes")
        inits.append(const("axes", np.array(axes, np.int64), np.int64))
    elif axes is not None:
        attrs["axes"] = axes
    nodes = [node("ReduceMean", inputs, ["y"], "mean", **attrs)]
    return make_model(nodes, [("x", shape, dtype)], [("y", None, dtype)], inits, opset=opset)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize(("shape", "axes"), [
    (["N", 4, 5, 6], [2, 3]), (["N", 4, 5, 6], [-1, -2]), (["N", 4, 5, 6], [3, -2]),
    (["N", 4, 7], [2]), (["N", 4, 3, 5, 6], [2, 3, 4]), ([2, 4, "H", "W"], [-2, -1])])
def test_spatial_mean_keepdims_is_a_global_pool(shape: list, axes: list[int],
                                                opset: int) -> None:
    result = fuse_model(_reduce(shape, axes, opset=opset), input_shapes={"x": [
        2 if isinstance(d, str) else d for d in shape]})
    expect_fused(result, {"GlobalAveragePool": 1}, {RULE: 1})


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_spatial_mean_without_keepdims_is_pool_and_flatten(rank: int) -> None:
    shape = ["N", 4, *[5 + i for i in range(rank - 2)]]
    result = fuse_model(_reduce(shape, list(range(2, rank)), keepdims=0))
    expect_fused(result, {"GlobalAveragePool": 1, "Flatten": 1}, {RULE: 1})


def test_float16() -> None:
    result = fuse_model(_reduce(["N", 4, 5, 6], [2, 3], dtype=TensorProto.FLOAT16))
    expect_fused(result, {"GlobalAveragePool": 1}, {RULE: 1})


def test_double_refused() -> None:
    """GlobalAveragePool allows double, but onnxruntime's CPU kernels do not run it."""
    result = fuse_model(_reduce(["N", 4, 5, 6], [2, 3], dtype=TensorProto.DOUBLE))
    expect_refused(result, RULE, "dtype")


@pytest.mark.parametrize(("axes", "words"), [
    ([1, 2, 3], "not exactly the spatial axes"), ([2], "not exactly the spatial axes"),
    ([0, 2, 3], "not exactly the spatial axes"), ([3], "not exactly the spatial axes")])
def test_other_axes_refused(axes: list[int], words: str) -> None:
    result = fuse_model(_reduce(["N", 4, 5, 6], axes))
    expect_refused(result, RULE, "mean", words)


def test_no_axes_reduce_everything_refused() -> None:
    expect_refused(fuse_model(_reduce(["N", 4, 5, 6], None)), RULE, "reduces every axis")
    expect_refused(fuse_model(_reduce(["N", 4, 5, 6], [], axes_as_input=True)), RULE,
                   "reduces every axis")


def test_empty_axes_with_noop_refused() -> None:
    result = fuse_model(_reduce(["N", 4, 5, 6], None, noop=1))
    expect_refused(result, RULE, "passes its input through")


def test_axes_from_a_graph_input_refused() -> None:
    nodes = [node("ReduceMean", ["x", "axes"], ["y"], "mean")]
    model = make_model(nodes, [("x", ["N", 4, 5, 6]), ("axes", [2], TensorProto.INT64)],
                       [("y", ["N", 4, 1, 1])])
    result = fuse_model(model, verify=False)  # random axes: the model itself fails
    assert result.report.applied == []
    assert any("takes its axes from 'axes'" in r for r in misses_for(result, RULE))


def test_low_rank_and_integer_refused() -> None:
    expect_refused(fuse_model(_reduce(["N", 4], [1])), RULE, "rank >= 3")
    expect_refused(fuse_model(_reduce(["N", 4, 5, 6], [2, 3], dtype=TensorProto.INT32)),
                   RULE, "dtype")


def test_idempotent() -> None:
    once = fuse_model(_reduce(["N", 4, 5, 6], [2, 3]))
    again = fuse_model(once.model)
    assert not again.report.applied
