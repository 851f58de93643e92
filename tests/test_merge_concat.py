"""merge-concat: convs on one input concatenated on channels become one Conv."""

from __future__ import annotations

from tests.helpers import C, G, applied_rules, expect_fused, expect_refused, fuse_model, op_counts

RULE = "merge-concat"


def test_inception_branches_become_one_conv() -> None:
    g = G()
    cat = g.op("Concat", [g.conv("c1", "x", 3, 1), g.conv("c3", "x", 5, 3),
                          g.conv("c5", "x", 2, 5), g.conv("c13", "x", 4, (1, 3))], "cat", axis=1)
    g.op("Relu", [cat], "y")
    result = fuse_model(g.model("y_out"))
    expect_fused(result, {"Conv": 1, "Relu": 1}, {RULE: 1})
    assert not fuse_model(result.model).report.applied


def test_stride2_and_negative_axis() -> None:
    g = G()
    cat = g.op("Concat", [g.conv("c1", "x", 3, 1, strides=[2, 2]),
                          g.conv("c3", "x", 5, 3, strides=[2, 2])], "cat", axis=-3)
    expect_fused(fuse_model(g.model(cat)), {"Conv": 1}, {RULE: 1})


def test_a_run_of_convs_merges_and_the_other_input_stays_in_place() -> None:
    g = G()
    cat = g.op("Concat", [g.op("Relu", ["x"], "r"), g.conv("c1", "x", 3, 1),
                          g.conv("c3", "x", 5, 3)], "cat", axis=1)
    expect_fused(fuse_model(g.model(cat)), {"Conv": 1, "Relu": 1, "Concat": 1}, {RULE: 1})


def test_concat_on_a_spatial_axis_is_refused() -> None:
    g = G()
    cat = g.op("Concat", [g.conv("c1", "x", C, 1), g.conv("c3", "x", C, 3)], "cat", axis=2)
    result = fuse_model(g.model(cat))
    expect_refused(result, RULE, "axis 2")
    assert op_counts(result.model)["Conv"] == 2


def test_different_strides_are_refused() -> None:
    g = G(hw=(1, 1))
    cat = g.op("Concat", [g.conv("c1", "x", C, 1), g.conv("c3", "x", C, 3, strides=[2, 2])],
               "cat", axis=1)
    result = fuse_model(g.model(cat))
    expect_refused(result, RULE, "strides")
    assert op_counts(result.model)["Conv"] == 2


def test_conv_output_with_another_consumer_is_refused() -> None:
    g = G()
    a = g.conv("c1", "x", C, 1)
    cat = g.op("Concat", [a, g.conv("c3", "x", C, 3)], "cat", axis=1)
    g.op("Relu", [a], "extra")
    result = fuse_model(g.model(cat, "extra_out"))
    expect_refused(result, RULE, "c1_out", "2 consumers")


def test_grouped_convs_are_refused() -> None:
    g = G()
    cat = g.op("Concat", [g.conv("c1", "x", C, 1, group=2), g.conv("c3", "x", C, 3, group=2)],
               "cat", axis=1)
    result = fuse_model(g.model(cat))
    expect_refused(result, RULE, "group")
    assert applied_rules(result)[RULE] == 0


def test_padding_that_cannot_align_is_refused() -> None:
    # stride 3 on a 3x3 input: a pad-0 1x1 and a pad-0 3x3 both give 1x1 here, but not for
    # every input size, so no single conv computes both
    g = G(hw=(3, 3))
    cat = g.op("Concat", [g.conv("c1", "x", C, 1, pads=[0, 0, 0, 0], strides=[3, 3]),
                          g.conv("c3", "x", C, 3, pads=[0, 0, 0, 0], strides=[3, 3])],
               "cat", axis=1)
    result = fuse_model(g.model(cat))
    expect_refused(result, RULE, "cannot align")
