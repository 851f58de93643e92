"""The local check of one rewrite, before the engine applies it (docs/DESIGN.md, "Verification").

The nodes a Replacement removes and the nodes it adds are each cut out as a small model on the
same boundary: the tensors of the graph they read (inputs) and the tensors the new nodes take
over (outputs), with the constants they read as initializers. Both run on onnxruntime on the
same random inputs at several sizes and in several value regimes; a difference past the dtype's
tolerance refuses the rewrite, naming the rule, so a rule bug costs one fusion, not a wrong
model. It is cheap: one block, at small sizes where the model leaves sizes free.

Shapes as inputs: an integer boundary input computed from Shape nodes (batchwise's
shape_subgraph: a Reshape's target built from Shape(x)) joins both sides with its
computation, and the tensors the Shape nodes read become boundary inputs instead.

Values: a boundary input the rule proved non-negative upstream (the precondition of residual
removal, `Replacement.nonnegative_inputs`) gets the absolute values of each regime: the block
is only claimed equal on the inputs it can receive.

Sizes: a block made only of ops that compute the same map at every size (convolutions with
explicit pads, BatchNormalization, element-wise arithmetic, pools, Gemm/MatMul, channel
Concat) is checked at small sizes whatever sizes the model fixes: its border cases and both
parities occur there, and a 224x224 layer would cost a full-size run per regime. Otherwise a
boundary dimension that is static in the graph keeps its value; a symbolic (or unknown) one
is free: batch (axis 0) takes 1 and 2, spatial axes (2 and up of a rank >= 3
tensor) take sizes of both parities (stride-2 alignment differs with the parity), the same
value for the same axis on every boundary input - and first, where one input's static dims
fix a size another leaves free, that size. A size at which the *removed* block does not
run is not one the model admits there: it is skipped. When no size runs, or the block cannot
be cut out (a subgraph attribute, a non-float input other than a shape computation, an
unknown-rank input, a custom domain), the
rewrite is applied unchecked and the report says why; the whole-model verification still runs.

This is sampling, not a proof: a rewrite that is wrong only at sizes or values not tried here
gets through to the whole-model check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxrep.batchwise import shape_subgraph
from onnxrep.errors import first_line
from onnxrep.graph import shape_probe
from onnxrep.io import payload_bytes
from onnxrep.query import attr_str
from onnxrep.rule import NewNode, NewValue, NewWeight, Refusal, Replacement
from onnxrep.verify import REGIMES, compare_outputs, random_tensor, regime_scale, session

_LIGHT_BYTES = 4096  # shape inference reads the dims of weights larger than this, not bytes
# (batch, spatial size per spatial axis): odd and even sizes, batch 1 and 2
_SIZES = ((1, (9, 8)), (2, (12, 13)), (1, (17, 16)))
_MAX_ELEMENTS = 1 << 22  # a boundary input larger than this (static sizes): one regime only
# a block whose new weights hold more than this many values (a 2560-channel 3x3 conv: 59M)
# runs at the first two sizes only, which already cover both parities and batch 2
_HEAVY_WEIGHTS = 1 << 20


class Unchecked(Exception):
    """The block cannot be cut out or run: the rewrite goes unchecked (the reason says why)."""


@dataclass
class LocalCheck:
    passed: bool
    runs: int  # comparisons made
    detail: str  # what was checked, or what failed, or why nothing was
    # shapes onnx infers for the replacement's new values (id of the NewValue -> dims), so
    # that a later rewrite reading one can cut its own block out
    shapes: dict[int, list[int | str | None]] = field(default_factory=dict)


def _attribute(name: str, value: object) -> onnx.AttributeProto:
    if isinstance(value, gs.Constant):
        return helper.make_attribute(name, numpy_helper.from_array(np.asarray(value.values)))
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    if isinstance(value, gs.Graph | gs.Tensor) or (
            isinstance(value, list | tuple) and not value):
        raise Unchecked(f"attribute {name} cannot be copied into a block")
    return helper.make_attribute(name, value)


class _Block:
    """Builds the two models on one boundary, naming new values apart from the graph's."""

    def __init__(self, graph: gs.Graph, replacement: Replacement) -> None:
        self.graph, self.replacement = graph, replacement
        removed = {id(n) for n in replacement.removes}
        self.outputs = [t for n in replacement.nodes for t in n.outputs
                        if isinstance(t, gs.Tensor)]
        self.inputs: list[gs.Variable] = []
        self.constants: dict[str, gs.Constant] = {}
        seen: set[int] = set()
        taken_over = {id(t) for t in self.outputs}
        readers = [t for n in replacement.removes for t in n.inputs] + [
            t for n in replacement.nodes for t in n.inputs if isinstance(t, gs.Tensor)]
        for t in readers:
            if t is None or not t.name or id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(t, gs.Constant):
                self.constants[t.name] = t
            elif not any(id(p) in removed for p in t.inputs) or (
                    id(t) in taken_over and not t.inputs):
                self.inputs.append(t)
        self.names: dict[int, str] = {}
        self.weights: list[onnx.TensorProto] = []
        self.prefix: list[gs.Node] = []  # shape computations both sides run first
        self._pull_shape_computations()

    def _pull_shape_computations(self) -> None:
        """An integer boundary input computed from shapes (a Reshape's target built from
        Shape(x): the dynamo export's views) cannot take random values: its computation
        joins both sides of the block, and the tensors its Shape nodes read become inputs
        (their dims follow the sizes tried, so the target follows them as in the model)."""
        inputs: list[gs.Tensor] = []
        for t in self.inputs:
            if np.dtype(t.dtype or np.float32).kind == "f":
                inputs.append(t)
                continue
            found = shape_subgraph(t)
            if isinstance(found, Refusal):
                raise Unchecked(f"{t.name} is not floating point")
            order, sources = found
            known = {id(n) for n in self.prefix}
            for n in order:
                if id(n) not in known:
                    self.prefix.append(n)
                for i in n.inputs:
                    if isinstance(i, gs.Constant):
                        self.constants[i.name] = i
            for source in sources:
                if isinstance(source, gs.Constant):
                    self.constants[source.name] = source
                elif np.dtype(source.dtype or np.float32).kind != "f":
                    raise Unchecked(f"{t.name} is not floating point")
                else:
                    inputs.append(source)
        unique: dict[int, gs.Tensor] = {}
        for t in inputs:
            unique.setdefault(id(t), t)
        self.inputs = list(unique.values())

    def name_of(self, t: object) -> str:
        if isinstance(t, gs.Tensor):
            return t.name
        if id(t) not in self.names:
            hint = t.hint if isinstance(t, NewValue | NewWeight) else "t"
            self.names[id(t)] = f"__local{len(self.names)}__{hint}"
            if isinstance(t, NewWeight):
                self.weights.append(numpy_helper.from_array(np.asarray(t.values),
                                                            self.names[id(t)]))
        return self.names[id(t)]

    def _opsets(self, domains: set[str]) -> list[onnx.OperatorSetIdProto]:
        if domains - {"", "ai.onnx"}:
            raise Unchecked(f"nodes of domain {sorted(domains - {'', 'ai.onnx'})}")
        return [helper.make_opsetid("", int(self.graph.opset))]

    def model(self, nodes: list[onnx.NodeProto], weights: list[onnx.TensorProto],
              dims: dict[str, list[int | str | None]]) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info(t.name, _elem_type(t), dims[t.name])
                  for t in self.inputs]
        like = self.inputs[0] if self.inputs else None
        outputs = [helper.make_tensor_value_info(
            t.name, _elem_type(t if t.dtype is not None or like is None else like), None)
            for t in self.outputs]
        constants = [numpy_helper.from_array(np.asarray(c.values), name)
                     for name, c in self.constants.items()]
        graph = helper.make_graph(nodes, "block", inputs, outputs, constants + weights)
        model = helper.make_model(graph, opset_imports=self._opsets({n.domain for n in nodes}))
        model.ir_version = min(model.ir_version, 10)
        return model

    @staticmethod
    def _protos(nodes: list[gs.Node]) -> list[onnx.NodeProto]:
        return _with_attrs([helper.make_node(
            n.op, [t.name if t is not None else "" for t in n.inputs],
            [t.name for t in n.outputs], name=n.name or n.op, domain=n.domain or "")
            for n in nodes], nodes)

    def before(self) -> list[onnx.NodeProto]:
        return self._protos([*self.prefix, *self.replacement.removes])

    def after(self) -> list[onnx.NodeProto]:
        return self._protos(self.prefix) + [self._new_node(n) for n in self.replacement.nodes]

    def _new_node(self, n: NewNode) -> onnx.NodeProto:
        node = helper.make_node(n.op, [self.name_of(t) for t in n.inputs],
                                [self.name_of(t) for t in n.outputs], name=n.name)
        node.attribute.extend(_attribute(k, v) for k, v in n.attrs.items())
        return node


def _elem_type(t: gs.Tensor) -> int:
    if t.dtype is None:
        raise Unchecked(f"the dtype of {t.name} is unknown")
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    except (TypeError, KeyError, ValueError) as exc:
        raise Unchecked(f"{t.name} has dtype {t.dtype}") from exc


def _with_attrs(protos: list[onnx.NodeProto], nodes: list[gs.Node]) -> list[onnx.NodeProto]:
    for proto, node in zip(protos, nodes, strict=True):
        proto.attribute.extend(_attribute(k, v) for k, v in node.attrs.items())
    return protos


def _sizes(inputs: list[gs.Variable]) -> list[tuple[int, tuple[int, ...]]]:
    """The (batch, spatial sizes) to try: `_SIZES`, and first - when some boundary input fixes
    a batch or spatial size that another leaves free (shape inference lost the link, e.g.
    behind an Expand) - the sizes the static dims say, for every input."""
    batch, spatial = None, {}
    for t in inputs:
        for axis, d in enumerate(t.shape or []):
            if isinstance(d, int) and d > 0:
                if axis == 0:
                    batch = batch or int(d)
                elif len(t.shape) >= 3 and axis >= 2:
                    spatial.setdefault(axis - 2, int(d))
    sizes = list(_SIZES)
    if batch is not None or spatial:
        default = _SIZES[0][1]
        rank = max(spatial, default=len(default) - 1) + 1
        anchored = (batch or 1, tuple(spatial.get(a, default[a] if a < len(default) else 8)
                                      for a in range(max(rank, len(default)))))
        sizes.insert(0, anchored)
    return sizes


def _concrete(t: gs.Variable, batch: int, spatial: tuple[int, ...],
              free: bool = False) -> list[int]:
    """`t`'s dims at (batch, spatial): static dims kept - unless `free` (a size-agnostic
    block), where only the channel / feature dims are."""
    if t.shape is None:
        raise Unchecked(f"the shape of {t.name} is unknown")
    rank = len(t.shape)
    dims = []
    for axis, d in enumerate(t.shape):
        spatial_axis = rank >= 3 and axis >= 2 and axis - 2 < len(spatial)
        if isinstance(d, int) and d > 0 and not (free and (axis == 0 or spatial_axis)):
            dims.append(int(d))
        elif axis == 0:
            dims.append(batch)
        elif spatial_axis:
            dims.append(spatial[axis - 2])
        else:
            raise Unchecked(f"{t.name} has a free dimension at axis {axis}")
    return dims


# Ops that compute the same map at every batch and spatial size (per position, per channel,
# or a sliding window with explicit pads): a block of these alone is checked at small sizes
# even where the model fixes a large one - the border cases and both parities occur there,
# and the interior is the interior.
_SIZE_AGNOSTIC = frozenset({
    "Conv", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Max", "Min",
    "Sigmoid", "AveragePool", "MaxPool", "Gemm", "MatMul", "Identity",
})


def _size_agnostic(node: gs.Node | NewNode) -> bool:
    if attr_str(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False  # SAME_* pads depend on the size
    return node.op in _SIZE_AGNOSTIC or (
        node.op == "Concat" and int(node.attrs.get("axis", 0)) in (1, -3))


def check(graph: gs.Graph, replacement: Replacement, seed: int = 0) -> LocalCheck:
    """Compare the removed block with its replacement on onnxruntime (see the module doc)."""
    try:
        block = _Block(graph, replacement)  # Unchecked for a non-float input (not a shape)
        before_nodes = block.before()
        after_nodes = block.after()
        symbolic = {t.name: list(t.shape) if t.shape is not None else None for t in block.inputs}
        plans = []
        free = all(_size_agnostic(n) for n in [*replacement.removes, *replacement.nodes])
        heavy = sum(np.asarray(w.values).size for n in replacement.nodes for w in n.inputs
                    if isinstance(w, NewWeight)) > _HEAVY_WEIGHTS
        candidates = _SIZES if free else _sizes(block.inputs)
        for batch, spatial in candidates[:2] if heavy else candidates:
            dims = {t.name: _concrete(t, batch, spatial, free) for t in block.inputs}
            if any(dims == p for p, _ in plans):
                continue
            big = any(int(np.prod(d)) > _MAX_ELEMENTS for d in dims.values())
            # every value regime at the first size, standard normal at the others (as the
            # whole-model verification does)
            plans.append((dims, REGIMES if not plans and not big else REGIMES[:1]))
        # the sessions declare the dims they will be fed at as free; shape inference for the
        # new values keeps the graph's own dims
        declared = {name: [None if free and (axis == 0 or (len(d) >= 3 and axis >= 2)) else x
                           for axis, x in enumerate(d)] if d is not None else None
                    for name, d in symbolic.items()}
        before = session(block.model(before_nodes, [], declared))
        after = session(block.model(after_nodes, block.weights, declared))
        shapes = _new_value_shapes(block, block.model(after_nodes, block.weights, symbolic))
    except Unchecked as exc:
        return LocalCheck(True, 0, f"not checked: {exc}")
    except Exception as exc:  # noqa: BLE001 - a block onnxruntime will not load as cut out
        return LocalCheck(True, 0, f"not checked: {first_line(exc)}")

    names = [t.name for t in block.outputs]
    runs, sizes = 0, []
    for k, (dims, regimes) in enumerate(plans):
        for j, regime in enumerate(regimes):
            rng = np.random.default_rng(seed + 31 * k + j)
            feeds = {t.name: random_tensor(rng, _ort_type(t), dims[t.name], regime)
                     for t in block.inputs}
            for t in replacement.nonnegative_inputs:  # a precondition proven upstream
                if t.name in feeds:
                    feeds[t.name] = np.abs(feeds[t.name])
            try:
                ref = before.run(None, feeds)
            except Exception:  # noqa: BLE001 - a size the block does not admit
                break
            try:
                new = after.run(None, feeds)
            except Exception as exc:  # noqa: BLE001 - the block runs here, its replacement must
                return LocalCheck(False, runs, f"the replacement fails at "
                                  f"{_text(dims)} where the block runs: {first_line(exc)}")
            runs += 1
            scale = max([regime_scale(regime, f.dtype) for f in feeds.values()], default=1.0)
            for diff in compare_outputs(names, ref, new, atol_scale=scale):
                if not diff.passed:
                    return LocalCheck(False, runs, f"{diff.name} differs at {_text(dims)}, "
                                      f"{regime} inputs: rel L2 {diff.rel_l2:.3g}, max|err| "
                                      f"{diff.max_abs:.3g}")
            if j == 0:
                sizes.append(_text(dims))
    if not runs:
        return LocalCheck(True, 0, "not checked: the block runs at none of the sizes tried",
                          shapes)
    return LocalCheck(True, runs, f"checked: {runs} runs at {'; '.join(sizes)}", shapes)


def _new_value_shapes(block: _Block, model: onnx.ModelProto) -> dict[int, list]:
    """onnx shape inference on the replacement block (symbolic boundary dims): the dims of
    each NewValue it computes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(
            shape_probe(model, lambda t: (payload_bytes(t) or 0) > _LIGHT_BYTES))
    except Exception:  # noqa: BLE001 - shapes are an aid to later checks, never required
        return {}
    found = {}
    for info in inferred.graph.value_info:
        shape = info.type.tensor_type.shape if info.type.tensor_type.HasField("shape") else None
        if shape is not None:
            found[info.name] = [d.dim_value if d.HasField("dim_value") else
                                (d.dim_param or None) for d in shape.dim]
    return {key: found[name] for key, name in block.names.items() if name in found}


def _ort_type(t: gs.Tensor) -> str:
    name = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
            np.dtype(np.float16): "float16"}.get(np.dtype(t.dtype))
    if name is None:
        raise Unchecked(f"{t.name} has dtype {t.dtype}")
    return f"tensor({name})"


def _text(dims: dict[str, list[int]]) -> str:
    return ", ".join(f"{k}{v}" for k, v in dims.items())


__all__ = ["LocalCheck", "check", "ort"]
