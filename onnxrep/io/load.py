"""Loading a model and checking it: clear one-line errors, external data checked, not read.

A single-file model is parsed by `wire.read_without_weight_bytes`, which leaves its large
weights in the file (pointing into the model file itself, as external data): `graph.normalize`
reads them straight into numpy, so no weight is ever held twice. Anything else (external
data, an unusual layout, a damaged file) goes through `onnx.load(load_external_data=False)`.
Either way every tensor in external data is checked here (a file beside the model, holding
exactly the tensor's bytes) before anything runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper as edh
from onnx import numpy_helper

from onnxrep.errors import OnnxrepError, first_line
from onnxrep.io.wire import copy_fields, read_without_weight_bytes


@dataclass
class LoadedModel:
    """A checked model. Its top-level initializers in external data are checked but not
    read: `graph.normalize(model, base_dir)` reads them straight into numpy."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool  # the file kept (some) weights in an external data file
    files: list[Path] = field(default_factory=list)  # every file it reads: model, data files


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model that may use external data, the set onnx's own external
    data loader visits: the initializers of the graph and of its subgraphs, then the tensors
    of node attributes (`t`, `tensors`) in the graph, its subgraphs and the model's
    functions."""
    yield from _initializers(model.graph)
    for graph in (model.graph, *model.functions):
        yield from _attribute_tensors(graph)


def _subgraphs(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                yield from attribute.graphs


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sub in _subgraphs(graph):
        yield from _initializers(sub)


def _attribute_tensors(graph: onnx.GraphProto | onnx.FunctionProto
                       ) -> Iterator[onnx.TensorProto]:
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
    for sub in _subgraphs(graph):
        yield from _attribute_tensors(sub)


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


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(edh.uses_external_data(t) for t in all_tensors(model))


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
            external = _uses_external_data(model)
    except DecodeError as exc:
        raise OnnxrepError(
            f"{path}: not an ONNX model (protobuf parse failed: {first_line(exc)})"
        ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise OnnxrepError(f"{path}: cannot read model: {first_line(exc)}") from exc
    if model.ir_version <= 0 or not model.opset_import or not model.graph.output:
        raise OnnxrepError(f"{path}: not an ONNX model (no IR version, opset or graph outputs)")
    files = [path]
    if _uses_external_data(model):
        initializers = list(model.graph.initializer)  # held: upb wrappers keep their ids
        top = {id(t) for t in initializers}
        try:
            for tensor in all_tensors(model):
                if not edh.uses_external_data(tensor):
                    continue
                if id(tensor) in top:
                    file = external_source(tensor, path.parent)[0]  # read by normalize
                else:  # a subgraph's or an attribute's tensor: rare and small, read now
                    edh.load_external_data_for_tensor(tensor, str(path.parent))
                    file = path.parent / edh.ExternalDataInfo(tensor).location
                if file not in files:
                    files.append(file)
        except FileNotFoundError as exc:
            missing = getattr(exc, "filename", None) or first_line(exc)
            raise OnnxrepError(f"{path}: external data file missing: {missing}") from exc
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise OnnxrepError(f"{path}: cannot read external data: {first_line(exc)}") from exc
    _check_initializer_sizes(model)
    check(model, str(path))
    return LoadedModel(model=model, path=path, external_data=external, files=files)


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


def header_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its graph: IR version, opsets, producer, metadata, functions."""
    header = onnx.ModelProto()
    copy_fields(header, model, skip="graph")
    return header


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer reduced to its name and type, as an empty tensor (the
    checker accepts no value field for zero elements), built without copying a byte of
    weight data."""
    light = header_of(model)
    copy_fields(light.graph, model.graph, skip="initializer")
    for tensor in model.graph.initializer:
        light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=[0])
    return light


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


def inline_constants(model: onnx.ModelProto, data_types: tuple[int, ...] | None = None
                     ) -> dict[str, np.ndarray]:
    """The values the proto itself holds: initializers with their bytes inline (not external,
    not a SplitModel's placeholder) and the `value` of default-domain Constant nodes. With
    `data_types`, only tensors of those onnx types: the others are not converted (no copy of
    a model's weights to read its integer constants)."""
    def wanted(t: onnx.TensorProto) -> bool:
        return data_types is None or t.data_type in data_types

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if wanted(t) and has_data(t) and t.data_location != onnx.TensorProto.EXTERNAL}
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is not None and wanted(value):
            values[node.output[0]] = numpy_helper.to_array(value)
    return values


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers (strings and unsized types count their element count)."""
    return sum(payload_bytes(t) or int(np.prod(t.dims, dtype=np.int64))
               for t in model.graph.initializer)
