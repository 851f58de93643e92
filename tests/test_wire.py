"""The protobuf wire format (onnxrep/io/wire.py). The reader gives what onnx.load gives, its
large weights left in the file, or None for anything it does not expect; the writer gives
bytes that parse to exactly the proto with the arrays as raw_data."""

from __future__ import annotations

import io as io_module
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import chain, const, conv, make_model, node, rand
from onnx import TensorProto, helper

from onnxrep import io
from onnxrep.io import wire

EXAMPLES = Path(__file__).resolve().parent.parent / "models" / "examples"


def conv_model() -> onnx.ModelProto:
    """A Conv whose weight (16x16x3x3 float32, 9 KB) is over READ_INLINE and whose bias is
    under it, with model fields besides the graph."""
    nodes, inits = chain(conv("c", "x", rand(16, 16, 3, 3), rand(16, seed=2), pads=[1] * 4))
    model = make_model(nodes, [("x", [1, 16, 8, 8])], [("c_out", [1, 16, 8, 8])], inits)
    model.doc_string = "a conv"
    helper.set_model_props(model, {"author": "test"})
    return model


def big_odd_type_model() -> onnx.ModelProto:
    """Large weights of a type numpy has and of one it lacks (bfloat16)."""
    bf16 = helper.make_tensor("odd", TensorProto.BFLOAT16, [3000], np.linspace(-3, 3, 3000))
    return make_model([node("Add", ["x", "w"], ["y"], "add"),
                       node("Concat", ["odd", "b"], ["z"], "concat", axis=0)],
                      [("x", [3000]), ("b", [2], TensorProto.BFLOAT16)],
                      [("y", [3000]), ("z", [3002], TensorProto.BFLOAT16)],
                      [const("w", rand(3000)), bf16])


def with_bytes_read_back(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """The reader's model with each self-reference replaced by the bytes it points at."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            file, offset, length = io.external_source(tensor, folder)
            with open(file, "rb") as f:
                f.seek(offset)
                tensor.raw_data = f.read(length)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
    return model


def saved(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    return path


# --- the reader -------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["conv", "big_odd", "repvgg_tiny", "mobileone_tiny"])
def test_reader_gives_what_onnx_load_gives(tmp_path: Path, source: str) -> None:
    if source.endswith("_tiny"):
        path = EXAMPLES / f"{source}.onnx"
    else:
        path = saved({"conv": conv_model, "big_odd": big_odd_type_model}[source](), tmp_path)
    model = wire.read_without_weight_bytes(path)
    assert model is not None
    moved = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert all(not t.HasField("raw_data") for t in moved)
    assert all(next(e.value for e in t.external_data if e.key == "location") == path.name
               for t in moved)
    if not source.endswith("_tiny"):  # the examples' weights may all be small
        assert moved
    assert with_bytes_read_back(model, path.parent) == onnx.load(str(path))


def test_reader_moves_only_weights_over_read_inline(tmp_path: Path) -> None:
    at, over = wire.READ_INLINE // 4, wire.READ_INLINE // 4 + 1  # float32 elements
    model = make_model([node("Add", ["a", "b"], ["y"], "add")], [], [("y", None)],
                       [const("a", rand(at)), const("b", rand(over, seed=1))], check=False)
    got = wire.read_without_weight_bytes(saved(model, tmp_path))
    assert got is not None
    kinds = {t.name: t.data_location for t in got.graph.initializer}
    assert kinds == {"a": TensorProto.DEFAULT, "b": TensorProto.EXTERNAL}


def test_reader_leaves_other_files_to_onnx_load(tmp_path: Path) -> None:
    external = tmp_path / "ext.onnx"
    onnx.save(conv_model(), str(external), save_as_external_data=True,
              location="ext.onnx.data", size_threshold=1024)
    assert wire.read_without_weight_bytes(external) is None  # external data already
    whole = conv_model().SerializeToString()
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "cut.onnx").write_bytes(whole[: len(whole) // 2])
    assert wire.read_without_weight_bytes(tmp_path / "empty.onnx") is None
    assert wire.read_without_weight_bytes(tmp_path / "cut.onnx") is None
    with pytest.raises(io.OnnxrepError):
        io.load(tmp_path / "cut.onnx")


def graph_with_initializer_bytes(model: onnx.ModelProto, tensor_bytes: bytes) -> bytes:
    """The model's bytes with one more initializer field, of the given content, at the end of
    its graph (hand-framed: the bytes need not be a well-formed tensor)."""
    header = onnx.ModelProto()
    header.CopyFrom(model)
    header.ClearField("graph")
    graph = model.graph.SerializeToString() + wire.delimited_key(
        wire.GRAPH_INITIALIZER, len(tensor_bytes)) + tensor_bytes
    return (header.SerializeToString() + wire.delimited_key(wire.MODEL_GRAPH, len(graph))
            + graph)


@pytest.mark.parametrize("order", ["large_last", "small_last"])
def test_reader_leaves_raw_data_given_twice_to_onnx_load(tmp_path: Path, order: str) -> None:
    """Protobuf merges a field given twice (the last wins): the reader does not guess."""
    model = conv_model()
    large = rand(16, 16, 3, 3, seed=7).tobytes()
    small = rand(4, seed=8).tobytes()
    tensor = TensorProto(name="extra", data_type=TensorProto.FLOAT, dims=[16, 16, 3, 3])
    first, last = (small, large) if order == "large_last" else (large, small)
    raw = (TensorProto(raw_data=first).SerializeToString()
           + TensorProto(raw_data=last).SerializeToString())
    path = tmp_path / "m.onnx"
    path.write_bytes(graph_with_initializer_bytes(model, tensor.SerializeToString() + raw))
    assert onnx.load(str(path)).graph.initializer[-1].raw_data == last
    assert wire.read_without_weight_bytes(path) is None


def test_reader_leaves_an_initializer_of_the_wrong_wire_type_to_onnx_load(tmp_path: Path
                                                                          ) -> None:
    """An initializer field encoded as a varint: protobuf keeps it as an unknown field."""
    model = conv_model()
    header = onnx.ModelProto()
    header.CopyFrom(model)
    header.ClearField("graph")
    graph = model.graph.SerializeToString() + wire.varint(wire.GRAPH_INITIALIZER << 3) + b"\x05"
    path = tmp_path / "m.onnx"
    path.write_bytes(header.SerializeToString() + wire.delimited_key(wire.MODEL_GRAPH, len(graph))
                     + graph)
    assert len(onnx.load(str(path)).graph.initializer) == len(model.graph.initializer)
    assert wire.read_without_weight_bytes(path) is None


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**63 - 1, 2**64 - 1])
def test_varint_round_trip(value: int) -> None:
    encoded = wire.varint(value)
    assert wire.read_varint(memoryview(encoded), 0) == (value, len(encoded))


# --- the writer -------------------------------------------------------------------------------

def split_parts() -> tuple[onnx.ModelProto, dict[str, np.ndarray], onnx.ModelProto]:
    """(data-less proto, weights, the full proto they stand for). The weights include a
    big-endian array and a non-contiguous one: raw_data is little-endian, C order."""
    full = conv_model()
    weight = rand(16, 16, 3, 3, seed=3)
    weights = {"c.W": np.asfortranarray(weight.astype(">f4"))}
    assert not weights["c.W"].flags.c_contiguous and weights["c.W"].dtype.byteorder == ">"
    proto = onnx.ModelProto()
    proto.CopyFrom(full)
    for tensor in proto.graph.initializer:
        if tensor.name == "c.W":
            tensor.ClearField("raw_data")
    for tensor in full.graph.initializer:
        if tensor.name == "c.W":
            tensor.raw_data = weight.astype("<f4").tobytes()
    return proto, weights, full


def test_writer_gives_exactly_the_full_proto() -> None:
    proto, weights, full = split_parts()
    out = io_module.BytesIO()
    wire.write_single_file(proto, weights, out)
    assert onnx.ModelProto.FromString(out.getvalue()) == full
    assert len(out.getvalue()) == full.ByteSize()  # every field once: nothing merged


def test_writer_output_is_read_back_by_the_reader(tmp_path: Path) -> None:
    proto, weights, full = split_parts()
    path = tmp_path / "m.onnx"
    with open(path, "wb") as out:
        wire.write_single_file(proto, weights, out)
    model = wire.read_without_weight_bytes(path)
    assert model is not None
    assert with_bytes_read_back(model, tmp_path) == full


def test_writer_refuses_an_array_for_a_tensor_with_data_of_its_own() -> None:
    full = conv_model()
    with pytest.raises(ValueError, match="c.W"):
        wire.write_single_file(full, {"c.W": rand(16, 16, 3, 3)}, io_module.BytesIO())
