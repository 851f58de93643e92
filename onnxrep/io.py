"""Loading and writing models: external data, clear one-line errors, atomic writes."""

from __future__ import annotations

import io as io_module
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper as edh

from onnxrep.errors import OnnxrepError, first_line

TWO_GB = 2**31 - 1
_EXTERNAL_THRESHOLD = 256  # bytes: smaller tensors (scalars, shapes) stay inline


@dataclass
class LoadedModel:
    """A checked model. Its top-level initializers in external data are checked but not
    read: `graph.normalize(model, base_dir)` reads them straight into numpy."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool  # the file kept (some) weights in an external data file


def _check_initializer_sizes(model: onnx.ModelProto) -> None:
    """A truncated file yields short raw_data: catch it before anything runs."""
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data"):
            continue
        expected = payload_bytes(tensor)
        if expected is None:
            continue
        if len(tensor.raw_data) != expected:
            raise OnnxrepError(
                f"initializer '{tensor.name}' has {len(tensor.raw_data)} bytes, expected "
                f"{expected}: the model or its external data file is truncated"
            )


def load(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a model file and its external data; raise OnnxrepError with one line on any fault."""
    path = Path(path)
    if not path.exists():
        raise OnnxrepError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxrepError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = read_without_weight_bytes(path)
        external = False
        if model is None:
            model = onnx.load(str(path), load_external_data=False)
            external = any(edh.uses_external_data(t) for t in edh._get_all_tensors(model))
    except DecodeError as exc:
        raise OnnxrepError(
            f"{path}: not an ONNX model (protobuf parse failed: {first_line(exc)})"
        ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise OnnxrepError(f"{path}: cannot read model: {first_line(exc)}") from exc
    if model.ir_version <= 0 or not model.opset_import or not model.graph.output:
        raise OnnxrepError(f"{path}: not an ONNX model (no IR version, opset or graph outputs)")
    if any(edh.uses_external_data(t) for t in edh._get_all_tensors(model)):
        initializers = list(model.graph.initializer)  # held: upb wrappers keep their ids
        top = {id(t) for t in initializers}
        try:
            for tensor in edh._get_all_tensors(model):
                if not edh.uses_external_data(tensor):
                    continue
                if id(tensor) in top:
                    external_source(tensor, path.parent)  # checked now, read by normalize
                else:  # a subgraph's or an attribute's tensor: rare and small, read now
                    edh.load_external_data_for_tensor(tensor, str(path.parent))
        except FileNotFoundError as exc:
            missing = getattr(exc, "filename", None) or first_line(exc)
            raise OnnxrepError(f"{path}: external data file missing: {missing}") from exc
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise OnnxrepError(f"{path}: cannot read external data: {first_line(exc)}") from exc
    _check_initializer_sizes(model)
    check(model, str(path))
    return LoadedModel(model=model, path=path, external_data=external)


class _NotPlain(Exception):
    """The file is not laid out as the fast reader expects: read it with onnx.load."""


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
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


def _wire_fields(buf: memoryview, start: int, end: int
                 ) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of the field's key, start of its value, end of the field) of each
    field of the message in buf[start:end] (protobuf wire format)."""
    pos = start
    while pos < end:
        key_start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            value_start = pos
        elif wire in (1, 5):
            value_start, pos = pos, pos + (8 if wire == 1 else 4)
        elif wire == 2:
            length, value_start = _read_varint(buf, pos)
            pos = value_start + length
        else:
            raise _NotPlain  # groups: never in ONNX
        if pos > end:
            raise _NotPlain
        yield number, key_start, value_start, pos


def _number(message: type[Message], name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


_MODEL_GRAPH = _number(onnx.ModelProto, "graph")
_GRAPH_INITIALIZER = _number(onnx.GraphProto, "initializer")
_TENSOR_RAW_DATA = _number(onnx.TensorProto, "raw_data")
_TENSOR_LOCATION = {_number(onnx.TensorProto, f) for f in ("data_location", "external_data")}
_READ_INLINE = 4096  # raw weights up to this size are read into the proto as usual


def read_without_weight_bytes(path: Path) -> onnx.ModelProto | None:
    """Parse a single-file model except its large weights' bytes. Each such initializer is
    left pointing into the model file itself, as external data (location = the file's name,
    offset and length of its raw_data there), for `graph.normalize` to read straight into
    numpy: onnx.load would hold the file's bytes and the parsed proto at once, two copies of
    every weight before a rule runs. None when the file has external data already, or is not
    laid out as expected (then onnx.load reads it, and reports what is wrong)."""
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
    for number, key, _value, end in _wire_fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH:
            if graph_at is not None:
                raise _NotPlain  # a graph in two parts: legal, but leave it to onnx
            graph_at = (_value, end)
        else:
            rest += buf[key:end]
    if graph_at is None:
        raise _NotPlain
    model = onnx.ModelProto()
    model.ParseFromString(bytes(rest))
    graph_rest = bytearray()
    tensors: list[tuple[bytes, tuple[int, int] | None]] = []
    for number, key, value, end in _wire_fields(buf, *graph_at):
        if number != _GRAPH_INITIALIZER:
            graph_rest += buf[key:end]
            continue
        fields, raw = bytearray(), None
        for t_number, t_key, t_value, t_end in _wire_fields(buf, value, end):
            if t_number in _TENSOR_LOCATION:
                return None  # external data already: onnx.load and the usual checks
            if t_number == _TENSOR_RAW_DATA and t_end - t_value > _READ_INLINE:
                raw = (t_value, t_end - t_value)
            else:
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


def external_source(tensor: onnx.TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of a tensor kept in external data, checked against the file: it
    exists inside `base_dir` and holds exactly the tensor's bytes. Raises OSError/ValueError."""
    info = edh.ExternalDataInfo(tensor)
    location = Path(info.location)
    if not info.location or location.is_absolute() or ".." in location.parts:
        raise ValueError(f"tensor '{tensor.name}': external data location "
                         f"'{info.location}' is not a file beside the model")
    file = base_dir / location
    if not file.is_file():
        raise FileNotFoundError(2, "no such file", str(file))
    size = file.stat().st_size
    offset = int(info.offset or 0)
    length = int(info.length) if info.length is not None else size - offset
    expected = payload_bytes(tensor)
    if offset + length > size or (expected is not None and length != expected):
        raise ValueError(f"tensor '{tensor.name}' needs {expected} bytes at offset {offset} of "
                         f"{file.name} ({size} bytes): the model or its external data file "
                         "is truncated")
    return file, offset, length


def read_external(tensor: onnx.TensorProto, base_dir: Path, dtype: np.dtype | None
                  ) -> np.ndarray | bytes:
    """A tensor's external bytes, read straight into an array of `dtype` (one copy, never
    through the proto), or as bytes when `dtype` is None."""
    file, offset, length = external_source(tensor, base_dir)
    if dtype is None:
        with open(file, "rb") as f:
            f.seek(offset)
            return f.read(length)
    count = length // dtype.itemsize
    return np.fromfile(file, dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))


def check(model: onnx.ModelProto, what: str = "model") -> None:
    """The onnx checker, with its verdict on one line. It runs on a copy without the weights'
    bytes: the checker serializes what it is given, and sizes are checked on load instead."""
    try:
        onnx.checker.check_model(_without_data(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise OnnxrepError(f"{what}: invalid ONNX model: {first_line(exc)}") from exc


def _copy_fields(dst: Message, src: Message, skip: str) -> None:
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


def header_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its graph: IR version, opsets, producer, metadata, functions."""
    header = onnx.ModelProto()
    _copy_fields(header, model, skip="graph")
    return header


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer reduced to its name and type, as an empty tensor (the
    checker accepts no value field for zero elements), built without copying a byte of
    weight data."""
    light = header_of(model)
    _copy_fields(light.graph, model.graph, skip="initializer")
    for tensor in model.graph.initializer:
        light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=[0])
    return light


def check_destination(src: Path | None, dst: Path, force: bool) -> None:
    """Refuse a missing folder, or overwriting the input without --force."""
    if not dst.parent.exists():
        raise OnnxrepError(f"{dst.parent}: output folder does not exist")
    if dst.is_dir():
        raise OnnxrepError(f"{dst}: is a directory")
    if src is not None and dst.exists() and src.exists() and os.path.samefile(src, dst):
        if not force:
            raise OnnxrepError(f"{dst}: refusing to overwrite the input model (use --force)")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_PACKED_4BIT = {getattr(onnx.TensorProto, t) for t in ("INT4", "UINT4", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, t)}


def payload_bytes(tensor: onnx.TensorProto) -> int | None:
    """A tensor's raw size in bytes from its dims and type (reading raw_data would copy it);
    None for strings and types onnx does not size."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2  # two elements a byte
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data", "external_data")


def has_data(tensor: onnx.TensorProto) -> bool:
    """Does the proto carry the tensor's values (raw, typed or external)? A SplitModel's
    placeholders do not."""
    return (tensor.HasField("raw_data") or any(len(getattr(tensor, f)) for f in _VALUE_FIELDS)
            or int(np.prod(tensor.dims, dtype=np.int64)) == 0)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers (strings and unsized types count their element count)."""
    return sum(payload_bytes(t) or int(np.prod(t.dims, dtype=np.int64))
               for t in model.graph.initializer)


@dataclass
class SplitModel:
    """A model whose large weights are numpy arrays beside a proto that names them (name, type
    and dims, no bytes). It is written and verified without ever building the full proto:
    for a 0.5 GB model that saves a copy of every weight in time and in memory."""

    proto: onnx.ModelProto
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.proto)

    def materialize(self) -> onnx.ModelProto:
        """The complete ModelProto (a copy; for API users and tests)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        for tensor in model.graph.initializer:
            if tensor.name in self.weights:
                tensor.raw_data = _raw(self.weights[tensor.name]).tobytes()
        return model


def _raw(array: np.ndarray) -> np.ndarray:
    """The array as ONNX raw_data lays it out: C order, little-endian."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(number: int) -> bytes:
    """The key of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2)


_GRAPH = _tag(_MODEL_GRAPH)
_INITIALIZER = _tag(_GRAPH_INITIALIZER)
_RAW_DATA = _tag(_TENSOR_RAW_DATA)


def _delimited(tag: bytes, length: int) -> bytes:
    return tag + _varint(length)


def write_single_file(model: SplitModel, out: BinaryIO) -> None:
    """Serialize `model` as one protobuf message, streaming each weight's bytes from its
    array: no serialized copy of the whole model is ever held. Fields may come in any order
    on the wire, so the initializers follow the rest of the graph, and each weight's raw_data
    follows the tensor's other fields; every field occurs once, with its exact length."""
    out.write(header_of(model.proto).SerializeToString())
    graph = onnx.GraphProto()
    _copy_fields(graph, model.proto.graph, skip="initializer")
    body = graph.SerializeToString()
    tensors: list[tuple[bytes, np.ndarray | None]] = []
    graph_length = len(body)
    for tensor in model.proto.graph.initializer:
        array = model.weights.get(tensor.name)
        fields = tensor.SerializeToString()
        if array is None:
            framed = _delimited(_INITIALIZER, len(fields)) + fields
            tensors.append((framed, None))
            graph_length += len(framed)
            continue
        array = _raw(array)
        raw_prefix = _delimited(_RAW_DATA, array.nbytes)
        length = len(fields) + len(raw_prefix) + array.nbytes
        framed = _delimited(_INITIALIZER, length) + fields + raw_prefix
        tensors.append((framed, array))
        graph_length += len(framed) + array.nbytes
    out.write(_delimited(_GRAPH, graph_length))
    out.write(body)
    for framed, array in tensors:
        out.write(framed)
        if array is not None:
            out.write(memoryview(array.reshape(-1)).cast("B"))


_ALIGN_FROM = 1 << 20  # tensors this large start on a 64 KiB boundary (mmap-friendly)
_ALIGNMENT = 1 << 16


def write_external(model: SplitModel, out: BinaryIO, data: BinaryIO, location: str) -> None:
    """Weights of 256 bytes and more go to `data` (`location` relative to the model file),
    the rest, and the structure, to `out`."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)  # weights are not in it; a raw_data tensor stays small or moves
    for tensor in proto.graph.initializer:
        array = model.weights.get(tensor.name)
        if array is not None:
            payload = memoryview(_raw(array).reshape(-1)).cast("B")
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= _EXTERNAL_THRESHOLD:
            payload = memoryview(tensor.raw_data)
        else:
            continue
        offset = data.tell()
        if payload.nbytes >= _ALIGN_FROM and offset % _ALIGNMENT:
            data.write(b"\0" * (_ALIGNMENT - offset % _ALIGNMENT))
            offset = data.tell()
        data.write(payload)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", payload.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
    out.write(proto.SerializeToString())


def serialize(model: onnx.ModelProto | SplitModel) -> bytes:
    """The model as one protobuf message in memory (under 2 GB)."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    buffer = io_module.BytesIO()
    write_single_file(model, buffer)
    return buffer.getvalue()


def save_atomic(
    model: onnx.ModelProto | SplitModel, dst: str | os.PathLike[str], external_data: bool
) -> list[Path]:
    """Write `model` to `dst` through a temp folder beside it, then rename into place.

    With external data the weights go to `<dst name>.data`; the data file is moved first so
    that a reader never sees a model whose data file is missing. Past 2 GB (protobuf's limit)
    the weights go to external data whatever was asked.
    """
    split = model if isinstance(model, SplitModel) else SplitModel(model)
    dst = Path(dst)
    external_data = external_data or split.nbytes >= TWO_GB
    tmp = Path(tempfile.mkdtemp(prefix=".onnxrep-", dir=dst.parent))
    written: list[Path] = []
    try:
        tmp_model = tmp / dst.name
        data_name = dst.name + ".data"
        with open(tmp_model, "wb") as out:
            if external_data:
                with open(tmp / data_name, "wb") as data:
                    write_external(split, out, data, data_name)
                if (tmp / data_name).stat().st_size == 0:
                    (tmp / data_name).unlink()  # nothing was large enough to move
            else:
                write_single_file(split, out)
        mode = 0o666 & ~_umask()
        for written_file in tmp.iterdir():
            os.chmod(written_file, mode)
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, dst.parent / data_name)
            written.append(dst.parent / data_name)
        os.replace(tmp_model, dst)
        written.insert(0, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
