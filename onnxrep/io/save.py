"""Writing a model: SplitModel (weights as arrays beside a data-less proto), one file or
external data, always through a temp folder and a rename.

Why hand-written code stays, and what of onnx's it uses:
- One file: onnx.save / SerializeToString need the full proto, i.e. every weight copied into
  it first, and then serialized whole (a third copy). No public API of onnx or onnx_ir
  streams a message, so `wire.write_single_file` writes the protobuf bytes itself.
- External data: onnx.external_data_helper converts a model whose tensors already carry
  raw_data (`convert_model_to_external_data`, `write_external_data_tensors`,
  `set_external_data`, which refuses a tensor without raw_data): again a copy of every weight
  in the proto first. onnx_ir.save could write numpy arrays out directly, but it is not a
  dependency of onnxrep (only onnxscript, a test extra, brings it), needs the whole model
  converted to its own IR and back, and its alignment defaults changed in onnx_ir 1.1. So
  `write_external` writes each payload itself, and sets the documented external data keys
  (location, offset, length: https://onnx.ai/onnx/repo-docs/ExternalData.html).
- Atomic replace: tempfile.mkdtemp beside the destination and os.replace, stdlib only.
"""

from __future__ import annotations

import io as io_module
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

from onnxrep.errors import OnnxrepError
from onnxrep.io.load import tensor_bytes
from onnxrep.io.wire import TWO_GB, raw_layout, write_single_file

EXTERNAL_THRESHOLD = 256  # bytes: smaller tensors (scalars, shapes) stay inline
ALIGN_FROM = 1 << 20  # tensors this large start on a 64 KiB boundary (mmap-friendly)
ALIGNMENT = 1 << 16


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
                tensor.raw_data = raw_layout(self.weights[tensor.name]).tobytes()
        return model


def check_destination(src: Path | None, dst: Path, force: bool) -> None:
    """Refuse a missing folder, or overwriting the input without --force."""
    if not dst.parent.exists():
        raise OnnxrepError(f"{dst.parent}: output folder does not exist")
    if dst.is_dir():
        raise OnnxrepError(f"{dst}: is a directory")
    if src is not None and dst.exists() and src.exists() and os.path.samefile(src, dst):
        if not force:
            raise OnnxrepError(f"{dst}: refusing to overwrite the input model (use --force)")


def data_file(dst: Path) -> Path:
    """Where `save_atomic` puts the external data of a model written to `dst`."""
    return dst.parent / (dst.name + ".data")


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_writes(sources: list[Path], dst: Path, external_data: bool,
                 report: Path | None = None, force: bool = False) -> None:
    """Before anything is written: every file a fuse would write (the model, its external
    data, the report) is writable and none is a file the input model reads (`sources`: the
    model and its data files; --force allows overwriting those with the model, never with the
    report) or another of the written files."""
    check_destination(sources[0] if sources else None, dst, force)
    model_files = [dst] + ([data_file(dst)] if external_data else [])
    for written in model_files[1:]:
        for source in sources:
            if _same(written, source) and not force:
                raise OnnxrepError(f"{written}: refusing to overwrite {source.name}, which the "
                                   "input model reads (use --force)")
    if report is None:
        return
    if not report.parent.exists():
        raise OnnxrepError(f"{report.parent}: report folder does not exist")
    if report.is_dir():
        raise OnnxrepError(f"{report}: is a directory, expected a report file name")
    for other in [*sources, *model_files]:
        if _same(report, other):
            raise OnnxrepError(f"{report}: the report would overwrite {other} (a model file)")
    if not os.access(report.parent, os.W_OK) or (report.exists() and
                                                 not os.access(report, os.W_OK)):
        raise OnnxrepError(f"{report}: cannot write the report there")


def write_external(model: SplitModel, out: BinaryIO, data: BinaryIO, location: str) -> None:
    """Weights of EXTERNAL_THRESHOLD bytes and more go to `data` (`location` relative to the
    model file), those of ALIGN_FROM and more at an offset that is a multiple of ALIGNMENT;
    the rest, and the structure, to `out`."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)  # weights are not in it; a raw_data tensor stays small or moves
    for tensor in proto.graph.initializer:
        array = model.weights.get(tensor.name)
        if array is not None:
            payload = memoryview(raw_layout(array).reshape(-1)).cast("B")
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
            payload = memoryview(tensor.raw_data)
        else:
            continue
        offset = data.tell()
        if payload.nbytes >= ALIGN_FROM and offset % ALIGNMENT:
            data.write(b"\0" * (ALIGNMENT - offset % ALIGNMENT))
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
    write_single_file(model.proto, model.weights, buffer)
    return buffer.getvalue()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


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
                write_single_file(split.proto, split.weights, out)
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
