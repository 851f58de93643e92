"""remove-residual (opt-in RM, docs/RULES.md, remove-residual) and report.macs: hand-built
blocks for every precondition, then torch exports end to end. The proofs of x >= 0 have their
own tests (test_nonnegative.py), rm-merge-pointwise too (test_rm_merge_pointwise.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxrep.report import macs
from tests.helpers import (
    applied_rules,
    assert_same_outputs,
    cli,
    const,
    conv,
    expect_fused,
    expect_refused,
    fuse_model,
    initializer,
    inverted_block,
    make_model,
    node,
    op_counts,
    rand,
    run,
    wt,
)

RM = "remove-residual"
PW = "rm-merge-pointwise"


def basic_block(cin: int = 4, planes: int = 4, stride: int = 1, downsample: bool = False,
                proven: bool = True, size: int = 8) -> onnx.ModelProto:
    """[Relu ->] x -> Conv3x3(s) -> Relu -> Conv3x3 -> Add(x | Conv1x1_s(x)) -> Relu -> y."""
    nodes, inits = [], []
    x = "x"
    if proven:
        nodes.append(node("Relu", ["input"], ["x"], "relu_in"))
    else:
        x = "input"
    for n, i in (conv("conv1", x, wt(planes, cin, 3, 3, seed=1), rand(planes, seed=2),
                      out="c1", pads=[1, 1, 1, 1], strides=[stride, stride]),
                 (node("Relu", ["c1"], ["r1"], "relu1"), []),
                 conv("conv2", "r1", wt(planes, planes, 3, 3, seed=3), rand(planes, seed=4),
                      out="c2", pads=[1, 1, 1, 1])):
        nodes.append(n)
        inits += i
    short = x
    if downsample:
        n, i = conv("down", x, wt(planes, cin, 1, 1, seed=5), rand(planes, seed=6), out="d",
                    strides=[stride, stride])
        nodes.append(n)
        inits += i
        short = "d"
    nodes += [node("Add", ["c2", short], ["sum"], "add"), node("Relu", ["sum"], ["y"], "relu_out")]
    return make_model(nodes, [("input", ["N", cin, size, size])], [("y", None)], inits)


def bottleneck_block(cin: int = 8, mid: int = 2, cout: int = 8, stride: int = 1,
                     downsample: bool = False, group: int = 1) -> onnx.ModelProto:
    """Relu -> x -> 1x1 -> Relu -> 3x3(s, group) -> Relu -> 1x1 -> Add(x | 1x1_s(x)) -> Relu."""
    pieces = [
        (node("Relu", ["input"], ["x"], "relu_in"), []),
        conv("conv1", "x", wt(mid, cin, 1, 1, seed=1), rand(mid, seed=2), out="c1"),
        (node("Relu", ["c1"], ["r1"], "relu1"), []),
        conv("conv2", "r1", wt(mid, mid // group, 3, 3, seed=3), rand(mid, seed=4), out="c2",
             pads=[1, 1, 1, 1], strides=[stride, stride], group=group),
        (node("Relu", ["c2"], ["r2"], "relu2"), []),
        conv("conv3", "r2", wt(cout, mid, 1, 1, seed=5), rand(cout, seed=6), out="c3"),
    ]
    short = "x"
    if downsample:
        pieces.append(conv("down", "x", wt(cout, cin, 1, 1, seed=7), None, out="d",
                           strides=[stride, stride]))
        short = "d"
    pieces += [(node("Add", [short, "c3"], ["sum"], "add"), []),
               (node("Relu", ["sum"], ["y"], "relu_out"), [])]
    nodes = [p[0] for p in pieces]
    inits = [i for p in pieces for i in p[1]]
    return make_model(nodes, [("input", ["N", cin, 8, 8])], [("y", None)], inits)


def _feeds(model: onnx.ModelProto, scale: float = 1.0, seed: int = 3) -> dict[str, np.ndarray]:
    dims = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {model.graph.input[0].name: rand(*dims, seed=seed) * np.float32(scale)}


def _conv_weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {n.name: initializer(model, n.input[1]).shape for n in model.graph.node
            if n.op_type == "Conv"}


# --- opt-in -----------------------------------------------------------------------------


def test_residual_stays_without_remove_residuals() -> None:
    result = fuse_model(basic_block())
    assert op_counts(result.model)["Add"] == 1
    assert applied_rules(result)[RM] == 0
    assert "macs" not in result.report.extra


# --- ResNet basic block -----------------------------------------------------------------


def test_basic_identity_block() -> None:
    model = basic_block(cin=4, planes=4)
    result = fuse_model(model, remove_residuals=True)
    expect_fused(result, {"Relu": 3, "Conv": 2}, {RM: 1})
    assert _conv_weights(result.model) == {"conv1": (8, 4, 3, 3), "conv2": (4, 8, 3, 3)}
    why = result.report.applied[0].why
    assert "x >= 0 via Relu(relu_in)" in why and "identity residual add" in why
    assert_same_outputs(model, result.model, _feeds(model, scale=5.0))


def test_basic_stride2_downsample_block() -> None:
    model = basic_block(cin=4, planes=6, stride=2, downsample=True, size=9)
    result = fuse_model(model, remove_residuals=True)
    expect_fused(result, {"Relu": 3, "Conv": 2}, {RM: 1})
    weights = _conv_weights(result.model)
    assert weights == {"conv1": (10, 4, 3, 3), "conv2": (6, 10, 3, 3)}
    conv1 = next(n for n in result.model.graph.node if n.name == "conv1")
    assert helper.get_attribute_value(next(a for a in conv1.attribute if a.name == "strides")) \
        == [2, 2]
    assert "1x1 downsample down" in result.report.applied[0].why
    assert_same_outputs(model, result.model, _feeds(model, scale=5.0))


@pytest.mark.parametrize("stride,downsample", [(1, False), (2, True), (1, True)])
def test_bottleneck_block(stride: int, downsample: bool) -> None:
    model = bottleneck_block(stride=stride, downsample=downsample)
    result = fuse_model(model, remove_residuals=True)
    expect_fused(result, {"Relu": 4, "Conv": 3}, {RM: 1})
    assert _conv_weights(result.model) == {
        "conv1": (10, 8, 1, 1), "conv2": (10, 10, 3, 3), "conv3": (8, 10, 1, 1)}
    assert_same_outputs(model, result.model, _feeds(model, scale=5.0))


def test_bottleneck_with_grouped_middle_conv() -> None:
    """ResNeXt-like 3x3 with group 2 (2 channels per group): the 8 carried channels become
    4 more groups of 2 with the identity inside each."""
    model = bottleneck_block(cin=8, mid=4, cout=8, group=2)
    result = fuse_model(model, remove_residuals=True)
    expect_fused(result, {"Relu": 4, "Conv": 3}, {RM: 1})
    assert _conv_weights(result.model)["conv2"] == (12, 2, 3, 3)
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert next(a.i for a in conv2.attribute if a.name == "group") == 6
    assert_same_outputs(model, result.model, _feeds(model, scale=5.0))


def test_refused_when_carried_channels_do_not_fill_the_groups() -> None:
    model = bottleneck_block(cin=6, mid=8, cout=6, group=2)
    expect_refused(fuse_model(model, remove_residuals=True), RM,
                   "conv2: 6 carried channels do not fill groups of 4")


def test_refused_when_block_input_not_provably_nonnegative() -> None:
    result = fuse_model(basic_block(proven=False), remove_residuals=True)
    expect_refused(result, RM, "'input' is not provably non-negative", "graph input", "relu1")
    assert op_counts(result.model)["Add"] == 1
    assert result.verified


@pytest.mark.parametrize("source,words", [
    ("clip", "max -1 < 0"),  # ONNX Clip with min > max outputs max: x = -1 everywhere
    ("resize", "extrapolates with -2"),  # tf_crop_and_resize fills outside the roi with -2
])
def test_refused_when_the_block_input_only_looks_nonnegative(source: str, words: str) -> None:
    """Issue 12, hole 2: an op that is >= 0 for its usual attributes but not for these. Were
    the rule to fire, the carried x < 0 would pass relu1 as 0 and the model would change."""
    model = basic_block()
    relu_in = next(n for n in model.graph.node if n.name == "relu_in")
    if source == "clip":
        relu_in.CopyFrom(node("Clip", ["input", "lo", "hi"], ["x"], "clip_in"))
        model.graph.initializer.extend([const("lo", 0.5), const("hi", -1.0)])
    else:  # Relu(input[4x4]) -> Resize x2 over roi [-0.5, 1.5]: the border is -2
        relu_in.CopyFrom(node("Relu", ["input"], ["r"], "relu_in"))
        model.graph.node.insert(1, node(
            "Resize", ["r", "roi", "scales"], ["x"], "resize_in", mode="nearest",
            coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-2.0))
        model.graph.initializer.extend([const("roi", [0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5]),
                                        const("scales", [1, 1, 2, 2])])
        model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 4
        model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 4
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None))
    assert run(probe, _feeds(model))[1].min() < 0  # the counterexample is real
    result = fuse_model(model, remove_residuals=True)
    expect_refused(result, RM, "block input", words, "relu1")
    assert op_counts(result.model)["Add"] == 1
    assert result.verified


def test_refused_when_residual_operand_is_not_the_block_input() -> None:
    model = basic_block()
    add = next(n for n in model.graph.node if n.op_type == "Add")
    model.graph.node.insert(1, node("Abs", ["x"], ["ax"], "abs"))  # x -> Abs -> Add
    add.input[1] = "ax"
    result = fuse_model(model, remove_residuals=True)
    expect_refused(result, RM, "residual operand 'ax'", "not the block input 'x'", "Abs(abs)")
    assert op_counts(result.model)["Add"] == 1


def test_refused_when_the_shortcut_conv_is_not_1x1() -> None:
    model = basic_block(downsample=True)
    model.graph.node.insert(1, node("Relu", ["x"], ["x2"], "relu_x2"))
    down = next(n for n in model.graph.node if n.name == "down")
    w = rand(4, 4, 3, 3, seed=9)
    model.graph.initializer.append(numpy_helper.from_array(w, "down3.W"))
    down.input[1] = "down3.W"
    down.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    result = fuse_model(model, remove_residuals=True)
    expect_refused(result, RM, "shortcut down is not a 1x1 Conv", "kernel [3, 3]")


@pytest.mark.parametrize("reader", ["node", "graph-output"])
def test_refused_when_an_intermediate_has_another_reader(reader: str) -> None:
    model = basic_block()
    if reader == "node":
        model.graph.node.append(node("Sigmoid", ["r1"], ["side"], "side"))
    model.graph.output.append(helper.make_tensor_value_info(
        "side" if reader == "node" else "r1", onnx.TensorProto.FLOAT, ["N", 4, 8, 8]))
    result = fuse_model(model, remove_residuals=True)
    expect_refused(result, RM, "r1", "graph output" if reader == "graph-output" else "2 consumers")
    assert op_counts(result.model)["Add"] == 1


def test_refused_when_padding_does_not_keep_the_copy_aligned() -> None:
    model = basic_block()
    for n in model.graph.node:  # conv1 crops 2 pixels, conv2 pads them back
        if n.name in ("conv1", "conv2"):
            pads = next(a for a in n.attribute if a.name == "pads")
            pads.ints[:] = [0, 0, 0, 0] if n.name == "conv1" else [2, 2, 2, 2]
    result = fuse_model(model, remove_residuals=True)
    expect_refused(result, RM, "conv1 pads [0, 0, 0, 0]", "not 'same' padding")


@pytest.mark.parametrize("where", ["start", "end"])
def test_refused_when_the_chain_does_not_start_and_end_with_a_conv(where: str) -> None:
    model = basic_block()
    nodes = model.graph.node
    if where == "start":  # x -> Relu -> conv1
        next(n for n in nodes if n.name == "conv1").input[0] = "xr"
        nodes.insert(1, node("Relu", ["x"], ["xr"], "relu_start"))
        words = ("relu_start (Relu) reads the block input 'x'", "start with a Conv")
    else:  # conv2 -> Relu -> Add
        next(n for n in nodes if n.name == "add").input[0] = "c2r"
        nodes.insert(4, node("Relu", ["c2"], ["c2r"], "relu_end"))
        words = ("relu_end (Relu) feeds the residual add", "end with a Conv")
    expect_refused(fuse_model(model, remove_residuals=True), RM, *words)


def test_refused_when_the_chain_has_an_unsupported_node() -> None:
    model = basic_block()
    relu1 = next(n for n in model.graph.node if n.name == "relu1")
    relu1.op_type = "LeakyRelu"
    result = fuse_model(model, remove_residuals=True)
    expect_refused(result, RM, "relu1 (LeakyRelu)", "cannot carry identity channels")


# --- MobileNetV2 ------------------------------------------------------------------------


def test_inverted_residual_block_exact_with_inputs_x20() -> None:
    model = inverted_block()
    result = fuse_model(model, remove_residuals=True)
    # expand', dw' (group 12 + 4), and project' composed with the next 1x1
    expect_fused(result, {"Conv": 3, "Max": 2, "Min": 2}, {RM: 1, PW: 1})
    weights = _conv_weights(result.model)
    assert weights["expand"] == (16, 4, 1, 1) and weights["dw"] == (16, 1, 3, 3)
    assert weights["next"] == (5, 16, 1, 1)
    assert "proof" not in result.report.applied[0].why  # Clip needs no proof of x >= 0
    feeds = _feeds(model, scale=20.0)
    x = feeds["input"]
    assert x.min() < -6 and x.max() > 6  # the carried channels leave [0, 6]
    assert_same_outputs(model, result.model, feeds)


def _bounds(model: onnx.ModelProto) -> list[tuple[str, np.ndarray]]:
    return [(n.op_type, initializer(model, n.input[1]).reshape(-1))
            for n in model.graph.node if n.op_type in ("Max", "Min")]


def test_relu6_still_clamps_the_chain_channels_and_passes_the_carried_ones() -> None:
    model = inverted_block(scale=4.0)
    fused = fuse_model(model, remove_residuals=True).model
    bounds = _bounds(fused)
    for op, value in bounds:  # 12 chain channels then 4 carried ones
        assert value.shape == (16,)
        expected = (0.0, -np.inf) if op == "Max" else (6.0, np.inf)
        assert np.all(value[:12] == expected[0]) and np.all(value[12:] == expected[1])
    feeds = _feeds(model, scale=20.0)
    reference = run(model, feeds)[0]
    assert_same_outputs(model, fused, feeds)
    for broken in ("no clamp", "clamped copies"):  # either mistake shows at these inputs
        bad = onnx.ModelProto()
        bad.CopyFrom(fused)
        for n in bad.graph.node:
            if n.op_type not in ("Max", "Min"):
                continue
            t = next(i for i in bad.graph.initializer if i.name == n.input[1])
            v = numpy_helper.to_array(t).copy().reshape(-1)
            if broken == "no clamp":
                v[:12] = -np.inf if n.op_type == "Max" else np.inf
            else:
                v[12:] = 0.0 if n.op_type == "Max" else 6.0
            t.CopyFrom(numpy_helper.from_array(v.reshape(1, 16, 1, 1), t.name))
        out = run(bad, feeds)[0]
        assert np.abs(out - reference).max() > 1e-2, broken


def test_inverted_block_without_expansion_grouped_first_conv() -> None:
    """MobileNetV2's first block (t = 1): the chain starts with the depthwise conv, whose
    widened form holds 2 outputs per group (its own, the copy)."""
    model = inverted_block(expand=False, follow=False)
    result = fuse_model(model, remove_residuals=True)
    expect_fused(result, {"Conv": 2, "Max": 1, "Min": 1}, {RM: 1})
    assert _conv_weights(result.model) == {"dw": (8, 1, 3, 3), "project": (4, 8, 1, 1)}
    assert_same_outputs(model, result.model, _feeds(model, scale=20.0))


# --- report.macs ------------------------------------------------------------------------


def test_macs_counts_conv_gemm_matmul_with_symbolic_dims_as_1() -> None:
    pieces = [conv("c", "x", rand(8, 2, 3, 3), None, out="c_out", pads=[1, 1, 1, 1],
                   strides=[2, 2], group=2),
              (node("Flatten", ["c_out"], ["f"]), []),
              (node("Gemm", ["f", "B"], ["g"], transB=1), [const("B", rand(5, 8 * 4 * 4))]),
              (node("MatMul", ["g", "M"], ["y"]), [const("M", rand(5, 3))])]
    model = make_model([p[0] for p in pieces], [("x", ["N", 4, 8, 8])], [("y", None)],
                       [i for p in pieces for i in p[1]])
    conv_macs = 8 * 4 * 4 * (2 * 3 * 3)
    assert macs(model) == conv_macs + 128 * 5 + 5 * 3
    assert macs(model, {"x": [3, 4, 8, 8]}) == 3 * (conv_macs + 128 * 5 + 5 * 3)


def test_report_shows_macs_when_removing_residuals() -> None:
    result = fuse_model(basic_block(cin=4, planes=4, size=8), remove_residuals=True)
    before = 2 * 8 * 8 * 4 * 4 * 9
    after = 8 * 8 * (8 * 4 * 9 + 4 * 8 * 9)
    assert result.report.extra["macs"] == {"before": before, "after": after}
    assert f"macs: {before:,} -> {after:,}" in result.report.render()


# --- torch exports end to end -----------------------------------------------------------

E2E_FORMS = ("ts-folded", "ts-unfolded", "dynamo")
E2E_MODELS = ("resnet18", "resnet50", "mobilenetv2", "preact_resnet")
COMPUTE_OPS = ("Conv", "Relu", "Clip", "Max", "Min", "Add", "MaxPool", "Gemm",
               "BatchNormalization")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """name -> {form: training-time export, "plain": the plain reference (ts-folded)}."""
    from models.export import export_forms
    from models.registry import FAMILIES

    folder = tmp_path_factory.mktemp("rm")
    made = {}
    for name in E2E_MODELS:
        family = FAMILIES[name]
        paths = {f: folder / f"{name}-{f}.onnx" for f in E2E_FORMS}
        made[name] = dict(export_forms(family.build_train(), family.input_shape, paths))
        made[name]["plain"] = export_forms(family.build_plain(), family.input_shape,
                                           {"ts-folded": folder / f"{name}-plain.onnx"})[
                                               "ts-folded"]
    return made


def _fuse_cli(src: Path, tmp_path: Path) -> tuple[dict, onnx.ModelProto]:
    out, report_path = tmp_path / "fused.onnx", tmp_path / "report.json"
    proc = cli("fuse", src, out, "--report", report_path, "--remove-residuals", "-q",
               "--input-shape", "input:2,3,64,64" if "preact" not in src.name
               else "input:2,3,32,32")
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(out))
    return json.loads(report_path.read_text()), onnx.load(str(out))


@pytest.mark.torch
@pytest.mark.parametrize("form", E2E_FORMS)
@pytest.mark.parametrize("name", ("resnet18", "resnet50", "mobilenetv2"))
def test_export_loses_every_residual(name: str, form: str, exports: dict,
                                     tmp_path: Path) -> None:
    report, fused = _fuse_cli(exports[name][form], tmp_path)
    assert report["verification"]["passed"] is True
    assert report["verification"]["worst_rel_l2"] <= 1e-5
    adds = report["ops_before"]["Add"]
    assert adds == {"resnet18": 8, "resnet50": 16, "mobilenetv2": 11}[name]
    assert report["rules_applied"][RM] == adds
    counts = op_counts(fused)
    assert counts["Add"] == 0
    plain = onnx.load(str(exports[name]["plain"]))
    assert Counter({op: counts[op] for op in COMPUTE_OPS}) == Counter(
        {op: op_counts(plain)[op] for op in COMPUTE_OPS})
    assert report["macs"]["after"] > report["macs"]["before"]
    assert report["params_after"] > report["params_before"]
    if name.startswith("resnet"):  # the same network as models' RMNet plain reference
        assert report["macs"]["after"] == macs(plain, {"input": [2, 3, 64, 64]})


@pytest.mark.torch
@pytest.mark.parametrize("form", E2E_FORMS)
def test_preact_resnet_identity_blocks_refused(form: str, exports: dict,
                                              tmp_path: Path) -> None:
    """Pre-activation identity blocks: the block input is an Add (or a conv) output, not
    provably >= 0 - refused, and the model stays correct. The downsample blocks' shortcut
    reads Relu(BN(x)) >= 0: those two do lose their Add."""
    report, fused = _fuse_cli(exports["preact_resnet"][form], tmp_path)
    assert report["verification"]["passed"] is True
    assert report["verification"]["worst_rel_l2"] <= 1e-5
    assert report["ops_before"]["Add"] == 6
    assert report["rules_applied"].get(RM, 0) == 2
    assert op_counts(fused)["Add"] == 4
    reasons = [m["reason"] for m in report["near_misses"] if m["rule"] == RM]
    assert sum("is not provably non-negative" in r for r in reasons) == 4, reasons
