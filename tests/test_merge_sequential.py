"""merge-sequential: 1x1 -> [bias border fill] -> KxK / AveragePool, and KxK -> 1x1."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import (
    C,
    G,
    applied_rules,
    assert_same_outputs,
    expect_fused,
    expect_refused,
    fuse_model,
    make_model,
    op_counts,
    rand,
)

RULE = "merge-sequential"


def fill_model(fill_matches_bias: bool = True, second: str = "conv", pad: int = 1,
               group: int = 1, with_sibling: bool = True) -> object:
    """x -> Conv1x1(b1) -> Pad(0) -> border rows/cols := fill (via Mul/Add masks would compute
    on t, so written as ScatterND like the exporters do) -> Conv3x3(pad 0) | AveragePool."""
    g = G(hw=(5, 6))
    t = g.conv("c1", "x", C, 1, group=group, pads=[0, 0, 0, 0])
    b1 = None
    for init in g.inits:
        if init.name == "c1.b":
            b1 = np.frombuffer(init.raw_data, dtype=np.float32).copy() if init.raw_data else \
                np.array(init.float_data, dtype=np.float32)
    fill = b1 if fill_matches_bias else b1 + np.float32(0.01)
    pads = g.const("pads", np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64))
    padded = g.op("Pad", [t, pads], "pad")
    h, w = 5 + 2 * pad, 6 + 2 * pad
    # ScatterND on [H, W, N, C] (transposed) would need the batch; write the border through a
    # Where with a constant mask instead: u = Where(mask, fill, padded) - a selection of t.
    mask = np.ones((1, 1, h, w), dtype=bool)
    mask[:, :, pad:h - pad, pad:w - pad] = False
    m = g.const("mask", mask)
    f = g.const("fill", fill.reshape(1, C, 1, 1).astype(np.float32))
    u = g.op("Where", [m, f, padded], "fill_where")
    if second == "conv":
        out = g.conv("c3", u, C, 3, pads=[0, 0, 0, 0], group=group)
    else:
        out = g.op("AveragePool", [u], "avg", kernel_shape=[3, 3])
    if with_sibling:
        out = g.op("Add", [out, g.conv("sib", "x", C, 3, group=group)], "sum")
    return g.model(out)


@pytest.mark.parametrize(("second", "group"), [("conv", 1), ("conv", 2), ("avgpool", 1)])
def test_one_by_one_then_filled_kxk_becomes_one_conv(second: str, group: int) -> None:
    result = fuse_model(fill_model(second=second, group=group))
    expect_fused(result, {"Conv": 1}, {RULE: 1, "merge-parallel": 1})


def test_fill_that_differs_from_the_bias_is_refused() -> None:
    result = fuse_model(fill_model(fill_matches_bias=False))
    expect_refused(result, RULE, "border fill differs")
    assert op_counts(result.model)["Conv"] == 3


def test_padded_kxk_after_a_biased_1x1_is_refused() -> None:
    g = G()
    t = g.conv("c1", "x", C, 1, pads=[0, 0, 0, 0])
    out = g.op("Add", [g.conv("c3", t, C, 3), g.conv("sib", "x", C, 3)], "s")
    result = fuse_model(g.model(out))
    expect_refused(result, RULE, "zero-pads", "bias")


def test_kxk_then_1x1_merges() -> None:
    g = G()
    t = g.conv("c3", "x", C, 3, strides=[2, 2])
    out = g.conv("p", t, C, 1, pads=[0, 0, 0, 0])
    expect_fused(fuse_model(g.model(out)), {"Conv": 1}, {RULE: 1})


def test_a_bottleneck_that_would_cost_more_is_left_alone() -> None:
    g = G(cin=16)
    t = g.conv("down", "x", 2, 1, pads=[0, 0, 0, 0])
    out = g.conv("up", t, 16, 1, cin=2, pads=[0, 0, 0, 0])
    result = fuse_model(g.model(out))
    expect_refused(result, RULE, "costs more")
    assert op_counts(result.model)["Conv"] == 2


def test_count_include_pad_0_with_padding_is_refused() -> None:
    g = G()
    t = g.conv("c1", "x", C, 1, pads=[0, 0, 0, 0])
    pool = g.op("AveragePool", [t], "avg", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                count_include_pad=0)
    out = g.op("Add", [pool, g.conv("sib", "x", C, 3)], "s")
    result = fuse_model(g.model(out))
    expect_refused(result, RULE, "count_include_pad=0")
    assert applied_rules(result)[RULE] == 0


def test_a_relu_between_is_not_a_fill() -> None:
    g = G()
    t = g.op("Relu", [g.conv("c1", "x", C, 1, pads=[0, 0, 0, 0])], "r")
    out = g.conv("c3", t, C, 3, pads=[0, 0, 0, 0])
    result = fuse_model(g.model(out))
    assert applied_rules(result)[RULE] == 0
    assert op_counts(result.model)["Conv"] == 2


# --- batch sizes (issue 12, hole 4): the fill is probed at a few batch sizes; it must be the
# same fill at every batch size the model admits, and only those sizes are probed ---------

H, W = 5, 6  # x's spatial size; the fill pads 1 pixel: u is [N, C, 7, 8]


def _bias(g: G, conv: str) -> np.ndarray:
    init = next(i for i in g.inits if i.name == f"{conv}.b")
    return np.frombuffer(init.raw_data, dtype=np.float32).copy()


def _border_mask() -> np.ndarray:
    mask = np.ones((1, 1, H + 2, W + 2), dtype=bool)
    mask[:, :, 1:-1, 1:-1] = False
    return mask


def _with_sibling(g: G, u: str) -> str:
    """Conv3x3(pad 0) on the fill, summed with a sibling 3x3 on x (DBB)."""
    return g.op("Add", [g.conv("c3", u, C, 3, pads=[0, 0, 0, 0]), g.conv("sib", "x", C, 3)],
                "sum")


def _batch_range(g: G, like: str, name: str) -> str:
    """Unsqueeze(Range(0, Shape(like)[0]), -1): the index tuples (n,) for n < N."""
    n = g.op("Gather", [g.op("Shape", [like], f"{name}_shape"),
                        g.const(f"{name}_zero", np.array(0, np.int64))], f"{name}_n")
    rng = g.op("Range", [g.const(f"{name}_start", np.array(0, np.int64)), n,
                         g.const(f"{name}_one", np.array(1, np.int64))], f"{name}_range")
    return g.op("Unsqueeze", [rng, g.const(f"{name}_axis", np.array([-1], np.int64))], name)


def test_a_fill_that_changes_past_batch_3_is_refused() -> None:
    """Right at batch 1, 2 and 3, wrong from 4 on: probing three sizes must not pass it."""
    g = G(hw=(H, W))
    t = g.conv("c1", "x", C, 1, pads=[0, 0, 0, 0])
    b1 = _bias(g, "c1")
    padded = g.op("Pad", [t, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
                  "pad")
    mask = g.const("mask", _border_mask())
    good = g.op("Where", [mask, g.const("fill", b1.reshape(1, C, 1, 1)), padded], "good")
    bad = g.op("Where", [mask, g.const("other", b1.reshape(1, C, 1, 1) + 1), padded], "bad")
    batch = g.op("Shape", [t], "batch", start=0, end=1)
    big = g.op("Greater", [batch, g.const("three", np.array([3], np.int64))], "big")
    model = g.model(_with_sibling(g, g.op("Where", [big, bad, good], "choose")))
    result = fuse_model(model)
    expect_refused(result, RULE, "big", "batch size")
    assert_same_outputs(model, result.model, {"x": rand(5, C, H, W, seed=3)})


def _static_fill(g: G, t: str, b1: np.ndarray) -> str:
    """The dynamo exporter's fill on a static batch 1: Pad, then per axis a Transpose that
    brings it to the front and two ScatterND writes of constant rows/columns [1, ...] of b1
    (batch 1 baked in), and back."""
    padded = g.op("Pad", [t, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
                  "pad")
    x = g.op("Transpose", [padded], "rows_t", perm=[2, 1, 0, 3])  # [H+2, C, 1, W+2]
    rows = g.const("rows", np.broadcast_to(b1.reshape(1, C, 1, 1), (1, C, 1, W + 2)).copy())
    for i, at in enumerate((0, H + 1)):
        x = g.op("ScatterND", [x, g.const(f"row{i}", np.array([[at]], np.int64)), rows],
                 f"row_write{i}")
    x = g.op("Transpose", [x], "rows_back", perm=[2, 1, 0, 3])
    x = g.op("Transpose", [x], "cols_t", perm=[3, 1, 2, 0])  # [W+2, C, H+2, 1]
    cols = g.const("cols", np.broadcast_to(b1.reshape(1, C, 1, 1), (1, C, H + 2, 1)).copy())
    for i, at in enumerate((0, W + 1)):
        x = g.op("ScatterND", [x, g.const(f"col{i}", np.array([[at]], np.int64)), cols],
                 f"col_write{i}")
    return g.op("Transpose", [x], "cols_back", perm=[3, 1, 2, 0])


def test_a_static_batch_1_fill_is_probed_at_batch_1_only() -> None:
    g = G(hw=(H, W))
    t = g.conv("c1", "x", C, 1, pads=[0, 0, 0, 0])
    out = _with_sibling(g, _static_fill(g, t, _bias(g, "c1")))
    model = make_model(g.nodes, [("x", [1, C, H, W])], [(out, None)], g.inits)
    expect_fused(fuse_model(model), {"Conv": 1}, {RULE: 1, "merge-parallel": 1})


def test_a_fill_written_to_every_batch_element_by_index_is_merged() -> None:
    """The dynamo exporter's `u[:] = filled` with a dynamic batch: ScatterND whose index
    tuples are (n,) from Range(0, N) - each element n written from element n."""
    g = G(hw=(H, W))
    t = g.conv("c1", "x", C, 1, pads=[0, 0, 0, 0])
    b1 = _bias(g, "c1")
    padded = g.op("Pad", [t, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
                  "pad")
    filled = g.op("Where", [g.const("mask", _border_mask()),
                            g.const("fill", b1.reshape(1, C, 1, 1)), padded], "filled")
    u = g.op("ScatterND", [padded, _batch_range(g, padded, "idx"), filled], "write")
    model = g.model(_with_sibling(g, u))
    result = fuse_model(model)
    expect_fused(result, {"Conv": 1}, {RULE: 1, "merge-parallel": 1})
    assert_same_outputs(model, result.model, {"x": rand(5, C, H, W, seed=3)})


def test_a_scatter_that_reduces_is_not_a_fill() -> None:
    """ScatterND(reduction=max) with zeros: max(t, 0) inside, which a probe of positive
    values cannot tell from t."""
    g = G(hw=(H, W))
    t = g.conv("c1", "x", C, 1, pads=[0, 0, 0, 0])
    b1 = _bias(g, "c1")
    padded = g.op("Pad", [t, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
                  "pad")
    filled = g.op("Where", [g.const("mask", _border_mask()),
                            g.const("fill", b1.reshape(1, C, 1, 1)), padded], "filled")
    border = np.where(_border_mask(), b1.reshape(1, C, 1, 1), 0).astype(np.float32)
    updates = g.op("Expand", [g.const("border", border), g.op("Shape", [filled], "like")],
                   "updates")
    u = g.op("ScatterND", [filled, _batch_range(g, filled, "idx"), updates], "relu",
             reduction="max")
    result = fuse_model(g.model(_with_sibling(g, u)))
    expect_refused(result, RULE, "relu", "computes on the values")
    assert result.verified
