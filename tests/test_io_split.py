"""The low-copy path: SplitModel (weights as arrays beside a data-less proto) written as one
file or with external data, the blockwise float64 math, the loaded proto let go, and
Shape(weight) folded without onnxruntime. The protobuf reader and writer themselves are tested
in test_wire.py."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxrep import folding, io, kernels
from onnxrep import graph as graph_mod
from onnxrep.api import fuse
from onnxrep.io import save as io_save
from tests.helpers import bn, chain, const, conv, make_model, node, rand, run


def conv_bn_model() -> onnx.ModelProto:
    """Conv -> BN -> Add(x): a large weight and small per-channel vectors."""
    nodes, inits = chain(conv("c", "x", rand(16, 16, 3, 3), rand(16, seed=2), pads=[1] * 4),
                         bn("bn", "c_out", 16))
    nodes.append(node("Add", ["bn_out", "x"], ["y"], "add"))
    return make_model(nodes, [("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])], inits)


def odd_type_model() -> onnx.ModelProto:
    """A large float weight beside a bfloat16 one (a type numpy lacks: it must travel inside
    the proto, bytes untouched)."""
    bf16 = helper.make_tensor("odd", TensorProto.BFLOAT16, [300], np.linspace(-3, 3, 300))
    return make_model([node("Add", ["x", "w"], ["y"], "add"),
                       node("Concat", ["odd", "b"], ["z"], "concat", axis=0)],
                      [("x", [300]), ("b", [2], TensorProto.BFLOAT16)],
                      [("y", [300]), ("z", [302], TensorProto.BFLOAT16)],
                      [const("w", rand(300)), bf16])


def split_of(model: onnx.ModelProto) -> io.SplitModel:
    graph = graph_mod.normalize(model)
    graph_mod.load_weights(graph)
    return graph_mod.export(graph, like=io.header_of(model))


def test_split_export_keeps_large_weights_out_of_the_proto() -> None:
    split = split_of(conv_bn_model())
    assert set(split.weights) == {"c.W"}  # 16x16x3x3 float32; 64-byte vectors stay inline
    placeholder = next(t for t in split.proto.graph.initializer if t.name == "c.W")
    assert list(placeholder.dims) == [16, 16, 3, 3] and not io.has_data(placeholder)
    assert split.nbytes == io.tensor_bytes(split.materialize())


@pytest.mark.parametrize("external", [False, True])
def test_a_type_numpy_lacks_travels_in_the_proto(tmp_path: Path, external: bool) -> None:
    model = odd_type_model()
    split = split_of(model)
    assert set(split.weights) == {"w"}
    io.save_atomic(split, tmp_path / "m.onnx", external_data=external)
    loaded = {t.name: t for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    original = {t.name: t for t in model.graph.initializer}
    assert loaded["odd"].data_type == TensorProto.BFLOAT16
    assert numpy_helper.to_array(loaded["odd"]).tobytes() == \
        numpy_helper.to_array(original["odd"]).tobytes()
    assert np.array_equal(numpy_helper.to_array(loaded["w"]), numpy_helper.to_array(original["w"]))


@pytest.mark.parametrize("external", [False, True])
def test_written_file_is_the_materialized_model(tmp_path: Path, external: bool) -> None:
    model = conv_bn_model()
    split = split_of(model)
    out = tmp_path / "m.onnx"
    written = io.save_atomic(split, out, external_data=external)
    assert written == ([out, tmp_path / "m.onnx.data"] if external else [out])
    loaded = onnx.load(str(out))
    onnx.checker.check_model(loaded)
    expected = split.materialize()
    got = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in expected.graph.initializer}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name])
    assert list(loaded.graph.node) == list(expected.graph.node)
    assert loaded.opset_import == expected.opset_import
    x = rand(1, 16, 8, 8, seed=5)
    for a, b in zip(run(model, {"x": x}), run(loaded, {"x": x}), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if external:  # the big weight moved out, the small ones stayed in the model file
        location = {t.name: t.data_location for t in onnx.load(str(out), load_external_data=False)
                    .graph.initializer}
        assert location.pop("c.W") == TensorProto.EXTERNAL
        assert location and set(location.values()) == {TensorProto.DEFAULT}


def test_single_file_matches_protobuf_serialization_byte_for_byte_in_content() -> None:
    """The streamed message parses to exactly the proto onnx would have serialized."""
    split = split_of(conv_bn_model())
    parsed = onnx.ModelProto()
    parsed.ParseFromString(io.serialize(split))
    assert parsed == split.materialize()


def test_large_weights_are_aligned_in_external_data(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(io_save, "ALIGN_FROM", 1000)
    monkeypatch.setattr(io_save, "ALIGNMENT", 4096)
    split = io.SplitModel(make_model(
        [node("Add", ["x", "a"], ["t"], "a1"), node("Add", ["t", "b"], ["y"], "a2")],
        [("x", [300])], [("y", [300])], [const("a", rand(300)), const("b", rand(300, seed=1))]))
    io.save_atomic(split, tmp_path / "m.onnx", external_data=True)
    light = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset"))
               for t in light.graph.initializer]
    assert offsets == [0, 4096]
    x = rand(300, seed=3)
    assert np.allclose(run(onnx.load(str(tmp_path / "m.onnx")), {"x": x})[0],
                       x + rand(300) + rand(300, seed=1))


def test_no_data_file_when_nothing_is_large(tmp_path: Path) -> None:
    model = make_model([node("Add", ["x", "a"], ["y"], "add")], [("x", [4])], [("y", [4])],
                       [const("a", rand(4))])
    assert io.save_atomic(model, tmp_path / "m.onnx", external_data=True) == [tmp_path / "m.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_checker_runs_without_the_weights_but_still_checks() -> None:
    bad = conv_bn_model()
    bad.graph.node[0].input[1] = "nowhere"
    with pytest.raises(io.OnnxrepError, match="nowhere"):
        io.check(bad)
    io.check(conv_bn_model())


@pytest.mark.parametrize("rows", [0, 1, 7, 64])
def test_blockwise_math_is_the_one_pass_result(rows: int, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(kernels, "_BLOCK_ELEMENTS", 50)  # blocks of 1-2 rows of 27 elements
    w, a, c = rand(rows, 3, 3, 3), rand(rows, seed=1), rand(rows, seed=2)
    bias = rand(rows, seed=3)
    got_w, got_b = kernels.scale_conv_output_as(w, bias, a, c)
    one_w, one_b = kernels.scale_conv_output(w, bias, a, c)
    assert got_w.dtype == np.float32 and got_w.shape == w.shape
    assert np.array_equal(got_w, one_w.astype(np.float32))
    assert np.array_equal(got_b, one_b.astype(np.float32))


def test_identity_kernel_rows_are_its_slice() -> None:
    full = kernels.identity_kernel(12, 3)
    assert np.array_equal(kernels.identity_kernel(12, 3, rows=slice(5, 11)), full[5:11])


def _protobuf_objects_reachable_from(root: object) -> list[object]:
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | type | np.ndarray):
            continue
        seen.add(id(obj))
        if "protobuf" in type(obj).__module__ or "upb" in type(obj).__module__:
            if not type(obj).__name__.endswith(("Descriptor", "Meta", "Checker", "Default",
                                                "Database", "Pool", "Wrapper")):
                found.append(obj)
            continue
        stack.extend(gc.get_referents(obj))
    return found


def test_loaded_weights_hold_nothing_of_the_imported_proto() -> None:
    """With protobuf's upb backend one reference into a model keeps all of it alive: after
    load_weights the graph must hold no part of the proto it was imported from."""
    model = conv_bn_model()
    graph = graph_mod.normalize(model)
    graph_mod.load_weights(graph)
    parts = _protobuf_objects_reachable_from(graph)
    assert all(isinstance(p, onnx.OperatorSetIdProto) for p in parts), parts
    model.opset_import[0].version = 999  # the graph's opsets are copies, not views
    assert all(p.version != 999 for p in parts)


def test_fuse_from_a_file_reads_weights_once(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(path))
    result = fuse(path)
    assert result.verified
    assert set(result.fused.weights) == {"c.weight"}
    assert not io.has_data(next(t for t in result.fused.proto.graph.initializer
                                if t.name == "c.weight"))


@pytest.mark.parametrize(("start", "end", "want"), [
    (None, None, [16, 8, 3, 3]), (1, None, [8, 3, 3]), (-2, None, [3, 3]), (0, -1, [16, 8, 3]),
    (-10, 10, [16, 8, 3, 3]), (3, 1, []),
])
def test_shape_of_a_weight_folds_to_its_dims(start: int | None, end: int | None,
                                             want: list[int]) -> None:
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    model = make_model([node("Shape", ["w"], ["s"], "shape", **attrs),
                        node("Cast", ["s"], ["y"], "cast", to=TensorProto.FLOAT),
                        node("Add", ["x", "y"], ["z"], "add")],
                       [("x", [len(want)])], [("z", [len(want)])], [const("w", rand(16, 8, 3, 3))],
                       opset=18)
    graph = gs.import_onnx(model)
    folding.fold_shapes_of_weights(graph)
    graph.cleanup()
    assert [n.op for n in graph.nodes] == ["Cast", "Add"]
    assert graph.nodes[0].inputs[0].values.tolist() == want
    assert graph.nodes[0].inputs[0].values.dtype == np.int64


def external_copy(folder: Path) -> Path:
    path = folder / "m.onnx"
    onnx.save(conv_bn_model(), str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=1024)
    return path


def test_external_weights_are_checked_on_load_and_read_by_normalize(tmp_path: Path) -> None:
    path = external_copy(tmp_path)
    loaded = io.load(path)
    weight = next(t for t in loaded.model.graph.initializer if t.name == "c.W")
    assert weight.data_location == TensorProto.EXTERNAL and not weight.HasField("raw_data")
    graph = graph_mod.normalize(loaded.model, base_dir=tmp_path)
    conv_node = next(n for n in graph.nodes if n.op == "Conv")
    assert np.array_equal(conv_node.inputs[1].values, rand(16, 16, 3, 3))
    with pytest.raises(io.OnnxrepError, match="external data"):
        graph_mod.normalize(io.load(path).model)  # no folder to read it from


@pytest.mark.parametrize("location", ["../m.onnx.data", "/etc/passwd"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    path = external_copy(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    with pytest.raises(io.OnnxrepError, match="external data"):
        io.load(path)


def test_a_type_numpy_lacks_in_external_data_survives_fuse(tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(odd_type_model(), str(src), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    result = fuse(src, verify=False)
    written = io.save_atomic(result.fused, out, external_data=result.external_data)
    assert written == [out, tmp_path / "out.onnx.data"]
    loaded = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    original = {t.name: t for t in odd_type_model().graph.initializer}
    for name in ("odd", "w"):
        assert loaded[name].data_type == original[name].data_type
        assert numpy_helper.to_array(loaded[name]).tobytes() == \
            numpy_helper.to_array(original[name]).tobytes()


# --- the single-file reader (tests of the reader itself: test_wire.py) -----------------------

def test_fused_from_the_reader_is_written_as_one_file(tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn_model(), str(src))
    result = fuse(src)
    assert result.verified and not result.external_data
    assert io.save_atomic(result.fused, out, external_data=result.external_data) == [out]
    x = rand(1, 16, 8, 8, seed=9)
    np.testing.assert_allclose(run(onnx.load(str(out)), {"x": x})[0],
                               run(conv_bn_model(), {"x": x})[0], rtol=1e-5, atol=1e-5)


# --- every tensor that may use external data --------------------------------------------------

def tensors_everywhere_model() -> onnx.ModelProto:
    """Tensors in every place onnx's external data loader looks: the graph's initializers, a
    subgraph's, Constant node attributes in the graph, in a subgraph and in a function."""
    then_branch = helper.make_graph(
        [node("Constant", [], ["sub_c_out"], "sub_c", value=const("sub_c", rand(3, seed=2))),
         node("Add", ["sub_w", "sub_c_out"], ["then_out"], "sub_add")],
        "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [3])],
        [const("sub_w", rand(3, seed=1))])
    else_branch = helper.make_graph(
        [node("Identity", ["w"], ["else_out"], "else_id")],
        "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [3])])
    function = helper.make_function(
        "local", "F", ["a"], ["b"],
        [node("Constant", [], ["fc_out"], "fc", value=const("fc", rand(3, seed=3))),
         node("Add", ["a", "fc_out"], ["b"], "f_add")],
        [helper.make_opsetid("", 18)])
    model = make_model(
        [node("Constant", [], ["cv_out"], "cv", value=const("cv", rand(3, seed=4))),
         node("If", ["cond"], ["if_out"], "if", then_branch=then_branch, else_branch=else_branch),
         helper.make_node("F", ["if_out"], ["y"], name="f", domain="local")],
        [("cond", [], TensorProto.BOOL)], [("y", [3])], [const("w", rand(3))], check=False)
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    onnx.checker.check_model(model)
    return model


def test_all_tensors_visits_what_onnx_external_data_loader_visits() -> None:
    names = [t.name for t in io.all_tensors(tensors_everywhere_model())]
    assert names == ["w", "sub_w", "cv", "sub_c", "fc"]


def test_a_subgraph_weight_in_external_data_is_read_on_load(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tensors_everywhere_model(), str(path), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    loaded = io.load(path)
    tensors = {t.name: t for t in io.all_tensors(loaded.model)}
    assert loaded.external_data
    assert tensors["w"].data_location == TensorProto.EXTERNAL  # read later, by normalize
    for name in ("sub_w", "cv", "sub_c", "fc"):  # rare and small: read now
        assert tensors[name].data_location != TensorProto.EXTERNAL
        assert numpy_helper.to_array(tensors[name]).shape == (3,)
