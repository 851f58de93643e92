"""Loading and writing models: external data, clear one-line errors, atomic writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper as edh

from onnxrep.errors import OnnxrepError

TWO_GB = 2**31 - 1
_EXTERNAL_THRESHOLD = 256  # bytes: smaller tensors (scalars, shapes) stay inline


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path | None
    external_data: bool  # the file kept (some) weights in an external data file


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_initializer_sizes(model: onnx.ModelProto) -> None:
    """A truncated external data file yields short raw_data: catch it before anything runs."""
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data"):
            continue
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        if tensor.data_type in (onnx.TensorProto.STRING,):
            continue
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            continue  # packed; sizes differ
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
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise OnnxrepError(
            f"{path}: not an ONNX model (protobuf parse failed: {_first_line(exc)})"
        ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise OnnxrepError(f"{path}: cannot read model: {_first_line(exc)}") from exc
    if model.ir_version <= 0 or not model.opset_import or not model.graph.output:
        raise OnnxrepError(f"{path}: not an ONNX model (no IR version, opset or graph outputs)")
    external = any(edh.uses_external_data(t) for t in edh._get_all_tensors(model))
    if external:
        try:
            edh.load_external_data_for_model(model, str(path.parent))
        except FileNotFoundError as exc:
            missing = getattr(exc, "filename", None) or _first_line(exc)
            raise OnnxrepError(f"{path}: external data file missing: {missing}") from exc
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise OnnxrepError(f"{path}: cannot read external data: {_first_line(exc)}") from exc
    _check_initializer_sizes(model)
    check(model, str(path))
    return LoadedModel(model=model, path=path, external_data=external)


def check(model: onnx.ModelProto, what: str = "model") -> None:
    """The onnx checker, with its verdict on one line (large models are checked without data)."""
    try:
        if tensor_bytes(model) < TWO_GB:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(_without_data(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise OnnxrepError(f"{what}: invalid ONNX model: {_first_line(exc)}") from exc


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for tensor in light.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        tensor.ClearField("dims")
    return light


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers (raw or typed fields)."""
    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()
    return total


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


def save_atomic(
    model: onnx.ModelProto, dst: str | os.PathLike[str], external_data: bool
) -> list[Path]:
    """Write `model` to `dst` through a temp folder beside it, then rename into place.

    With external data the weights go to `<dst name>.data`; the data file is moved first so
    that a reader never sees a model whose data file is missing. Note that onnx moves the
    tensors' bytes out of `model` while it writes them: pass a copy if you need it after.
    """
    dst = Path(dst)
    external_data = external_data or tensor_bytes(model) >= TWO_GB
    tmp = Path(tempfile.mkdtemp(prefix=".onnxrep-", dir=dst.parent))
    written: list[Path] = []
    try:
        tmp_model = tmp / dst.name
        data_name = dst.name + ".data"
        if external_data:
            # Mark tensors ourselves: onnx's save_model(save_as_external_data=True) refuses
            # when a file named like `location` exists in the current working directory.
            for tensor in model.graph.initializer:
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= _EXTERNAL_THRESHOLD:
                    edh.set_external_data(tensor, data_name)
        onnx.save_model(model, str(tmp_model))
        mode = 0o666 & ~_umask()
        for written_file in tmp.iterdir():
            os.chmod(written_file, mode)  # onnx writes data files 0600; match a normal file
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, dst.parent / data_name)
            written.append(dst.parent / data_name)
        os.replace(tmp_model, dst)
        written.insert(0, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
