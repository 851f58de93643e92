"""onnxrep/gs_bridge.py: the onnx-graphsurgeon internals onnxrep relies on behave as assumed
(a new gs version that breaks one fails here first)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from helpers import const, make_model, node, rand
from onnx import TensorProto, helper, numpy_helper

from onnxrep import gs_bridge


def tiny() -> onnx.ModelProto:
    """y = x + w (float32), z = Concat(odd, b) with `odd` bfloat16 (a type numpy lacks)."""
    odd = helper.make_tensor("odd", TensorProto.BFLOAT16, [4], np.linspace(-1, 1, 4))
    return make_model([node("Add", ["x", "w"], ["y"], "add"),
                       node("Concat", ["odd", "b"], ["z"], "concat", axis=0)],
                      [("x", [4]), ("b", [2], TensorProto.BFLOAT16)],
                      [("y", [4]), ("z", [6], TensorProto.BFLOAT16)],
                      [const("w", rand(4)), odd])


def constants(graph: gs.Graph) -> dict[str, gs.Constant]:
    return {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}


def test_lazy_proto_is_the_imported_tensor_until_the_first_read() -> None:
    model = tiny()
    w = constants(gs.import_onnx(model))["w"]
    proto = gs_bridge.lazy_proto(w)
    assert proto is not None and proto.name == "w"
    assert proto.raw_data == model.graph.initializer[0].raw_data
    assert np.array_equal(w.values, rand(4))
    assert gs_bridge.lazy_proto(w) is None  # converted: gs holds an array now


def test_set_lazy_proto_is_exported_as_it_is() -> None:
    graph = gs.import_onnx(tiny())
    w = constants(graph)["w"]
    replacement = numpy_helper.from_array(rand(4, seed=5), "w")
    gs_bridge.set_lazy_proto(w, replacement)
    assert gs_bridge.lazy_proto(w) is replacement
    exported = {t.name: t for t in gs.export_onnx(graph, do_type_check=False).graph.initializer}
    assert exported["w"] == replacement
    assert np.array_equal(w.values, rand(4, seed=5))


def test_detach_opsets_copies_the_imported_opset_imports() -> None:
    model = tiny()
    graph = gs.import_onnx(model)
    gs_bridge.detach_opsets(graph)
    assert [(d.domain, d.version) for d in graph.import_domains] == [("", 18)]
    model.opset_import[0].version = 999
    assert graph.import_domains[0].version == 18
    assert gs.export_onnx(graph).opset_import[0].version == 18


def test_release_values_empties_an_array_and_leaves_an_unread_odd_type() -> None:
    tensors = constants(gs.import_onnx(tiny()))
    w, odd = tensors["w"], tensors["odd"]
    gs_bridge.release_values(w)
    assert w.values.shape == (0,) and w.values.dtype == np.float32
    proto = gs_bridge.lazy_proto(odd)
    gs_bridge.release_values(odd)
    assert gs_bridge.lazy_proto(odd) is proto  # bfloat16: never converted by gs


def test_export_dtype_is_the_dtype_of_a_plain_constant() -> None:
    w = constants(gs.import_onnx(tiny()))["w"]
    assert gs_bridge.export_dtype(w) == np.float32
