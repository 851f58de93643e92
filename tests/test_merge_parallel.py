"""merge-parallel on hand-built graphs: each positive shape of branch sum, and one negative
case per precondition (the rule does not fire and its near miss names the cause)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import (
    C,
    G,
    applied_rules,
    assert_same_outputs,
    bn,
    dims,
    expect_fused,
    expect_refused,
    fuse_model,
    make_model,
    op_counts,
    rand,
)

RULE = "merge-parallel"
def repvgg(identity_bn: bool = True, group: int = 1) -> onnx.ModelProto:
    g = G()
    a = g.conv("c3", "x", C, 3, group=group)
    b = g.conv("c1", "x", C, 1, group=group)
    s = g.op("Add", [a, b], "sum1")
    if identity_bn:
        g.add(bn("bn_id", "x", C))
        s = g.op("Add", [s, "bn_id_out"], "sum2")
    else:
        s = g.op("Add", [s, "x"], "sum2")
    g.op("Relu", [s], "y")
    return g.model("y_out")


@pytest.mark.parametrize("identity_bn", [True, False])
@pytest.mark.parametrize("group", [1, 2, C])
def test_repvgg_block_becomes_one_conv(identity_bn: bool, group: int) -> None:
    result = fuse_model(repvgg(identity_bn, group))
    expect_fused(result, {"Conv": 1, "Relu": 1}, {RULE: 1})
    again = fuse_model(result.model)
    assert not again.report.applied


@pytest.mark.parametrize("order", ["left", "right", "middle"])
def test_add_tree_in_any_grouping_order(order: str) -> None:
    g = G()
    a, b = g.conv("c3", "x", C, 3), g.conv("c1", "x", C, 1)
    if order == "left":
        s = g.op("Add", [g.op("Add", [a, b], "s1"), "x"], "s2")
    elif order == "right":
        s = g.op("Add", [a, g.op("Add", [b, "x"], "s1")], "s2")
    else:
        s = g.op("Add", [g.op("Add", [a, "x"], "s1"), b], "s2")
    g.op("Relu", [s], "y")
    expect_fused(fuse_model(g.model("y_out")), {"Conv": 1, "Relu": 1}, {RULE: 1})


def test_stride2_and_dilation2() -> None:
    g = G()
    s = g.op("Add", [g.conv("c3", "x", 6, 3, strides=[2, 2]),
                     g.conv("c1", "x", 6, 1, strides=[2, 2])], "s")
    d = g.op("Add", [g.conv("d3", "x", C, 3, dilations=[2, 2], pads=[2, 2, 2, 2]), "x"], "d")
    expect_fused(fuse_model(g.model(s, d)), {"Conv": 2}, {RULE: 2})


def test_acnet_asymmetric_kernels_and_5x5() -> None:
    g = G()
    t = g.op("Add", [g.op("Add", [g.conv("sq", "x", C, 5), g.conv("hor", "x", C, (1, 3))], "a"),
                     g.conv("ver", "x", C, (3, 1))], "s")
    expect_fused(fuse_model(g.model(t)), {"Conv": 1}, {RULE: 1})


def test_acnet_crop_before_pad0_branches() -> None:
    """ACNet with padding 0 < k//2: the 1x3 / 3x1 branches read a cropped input."""
    g = G()
    sq = g.conv("sq", "x", C, 3, pads=[0, 0, 0, 0])
    starts, ends, axes = (g.const("st", np.array([1], np.int64)),
                          g.const("en", np.array([-1], np.int64)),
                          g.const("ax3", np.array([3], np.int64)))
    crop_w = g.op("Slice", ["x", starts, ends, axes], "crop_w")
    ver = g.conv("ver", crop_w, C, (3, 1), pads=[0, 0, 0, 0])
    axes2 = g.const("ax2", np.array([2], np.int64))
    crop_h = g.op("Slice", ["x", starts, ends, axes2], "crop_h")
    hor = g.conv("hor", crop_h, C, (1, 3), pads=[0, 0, 0, 0])
    t = g.op("Add", [g.op("Add", [sq, ver], "a"), hor], "s")
    expect_fused(fuse_model(g.model(t)), {"Conv": 1}, {RULE: 1})


def test_csla_scaled_branches_and_repmixer() -> None:
    g = G()
    s, t, u = (g.const(n, rand(1, C, 1, 1, seed=k)) for k, n in enumerate(("s", "t", "u")))
    csla = g.op("Add", [g.op("Add", [g.op("Mul", [g.conv("c3", "x", C, 3), s], "ms"),
                                     g.op("Mul", [g.conv("c1", "x", C, 1), t], "mt")], "a"),
                        g.op("Mul", ["x", u], "mu")], "csla")
    ls = g.const("ls", rand(C, 1, 1, seed=7))
    g.add(bn("norm", "x", C))
    mixer = g.conv("mixer", "x", C, 3, group=C)
    rep = g.op("Add", ["x", g.op("Mul", [g.op("Sub", [mixer, "norm_out"], "d"), ls], "m")], "rm")
    result = fuse_model(g.model(csla, rep))
    assert op_counts(result.model) == {"Conv": 2}
    assert result.verified


def test_bn_after_the_sum_folds_afterwards() -> None:
    g = G()
    s = g.op("Add", [g.op("Add", [g.conv("c3", "x", C, 3), g.conv("c1", "x", C, 1)], "a"), "x"],
             "s")
    g.add(bn("post", s, C))
    g.op("Relu", ["post_out"], "y")
    expect_fused(fuse_model(g.model("y_out")), {"Conv": 1, "Relu": 1}, {RULE: 1, "fold-bn": 1})


def test_partial_merge_keeps_the_other_leaf() -> None:
    g = G()
    other = g.op("Relu", ["x"], "r")
    s = g.op("Add", [g.op("Add", [g.conv("c3", "x", C, 3), other], "a"),
                     g.conv("c1", "x", C, 1)], "s")
    result = fuse_model(g.model(s))
    expect_fused(result, {"Conv": 1, "Relu": 1, "Add": 1}, {RULE: 1})


# --- refusals -------------------------------------------------------------------------------

def _two_branches(**second: object) -> tuple[G, str, str]:
    g = G()
    return g, g.conv("c3", "x", C, 3), g.conv("c1", "x", C, 1, **second)


def test_branch_output_with_another_consumer() -> None:
    g, a, b = _two_branches()
    s = g.op("Add", [a, b], "s")
    g.op("Relu", [b], "extra")
    result = fuse_model(g.model(s, "extra_out"))
    expect_refused(result, RULE, "c1_out", "2 consumers")
    assert op_counts(result.model)["Add"] == 1


def test_branch_output_that_is_a_graph_output() -> None:
    g, a, b = _two_branches()
    s = g.op("Add", [a, b], "s")
    expect_refused(fuse_model(g.model(s, b)), RULE, "c1_out", "graph output")


def test_partial_sum_with_another_consumer_merges_only_below_it() -> None:
    g, a, b = _two_branches()
    part = g.op("Add", [a, b], "part")
    s = g.op("Add", [part, "x"], "s")
    g.op("Relu", [part], "extra")
    result = fuse_model(g.model(s, "extra_out"))
    # the partial sum merges into one conv; the identity is not absorbed past the fork
    expect_fused(result, {"Conv": 1, "Add": 1, "Relu": 1}, {RULE: 1})


@pytest.mark.parametrize("attr", ["strides", "dilations"])
def test_different_strides_or_dilations(attr: str) -> None:
    g = G(hw=(1, 1))  # 1x1 inputs: both branches give 1x1 outputs, so the sum is valid
    pads = [2, 2, 2, 2] if attr == "dilations" else [1, 1, 1, 1]
    s = g.op("Add", [g.conv("c3", "x", C, 3, pads=pads, **{attr: [2, 2]}),
                     g.conv("c1", "x", C, 1)], "s")
    result = fuse_model(g.model(s))
    expect_refused(result, RULE, attr)
    assert op_counts(result.model)["Conv"] == 2


def test_different_groups() -> None:
    g = G()
    s = g.op("Add", [g.conv("c3", "x", C, 3, group=2), g.conv("c1", "x", C, 1)], "s")
    expect_refused(fuse_model(g.model(s)), RULE, "group")


def test_padding_that_cannot_align() -> None:
    g = G(hw=(1, 1))
    # 3x3 pad 1 keeps the size, 1x1 pad 1 grows it by 2: on a 1x1 input the outputs
    # (1x1 and 3x3) broadcast, so the graph is valid, yet no single conv computes the sum
    s = g.op("Add", [g.conv("c3", "x", C, 3, pads=[1, 1, 1, 1]),
                     g.conv("c1", "x", C, 1, pads=[1, 1, 1, 1])], "s")
    expect_refused(fuse_model(g.model(s)), RULE, "cannot align")


def test_reflect_pad_before_one_branch_only() -> None:
    g = G()
    pads = g.const("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    padded = g.op("Pad", ["x", pads], "pad", mode="reflect")
    s = g.op("Add", [g.conv("c3", padded, C, 3, pads=[0, 0, 0, 0]), g.conv("c1", "x", C, 1)],
             "s")
    result = fuse_model(g.model(s))
    expect_refused(result, RULE, "padding modes differ")
    assert op_counts(result.model)["Conv"] == 2


def test_nonlinear_op_inside_a_branch() -> None:
    g = G()
    inner = g.op("Relu", [g.conv("c1", "x", C, 1)], "r")
    s = g.op("Add", [g.conv("c3", inner, C, 3), g.conv("c1b", "x", C, 1)], "s")
    result = fuse_model(g.model(s))
    assert applied_rules(result)[RULE] == 0
    assert op_counts(result.model)["Conv"] == 3


def test_identity_bn_in_training_mode_is_not_absorbed() -> None:
    g = G()
    g.add(bn("bn_id", "x", C, out=["bn_id_out", "rm", "rv"], training_mode=1))
    s = g.op("Add", [g.op("Add", [g.conv("c3", "x", C, 3), g.conv("c1", "x", C, 1)], "a"),
                     "bn_id_out"], "s")
    model = make_model(g.nodes, [("x", [2, C, 9, 7])], [(s, None)], g.inits)
    result = fuse_model(model, verify=False)
    counts = op_counts(result.model)
    assert counts["BatchNormalization"] == 1 and counts["Conv"] == 1 and counts["Add"] == 1


def test_scale_of_shape_c_is_not_per_channel() -> None:
    g = G(hw=(C, C))
    s = g.const("s", rand(C, seed=3))  # [C] scales the last axis, not channels
    t = g.op("Add", [g.op("Mul", [g.conv("c3", "x", C, 3), s], "m"), g.conv("c1", "x", C, 1)],
             "t")
    result = fuse_model(g.model(t))
    assert op_counts(result.model)["Mul"] == 1
    assert op_counts(result.model)["Conv"] == 2
    assert result.verified


# --- input peeling and size bound (issue 12, holes 1 and 7) ---------------------------------

INT64_MAX = np.iinfo(np.int64).max
SIZES = [(8, 8), (9, 7), (7, 10), (6, 5), (5, 6)]  # H, W: every parity on both axes


def _symbolic(g: G, *outputs: str, opset: int = 18) -> onnx.ModelProto:
    """g's graph with x[N, C, H, W] symbolic in every dim but channels."""
    return make_model(g.nodes, [("x", ["N", g.cin, "H", "W"])], [(o, None) for o in outputs],
                      g.inits, opset=opset)


def _same_at_every_size(original: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    for h, w in SIZES:
        x = rand(2, C, h, w, seed=h * 31 + w)
        assert_same_outputs(original, fused, {"x": x})


def _border_amounts(border: str) -> tuple[list[int], list[int], list[int], int]:
    """(Slice starts, ends, axes) cropping one row/column off `border`, and the index of that
    border in an NCHW pads vector [begins..., ends...]."""
    axis = 2 if border in ("top", "bottom") else 3
    if border in ("top", "left"):
        return [1], [INT64_MAX], [axis], axis
    return [0], [-1], [axis], 4 + axis


@pytest.mark.parametrize("crop_op", ["Slice", "Pad"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("border", ["top", "bottom", "left", "right"])
def test_crop_then_zero_pad_on_one_border_is_not_absorbed(border: str, stride: int,
                                                         crop_op: str) -> None:
    """x -> Slice(crop 1 row) -> Pad(1 zero row, same border) -> Conv3x3 pad 1 is not Conv3x3
    pad 1 on x: the zero row stands where x's row was. Summed with a Conv3x3 pad 1 on x, the
    two must not merge (the old peeling added -1 + 1 and merged them). The crop may also be
    a Pad with a negative amount."""
    g = G()
    starts, ends, axes, where = _border_amounts(border)
    amounts = np.zeros(8, np.int64)
    if crop_op == "Slice":
        crop = g.op("Slice", ["x", g.const("st", np.array(starts, np.int64)),
                              g.const("en", np.array(ends, np.int64)),
                              g.const("ax", np.array(axes, np.int64))], "crop")
    else:
        amounts[where] = -1
        crop = g.op("Pad", ["x", g.const("neg", amounts.copy())], "crop")
    amounts[where] = 1
    padded = g.op("Pad", [crop, g.const("pads", amounts)], "zpad")
    s = g.op("Add", [g.conv("a", padded, C, 3, strides=[stride, stride]),
                     g.conv("b", "x", C, 3, strides=[stride, stride])], "s")
    model = _symbolic(g, s)
    result = fuse_model(model, rules=[RULE], verify=False)
    expect_refused(result, RULE, "crop", "zero-pads it again")
    _same_at_every_size(model, result.model)


def test_crop_then_the_convs_own_pad_on_one_border_is_not_absorbed() -> None:
    """The Conv's own padding is the last pad: Slice(crop top) -> Conv3x3 pads [1,1,1,1]."""
    g = G()
    crop = g.op("Slice", ["x", g.const("st", np.array([1], np.int64)),
                          g.const("en", np.array([INT64_MAX], np.int64)),
                          g.const("ax", np.array([2], np.int64))], "crop")
    a = g.conv("a", crop, C, 3, pads=[1, 1, 0, 1])  # crop 1 top, pad 1 top
    b = g.conv("b", "x", C, 3, pads=[0, 1, 0, 1])
    s = g.op("Add", [a, b], "s")
    model = _symbolic(g, s)
    result = fuse_model(model, rules=[RULE], verify=False)
    expect_refused(result, RULE, "crop", "a (own pads)")
    _same_at_every_size(model, result.model)


def test_pad_then_crop_and_crops_on_other_borders_are_absorbed() -> None:
    """Exact compositions still merge: Pad 2 top then crop 1 top (only zeros go) is pad 1;
    a crop of the top row with a zero row added at the bottom is a shift (the merged kernel
    is one row taller)."""
    g = G()
    pads = np.zeros(8, np.int64)
    pads[2] = 2
    padded = g.op("Pad", ["x", g.const("p2", pads)], "pad2")
    start, end = g.const("st", np.array([1], np.int64)), g.const("en", np.array([INT64_MAX],
                                                                                 np.int64))
    ax = g.const("ax", np.array([2], np.int64))
    cropped = g.op("Slice", [padded, start, end, ax], "crop")
    a = g.conv("a", cropped, C, 3, pads=[0, 1, 1, 1])  # net top 2 - 1 + 0 = 1
    b = g.conv("b", "x", C, 3)
    shifted = g.op("Slice", ["x", start, end, ax], "crop_top")
    bottom = np.zeros(8, np.int64)
    bottom[6] = 1
    shifted = g.op("Pad", [shifted, g.const("pb", bottom)], "pad_bottom")
    c = g.conv("c", shifted, C, 3, pads=[0, 1, 2, 1])  # x one row down: net top -1, bottom 3
    s = g.op("Add", [g.op("Add", [a, b], "s1"), c], "s")
    model = _symbolic(g, s)
    result = fuse_model(model, rules=[RULE], verify=False)
    assert op_counts(result.model) == {"Conv": 1}, op_counts(result.model)
    _same_at_every_size(model, result.model)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_opset10_pad_with_attributes(value: float) -> None:
    """Pad before opset 11 has `pads` and `value` as attributes and one input: a zero Pad is
    absorbed like a Pad with a pads input; a nonzero value is not."""
    g = G()
    padded = g.op("Pad", ["x"], "pad", mode="constant", pads=[0, 0, 1, 1, 0, 0, 1, 1],
                  value=value)
    s = g.op("Add", [g.op("Add", [g.conv("c3", padded, C, 3, pads=[0, 0, 0, 0]),
                                  g.conv("c1", "x", C, 1)], "s1"), "x"], "s")
    model = _symbolic(g, s, opset=10)
    result = fuse_model(model, rules=[RULE], verify=False)
    if value == 0.0:
        assert op_counts(result.model) == {"Conv": 1}, op_counts(result.model)
    else:  # c1 and the identity merge; c3 stays behind its Pad
        assert "pad (Pad mode=constant) while other branches read x: padding modes differ" in (
            result.report.applied[0].why)
        assert op_counts(result.model) == {"Conv": 2, "Pad": 1, "Add": 1}
    _same_at_every_size(model, result.model)


@pytest.mark.parametrize(("shift", "merges"), [(1, True), (4, True), (5, False)])
def test_size_bound_on_branches_behind_opposite_shifts(shift: int, merges: bool) -> None:
    """Two 1x1 convs reading x shifted up and down by `shift` rows line up in a merged kernel
    of 2*shift + 1 rows: merged only while that is at most max(4 * 1, 1 + 8) = 9 taps."""
    g = G(hw=(12, 7))
    up, down = np.zeros(8, np.int64), np.zeros(8, np.int64)
    up[2], up[6] = shift, -shift
    down[2], down[6] = -shift, shift
    a = g.conv("a", g.op("Pad", ["x", g.const("up", up)], "pad_up"), C, 1)
    b = g.conv("b", g.op("Pad", ["x", g.const("down", down)], "pad_down"), C, 1)
    s = g.op("Add", [a, b], "s")
    model = g.model(s)
    result = fuse_model(model, rules=[RULE])
    assert result.verified
    if merges:
        assert op_counts(result.model) == {"Conv": 1}, op_counts(result.model)
    else:
        expect_refused(result, RULE, "taps", "more than 9")
        assert op_counts(result.model) == {"Conv": 2, "Pad": 2, "Add": 1}


@pytest.mark.parametrize(("include_pad", "merges"), [(1, True), (0, False)])
def test_average_pool_branch_is_a_depthwise_conv(include_pad: int, merges: bool) -> None:
    """A pool branch beside a depthwise conv: AveragePool(3, pad 1) is the depthwise conv
    1/9 only with count_include_pad=1; otherwise it stays a pool and the conv merges with the
    identity."""
    g = G()
    pool = g.op("AveragePool", ["x"], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                count_include_pad=include_pad)
    s = g.op("Add", [g.op("Add", [g.conv("c3", "x", C, 3, group=C), pool], "s1"), "x"], "s")
    result = fuse_model(g.model(s), rules=[RULE])
    if merges:
        expect_fused(result, {"Conv": 1}, {RULE: 1})
    else:
        expect_fused(result, {"Conv": 1, "AveragePool": 1, "Add": 1}, {RULE: 1})


def test_average_pools_alone_stay_pools() -> None:
    g = G()
    pool = g.op("AveragePool", ["x"], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                count_include_pad=1)
    s = g.op("Add", [pool, "x"], "s")
    expect_refused(fuse_model(g.model(s), rules=[RULE]), RULE, "no Conv among the branches")


def test_size_bound_measures_the_box_of_the_branch_kernels() -> None:
    """1x5 + 5x1 merge into 5x5: 25 taps, five times the largest branch, but exactly the box
    the branches span (no offset between them), so the bound does not refuse it."""
    g = G()
    s = g.op("Add", [g.conv("hor", "x", C, (1, 5)), g.conv("ver", "x", C, (5, 1))], "s")
    expect_fused(fuse_model(g.model(s), rules=[RULE]), {"Conv": 1}, {RULE: 1})


@pytest.mark.parametrize("symbolic", [False, True], ids=["static-width", "symbolic-width"])
def test_a_crop_of_two_is_a_negative_pad_only_where_the_width_is_known(symbolic: bool) -> None:
    """y = x + Conv1x1(Slice(x, crop 2 at the right), pads left 2): a shift. With W fixed (7)
    it is one Conv; with W symbolic, W = 1 is admitted (the Slice empties, Add broadcasts) and
    the merged conv would differ there: refused, and the model stays equal at W = 1."""
    g = G()
    cropped = g.op("Slice", ["x", g.const("st", np.array([0], np.int64)),
                             g.const("en", np.array([-2], np.int64)),
                             g.const("ax", np.array([3], np.int64))], "crop")
    a = g.conv("a", cropped, C, 1, pads=[0, 2, 0, 0])
    s = g.op("Add", ["x", a], "s")
    model = _symbolic(g, s) if symbolic else g.model(s)
    result = fuse_model(model, rules=[RULE])
    if symbolic:
        assert applied_rules(result)[RULE] == 0
        assert_same_outputs(model, result.model, {"x": rand(1, C, 3, 1, seed=2)})
    else:
        assert op_counts(result.model) == {"Conv": 1}, op_counts(result.model)


def test_a_declared_static_output_shape_does_not_reach_the_rules() -> None:
    """r = Relu(x) is a graph output declared [1, C, 5, 7] while x's H, W are symbolic; a
    branch crops 2 columns off r. Trusting the declaration, merge-parallel would take the crop
    for a pad of -2 (W = 7 >= 2), wrong at W = 1, which the model admits (the Slice empties,
    the Add broadcasts). The rules see the shapes inferred from the inputs; the output keeps
    its declaration."""
    g = G()
    r = g.op("Relu", ["x"], "r")
    cropped = g.op("Slice", [r, g.const("st", np.array([0], np.int64)),
                             g.const("en", np.array([-2], np.int64)),
                             g.const("ax", np.array([3], np.int64))], "crop")
    a = g.conv("a", cropped, C, 1, pads=[0, 2, 0, 0])
    s = g.op("Add", [r, a], "s")
    model = make_model(g.nodes, [("x", ["N", C, "H", "W"])],
                       [(s, None), (r, [1, C, 5, 7])], g.inits)
    result = fuse_model(model, rules=[RULE])
    assert applied_rules(result)[RULE] == 0
    assert_same_outputs(model, result.model, {"x": rand(1, C, 3, 1, seed=2)})
    assert dims(result.model.graph.output[1]) == [1, C, 5, 7]
