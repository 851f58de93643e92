"""depthwise-multiplier: Conv(group g, weight [k*g, 1, ..]) after Conv P -> depthwise Conv
(group k*g) after P with each output channel repeated k times."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxrep import engine
from onnxrep import graph as graph_mod
from onnxrep.rules.depthwise_multiplier import WidenIntoDepthwise
from tests.helpers import cli, const, conv, make_model, node, op_counts, rand, run

RULE = "depthwise-multiplier"
CIN, G = 3, 8


def _model(chain: list[tuple[str, dict]] = (("Clip", {}),), k: int = 2, p_group: int = 1,
           cin: int = CIN, d_weight: np.ndarray | None = None, d_group: int = G,
           p_output_too: bool = False, second_reader: bool = False,
           clip_bound: np.ndarray | None = None, p_bias: bool = True) -> onnx.ModelProto:
    """x[N, cin, H, W] -> P Conv(cin -> 8, 3x3, group p_group) -> chain -> D Conv(group 8,
    weight [k*8, 1, 3, 3] unless d_weight) -> y. Clip reads zero/six (or clip_bound as max)."""
    nodes, inits = [], [const("zero", 0.0), const("six", 6.0)]
    p, p_inits = conv("P", "x", rand(G, cin // p_group, 3, 3, seed=1),
                      rand(G, seed=2) if p_bias else None, out="t", pads=[1, 1, 1, 1],
                      strides=[2, 2], group=p_group)
    nodes.append(p)
    inits += p_inits
    src = "t"
    for i, (op, attrs) in enumerate(chain):
        inputs = [src]
        if op == "Clip":
            if clip_bound is not None:
                inits.append(const("bound", clip_bound))
                inputs += ["zero", "bound"]
            else:
                inputs += ["zero", "six"]
        nodes.append(node(op, inputs, [f"c{i}"], f"act{i}", **attrs))
        src = f"c{i}"
    weight = rand(k * G, 1, 3, 3, seed=3) if d_weight is None else d_weight
    d, d_inits = conv("D", src, weight, rand(weight.shape[0], seed=4), out="y",
                      pads=[1, 1, 1, 1], group=d_group)
    nodes.append(d)
    inits += d_inits
    outputs = [("y", None)]
    if p_output_too:
        outputs.append(("t", None))
    if second_reader:
        nodes.append(node("Sigmoid", [src], ["side"], "side"))
        outputs.append(("side", None))
    return make_model(nodes, [("x", ["N", cin, "H", "W"])], outputs, inits)


def _apply(model: onnx.ModelProto) -> tuple[engine.EngineResult, onnx.ModelProto]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = graph_mod.normalize(copy, base_dir=None)
    result = engine.run(graph, [WidenIntoDepthwise()], check_locally=True)
    out = graph_mod.export(graph, like=model).materialize()
    onnx.checker.check_model(out, full_check=True)
    return result, out


def _conv(model: onnx.ModelProto, name: str) -> tuple[onnx.NodeProto, np.ndarray]:
    (n,) = [n for n in model.graph.node if n.name == name]
    inits = {t.name: t for t in model.graph.initializer}
    return n, onnx.numpy_helper.to_array(inits[n.input[1]])


def _group(n: onnx.NodeProto) -> int:
    return next((a.i for a in n.attribute if a.name == "group"), 1)


def _expect_fired(model: onnx.ModelProto, k: int = 2, cin: int = CIN) -> onnx.ModelProto:
    result, out = _apply(model)
    assert Counter(a.rule for a in result.applied) == Counter({RULE: 1}), result.misses
    assert all("local check" not in a.checked or "differ" not in a.checked
               for a in result.applied)
    assert op_counts(out) == op_counts(model)
    d, w_d = _conv(out, "D")
    assert _group(d) == k * G and w_d.shape == (k * G, 1, 3, 3)
    p, w_p = _conv(out, "P")
    assert w_p.shape[0] == k * G
    np.testing.assert_array_equal(w_p, np.repeat(_conv(model, "P")[1], k, axis=0))
    for batch, hw in ((2, (17, 13)), (1, (16, 16)), (2, (9, 10))):
        x = {"x": rand(batch, cin, *hw, seed=7) * np.float32(3)}
        for a, b in zip(run(model, x), run(out, x), strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return out


def _expect_unchanged(model: onnx.ModelProto, *words: str) -> None:
    result, out = _apply(model)
    assert result.applied == []
    assert [(n.op_type, _group(n)) for n in out.graph.node] == [
        (n.op_type, _group(n)) for n in model.graph.node]
    reasons = [m.reason for m in result.misses if m.rule == RULE]
    if words:
        assert any(all(w in r for w in words) for r in reasons), (words, reasons)
    else:
        assert reasons == []


def test_fires_conv_clip_depthwise_multiplier() -> None:
    out = _expect_fired(_model())
    assert [n.op_type for n in out.graph.node] == ["Conv", "Clip", "Conv"]


def test_fires_with_grouped_producer() -> None:
    _expect_fired(_model(p_group=2, cin=4), cin=4)


def test_fires_without_chain() -> None:
    _expect_fired(_model(chain=[]))


def test_fires_with_relu_and_hardswish() -> None:
    _expect_fired(_model(chain=[("Relu", {}), ("HardSwish", {})]))


def test_fires_with_k3_and_other_activations() -> None:
    _expect_fired(_model(chain=[("LeakyRelu", {"alpha": 0.2}), ("Sigmoid", {}),
                                ("HardSigmoid", {"alpha": 0.3, "beta": 0.4})], k=3), k=3)


def test_fires_without_producer_bias() -> None:
    _expect_fired(_model(p_bias=False))


def test_refuses_chain_tensor_read_twice() -> None:
    _expect_unchanged(_model(second_reader=True), "c0", "2 consumers")


def test_refuses_producer_output_is_graph_output() -> None:
    # the rule's own reason (the engine's validation would say "t (inside the match) ...")
    _expect_unchanged(_model(p_output_too=True), "t is a graph output")


def test_refuses_per_channel_clip_bound() -> None:
    bound = np.linspace(1, 6, G, dtype=np.float32).reshape(1, G, 1, 1)
    _expect_unchanged(_model(clip_bound=bound), "act0", "not one value for every channel")


def test_refuses_maxpool_between() -> None:
    _expect_unchanged(_model(chain=[("Relu", {}), ("MaxPool", {"kernel_shape": [1, 1]})]),
                      "MaxPool", "not a Conv")


def test_refuses_true_grouped_conv() -> None:
    """group 4 with 2 input channels per group: not a depthwise multiplier."""
    _expect_unchanged(_model(d_weight=rand(16, 2, 3, 3, seed=3), d_group=4),
                      "D", "2 channels per group")


def test_already_depthwise_not_matched() -> None:
    _expect_unchanged(_model(k=1))


def test_refuses_graph_input_producer() -> None:
    weight = rand(2 * G, 1, 3, 3, seed=3)
    d, inits = conv("D", "x", weight, rand(2 * G, seed=4), out="y", pads=[1, 1, 1, 1],
                    group=G)
    model = make_model([d], [("x", ["N", G, 9, 9])], [("y", None)], inits)
    _expect_unchanged(model, "D", "no Conv computes")


@pytest.mark.parametrize("chain", [[("Relu", {})], []])
def test_growth_bound_refuses(chain: list) -> None:
    """copies_weights: --max-growth 1 refuses the copy of P's weight."""
    model = _model(chain=chain)
    graph = graph_mod.normalize(model, base_dir=None)
    result = engine.run(graph, [WidenIntoDepthwise()], max_growth=1.0)
    assert result.applied == []
    assert any("max-growth" in m.reason for m in result.misses)


def _conv_groups(model: onnx.ModelProto) -> list[tuple[int, int, int]]:
    """(group, weight out channels, weight in channels per group) of every Conv."""
    weights = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            dims = weights[n.input[1]].dims
            out.append((group, dims[0], dims[1]))
    return out


@pytest.mark.torch
def test_mobilenetv2_has_no_conv_between_grouped_and_depthwise(tmp_path: Path) -> None:
    """Residual removal leaves MobileNetV2's first block with a Conv of 2 outputs per input
    channel (group 8, weight [16, 1, 3, 3]), which MNN splits into 17 layers and onnxruntime
    runs outside its NCHWc kernels; it becomes depthwise (group 16) with the stem Conv's
    channels repeated, for every target."""
    from models.export import export
    from models.registry import FAMILIES

    family = FAMILIES["mobilenetv2"]
    src = tmp_path / "train.onnx"
    export(family.build_train(), family.input_shape, src, "ts-folded")
    kinds = {}
    for target in ("onnxruntime", "mnn"):
        out = tmp_path / f"{target}.onnx"
        proc = cli("fuse", src, out, "-q", "--remove-residuals", "--target", target)
        assert proc.returncode == 0, proc.stderr
        kinds[target] = {"dense" if g == 1 else "depthwise" if w_in == 1 and g == w_out
                         else "multiplier" for g, w_out, w_in in
                         _conv_groups(onnx.load(str(out)))}
    # onnxruntime too: its NCHWc kernels take depthwise Convs only (the multiplier Conv ran
    # 4-6% slower than the RMNet plain form; with the rule 3% faster)
    assert kinds["onnxruntime"] == kinds["mnn"] == {"dense", "depthwise"}
