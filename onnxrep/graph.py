"""Normalize an imported model before the rules run.

1. onnx shape inference from the graph inputs alone (so that static shape arithmetic can
   fold): the model's own value_info and the declared shapes of its graph outputs are not
   trusted - a declaration may be static where the tensor follows a dynamic input;
2. initializers that are also graph inputs (IR >= 4: defaults the caller may override) become
   graph inputs (`OverridableInput`): data to folding and to every rule; export writes their
   defaults back;
3. unique node names (onnx-graphsurgeon compares nodes by name);
4. constant folding (`fold_constants`): all-constant subgraphs (OREPA's weight computation,
   DBB's pad-value construction, dynamo's Shape -> Expand -> CastLike zero biases) and Shape
   arithmetic on static dims. onnx-graphsurgeon computes the values on a copy of the graph;
   a fold is applied only if it does not grow the weights, does not create an inf or NaN, and
   never for a random op or what depends on it;
5. removal of no-ops: Identity, inference Dropout, Add/Sub(t, 0), Mul/Div(t, 1);
6. dead-node cleanup and topological order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxrep import gs_bridge, io
from onnxrep.errors import OnnxrepError
from onnxrep.io import SplitModel, has_data, payload_bytes
from onnxrep.query import constant_value, is_graph_input, is_graph_output, optional_input, producer
from onnxrep.surgery import bypass, redirect_consumers, replace_input

gs_bridge.log_errors_only()
log = logging.getLogger(__name__)

_MAX_FOLD_ROUNDS = 8

# Ops whose value is drawn anew at every run: never folded, nor anything computed from them
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Bernoulli", "Multinomial"})

# A fold may store this many new bytes even if no weight dies with it (shape arithmetic,
# small biases); past it, a fold must free at least as many weight bytes as it adds
_SMALL_FOLD_BYTES = 4096

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


@contextlib.contextmanager
def trusted_output_shapes(graph: gs.Graph, shapes: dict[str, Dims]) -> Iterator[None]:
    """While normalizing, the graph outputs carry the shapes inferred from the graph inputs
    (None where unknown), not their declarations; afterwards the declarations come back."""
    declared = [(t, t.shape) for t in graph.outputs if isinstance(t, gs.Variable)
                and not isinstance(t, OverridableInput) and not is_graph_input(graph, t)]
    for tensor, _ in declared:
        tensor.shape = shapes.get(tensor.name)
    try:
        yield
    finally:
        for tensor, shape in declared:
            if isinstance(tensor, gs.Variable):
                tensor.shape = shape


def castlike_to_cast(graph: gs.Graph) -> None:
    """CastLike(c, like) reads only the dtype of `like`; as Cast(c, to=dtype) it folds even
    when `like` is dynamic (the dynamo exporter's zero biases: CastLike(0, input))."""
    for node in graph.nodes:
        if node.op != "CastLike" or len(node.inputs) != 2:
            continue
        like = node.inputs[1]
        if like.dtype is None:
            continue
        try:
            to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(like.dtype))
        except (TypeError, KeyError, ValueError):
            continue
        del node.inputs[1]
        node.op = "Cast"
        node.attrs = {"to": int(to)}


def _shape_output(shape_node: gs.Node, dims: list) -> list:
    """What Shape(start, end) gives for a tensor of `dims`: Python's slice is the operator's
    start/end rule (negative counts from the end, out of range clamps)."""
    start, end = int(shape_node.attrs.get("start", 0)), shape_node.attrs.get("end")
    return dims[start:None if end is None else int(end)]


def _known_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """A tensor's dims, None for each dynamic one; None when its rank is unknown. During
    normalize every Variable's shape is one inferred from the graph inputs (or the declaration
    of a graph input, which is the model's contract)."""
    shape = tensor.shape
    if shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]


def _picked_dims(node: gs.Node, dims: list[int | None]) -> np.ndarray | None:
    """Gather(axis 0) or Slice of a shape vector `dims` with constant indices: the picked
    dims as an int64 array (None anywhere: a dynamic dim was picked), or None."""
    rank = len(dims)
    if node.op == "Gather":
        indices = constant_value(optional_input(node, 1))
        if indices is None or int(node.attrs.get("axis", 0)) not in (0, -1):
            return None
        flat = [int(i) for i in np.ravel(indices)]
        if any(not -rank <= i < rank for i in flat):
            return None
        picked = [dims[i] for i in flat]
        shape = indices.shape
    elif node.op == "Slice":
        if len(node.inputs) >= 3:  # opset 10 on: starts, ends[, axes[, steps]] are inputs
            given = [optional_input(node, k) for k in range(1, 5)]
            parts = [constant_value(t) for t in given]
            if parts[0] is None or parts[1] is None or any(
                    t is not None and p is None for t, p in zip(given, parts, strict=True)):
                return None
            starts, ends, axes, steps = parts
        else:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes, steps = node.attrs.get("axes"), None
            if starts is None or ends is None:
                return None
        values = [np.ravel(v) for v in (starts, ends)] + [
            np.ravel(v) if v is not None else None for v in (axes, steps)]
        if any(v is not None and v.size != 1 for v in values):
            return None
        if values[2] is not None and int(values[2][0]) not in (0, -1):
            return None
        step = int(values[3][0]) if values[3] is not None else 1
        if step == 0:
            return None
        picked = dims[int(values[0][0]):int(values[1][0]):step]  # numpy's rule is Slice's
        shape = (len(picked),)
    else:
        return None
    if any(d is None for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(shape)


def _fold_shapes(graph: gs.Graph, of: Callable[[gs.Tensor], bool]) -> bool:
    """Shape(t) when every dim it gives is static, and a Gather or Slice of Shape(t) that
    picks only static dims (Shape's start/end honoured), for the tensors t that `of` admits.
    Returns whether anything folded."""
    changed = False
    for node in list(graph.nodes):
        if len(node.outputs) != 1 or not isinstance(node.outputs[0], gs.Variable):
            continue
        value = None
        if node.op == "Shape" and len(node.inputs) == 1 and of(node.inputs[0]):
            dims = _known_dims(node.inputs[0])
            if dims is not None and None not in (picked := _shape_output(node, dims)):
                value = np.array(picked, dtype=np.int64)
        elif node.op in ("Gather", "Slice") and node.inputs:
            source = producer(node.inputs[0])
            if (source is not None and source.op == "Shape" and len(source.inputs) == 1
                    and of(source.inputs[0])):
                dims = _known_dims(source.inputs[0])
                if dims is not None:
                    value = _picked_dims(node, _shape_output(source, dims))
        if value is not None:
            out = node.outputs[0]
            node.outputs.clear()
            out.to_constant(value)
            changed = True
    return changed


def fold_shapes_of_weights(graph: gs.Graph) -> bool:
    """Shape(weight) -> the weight's dims. onnx-graphsurgeon leaves a Shape of a constant to
    its onnxruntime pass, which then serializes the weight itself: for the dynamo exporter's
    Shape(W) -> Expand zero biases, a copy of every weight (seconds and GB on a large model)."""
    return _fold_shapes(graph, lambda t: isinstance(t, gs.Constant))


def fold_static_shapes(graph: gs.Graph) -> bool:
    """Shape arithmetic on static dims, of weights and of computed tensors alike (their shapes
    inferred from the graph inputs alone, see `trusted_output_shapes`); onnx-graphsurgeon's own
    shape folding ignores Shape's start/end and is not used."""
    return _fold_shapes(graph, lambda t: True)


def _become(tensor: gs.Tensor, value: gs.Constant) -> None:
    """Make a computed tensor the constant `value` (an unread proto stays one: a type numpy
    lacks is not cast); its producer gives it up."""
    proto = gs_bridge.lazy_proto(value)
    tensor.inputs.clear()
    tensor.to_constant(value.values if proto is None else np.zeros((0,), np.float32))
    if proto is not None:
        gs_bridge.set_lazy_proto(tensor, proto)


# Constant-node attributes and the type of their value (onnx-graphsurgeon's own lowering makes
# float64 of value_float(s), which then no longer matches the float32 that reads it)
_CONSTANT_ATTRS = {"value_float": np.float32, "value_floats": np.float32,
                   "value_int": np.int64, "value_ints": np.int64}


def lower_constant_nodes(graph: gs.Graph) -> None:
    """A Constant node whose value is a tensor or a number (list) becomes that constant."""
    for node in graph.nodes:
        if node.op != "Constant" or len(node.attrs) != 1 or len(node.outputs) != 1:
            continue
        (name, attr), = node.attrs.items()
        if name == "value" and isinstance(attr, gs.Constant):
            _become(node.outputs[0], attr)
        elif name in _CONSTANT_ATTRS and isinstance(attr, (int, float, list, tuple)):
            value = np.array(attr, dtype=_CONSTANT_ATTRS[name])
            _become(node.outputs[0], gs.Constant(node.outputs[0].name, value))


def _never_fold(node: gs.Node) -> bool:
    """A random op, or a node whose subgraphs hold one: its value changes at every run."""
    if node.op in RANDOM_OPS:
        return True
    return any(isinstance(v, gs.Graph) and any(_never_fold(n) for n in v.nodes)
               for v in node.attrs.values())


def _nbytes(tensor: gs.Constant) -> int:
    proto = gs_bridge.lazy_proto(tensor)
    if proto is not None:
        return payload_bytes(proto) or 0
    return int(np.asarray(tensor.values).nbytes)


def _nonfinite(values: object) -> bool:
    """Does a float array hold an inf or a NaN? (False for other dtypes, unread protos)."""
    if not isinstance(values, np.ndarray):
        return False
    try:
        floating = np.issubdtype(values.dtype, np.floating) or values.dtype.kind == "c"
    except TypeError:
        return False
    return bool(floating and not np.all(np.isfinite(values)))


class _Fold:
    """One tensor that onnx-graphsurgeon computed on the copy: the nodes that compute it in
    the graph (walked back to constants and other computed tensors) and those leaves."""

    def __init__(self, tensor: gs.Tensor, value: gs.Constant, computed: set[str]) -> None:
        self.tensor, self.value = tensor, value
        self.nodes: dict[int, gs.Node] = {}
        self.leaves: dict[int, gs.Tensor] = {}
        self.complete = True
        stack = list(tensor.inputs)
        while stack:
            node = stack.pop()
            if id(node) in self.nodes:
                continue
            self.nodes[id(node)] = node
            for t in node.inputs:
                if not t.name:
                    continue
                if isinstance(t, gs.Constant) or t.name in computed:
                    self.leaves[id(t)] = t
                elif (src := producer(t)) is not None:
                    stack.append(src)
                else:
                    self.complete = False  # not constant after all: never apply


def _stored(graph: gs.Graph, folds: list[_Fold]) -> list[_Fold]:
    """The folds of a group that would stay in the model: read by a node outside the group, or
    graph outputs (the others die with the nodes of the group)."""
    nodes = {k for f in folds for k in f.nodes}
    return [f for f in folds if is_graph_output(graph, f.tensor)
            or any(id(r) not in nodes for r in f.tensor.outputs)]


def _accepted(graph: gs.Graph, folds: list[_Fold], computed: dict[str, _Fold]) -> bool:
    """May these folds (one connected group) be applied? Only if they store no more new bytes
    than the weights that die with them free (or few bytes), and no inf or NaN that no weight
    they read holds."""
    if not all(f.complete for f in folds):
        return False
    nodes = {k: n for f in folds for k, n in f.nodes.items()}
    leaves = {k: t for f in folds for k, t in f.leaves.items()}
    stored = _stored(graph, folds)
    added = sum(_nbytes(f.value) for f in stored)
    freed = 0
    for leaf in leaves.values():
        if (isinstance(leaf, gs.Constant) and leaf.name not in computed
                and all(id(r) in nodes for r in leaf.outputs)
                and not is_graph_output(graph, leaf) and not is_graph_input(graph, leaf)):
            freed += _nbytes(leaf)
    for node in nodes.values():  # a Constant node dies with its value's fold
        if node.op == "Constant" and node.outputs and node.outputs[0].name in computed:
            freed += _nbytes(computed[node.outputs[0].name].value)
    if added > max(freed, _SMALL_FOLD_BYTES):
        log.debug("not folded (%d new bytes, %d freed): %s", added, freed,
                  [f.tensor.name for f in stored])
        return False
    overflows = any(gs_bridge.lazy_proto(f.value) is None and _nonfinite(f.value.values)
                    for f in stored)
    if overflows and not any(isinstance(t, gs.Constant) and t.name not in computed
                             and gs_bridge.lazy_proto(t) is None and _nonfinite(t.values)
                             for t in leaves.values()):
        log.debug("not folded (inf or NaN that no weight read holds): %s",
                  [f.tensor.name for f in stored])
        return False
    return True


def _groups(folds: list[_Fold]) -> list[list[_Fold]]:
    """Folds that share a node, or where one reads another, in one group. Folds that only
    read the same weight are not grouped: that weight then dies with neither of them, and each
    must pay for its own bytes."""
    parent = list(range(len(folds)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    by_tensor = {id(f.tensor): i for i, f in enumerate(folds)}
    for i, fold in enumerate(folds):
        for key in fold.nodes:
            parent[root(owner.setdefault(key, i))] = root(i)
        for key in fold.leaves:
            if key in by_tensor:
                parent[root(by_tensor[key])] = root(i)
    groups: dict[int, list[_Fold]] = {}
    for i, fold in enumerate(folds):
        groups.setdefault(root(i), []).append(fold)
    return list(groups.values())


def _may_fold(graph: gs.Graph, excluded: set[str]) -> bool:
    """Is there a node that onnx-graphsurgeon could fold (all inputs constant)?"""
    constant = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    for node in graph.nodes:
        if node.name in excluded or _never_fold(node):
            continue
        if node.op == "Constant" or all(t.name in constant for t in node.inputs if t.name):
            return True
    return False


def _fold_round(graph: gs.Graph, excluded: set[str]) -> tuple[int, set[str]]:
    """onnx-graphsurgeon folds a copy of the graph; the folds that `_accepted` passes are
    applied to the graph. A refused group gives up the tensors it would store (their nodes
    stay) and what remains of it is judged again: what the kept nodes read may still fold.
    Returns how many tensors became constants, and the nodes kept (excluded from the next
    rounds)."""
    if not _may_fold(graph, excluded):
        return 0, set()
    copy = graph.copy()
    copy.fold_constants(fold_shapes=False, recurse_subgraphs=False, recurse_functions=False,
                        flatten_subgraphs=False, error_ok=True,
                        should_exclude_node=lambda n: n.name in excluded or _never_fold(n))
    mine = graph.tensors()
    values = {name: t for name, t in copy.tensors().items()
              if isinstance(t, gs.Constant) and isinstance(mine.get(name), gs.Variable)}
    del copy
    names = set(values)
    computed = {name: _Fold(mine[name], value, names) for name, value in values.items()}
    pending = list(computed.values())
    kept: dict[int, gs.Node] = {}
    while True:
        refused = [g for g in _groups(pending) if not _accepted(graph, g, computed)]
        if not refused:
            break
        for group in refused:
            for fold in _stored(graph, group) or group:
                kept.update(fold.nodes)
        pending = [f for f in pending if not f.nodes.keys() & kept.keys()]
    applying = {id(f.tensor) for f in pending}
    applied = 0
    for fold in pending:
        src = producer(fold.tensor)
        if src is not None and any(id(o) not in applying and (o.outputs or is_graph_output(
                graph, o)) for o in src.outputs):
            continue  # the node stays for another output: its outputs keep their places
        _become(fold.tensor, fold.value)
        applied += 1
    return applied, {n.name for n in kept.values()} - excluded


def _flatten_constant_ifs(graph: gs.Graph) -> None:
    """An If with a constant condition becomes the branch it takes (onnx-graphsurgeon's
    flattening; nothing else folds in this call)."""
    if any(n.op == "If" and n.inputs and isinstance(n.inputs[0], gs.Constant)
           for n in graph.nodes):
        graph.fold_constants(fold_shapes=False, recurse_subgraphs=False, recurse_functions=False,
                             flatten_subgraphs=True, error_ok=True,
                             should_exclude_node=lambda n: True)


def _fold_scope(graph: gs.Graph, top: bool) -> None:
    excluded: set[str] = set()
    for _ in range(_MAX_FOLD_ROUNDS):
        lower_constant_nodes(graph)
        castlike_to_cast(graph)
        shapes = fold_static_shapes(graph)
        if top:
            graph.cleanup().toposort()
        applied, refused = _fold_round(graph, excluded)
        excluded |= refused
        if top:
            _flatten_constant_ifs(graph)
            graph.cleanup().toposort()
        if not (shapes or applied or refused):
            break


def fold_constants(graph: gs.Graph) -> None:
    """Fold until nothing more folds: the graph, then its subgraphs, then its functions."""
    _fold_scope(graph, top=True)
    for subgraph in list(graph.subgraphs(recursive=True)):
        _fold_scope(subgraph, top=False)
    for function in reversed(graph.functions):
        _fold_scope(function, top=False)
    graph.cleanup().toposort()


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
    with trusted_output_shapes(graph, output_shapes):
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
