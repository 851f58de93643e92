"""Normalize an imported model before the rules run.

1. onnx shape inference from the graph inputs alone (so that static shape arithmetic can
   fold): the model's own value_info and the declared shapes of its graph outputs are not
   trusted - a declaration may be static where the tensor follows a dynamic input;
2. initializers that are also graph inputs (IR >= 4: defaults the caller may override) become
   graph inputs (`OverridableInput`): data to folding and to every rule; export writes their
   defaults back;
3. unique node names (onnx-graphsurgeon compares nodes by name);
4. guarded constant folding (onnxrep.folding);
5. removal of no-ops: Identity, inference Dropout, Add/Sub(t, 0), Mul/Div(t, 1) - except a
   zero Add after a MatMul, which a runtime fuses into a Gemm - and a Slice of whole axes
   (start 0, end INT64_MAX, step 1);
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
from onnxrep.query import (
    constant_value,
    input_symbols,
    is_graph_input,
    is_graph_output,
    producer,
)
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


_PROBE_MAX_ELEMENTS = 64  # larger initializers enter shape inference as typed inputs


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None
                  ) -> dict[str, list[int]] | None:
    """name -> static dims of every tensor onnx shape inference can size, with the graph
    inputs' symbolic dims set to 1 (or taken from `input_shapes`). Large weights (and those
    whose bytes the proto does not hold) are not copied: shape inference reads their dims
    only. None when shape inference fails. The MAC count and the search for admissible sizes
    (onnxrep.admissible) use it."""
    probe = shape_probe(model, lambda t: int(np.prod(t.dims, dtype=np.int64))
                        > _PROBE_MAX_ELEMENTS or not has_data(t)
                        or t.data_location == onnx.TensorProto.EXTERNAL)
    weights = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        given = (input_shapes or {}).get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        fixed = list(given) if given is not None else [
            d.dim_value if d.HasField("dim_value") else 1 for d in dims]
        next(p for p in probe.graph.input if p.name == vi.name).CopyFrom(
            onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, fixed))
    del probe.graph.output[:]  # their declared shapes must not constrain inference
    for vi in model.graph.output:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(vi.name))
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes (the callers do without)
        return None
    shapes: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


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


def _inline_small_external(probe: onnx.ModelProto, model: onnx.ModelProto,
                            base_dir: Path) -> None:
    """Small initializers kept in external data (the dynamo exporter writes even a
    ReduceMean's axes there) enter the probe with their bytes, so that inference sees their
    values; without them a ReduceMean's output has no shape, nor anything after it."""
    inputs = {i.name: k for k, i in enumerate(probe.graph.input)}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.name not in inputs:
            continue
        try:
            size = int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(
                tensor.data_type).itemsize
            if size > _LIGHT_BYTES:
                continue
            data = io.read_external(tensor, base_dir, None)
        except (OSError, ValueError, TypeError, KeyError, OnnxrepError):
            continue  # load_weights says what is wrong with it
        probe.graph.initializer.append(onnx.TensorProto(
            name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, raw_data=data))
    kept = {t.name for t in probe.graph.initializer}
    remaining = [i for i in probe.graph.input if i.name not in kept or i.name in {
        v.name for v in model.graph.input}]
    del probe.graph.input[:]
    probe.graph.input.extend(remaining)


def inferred_types(model: onnx.ModelProto, base_dir: Path | None = None
                   ) -> tuple[list[onnx.ValueInfoProto], dict[str, Dims]]:
    """onnx shape inference from the graph inputs alone: the value_info it finds, and the
    shapes of the graph outputs. The declared shapes of the outputs are left out (a model may
    declare [1, ...] for a tensor that follows a dynamic batch), and so are the values of
    overridable initializers (only their declared types are known). With `base_dir`, small
    weights in external data are read for it (`_inline_small_external`)."""
    probe = shape_probe(model, _heavy)
    if base_dir is not None:
        _inline_small_external(probe, model, base_dir)
    for out in probe.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    overridable = overridable_names(model)
    if overridable:
        kept = [t for t in probe.graph.initializer if t.name not in overridable]
        del probe.graph.initializer[:]
        probe.graph.initializer.extend(kept)
    inferred = None
    for _ in range(_SEED_ROUNDS):
        try:
            inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - inference is an aid, never a requirement
            log.debug("shape inference failed: %s", exc)
            break
        seeds = _reshape_symbols(inferred)
        if not seeds:
            break
        probe.graph.value_info.extend(seeds)  # onnx starts from them and carries them on
    if inferred is None:
        return [], {}
    return (list(inferred.graph.value_info),
            {out.name: _dims(out) for out in inferred.graph.output})


_SEED_ROUNDS = 16  # inference runs; each names the Reshapes the names of the last one reach


def _reshape_symbols(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The outputs of constant-shape Reshapes whose one -1 entry onnx inference left unnamed
    (or gave a made-up name), where the element count proves it is a graph input's own symbol
    S: the input's dims are
    static but for one S, and the static product of the input equals that of the target
    (0 entries copy the input's static dims). S * P = free * P with P > 0, so free = S.
    onnx does not divide symbols; the dynamo exporter writes a view's shape as a constant with
    -1 for the batch, and without the name runtimes lose fusions that need equal shapes
    (onnxruntime's Conv + Add on NextViT's residuals)."""
    g = model.graph
    symbols = {d.dim_param for i in g.input for d in i.type.tensor_type.shape.dim
               if d.dim_param}
    infos = {vi.name: vi for vi in [*g.input, *g.value_info]}
    dims = {name: _dims(vi) for name, vi in infos.items()}
    constants = io.inline_constants(model, (onnx.TensorProto.INT64,))  # Reshape's shape type
    seeds = []
    for node in g.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(
                node.input) != 2 or node.input[1] not in constants:
            continue
        out = dims.get(node.output[0])
        x = dims.get(node.input[0])
        target = [int(v) for v in constants[node.input[1]].ravel()]
        if out is None or x is None or len(out) != len(target) or target.count(-1) != 1:
            continue
        free = target.index(-1)
        if out[free] is not None and not _made_up(out[free]):
            continue  # static, or named by inference from a graph input already
        named = [d for d in x if not isinstance(d, int)]
        if len(named) != 1 or named[0] not in symbols:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        entries = []
        for k, v in enumerate(target):
            if v == 0 and not allowzero:
                if k >= len(x) or not isinstance(x[k], int):
                    break
                v = x[k]
            entries.append(v)
        else:
            static_x = int(np.prod([d for d in x if isinstance(d, int)], dtype=np.int64))
            static_target = int(np.prod([v for k, v in enumerate(entries) if k != free],
                                        dtype=np.int64))
            if static_target > 0 and static_x == static_target:
                shape = [named[0] if k == free else d for k, d in enumerate(out)]
                seeds.append(onnx.helper.make_tensor_value_info(
                    node.output[0], infos[node.output[0]].type.tensor_type.elem_type, shape))
    return seeds


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


def _feeds_gemm_fusion(tensor: gs.Tensor) -> bool:
    """Is `tensor` a MatMul's output? A runtime fuses MatMul + Add into one Gemm (onnxruntime's
    MatMulAddFusion): dropping a zero bias there would make the output slower than the input
    (docs/DESIGN.md, normalize)."""
    made = producer(tensor)
    return made is not None and made.op == "MatMul"


_UNBOUNDED = 2**62  # a Slice end at least this large takes an axis to its end, any size


def _whole_slice(node: gs.Node) -> bool:
    """A Slice (opset >= 10, inputs) from 0 to the end of each axis it names, step 1: every
    element, for every input size (the dynamo exporter writes x[:, ...] as Slice(0, INT_MAX)
    on axis 0, and shape inference then loses the batch name)."""
    if len(node.inputs) < 3 or node.attrs:
        return False
    values = [constant_value(t) for t in node.inputs[1:]]
    if any(v is None for v in values):
        return False
    starts, ends = values[0].reshape(-1), values[1].reshape(-1)
    steps = values[3].reshape(-1) if len(values) > 3 else np.ones_like(starts)
    return bool(starts.size and np.all(starts == 0) and np.all(ends >= _UNBOUNDED)
                and np.all(steps == 1))


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
    if node.op == "Slice":
        return node.inputs[0] if _whole_slice(node) else None
    neutral = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}.get(node.op)
    if neutral is None or len(node.inputs) != 2:
        return None
    sides = [(0, 1), (1, 0)] if node.op in ("Add", "Mul") else [(1, 0)]
    for const_idx, other_idx in sides:
        value = constant_value(node.inputs[const_idx])
        other = node.inputs[other_idx]
        if value is None or constant_value(other) is not None:
            continue
        if node.op == "Add" and _feeds_gemm_fusion(other):
            continue
        if value.size and np.all(value == neutral) and not _widens(value.shape, other):
            if other.dtype is not None and np.dtype(other.dtype) != value.dtype:
                continue
            return other
    return None


def drop_identities(graph: gs.Graph) -> int:
    """Remove the Identity nodes rules left (reshape-chain writes one where a Reshape did
    nothing: a rule describes a replacement, so it cannot delete a node outright)."""
    removed = sum(1 for node in list(graph.nodes)
                  if node.op == "Identity" and bypass(graph, node, node.inputs[0]))
    if removed:
        graph.cleanup().toposort()
    return removed


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
    value_info, output_shapes = inferred_types(model, base_dir)
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
    refresh_shapes(graph)
    return graph


def refresh_shapes(graph: gs.Graph) -> int:
    """Infer the dims again, for the tensors an earlier inference could not size or gave a
    made-up name (unk__N): after folding, an exporter's computed ReduceMean axes
    (dynamo-noopt: a Reshape of a Constant) are a constant at last; after the rules, a
    reshape pair that did nothing is gone and the batch name reaches the head again. A
    tensor without dims takes the new ones; a made-up name is replaced only by a graph
    input's own symbol (a static size in its place would change how the local checks cut
    blocks, for no proof the rules need). Large weights enter the probe without their bytes
    (no copy); returns how many tensors changed."""
    missing = [t for t in graph.tensors().values()
               if isinstance(t, gs.Variable) and t.inputs and (t.shape is None or any(
                   _made_up(d) for d in t.shape))]
    if not missing or _has_subgraphs(graph):
        return 0
    try:
        model, _ = _export_without_bytes(graph, _LIGHT_BYTES)
    except Exception:  # noqa: BLE001 - inference is an aid, never a requirement
        return 0
    value_info, _ = inferred_types(model)
    found = {vi.name: _dims(vi) for vi in value_info}
    filled = 0
    own = input_symbols(graph)
    for tensor in missing:
        dims = found.get(tensor.name)
        if dims is None:
            continue
        before = tensor.shape
        if tensor.shape is None:
            tensor.shape = dims
        elif len(dims) == len(tensor.shape):
            # a made-up name becomes the graph input's own symbol where inference now finds it
            # (and only that: a static size in its place would change how the local checks
            # cut blocks, for no proof the rules need)
            tensor.shape = [n if _made_up(d) and isinstance(n, str) and n in own else d
                            for d, n in zip(tensor.shape, dims, strict=True)]
        filled += tensor.shape != before
    return filled


def _made_up(dim: object) -> bool:
    """A dim name onnx shape inference invented (unk__N): it proves no equality."""
    return isinstance(dim, str) and dim.startswith("unk__")


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


def _sharing_key(tensor: gs.Constant) -> tuple | None:
    """What two constants must have alike to be one tensor (dtype, shape, a few bytes; the
    whole bytes are compared after), or None for a constant not held as an array."""
    if gs_bridge.lazy_proto(tensor) is not None:
        return None  # a type numpy lacks, kept as a proto: left as it is
    values = tensor.values
    if not isinstance(values, np.ndarray):
        return None
    flat = values.reshape(-1).view(np.uint8) if values.flags.c_contiguous else None
    edges = b"" if flat is None else bytes(flat[:32]) + bytes(flat[-32:])
    return (values.dtype.str, values.shape, edges)


def share_identical_constants(graph: gs.Graph) -> int:
    """Constants of the same dtype, shape and bytes become one tensor (the exporters write a
    ReLU6's 0 and 6 once per node). Graph inputs (overridable defaults) and outputs keep their
    own; a graph with subgraphs is left alone (a subgraph reads outer names). Returns how many
    constants went."""
    if _has_subgraphs(graph):
        return 0
    pinned = {id(t) for t in [*graph.inputs, *graph.outputs]}
    kept: dict[tuple, list[gs.Constant]] = {}
    shared = 0
    for node in graph.nodes:
        for tensor in list(node.inputs):
            if not isinstance(tensor, gs.Constant) or id(tensor) in pinned:
                continue
            key = _sharing_key(tensor)
            if key is None:
                continue
            same = kept.setdefault(key, [])
            twin = next((k for k in same if k is tensor
                         or k.values.tobytes() == tensor.values.tobytes()), None)
            if twin is None:
                same.append(tensor)
            elif twin is not tensor:
                redirect_consumers(graph, tensor, twin)
                shared += 1
    return shared


def _export_without_bytes(graph: gs.Graph, light: int = -1
                          ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """gs.export_onnx with every weight of more than `light` bytes written as a data-less
    placeholder (its dims and dtype only; no copy of its bytes), and those weights by name.
    A graph with subgraphs is exported whole: a subgraph may copy an outer weight into its
    own scope."""
    held: list[tuple[gs.Constant, np.ndarray]] = []
    if not _has_subgraphs(graph):
        for tensor in graph.tensors().values():
            values = _plain_weight(tensor) if isinstance(tensor, gs.Constant) else None
            if values is None or values.nbytes <= light:
                continue
            held.append((tensor, values))
            gs_bridge.set_lazy_proto(tensor, onnx.TensorProto(
                name=tensor.name, dims=values.shape,
                data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype)))
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in held:
            tensor.values = values
    return model, {tensor.name: values for tensor, values in held}


def export(graph: gs.Graph, like: onnx.ModelProto) -> SplitModel:
    """Export a graph keeping the input model's IR version, opsets and model fields;
    identical constants are written once (`share_identical_constants`).

    The large weights stay numpy arrays beside the proto (see SplitModel): the exporter sees
    them as data-less tensors, and no copy of their bytes is made. Intermediate shapes are
    dropped and inferred again: rewrites leave stale value_info.
    """
    declared = restore_overridable_inputs(graph)
    restore_declared_output_shapes(graph)
    share_identical_constants(graph)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and not any(
            tensor is t for t in graph.inputs + graph.outputs
        ):
            tensor.shape = None
            tensor.dtype = None
    model, weights = _export_without_bytes(graph)
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
    model.graph.value_info.extend(_without_invented_symbols(inferred_value_info(model), model))
    return SplitModel(model, weights)


def _without_invented_symbols(value_info: list[onnx.ValueInfoProto], model: onnx.ModelProto
                              ) -> list[onnx.ValueInfoProto]:
    """The value_info with the dim names that shape inference invented (unk__N) made plain
    unknown dims. Inference has been seen to give one such name to dims of different sizes
    (the elements of an uneven split into a sequence, LeViT's qkv in the dynamo-noopt
    export), and onnxruntime plans its buffers by equal names: the fused model then failed to
    run. The graph inputs' own names stay."""
    own = {d.dim_param for vi in model.graph.input for d in vi.type.tensor_type.shape.dim
           if d.HasField("dim_param")}
    for vi in value_info:
        kind = vi.type
        while kind.HasField("sequence_type"):  # a sequence's element type has dims too
            kind = kind.sequence_type.elem_type
        if not kind.HasField("tensor_type"):
            continue
        for d in kind.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param not in own:
                d.ClearField("dim_param")
    return value_info
