"""Guarded constant folding, normalize's step 4 (docs/DESIGN.md, "The path of a model").

All-constant subgraphs (OREPA's weight computation, DBB's pad-value construction, dynamo's
Shape -> Expand -> CastLike zero biases) and Shape arithmetic on static dims fold.
onnx-graphsurgeon computes the values on a copy of the graph; a group of folds is applied only
if it does not grow the weights (it stores no more new bytes than the weights that die with
it, or at most _SMALL_FOLD_BYTES), does not create an inf or NaN that no weight it reads
holds, and never for a random op or what depends on it. Shapes are those inferred from the
graph inputs (graph.normalize sees to it): a declared static shape is never folded in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxrep import gs_bridge
from onnxrep.io import payload_bytes
from onnxrep.query import constant_value, is_graph_input, is_graph_output, optional_input, producer

log = logging.getLogger(__name__)

_MAX_FOLD_ROUNDS = 8

# Ops whose value is drawn anew at every run: never folded, nor anything computed from them
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Bernoulli", "Multinomial"})

# A fold may store this many new bytes even if no weight dies with it (shape arithmetic,
# small biases); past it, a fold must free at least as many weight bytes as it adds
_SMALL_FOLD_BYTES = 4096

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
    inferred from the graph inputs alone, see `graph.use_inferred_output_shapes`);
    onnx-graphsurgeon's own shape folding ignores Shape's start/end and is not used."""
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


