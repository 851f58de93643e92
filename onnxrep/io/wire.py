"""The protobuf wire format of an ONNX model: the one module that reads or writes its bytes.

onnx (and protobuf) offer a model only whole: parsing a file holds its bytes and the parsed
proto at once, and serializing a model holds the proto and its bytes at once. For a model of
0.5 GB that is a second copy of every weight. The two functions here avoid the copy, and rely
on nothing but the protobuf encoding (https://protobuf.dev/programming-guides/encoding/) and
the field numbers, which are read from onnx's own descriptors:

`read_without_weight_bytes(path)` parses a single-file model except its large weights.
  Guarantees: the result equals `onnx.load(path)`'s, except that each initializer whose
  raw_data is over 4 KB (`READ_INLINE`) is left in the file: the tensor is marked EXTERNAL,
  with location = the model file's own name and the offset and length of its raw_data there,
  and has no raw_data field. It returns None, never a wrong model, for anything unexpected:
  an empty or unmappable file, a truncated or malformed field, a wire type that is not the
  one ONNX declares for the graph, an initializer or raw_data, the graph or a raw_data field
  given twice (legal protobuf, merged by a parser: left to onnx), a tensor that has external
  data already. The caller then uses onnx.load, which reports what is wrong.

`write_single_file(proto, weights, out)` writes a model whose large weights are numpy arrays
  beside a data-less proto (see io.save.SplitModel) as one protobuf message, streaming each
  weight's bytes from its array.
  Guarantees: the bytes parse to exactly the proto with each named initializer's raw_data set
  from its array (little-endian, C order). Protobuf lets fields come in any order on the
  wire, so the initializers follow the rest of the graph and each weight's raw_data follows
  its tensor's other fields; every field is written once, with its exact length (no merge
  semantics are relied on; a tensor that has an array and data of its own is refused with
  ValueError). No serialized copy of the whole model is held.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message

TWO_GB = 2**31 - 1  # protobuf's limit on the size of one message
READ_INLINE = 4096  # raw weights up to this size are read into the proto as usual

_LENGTH_DELIMITED = 2  # the wire type of strings, bytes and sub-messages


def field_number(message: type[Message], name: str) -> int:
    """A field's number, from the message's descriptor."""
    return message.DESCRIPTOR.fields_by_name[name].number


MODEL_GRAPH = field_number(onnx.ModelProto, "graph")
GRAPH_INITIALIZER = field_number(onnx.GraphProto, "initializer")
TENSOR_RAW_DATA = field_number(onnx.TensorProto, "raw_data")
TENSOR_LOCATION = {field_number(onnx.TensorProto, f) for f in ("data_location", "external_data")}


# --- reading ---------------------------------------------------------------------------------

class _NotPlain(Exception):
    """The file is not laid out as the reader expects: read it with onnx.load."""


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`. Raises _NotPlain past the end."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _NotPlain
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def wire_fields(buf: memoryview, start: int, end: int
                ) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field's key, start of its value, end of the
    field) of each field of the message in buf[start:end]. Raises _NotPlain on groups or a
    field that runs past `end`."""
    pos = start
    while pos < end:
        key_start = pos
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = read_varint(buf, pos)
            value_start = pos
        elif wire in (1, 5):
            value_start, pos = pos, pos + (8 if wire == 1 else 4)
        elif wire == _LENGTH_DELIMITED:
            length, value_start = read_varint(buf, pos)
            pos = value_start + length
        else:
            raise _NotPlain  # groups: never in ONNX
        if pos > end:
            raise _NotPlain
        yield number, wire, key_start, value_start, pos


def read_without_weight_bytes(path: Path) -> onnx.ModelProto | None:
    """Parse a single-file model except its large weights' bytes (see the module docstring
    for what the result is, and when it is None)."""
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file, or one that cannot be mapped
            return None
    with mapped:
        buf = memoryview(mapped)
        try:
            return _split_parse(buf, path.name)
        except (_NotPlain, DecodeError):
            return None
        finally:
            buf.release()


def _split_parse(buf: memoryview, location: str) -> onnx.ModelProto | None:
    rest, graph_at = bytearray(), None
    for number, wire, key, value, end in wire_fields(buf, 0, len(buf)):
        if number == MODEL_GRAPH:
            if graph_at is not None or wire != _LENGTH_DELIMITED:
                raise _NotPlain  # a graph in two parts: legal, but leave it to onnx
            graph_at = (value, end)
        else:
            rest += buf[key:end]
    if graph_at is None:
        raise _NotPlain
    model = onnx.ModelProto()
    model.ParseFromString(bytes(rest))
    graph_rest = bytearray()
    tensors: list[tuple[bytes, tuple[int, int] | None]] = []
    for number, wire, key, value, end in wire_fields(buf, *graph_at):
        if number != GRAPH_INITIALIZER:
            graph_rest += buf[key:end]
            continue
        if wire != _LENGTH_DELIMITED:
            raise _NotPlain
        fields, raw, raw_seen = bytearray(), None, False
        for t_number, t_wire, t_key, t_value, t_end in wire_fields(buf, value, end):
            if t_number in TENSOR_LOCATION:
                return None  # external data already: onnx.load and the usual checks
            if t_number == TENSOR_RAW_DATA:
                if raw_seen or t_wire != _LENGTH_DELIMITED:
                    raise _NotPlain  # raw_data twice (protobuf merges: last wins)
                raw_seen = True
                if t_end - t_value > READ_INLINE:
                    raw = (t_value, t_end - t_value)
                    continue
            fields += buf[t_key:t_end]
        tensors.append((bytes(fields), raw))
    model.graph.ParseFromString(bytes(graph_rest))
    for fields, raw in tensors:
        tensor = model.graph.initializer.add()
        tensor.ParseFromString(fields)
        if raw is not None:
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", raw[0]), ("length", raw[1])):
                tensor.external_data.add(key=k, value=str(v))
    return model


# --- writing ---------------------------------------------------------------------------------

def copy_fields(dst: Message, src: Message, skip: str) -> None:
    """Copy every set field of `src` but one into `dst` (a shallow structural copy)."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        repeated = getattr(fd, "is_repeated", None)  # protobuf >= 5.28; `label` before
        if repeated if repeated is not None else fd.label == fd.LABEL_REPEATED:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def raw_layout(array: np.ndarray) -> np.ndarray:
    """The array as ONNX raw_data lays it out: C order, little-endian (a view when it is)."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def delimited_key(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field (wire type 2) of `length` bytes."""
    return varint(number << 3 | _LENGTH_DELIMITED) + varint(length)


def write_single_file(proto: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                      out: BinaryIO) -> None:
    """Serialize `proto`, each initializer named in `weights` given its array as raw_data, as
    one protobuf message, streaming each weight's bytes (see the module docstring)."""
    header = onnx.ModelProto()
    copy_fields(header, proto, skip="graph")
    out.write(header.SerializeToString())
    graph = onnx.GraphProto()
    copy_fields(graph, proto.graph, skip="initializer")
    body = graph.SerializeToString()
    tensors: list[tuple[bytes, np.ndarray | None]] = []
    graph_length = len(body)
    for tensor in proto.graph.initializer:
        array = weights.get(tensor.name)
        if array is not None and (tensor.HasField("raw_data") or len(tensor.external_data)):
            raise ValueError(f"initializer '{tensor.name}' has data of its own and an array: "
                             "raw_data would be written twice")
        fields = tensor.SerializeToString()
        if array is None:
            framed = delimited_key(GRAPH_INITIALIZER, len(fields)) + fields
            tensors.append((framed, None))
            graph_length += len(framed)
            continue
        array = raw_layout(array)
        raw_prefix = delimited_key(TENSOR_RAW_DATA, array.nbytes)
        length = len(fields) + len(raw_prefix) + array.nbytes
        framed = delimited_key(GRAPH_INITIALIZER, length) + fields + raw_prefix
        tensors.append((framed, array))
        graph_length += len(framed) + array.nbytes
    out.write(delimited_key(MODEL_GRAPH, graph_length))
    out.write(body)
    for framed, array in tensors:
        out.write(framed)
        if array is not None:
            out.write(memoryview(array.reshape(-1)).cast("B"))
