"""merge-parallel on hand-built graphs: each positive shape of branch sum, and one negative
case per precondition (the rule does not fire and its near miss names the cause)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import (
    applied_rules,
    bn,
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

RULE = "merge-parallel"
C = 4


class G:
    """A tiny graph under construction: x[N, C, H, W] plus named pieces."""

    def __init__(self, cin: int = C, hw: tuple[int, int] = (9, 7)) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.cin, self.hw, self.seed = cin, hw, 10

    def add(self, piece: tuple) -> None:
        n, i = piece
        self.nodes.append(n)
        self.inits += i

    def conv(self, name: str, x: str, cout: int, k: tuple[int, int] | int, group: int = 1,
             cin: int | None = None, **attrs: object) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        cin = cin or self.cin
        self.seed += 2
        attrs.setdefault("pads", [kh // 2, kw // 2, kh // 2, kw // 2])
        self.add(conv(name, x, rand(cout, cin // group, kh, kw, seed=self.seed),
                      rand(cout, seed=self.seed + 1), out=f"{name}_out", group=group, **attrs))
        return f"{name}_out"

    def op(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(node(op, inputs, [f"{name}_out"], name, **attrs))
        return f"{name}_out"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(const(name, value, value.dtype))
        return name

    def model(self, *outputs: str) -> onnx.ModelProto:
        return make_model(self.nodes, [("x", ["N", self.cin, *self.hw])],
                          [(o, None) for o in outputs], self.inits)


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
