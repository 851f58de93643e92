"""`fuse --target T --opset N` (onnxrep/targets.py, onnxrep/opset.py): each opset conversion
on a hand-built graph at every opset 13..17, run on onnxruntime against the original; the
refusals (one line naming the op and the opset); the constant-shape step; the models/
families through the CLI; the op warnings; bad opsets."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxrep import opset as opset_mod
from onnxrep import targets
from onnxrep.errors import OnnxrepError
from onnxrep.verify import verify
from tests.helpers import assert_one_line_error, cli, const, make_model, node, op_counts, rand

OPSETS = range(13, 18)
F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32


def _i64(name: str, values: list[int]) -> TensorProto:
    return const(name, np.array(values, np.int64), np.int64)


def _one(op: str, inputs: list, outputs: list, inits: list = (), opset: int = 18,
         check: bool = True, **attrs: object) -> onnx.ModelProto:
    """A one-node model: `inputs` are graph input specs or initializer names."""
    init_names = {t.name for t in inits}
    names = [i if isinstance(i, str) else i[0] for i in inputs]
    graph_inputs = [i for i in inputs if not isinstance(i, str) and i[0] not in init_names]
    return make_model([node(op, names, [o[0] for o in outputs], **attrs)], graph_inputs, outputs,
                      list(inits), opset=opset, check=check)


# name -> model at its own opset; each converts exactly to every opset 13..17 below it
CASES: dict[str, onnx.ModelProto] = {
    **{f"{op}": _one(op, [("a", ["N", 3, 4]), ("b", [3, 4])], [("y", None)])
       for op in ("Add", "Sub", "Mul", "Div")},
    "Add-int32": _one("Add", [("a", ["N", 3], I32), ("b", [3], I32)], [("y", None, I32)]),
    "Relu": _one("Relu", [("x", ["N", 3, 4])], [("y", None)]),
    "LeakyRelu": _one("LeakyRelu", [("x", ["N", 3, 4])], [("y", None)], alpha=0.1),
    "PRelu": _one("PRelu", [("x", ["N", 3, 4]), "s"], [("y", None)], [const("s", rand(3, 1))]),
    "Pow": _one("Pow", [("x", ["N", 3]), "e"], [("y", None)], [const("e", 2.0)]),
    "Where": _one("Where", [("c", ["N", 3], TensorProto.BOOL), ("a", ["N", 3]), ("b", [3])],
                  [("y", None)]),
    "Identity": _one("Identity", [("x", ["N", 3])], [("y", None)]),
    "Reshape": _one("Reshape", [("x", ["N", 3, 4]), "s"], [("y", None)],
                    [_i64("s", [0, -1])], allowzero=0),
    "Reshape-allowzero": _one("Reshape", [("x", ["N", 3, 4]), "s"], [("y", None)],
                              [_i64("s", [-1, 12])], allowzero=1),
    "Shape": _one("Shape", [("x", ["N", 3, 4])], [("y", None, I64)]),
    "Shape-start-end": _one("Shape", [("x", ["N", 3, 4, 5])], [("y", None, I64)], start=1,
                            end=-1),
    "Shape-start": _one("Shape", [("x", ["N", 3, 4, 5])], [("y", None, I64)], start=-2),
    "BatchNormalization": _one(
        "BatchNormalization", [("x", ["N", 3, 4, 4]), "s", "b", "m", "v"], [("y", None)],
        [const("s", rand(3)), const("b", rand(3, seed=1)), const("m", rand(3, seed=2)),
         const("v", rand(3, seed=3, low=0.5, high=2.0))], epsilon=1e-3),
    **{f"{op}": _one(op, [("x", ["N", 3, 4, 5]), "axes"], [("y", None)],
                     [_i64("axes", [-1, 1])], keepdims=1)
       for op in opset_mod._REDUCE_18},
    "ReduceMean-keepdims0": _one("ReduceMean", [("x", ["N", 3, 4, 5]), "axes"], [("y", None)],
                                 [_i64("axes", [2, 3])], keepdims=0),
    "ReduceMean-all": _one("ReduceMean", [("x", ["N", 3, 4])], [("y", None)], keepdims=0),
    "ReduceMean-empty-axes": _one("ReduceMean", [("x", ["N", 3, 4]), "axes"], [("y", None)],
                                  [_i64("axes", [])], keepdims=1),
    "ReduceMax-noop": _one("ReduceMax", [("x", ["N", 3, 4])], [("y", None)],
                           noop_with_empty_axes=1),
    "ReduceSum": _one("ReduceSum", [("x", ["N", 3, 4]), "axes"], [("y", None)],
                      [_i64("axes", [1])], keepdims=1),
    "Pad": _one("Pad", [("x", ["N", 3, 4, 5]), "p", "c"], [("y", None)],
                [_i64("p", [0, 0, 1, 0, 0, 0, 2, 1]), const("c", 0.5)], mode="constant"),
    "Pad-axes": _one("Pad", [("x", ["N", 3, 4, 5]), "p", "c", "ax"], [("y", None)],
                     [_i64("p", [1, 0, 2, 3]), const("c", 0.5), _i64("ax", [-1, 2])],
                     mode="constant"),
    "Pad-axes-reflect": _one("Pad", [("x", ["N", 3, 4, 5]), "p", "", "ax"], [("y", None)],
                             [_i64("p", [1, 2]), _i64("ax", [3])], mode="reflect"),
    "Split-num-outputs": make_model(
        [node("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3)], [("x", ["N", 3, 7])],
        [("a", None), ("b", None), ("c", None)]),
    "Split-sizes": make_model(
        [node("Split", ["x", "s"], ["a", "b"], axis=1)], [("x", ["N", 5])],
        [("a", None), ("b", None)], [_i64("s", [2, 3])]),
    "Resize": _one("Resize", [("x", [1, 3, 4, 4]), "", "sc"], [("y", None)],
                   [const("sc", np.array([1, 1, 2, 2], np.float32))], mode="nearest"),
    "HardSwish": _one("HardSwish", [("x", ["N", 3, 4])], [("y", None)]),
    "CastLike": _one("CastLike", [("x", ["N", 3]), "t"], [("y", None, TensorProto.DOUBLE)],
                     [const("t", np.zeros(1), np.float64)]),
}


def _spec(name: str, target: int) -> str:
    return f"{name}->{target}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_conversion_is_exact_at_every_opset(name: str) -> None:
    model = CASES[name]
    for target in OPSETS:
        converted = opset_mod.convert(model, target)
        onnx.checker.check_model(converted, full_check=True)
        assert opset_mod.model_opset(converted) == target
        for n in converted.graph.node:  # each node exists, as written, at the target
            schema = onnx.defs.get_schema(n.op_type, target)
            assert {a.name for a in n.attribute} <= set(schema.attributes), _spec(name, target)
        result = verify(model, converted)
        assert result.passed, (_spec(name, target), result.outputs)


def test_reduce_axes_input_becomes_the_attribute() -> None:
    converted = opset_mod.convert(CASES["ReduceMean"], 17)
    (reduce,) = converted.graph.node
    assert list(reduce.input) == ["x"]
    assert [a.ints for a in reduce.attribute if a.name == "axes"] == [[-1, 1]]
    assert not converted.graph.initializer  # the axes tensor went with the input


def test_shape_with_start_becomes_shape_then_slice() -> None:
    converted = opset_mod.convert(CASES["Shape-start-end"], 14)
    assert [n.op_type for n in converted.graph.node] == ["Shape", "Slice"]


@pytest.mark.parametrize("model, target, words", [
    (_one("Reshape", [("x", ["N", 3, 4]), ("s", [2], I64)], [("y", None)], check=False,
          allowzero=1), 13,
     ["Reshape", "opset 13", "allowzero"]),
    (_one("Reshape", [("x", ["N", 0, 4]), "s"], [("y", None)], [_i64("s", [0, 4])],
          allowzero=1), 13, ["Reshape", "allowzero"]),
    (_one("ReduceMean", [("x", ["N", 3, 4]), ("axes", [1], I64)], [("y", None)],
          check=False), 17,
     ["ReduceMean", "opset 17", "axes"]),
    (_one("Add", [("a", ["N", 3], TensorProto.INT8), ("b", [3], TensorProto.INT8)],
          [("y", None, TensorProto.INT8)]), 13, ["Add", "opset 13", "int8"]),
    (_one("Relu", [("x", ["N", 3], I32)], [("y", None, I32)]), 13, ["Relu", "int32"]),
    (_one("LeakyRelu", [("x", ["N", 3], TensorProto.BFLOAT16)],
          [("y", None, TensorProto.BFLOAT16)]), 15, ["LeakyRelu", "bfloat16"]),
    (_one("BatchNormalization", [("x", ["N", 3, 4]), "s", "b", "m", "v"], [("y", None)],
          [const("s", rand(3)), const("b", rand(3)), const("m", rand(3)),
           const("v", rand(3), np.float16)]), 13, ["BatchNormalization", "dtype"]),
    (make_model([node("Split", ["x"], ["a", "b"], axis=0, num_outputs=2)], [("x", ["N", 4])],
                [("a", None), ("b", None)]), 17, ["Split", "num_outputs"]),
    (_one("Resize", [("x", [1, 3, 4, 4]), "", "sc"], [("y", None)],
          [const("sc", np.array([2, 2], np.float32))], axes=[2, 3]), 17, ["Resize", "axes"]),
    (_one("LayerNormalization", [("x", ["N", 4]), "s"], [("y", None)], [const("s", rand(4))]),
     16, ["LayerNormalization", "opset 16"]),
    (_one("Pad", [("x", ["N", 3, 4]), ("p", [2], I64), "", "ax"], [("y", None)],
          [_i64("ax", [2])], check=False), 17, ["Pad", "constants"]),
])
def test_an_op_without_an_exact_form_is_refused_in_one_line(
        model: onnx.ModelProto, target: int, words: list[str]) -> None:
    with pytest.raises(OnnxrepError) as raised:
        opset_mod.convert(model, target)
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_no_upward_conversion() -> None:
    model = _one("Relu", [("x", ["N", 3])], [("y", None)], opset=13)
    with pytest.raises(OnnxrepError, match="only converts down"):
        opset_mod.convert(model, 17)


def test_version_converter_of_onnx_cannot_do_it() -> None:
    """Why onnxrep converts itself: onnx has no Relu adapter below 14 (if this starts to
    pass, onnx.version_converter may be worth a second look)."""
    from onnx import version_converter

    with pytest.raises(Exception, match="Relu"):
        version_converter.convert_version(CASES["Relu"], 13)


def _dynamic_flatten() -> onnx.ModelProto:
    """The dynamo exporter's flatten of a pooled [N, 6, 1, 1]: Shape -> Gather -> Unsqueeze
    -> Concat([N], [6]) -> Reshape(allowzero=1)."""
    nodes = [
        node("GlobalAveragePool", ["x"], ["p"]),
        node("Shape", ["x"], ["s"], start=0, end=1),
        node("Concat", ["s", "c"], ["shape"], axis=0),
        node("Reshape", ["p", "shape"], ["y"], allowzero=1),
    ]
    return make_model(nodes, [("x", ["N", 6, 5, 5])], [("y", None)], [_i64("c", [6])])


def test_a_computed_flatten_shape_becomes_a_constant() -> None:
    model = _dynamic_flatten()
    fitted, warnings = targets.fit_to_target(model, "tensorrt", 13)
    assert op_counts(fitted) == {"GlobalAveragePool": 1, "Reshape": 1}
    (shape,) = [t for t in fitted.graph.initializer]
    assert onnx.numpy_helper.to_array(shape).tolist() == [-1, 6]
    assert opset_mod.model_opset(fitted) == 13 and warnings == []
    assert verify(model, fitted).passed


def test_a_shape_with_two_unknown_dims_stays_computed() -> None:
    nodes = [node("Shape", ["x"], ["s"], start=0, end=2),
             node("Concat", ["s", "c"], ["shape"], axis=0),
             node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [("x", ["N", "M", 4, 5])], [("y", None)], [_i64("c", [20])])
    fitted = targets.constant_shapes(model)
    assert op_counts(fitted) == op_counts(model)


def test_target_table_and_opsets() -> None:
    assert set(targets.TARGETS) == {"onnxruntime", "ort-mobile", "openvino", "tensorrt",
                                    "ncnn", "mnn", "tflite"}
    relu = CASES["Relu"]
    assert targets.target_opset(relu, "tensorrt", None) == 17
    assert targets.target_opset(relu, "ncnn", None) == 17  # pnnx misreads ReduceMean-18
    assert targets.target_opset(relu, "openvino", None) == 18
    assert targets.target_opset(relu, "openvino", 14) == 14
    for bad in (12, 19):
        with pytest.raises(OnnxrepError, match=f"--opset {bad}"):
            targets.target_opset(relu, "tensorrt", bad)
    with pytest.raises(OnnxrepError, match="unknown target"):
        targets.get_target("coreml")


def test_a_single_axis_reduce_mean_for_ncnn_gets_its_axes_as_the_attribute() -> None:
    """pnnx reads a one-element axes input of ReduceMean-18 as a plain int and ncnn's
    Reduction then reduces nothing (LeViT's token mean: wrong shape, every form); opset 17
    writes the axes as the attribute, which pnnx reads right."""
    model = _one("ReduceMean", [("x", ["N", 16, 32]), "axes"], [("y", None)],
                 [_i64("axes", [1])], keepdims=0)
    fitted, warnings = targets.fit_to_target(model, "ncnn", None)
    assert opset_mod.model_opset(fitted) == 17 and warnings == []
    (reduce,) = fitted.graph.node
    assert len(reduce.input) == 1 and [a.ints for a in reduce.attribute if a.name == "axes"]


def test_a_default_opset_with_no_exact_form_keeps_the_model_opset_and_warns() -> None:
    """The default opset of a target is a preference: a model with an op that has no exact
    form there keeps its own opset and says why; an --opset asked for is an error."""
    model = make_model([node("Split", ["x"], ["a", "b"], axis=0, num_outputs=2)],
                       [("x", ["N", 4])], [("a", None), ("b", None)])
    fitted, warnings = targets.fit_to_target(model, "ncnn", None)
    assert opset_mod.model_opset(fitted) == 18
    assert any("opset 17" in w and "num_outputs" in w for w in warnings), warnings
    with pytest.raises(OnnxrepError, match="num_outputs"):
        targets.fit_to_target(model, "ncnn", 17)


def test_op_warnings_name_each_op_once() -> None:
    gelu = make_model([node("Erf", ["x"], ["e"]), node("Erf", ["e"], ["y"])],
                      [("x", ["N", 3])], [("y", None)])
    assert [w.split(":")[0] for w in targets.op_warnings(gelu, "tflite")] == ["Erf"]
    assert targets.op_warnings(gelu, "openvino") == []
    odd = make_model([node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij")],
                     [("x", [2, 3])], [("y", None)])
    assert "not in onnxrep's table" in targets.op_warnings(odd, "mnn")[0]
    assert targets.op_warnings(odd, "onnxruntime") == []


# --- the models/ families through the CLI ------------------------------------------------

FAMILIES = ("fastvit",)  # GELU (Erf), and a computed flatten shape in dynamo-noopt
FAMILIES_ALL = "all"


def _export(root: Path, names: tuple[str, ...]) -> dict[tuple[str, str], Path]:
    from models.export import export_forms
    from models.registry import FAMILIES as REGISTRY

    out = {}
    for name in (sorted(REGISTRY) if names == (FAMILIES_ALL,) else names):
        fam = REGISTRY[name]
        paths = export_forms(fam.build_train(), fam.input_shape,
                             {f: root / f"{name}-{f}.onnx" for f in fam.forms})
        out.update({(name, form): path for form, path in paths.items()})
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    pytest.importorskip("torch")
    return _export(tmp_path_factory.mktemp("targets"), FAMILIES)


def _fuse_for_tensorrt(src: Path, dst: Path) -> onnx.ModelProto:
    report = dst.with_suffix(".json")
    done = cli("fuse", src, dst, "--target", "tensorrt", "--opset", "17", "--report", report,
               "-q")
    assert done.returncode == 0, done.stderr
    assert not Path(str(dst) + ".data").exists()  # one file: the weights fit in 2 GB
    model = onnx.load(str(dst))
    assert opset_mod.model_opset(model) == 17
    reduces = [n for n in model.graph.node if n.op_type.startswith("Reduce")]
    assert all(len(n.input) == 1 for n in reduces), "a ReduceMean axes input is left"
    data = json.loads(report.read_text())
    assert data["target"]["name"] == "tensorrt" and data["target"]["opset"] == 17
    assert data["verification"]["passed"]
    return model


@pytest.mark.torch
def test_families_fit_tensorrt_opset_17(exports: dict, tmp_path: Path) -> None:
    for (name, form), src in exports.items():
        model = _fuse_for_tensorrt(src, tmp_path / f"{name}-{form}.onnx")
        if form == "dynamo-noopt":  # the computed flatten shape is a constant now
            assert "Shape" not in op_counts(model), (name, form)


@pytest.mark.torch
def test_gelu_model_on_tflite_warns_about_erf(exports: dict, tmp_path: Path) -> None:
    src, dst = exports[("fastvit", "ts-folded")], tmp_path / "fastvit-tflite.onnx"
    report = tmp_path / "fastvit-tflite.json"
    done = cli("fuse", src, dst, "--target", "tflite", "--report", report)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "warning:" in line]
    assert len(lines) == 1 and "Erf" in lines[0] and "select-TF" in lines[0], done.stdout
    data = json.loads(report.read_text())
    assert data["target"] == {"name": "tflite", "opset": 18, "warnings": [
        lines[0].split("warning: ", 1)[1]]}


@pytest.mark.parametrize("option, bad, words", [
    ("--opset", "12", "--opset 12"), ("--opset", "19", "--opset 19"),
    ("--target", "coreml", "unknown target 'coreml'")])
def test_bad_opset_or_target_is_one_line_and_writes_nothing(
        option: str, bad: str, words: str, tmp_path: Path) -> None:
    src = tmp_path / "relu.onnx"
    onnx.save(CASES["Relu"], str(src))
    dst = tmp_path / "out.onnx"
    done = cli("fuse", src, dst, option, bad)
    line = assert_one_line_error(done.returncode, done.stderr)
    assert words in line
    assert not dst.exists()


@pytest.mark.torch
@pytest.mark.skipif(shutil.which("polygraphy") is None
                    or importlib.util.find_spec("polygraphy") is None,
                    reason="polygraphy not installed (pip install polygraphy)")
def test_tensorrt_output_passes_polygraphy_lint(exports: dict, tmp_path: Path) -> None:
    src = exports[("fastvit", "dynamo-noopt")]
    dst = tmp_path / "fastvit-trt.onnx"
    _fuse_for_tensorrt(src, dst)
    _passes_lint(dst)


def _passes_lint(model: Path) -> None:
    lint = model.with_suffix(".lint.json")
    done = subprocess.run(["polygraphy", "check", "lint", str(model), "-o", str(lint)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(lint.read_text())["summary"]["failing"] == []


@pytest.mark.torch
@pytest.mark.targets
def test_every_family_and_form_fits_tensorrt(tmp_path: Path) -> None:
    """Every models/ family in every form (make targets; minutes, not part of make test)."""
    lint = shutil.which("polygraphy") is not None
    for (name, form), src in _export(tmp_path, (FAMILIES_ALL,)).items():
        _fuse_for_tensorrt(src, tmp_path / f"{name}-{form}.fused.onnx")
        if lint:
            _passes_lint(tmp_path / f"{name}-{form}.fused.onnx")
