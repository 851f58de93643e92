"""merge-sequential: 1x1 -> [bias border fill] -> KxK / AveragePool, and KxK -> 1x1."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import applied_rules, expect_fused, expect_refused, fuse_model, op_counts
from tests.test_merge_parallel_rules import C, G

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
