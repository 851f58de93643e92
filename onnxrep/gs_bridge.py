"""Every use of onnx-graphsurgeon (gs) beyond its public API, in one place.

Written for onnx-graphsurgeon 0.5.2 to 0.6.x (read against the sources of 0.5.2, 0.5.8 and
0.6.1; pyproject.toml admits >=0.5,<0.7). gs is 0.x: a minor release may change any of this,
so a new minor version is checked here first, and tests/test_gs_bridge.py pins the behaviour.

What is used, and why:
- `Constant._values` and `gs.ir.tensor.LazyValues`. gs imports each initializer as a
  LazyValues holding the imported TensorProto, and converts it on the first read of
  `Constant.values`. onnxrep needs to see that proto before the conversion (`lazy_proto`):
  to read a weight kept in external data straight from its file into numpy, to view raw_data
  as an array without a second copy, and to keep a type numpy lacks (bfloat16, float8) as a
  proto rather than have gs cast it. It also gives a Constant a proto of its own as unread
  values (`set_lazy_proto`): a copy of such a type, or, on export, a data-less placeholder
  whose array travels beside the proto (io.SplitModel).
- `Graph.import_domains`. gs keeps the imported model's own `opset_import` container there
  (a constructor argument, not otherwise documented); with protobuf's upb backend a reference
  to one part of a message keeps the whole message, weights and all, alive
  (`detach_opsets`).
- `Constant.dtype` of an unread proto is the ONNX type number, not a numpy dtype, when numpy
  lacks the type (`release_values` relies on it to leave such a proto alone).
- `onnx_graphsurgeon.logger.G_LOGGER` (not in gs's documented API): gs prints a warning about
  every type numpy lacks and every node constant folding cannot run; onnxrep reports its
  own findings, so gs is told to log errors only (`log_errors_only`).
- `Constant.export_dtype` (the type a constant is written as) is public where it exists:
  0.5.8 and 0.6 have it, 0.5.2 has not and writes a constant as its dtype (`export_dtype`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER


def log_errors_only() -> None:
    """Silence gs's warnings (for the whole process): only its errors are logged."""
    G_LOGGER.severity = G_LOGGER.ERROR


def lazy_proto(tensor: gs.Constant) -> onnx.TensorProto | None:
    """The TensorProto a constant's values are still to be read from, or None when gs holds
    them as an array already. Reading `tensor.values` would convert (and, for a type numpy
    lacks, cast) the proto; this does not."""
    values = tensor._values  # private: see the module docstring
    return values.tensor if isinstance(values, LazyValues) else None


def set_lazy_proto(tensor: gs.Constant, proto: onnx.TensorProto) -> None:
    """Make `proto` the constant's unread values: gs exports it as it is (name aside) and
    converts it only if someone reads `tensor.values`."""
    tensor.values = LazyValues(proto)


def detach_opsets(graph: gs.Graph) -> None:
    """Give the graph opset imports of its own, copies of those of the imported model, so
    that the graph holds no part of that model."""
    if graph.import_domains is not None:
        graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version)
                                for d in graph.import_domains]


def release_values(tensor: gs.Constant) -> None:
    """Drop a constant's array now (an empty one of its dtype takes its place): gs holds the
    only reference, in a tensor that sits in a reference cycle and would wait for Python's
    cycle collector. An unread proto of a type numpy lacks is left as it is."""
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError:
        return  # still an unread proto (a type numpy lacks): nothing big to free
    tensor.values = np.zeros((0,), dtype=dtype)


def export_dtype(tensor: gs.Constant) -> object:
    """The type gs writes the constant as: its `export_dtype` where gs has one, else its dtype."""
    return getattr(tensor, "export_dtype", tensor.dtype)
