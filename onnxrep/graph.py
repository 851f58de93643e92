"""Normalize an imported model before the rules run.

1. onnx shape inference from the graph inputs alone (so that static shape arithmetic can
   fold): the model's own value_info and the declared shapes of its graph outputs are not
   trusted - a declaration may be static where the tensor follows a dynamic input;
2. initializers that are also graph inputs (IR >= 4: defaults the caller may override) become
   graph inputs (`OverridableInput`): data to folding and to every rule; export writes their
   defaults back;
3. unique node names (onnx-graphsurgeon compares nodes by name);
4. guarded constant folding (onnxrep.folding);
5. removal of no-ops: Identity, inference Dropout, Add/Sub(t, 0), Mul/Div(t, 1);
6. dead-node cleanup and topological order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxrep import gs_bridge, io
from onnxrep.errors import OnnxrepError
from onnxrep.folding import fold_constants
from onnxrep.io import SplitModel, has_data, payload_bytes
from onnxrep.query import constant_value, is_graph_input, is_graph_output
from onnxrep.surgery import bypass, redirect_consumers, replace_input

gs_bridge.log_errors_only()
log = logging.getLogger(__name__)

_LIGHT_BYTES = 4096  # initializers larger than this lose their data in the inference copy

Dims = list[int | str | None] | None


def shape_probe(model: onnx.ModelProto, heavy: Callable[[onnx.TensorProto], bool]
                ) -> onnx.ModelProto:
    """A copy of `model` for onnx shape inference in which each `heavy` initializer is a typed
    graph input instead (shape inference reads its dims, not its bytes): a big model costs no
    second copy of its weights. The light ones stay initializers, for data propagation."""
    probe = onnx.ModelProto()
    graph = model.graph
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    probe.graph.node.extend(graph.node)
    probe.graph.input.extend(graph.input)
    probe.graph.output.extend(graph.output)
    input_names = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if heavy(tensor):
            if tensor.name not in input_names:
                probe.graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                )
        else:
            probe.graph.initializer.append(tensor)
    return probe


def _heavy(tensor: onnx.TensorProto) -> bool:
    """Large, or with no bytes in the proto (a SplitModel's placeholder, external data)."""
    return ((payload_bytes(tensor) or 0) > _LIGHT_BYTES or not has_data(tensor)
            or tensor.data_location == onnx.TensorProto.EXTERNAL)


def overridable_names(model: onnx.ModelProto) -> set[str]:
    """Initializers that are also graph inputs, from IR 4 on: defaults a caller may override
    (before IR 4 every initializer is listed as an input, and none is overridable)."""
    if model.ir_version < 4:
        return set()
    inputs = {i.name for i in model.graph.input}
    return {t.name for t in model.graph.initializer if t.name in inputs}


def _dims(info: onnx.ValueInfoProto) -> Dims:
    """A ValueInfo's dims as onnx-graphsurgeon writes them (str symbolic, None unknown)."""
    tensor_type = info.type.tensor_type
    if not info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim]


def inferred_types(model: onnx.ModelProto) -> tuple[list[onnx.ValueInfoProto], dict[str, Dims]]:
    """onnx shape inference from the graph inputs alone: the value_info it finds, and the
    shapes of the graph outputs. The declared shapes of the outputs are left out (a model may
    declare [1, ...] for a tensor that follows a dynamic batch), and so are the values of
    overridable initializers (only their declared types are known)."""
    probe = shape_probe(model, _heavy)
    for out in probe.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    overridable = overridable_names(model)
    if overridable:
        kept = [t for t in probe.graph.initializer if t.name not in overridable]
        del probe.graph.initializer[:]
        probe.graph.initializer.extend(kept)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is an aid, never a requirement
        log.debug("shape inference failed: %s", exc)
        return [], {}
    return (list(inferred.graph.value_info),
            {out.name: _dims(out) for out in inferred.graph.output})


def inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """onnx shape inference on a `shape_probe` of the model: the value_info it finds."""
    return inferred_types(model)[0]


def unique_node_names(graph: gs.Graph) -> None:
    seen: set[str] = set()
    counters: dict[str, int] = {}
    for node in graph.nodes:
        name = node.name
        if not name or name in seen:
            base = name or node.op
            k = counters.get(base, 0)
            while True:
                k += 1
                candidate = f"{base}_{k}"
                if candidate not in seen:
                    break
            counters[base] = k
            name = candidate
        node.name = name
        seen.add(name)


class OverridableInput(gs.Variable):
    """A graph input with a default value (an initializer that is also a graph input): for
    folding and for the rules it is data like any input; `restore_overridable_inputs` puts the
    default back for export. `declared` is the input's ValueInfo in the input model."""

    default: gs.Constant
    declared: onnx.ValueInfoProto


def keep_overridable_inputs(graph: gs.Graph, model: onnx.ModelProto,
                            base_dir: Path | None = None) -> None:
    """onnx-graphsurgeon imports an initializer that is also a graph input as a plain constant
    and drops it from the inputs: make it an `OverridableInput` again, in its place among the
    inputs, with the declared type (its dims may be wider than the default's)."""
    names = overridable_names(model)
    if not names:
        return
    tensors: dict[str, gs.Tensor] = {}
    for scope in [*graph.subgraphs(recursive=True), graph]:  # read inside an If/Loop too
        tensors.update(scope.tensors())
    protos = {t.name: t for t in model.graph.initializer if t.name in names}
    inputs = {id(t): t for t in graph.inputs}
    ordered: list[gs.Tensor] = []
    for info in model.graph.input:
        if info.name not in names:
            found = next((t for t in graph.inputs if t.name == info.name), None)
            if found is not None:
                ordered.append(inputs.pop(id(found)))
            continue
        default = tensors.get(info.name)
        if not isinstance(default, gs.Constant):  # read by no node: gs did not keep it
            default = gs.Constant(info.name, np.zeros((0,), np.float32))
            own = onnx.TensorProto()
            own.CopyFrom(protos[info.name])
            gs_bridge.set_lazy_proto(default, own)
            _detach(default, base_dir)
        var = OverridableInput(info.name, dtype=default.dtype, shape=_dims(info))
        var.default = default
        var.declared = onnx.ValueInfoProto()
        var.declared.CopyFrom(info)
        redirect_consumers(graph, default, var)
        ordered.append(var)
    graph.inputs = ordered + list(inputs.values())


def restore_overridable_inputs(graph: gs.Graph) -> dict[str, onnx.ValueInfoProto]:
    """Put back the defaults of the `OverridableInput`s (gs exports a constant that is a graph
    input as an input and an initializer); returns their declared ValueInfos by name."""
    declared: dict[str, onnx.ValueInfoProto] = {}
    top = {id(n) for n in graph.nodes}
    for i, var in enumerate(list(graph.inputs)):
        if isinstance(var, OverridableInput):
            # A subgraph reads it by name, as an outer-scope value: gs would copy a constant
            # into the subgraph's own initializers, where it would hide the input
            outer = gs.Variable(var.name)
            for node in list(var.outputs):
                replace_input(node, var, var.default if id(node) in top else outer)
            for k, t in enumerate(graph.outputs):
                if t is var:
                    graph.outputs[k] = var.default
            graph.inputs[i] = var.default
            declared[var.name] = var.declared
    return declared


def declare_inputs(model: onnx.ModelProto, declared: dict[str, onnx.ValueInfoProto]) -> None:
    """Give exported graph inputs their declared types (gs writes a constant's own shape)."""
    for info in model.graph.input:
        if info.name in declared:
            info.CopyFrom(declared[info.name])


def use_inferred_output_shapes(graph: gs.Graph, shapes: dict[str, Dims]) -> None:
    """From normalize until export, the graph outputs carry the shapes inferred from the graph
    inputs (None where unknown), not their declarations: a model may declare a static shape
    where the tensor follows a dynamic input, and neither folding nor a rule may trust it.
    Each keeps its declaration in `declared_shape` for `restore_declared_output_shapes`."""
    for tensor in graph.outputs:
        if (isinstance(tensor, gs.Variable) and not isinstance(tensor, OverridableInput)
                and not is_graph_input(graph, tensor)):
            tensor.declared_shape = tensor.shape
            tensor.shape = shapes.get(tensor.name)


def restore_declared_output_shapes(graph: gs.Graph) -> None:
    """Give the graph outputs their declared shapes back, for export."""
    for tensor in graph.outputs:
        if isinstance(tensor, gs.Variable) and hasattr(tensor, "declared_shape"):
            tensor.shape = tensor.declared_shape


def _widens(const_shape: tuple[int, ...], other: gs.Tensor) -> bool:
    """Would broadcasting with a constant of `const_shape` change `other`'s shape?"""
    if all(d == 1 for d in const_shape):
        if other.shape is None:
            return len(const_shape) > 0
        return len(const_shape) > len(other.shape)
    if other.shape is None or len(const_shape) > len(other.shape):
        return True
    tail = list(other.shape)[len(other.shape) - len(const_shape):]
    return any(c != 1 and c != d for c, d in zip(const_shape, tail, strict=True))


def _noop_operand(node: gs.Node) -> gs.Tensor | None:
    """The operand that a node passes through unchanged, if it is a no-op."""
    if node.op == "Identity":
        return node.inputs[0]
    if node.op == "Dropout":
        if len(node.inputs) > 2 and node.inputs[2].name:
            training = constant_value(node.inputs[2])
            if training is None or bool(training):
                return None
        return node.inputs[0]
    neutral = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}.get(node.op)
    if neutral is None or len(node.inputs) != 2:
        return None
    sides = [(0, 1), (1, 0)] if node.op in ("Add", "Mul") else [(1, 0)]
    for const_idx, other_idx in sides:
        value = constant_value(node.inputs[const_idx])
        other = node.inputs[other_idx]
        if value is None or constant_value(other) is not None:
            continue
        if value.size and np.all(value == neutral) and not _widens(value.shape, other):
            if other.dtype is not None and np.dtype(other.dtype) != value.dtype:
                continue
            return other
    return None


def remove_noops(graph: gs.Graph) -> int:
    removed = 0
    for node in list(graph.nodes):
        if any(out.outputs or is_graph_output(graph, out) for out in node.outputs[1:]):
            continue  # another output is used (a Dropout's mask): the node stays
        through = _noop_operand(node)
        if through is not None and bypass(graph, node, through):
            removed += 1
    graph.cleanup().toposort()
    return removed


def normalize(model: onnx.ModelProto, base_dir: Path | None = None) -> gs.Graph:
    """Import and normalize a model; the result is what the rules see. Its weights are numpy
    arrays of its own (external data read from `base_dir`): the model can be let go."""
    value_info, output_shapes = inferred_types(model)
    original = list(model.graph.value_info)
    del model.graph.value_info[:]
    model.graph.value_info.extend(value_info)
    try:
        graph = gs.import_onnx(model)
    finally:
        del model.graph.value_info[:]
        model.graph.value_info.extend(original)
    load_weights(graph, base_dir)
    keep_overridable_inputs(graph, model, base_dir)
    unique_node_names(graph)
    use_inferred_output_shapes(graph, output_shapes)
    fold_constants(graph)
    remove_noops(graph)
    unique_node_names(graph)
    return graph


_DETACH_BYTES = 1024  # weights from this size on travel as arrays beside the proto


# ONNX types written as raw bytes of the numpy dtype they map to (not bfloat16, float8, 4-bit
# or strings)
_RAW_TYPES = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).newbyteorder("<") for t in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)}


def _plain_weight(tensor: gs.Constant) -> np.ndarray | None:
    """The values of a constant that can be written as raw little-endian bytes of its own
    dtype (not bfloat16/float8 or strings, not re-typed on export), if large enough."""
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError:
        return None  # an ONNX type numpy does not have: leave it to the exporter
    if dtype not in _RAW_TYPES.values() or gs_bridge.export_dtype(tensor) != tensor.dtype:
        return None
    values = tensor.values
    if not isinstance(values, np.ndarray) or values.nbytes < _DETACH_BYTES:
        return None
    return values


def _detach(tensor: gs.Constant, base_dir: Path | None) -> None:
    """Give a constant values of its own, so that nothing refers into the imported proto
    (with protobuf's upb backend one reference to a part keeps the whole message alive);
    weights in external data are read from their file straight into numpy."""
    proto = gs_bridge.lazy_proto(tensor)  # the imported TensorProto, until the first read
    if proto is None:
        return
    dtype = _RAW_TYPES.get(proto.data_type)
    tensor.data_location = None  # gs would stamp the imported EXTERNAL onto the export
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        if base_dir is None:
            raise OnnxrepError(f"weight '{proto.name}' is in external data, and the model "
                               "was given without its folder: load it with its data")
        try:
            data = io.read_external(proto, base_dir, dtype)
        except (OSError, ValueError) as exc:
            raise OnnxrepError(f"cannot read external data of '{proto.name}': {exc}") from exc
        if isinstance(data, np.ndarray):
            tensor.values = data
            return
        own = onnx.TensorProto(name=proto.name, data_type=proto.data_type, dims=proto.dims,
                               raw_data=data)
        gs_bridge.set_lazy_proto(tensor, own)
    elif dtype is not None and proto.HasField("raw_data"):
        # One copy of the bytes, read-only: a rule writes new arrays, it never edits weights
        tensor.values = np.frombuffer(proto.raw_data, dtype=dtype).reshape(tuple(proto.dims))
    elif dtype is not None:
        tensor.values = tensor.values  # typed fields (small tensors): gs's own conversion
    else:  # a type numpy lacks (bfloat16, float8, ...): keep it as a proto, a copy of it
        own = onnx.TensorProto()
        own.CopyFrom(proto)
        gs_bridge.set_lazy_proto(tensor, own)


def load_weights(graph: gs.Graph, base_dir: Path | None = None) -> None:
    """Read every weight into numpy now, so that the imported proto can be let go; weights
    in external data from their files beside the model, in `base_dir`."""
    gs_bridge.detach_opsets(graph)  # gs keeps the model's own opset_import container
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            _detach(tensor, base_dir)
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant):
                _detach(value, base_dir)


def _has_subgraphs(graph: gs.Graph) -> bool:
    return any(isinstance(v, gs.Graph) for n in graph.nodes for v in n.attrs.values())


def export(graph: gs.Graph, like: onnx.ModelProto) -> SplitModel:
    """Export a graph keeping the input model's IR version, opsets and model fields.

    The large weights stay numpy arrays beside the proto (see SplitModel): the exporter sees
    them as data-less tensors, and no copy of their bytes is made. Intermediate shapes are
    dropped and inferred again: rewrites leave stale value_info.
    """
    declared = restore_overridable_inputs(graph)
    restore_declared_output_shapes(graph)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and not any(
            tensor is t for t in graph.inputs + graph.outputs
        ):
            tensor.shape = None
            tensor.dtype = None
    weights: dict[str, np.ndarray] = {}
    held: list[tuple[gs.Constant, np.ndarray]] = []
    if not _has_subgraphs(graph):  # a subgraph may copy an outer weight into its own scope
        for tensor in graph.tensors().values():
            values = _plain_weight(tensor) if isinstance(tensor, gs.Constant) else None
            if values is None:
                continue
            placeholder = onnx.TensorProto(
                name=tensor.name, dims=values.shape,
                data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
            weights[tensor.name] = values
            held.append((tensor, values))
            gs_bridge.set_lazy_proto(tensor, placeholder)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in held:
            tensor.values = values
    declare_inputs(model, declared)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    del model.functions[:]
    model.functions.extend(like.functions)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred_value_info(model))
    return SplitModel(model, weights)
