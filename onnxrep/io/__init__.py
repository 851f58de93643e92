"""Loading and writing models: external data, clear one-line errors, atomic writes.

  wire   the protobuf wire format: the weight-free parse and the streaming single-file writer
  load   load, check, external data checked and read, tensor sizes
  save   SplitModel, save_atomic, external data written, destination checks
"""

from onnxrep.errors import OnnxrepError
from onnxrep.io.load import (
    LoadedModel,
    all_tensors,
    check,
    external_source,
    has_data,
    header_of,
    inline_constants,
    load,
    payload_bytes,
    read_external,
    tensor_bytes,
)
from onnxrep.io.save import (
    SplitModel,
    check_destination,
    check_writes,
    data_file,
    save_atomic,
    serialize,
    write_external,
)
from onnxrep.io.wire import TWO_GB, read_without_weight_bytes, write_single_file

__all__ = [
    "TWO_GB",
    "LoadedModel",
    "OnnxrepError",
    "SplitModel",
    "all_tensors",
    "check",
    "check_destination",
    "check_writes",
    "data_file",
    "external_source",
    "has_data",
    "header_of",
    "inline_constants",
    "load",
    "payload_bytes",
    "read_external",
    "read_without_weight_bytes",
    "save_atomic",
    "serialize",
    "tensor_bytes",
    "write_external",
    "write_single_file",
]
