"""Opset down-conversion, by onnxrep itself, for the ops fused models are made of
(docs/DESIGN.md, "Targets").

onnx's version_converter cannot take these models down (18 -> 13: no adapter below Relu-14,
Add-14, Div-14, Shape-15, BatchNormalization-15), so each op whose signature changed between
13 and 18 gets a converter here. An op is rewritten only when the rewrite is exact for every
input it admits; otherwise conversion stops with one line naming the op and the opset, and no
model is produced.

For a node whose schema differs between the model's opset and the target (onnx.defs):
  Add, Sub, Mul, Div (14), Relu (14), Pow (15), LeakyRelu, PRelu, Where (16), Identity (14,
      16): only types were added; kept when every input's dtype is allowed at the target.
  Reshape (14, allowzero): allowzero=0 is the older behaviour; allowzero=1 is dropped when
      the shape is a constant without a 0 (then the flag does not matter).
  Shape (15, start/end): Shape, then Slice(start, end) on axis 0 (both clamp alike).
  BatchNormalization (14, 15): inference mode only (training_mode 0, one output), all five
      inputs of one dtype (BatchNormalization-9 has a single type).
  ReduceMean, ReduceMax, ReduceMin, ReduceProd, ReduceL1, ReduceL2, ReduceLogSum,
      ReduceLogSumExp, ReduceSumSquare (18, axes input): a constant axes input becomes the
      attribute; no or empty axes reduce every axis (the older default) unless
      noop_with_empty_axes=1, which is an Identity. ReduceSum has had the input since 13.
  Pad (18, axes input): a constant axes is folded into full-rank constant pads.
  Split (18, num_outputs): the part sizes become the split input (a static axis length is
      needed: the last part may be smaller).
  Resize (18): kept when antialias=0, no axes and keep_aspect_ratio_policy=stretch.
  ScatterND (16, 18): kept when reduction is none.
  HardSwish (14): HardSigmoid(alpha=1/6, beta=1/2) then Mul, its definition.
  CastLike (15): Cast to the (known) dtype of its second input.
Anything else whose schema changed (LayerNormalization, GroupNormalization, Trilu, Mish ...)
is refused. A model with subgraphs or local functions is refused as a whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxrep.errors import OnnxrepError
from onnxrep.graph import inferred_types
from onnxrep.io import inline_constants

DEFAULT_DOMAINS = ("", "ai.onnx")
INT64_MAX = np.iinfo(np.int64).max


class Unconvertible(OnnxrepError):
    """An op that has no exact form at the target opset."""


def model_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    raise OnnxrepError("the model imports no ai.onnx opset")


def schema_version(op: str, opset: int) -> int | None:
    """The since_version of `op` at `opset`, or None when the op does not exist there."""
    try:
        return onnx.defs.get_schema(op, opset).since_version
    except onnx.defs.SchemaError:
        return None


@dataclass
class _Context:
    """What a converter may read about the model, and the initializers it adds."""

    target: int
    constants: dict[str, np.ndarray]
    types: dict[str, int]  # tensor name -> onnx elem_type
    dims: dict[str, list[int | str | None]]
    names: set[str]
    added: list[onnx.TensorProto] = field(default_factory=list)

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def add_constant(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.added.append(numpy_helper.from_array(value, name))
        self.constants[name] = value
        self.types[name] = self.added[-1].data_type
        self.dims[name] = list(value.shape)
        return name


Converter = Callable[[onnx.NodeProto, _Context], list[onnx.NodeProto]]


def _refuse(node: onnx.NodeProto, ctx: _Context, why: str) -> Unconvertible:
    return Unconvertible(f"cannot convert {node.op_type} node '{node.name}' to opset "
                         f"{ctx.target} exactly: {why}")


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _drop_attrs(node: onnx.NodeProto, *names: str) -> None:
    keep = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(keep)


def _same(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """Only types were added at the newer version: the generic type check decides."""
    return [node]


def _reshape(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    if _attr(node, "allowzero", 0):
        shape = ctx.constant(node.input[1])
        if shape is None or (shape == 0).any():
            raise _refuse(node, ctx, "allowzero=1 with a shape that is not a constant free "
                                     "of 0")
    _drop_attrs(node, "allowzero")
    return [node]


def _shape(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    _drop_attrs(node, "start", "end")
    if start == 0 and end is None:
        return [node]
    full = ctx.fresh(node.output[0] + "_full")
    ctx.types[full] = onnx.TensorProto.INT64
    out = node.output[0]
    node.output[0] = full
    starts = ctx.add_constant(out + "_start", np.array([start], np.int64))
    ends = ctx.add_constant(out + "_end", np.array([INT64_MAX if end is None else end],
                                                   np.int64))
    axes = ctx.add_constant(out + "_axes", np.array([0], np.int64))
    return [node, onnx.helper.make_node("Slice", [full, starts, ends, axes], [out],
                                        name=ctx.fresh(node.name + "_slice"))]


def _batchnorm(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    if _attr(node, "training_mode", 0):
        raise _refuse(node, ctx, "training_mode=1")
    if any(node.output[1:]):
        raise _refuse(node, ctx, "its running statistics outputs are used")
    dtypes = {ctx.types.get(t) for t in node.input}
    if len(dtypes) != 1 or None in dtypes:
        raise _refuse(node, ctx, "its inputs are not all of one known dtype")
    _drop_attrs(node, "training_mode")
    del node.output[1:]
    return [node]


def _reduce(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    axes_name = node.input[1] if len(node.input) > 1 else ""
    axes = ctx.constant(axes_name) if axes_name else np.zeros(0, np.int64)
    if axes is None:
        raise _refuse(node, ctx, "its axes are not a constant")
    noop = _attr(node, "noop_with_empty_axes", 0)
    _drop_attrs(node, "noop_with_empty_axes")
    del node.input[1:]
    if axes.size == 0:
        if noop:  # reduces nothing
            return [onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                          name=node.name)]
        return [node]  # every axis: the older default
    node.attribute.append(onnx.helper.make_attribute("axes", [int(a) for a in axes]))
    return [node]


def _pad(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    axes_name = node.input[3] if len(node.input) > 3 else ""
    if not axes_name:
        del node.input[3:]
        return [node]
    axes, pads = ctx.constant(axes_name), ctx.constant(node.input[1])
    rank = len(ctx.dims.get(node.input[0]) or []) if node.input[0] in ctx.dims else None
    if axes is None or pads is None or rank is None:
        raise _refuse(node, ctx, "its axes and pads are not constants of a known rank")
    full = np.zeros(2 * rank, np.int64)
    k = len(axes)
    for i, axis in enumerate(int(a) % rank for a in axes):
        full[axis], full[rank + axis] = pads[i], pads[k + i]
    node.input[1] = ctx.add_constant(node.output[0] + "_pads", full)
    del node.input[3:]
    return [node]


def _split(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    parts = _attr(node, "num_outputs", None)
    _drop_attrs(node, "num_outputs")
    if parts is None or (len(node.input) > 1 and node.input[1]):
        return [node]
    dims = ctx.dims.get(node.input[0])
    axis = int(_attr(node, "axis", 0))
    length = dims[axis] if dims and -len(dims) <= axis < len(dims) else None
    if not isinstance(length, int):
        raise _refuse(node, ctx, "num_outputs on an axis of unknown length")
    size = -(-length // parts)  # ceil: the last part takes what is left
    sizes = [min(size, length - i * size) for i in range(parts)]
    if any(s <= 0 for s in sizes):
        raise _refuse(node, ctx, f"{parts} outputs do not split a length of {length}")
    split = ctx.add_constant(node.output[0] + "_split", np.array(sizes, np.int64))
    del node.input[1:]
    node.input.append(split)
    return [node]


def _resize(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    if (_attr(node, "antialias", 0) or _attr(node, "axes", None) is not None
            or _attr(node, "keep_aspect_ratio_policy", b"stretch") not in (b"stretch",
                                                                          "stretch")):
        raise _refuse(node, ctx, "antialias, axes or keep_aspect_ratio_policy is set")
    _drop_attrs(node, "antialias", "axes", "keep_aspect_ratio_policy")
    return [node]


def _scatter_nd(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    if _attr(node, "reduction", b"none") not in (b"none", "none"):
        raise _refuse(node, ctx, "a reduction is set")
    _drop_attrs(node, "reduction")
    return [node]


def _hard_swish(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    gate = ctx.fresh(node.output[0] + "_gate")
    if node.input[0] in ctx.types:
        ctx.types[gate] = ctx.types[node.input[0]]
    return [onnx.helper.make_node("HardSigmoid", [node.input[0]], [gate],
                                  name=ctx.fresh(node.name + "_gate"), alpha=1.0 / 6, beta=0.5),
            onnx.helper.make_node("Mul", [node.input[0], gate], [node.output[0]],
                                  name=node.name)]


def _cast_like(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    to = ctx.types.get(node.input[1])
    if to is None:
        raise _refuse(node, ctx, "the dtype of its target_type input is unknown")
    return [onnx.helper.make_node("Cast", [node.input[0]], node.output, name=node.name, to=to)]


_REDUCE_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
CONVERTERS: dict[str, Converter] = {
    **{op: _same for op in ("Add", "Sub", "Mul", "Div", "Relu", "Pow", "LeakyRelu", "PRelu",
                            "Where", "Identity")},
    **{op: _reduce for op in _REDUCE_18},
    "Reshape": _reshape,
    "Shape": _shape,
    "BatchNormalization": _batchnorm,
    "Pad": _pad,
    "Split": _split,
    "Resize": _resize,
    "ScatterND": _scatter_nd,
    "HardSwish": _hard_swish,
    "CastLike": _cast_like,
}


def _check_against_schema(node: onnx.NodeProto, ctx: _Context) -> None:
    """The node as it stands is valid at the target: known attributes, no extra inputs, every
    input's dtype allowed by the target schema (a dtype added later has no older kernel)."""
    if node.domain not in DEFAULT_DOMAINS:
        return
    if schema_version(node.op_type, ctx.target) is None:
        raise _refuse(node, ctx, f"{node.op_type} does not exist before opset "
                                 f"{_first_version(node.op_type)}")
    schema = onnx.defs.get_schema(node.op_type, ctx.target)
    extra = [a.name for a in node.attribute if a.name not in schema.attributes]
    if extra:
        raise _refuse(node, ctx, f"attribute {extra[0]} does not exist at this opset")
    formal = list(schema.inputs)
    variadic = bool(formal) and (formal[-1].option
                                 == onnx.defs.OpSchema.FormalParameterOption.Variadic)
    if len(node.input) > len(formal) and not variadic:
        raise _refuse(node, ctx, "it has more inputs than this opset allows")
    allowed = {t.type_param_str: set(t.allowed_type_strs) for t in schema.type_constraints}
    for i, name in enumerate(node.input):
        if not name:
            continue
        param = formal[min(i, len(formal) - 1)]
        types = allowed.get(param.type_str, {param.type_str})
        dtype = ctx.types.get(name)
        if dtype is None:
            raise _refuse(node, ctx, f"the dtype of input '{name}' is unknown")
        text = f"tensor({onnx.TensorProto.DataType.Name(dtype).lower()})"
        if text not in types:
            raise _refuse(node, ctx, f"input '{name}' is {text[7:-1]}, not allowed at this "
                                     "opset")


def _first_version(op: str) -> int:
    return onnx.defs.get_schema(op).since_version if onnx.defs.has(op) else 0


def tensor_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    """name -> onnx elem_type, and name -> dims (int, or a str / None for a symbolic or unknown
    dim) of every tensor onnx shape inference types from the graph inputs (the declared shapes
    of the outputs are not trusted: graph.inferred_types), the initializers and Constants."""
    value_info, output_dims = inferred_types(model)
    types: dict[str, int] = {}
    dims: dict[str, list] = {}
    g = model.graph
    declared_outputs = {o.name for o in g.output}
    for vi in [*value_info, *g.input, *g.output]:
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            if tt.elem_type:
                types[vi.name] = tt.elem_type
            if tt.HasField("shape") and vi.name not in declared_outputs:
                dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in tt.shape.dim]
    dims.update({name: d for name, d in output_dims.items() if d is not None})
    for t in g.initializer:
        types[t.name] = t.data_type
        dims[t.name] = list(t.dims)
    for node in g.node:
        if node.op_type == "Constant":
            value = _attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                types[node.output[0]] = value.data_type
                dims[node.output[0]] = list(value.dims)
    return types, dims


def convert(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A copy of `model` at ai.onnx opset `opset` (<= the model's): every node rewritten
    exactly, or an OnnxrepError (Unconvertible) naming the op and the opset. Large weights may
    be placeholders without bytes (a SplitModel's proto): they are only passed along."""
    current = model_opset(model)
    if opset > current:
        raise OnnxrepError(f"--opset {opset}: the model is at opset {current}; onnxrep only "
                           "converts down")
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    if opset == current:
        return converted
    if model.functions:
        raise Unconvertible(f"cannot convert to opset {opset}: the model has local functions")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in model.graph.node for a in n.attribute):
        raise Unconvertible(f"cannot convert to opset {opset}: the model has subgraphs")
    types, dims = tensor_types(model)
    names = {t.name for t in model.graph.initializer} | {n.name for n in model.graph.node}
    names |= {o for n in model.graph.node for o in [*n.input, *n.output]}
    ctx = _Context(opset, inline_constants(model), types, dims, names)
    nodes: list[onnx.NodeProto] = []
    for original in model.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        if node.domain not in DEFAULT_DOMAINS:
            nodes.append(node)
            continue
        if schema_version(node.op_type, current) != schema_version(node.op_type, opset):
            convert_node = CONVERTERS.get(node.op_type)
            if convert_node is None:
                raise _refuse(node, ctx, f"onnxrep has no conversion for {node.op_type}-"
                                         f"{schema_version(node.op_type, current)}")
            replacement = convert_node(node, ctx)
            for new in replacement:
                _check_against_schema(new, ctx)
        else:  # the same schema at both opsets
            replacement = [node]
        nodes.extend(replacement)
    del converted.graph.node[:]
    converted.graph.node.extend(nodes)
    converted.graph.initializer.extend(ctx.added)
    _drop_dead_constants(converted, model)
    for entry in converted.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            entry.version = opset
    del converted.graph.value_info[:]  # stale after rewrites; onnx infers it again
    return converted


def _drop_dead_constants(model: onnx.ModelProto, before: onnx.ModelProto) -> None:
    """Initializers and Constant nodes that conversion left unread (an axes input that became
    an attribute). Graph inputs and outputs keep theirs."""
    def read(m: onnx.ModelProto) -> set[str]:
        return {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}

    dead = read(before) - read(model) - {i.name for i in model.graph.input}
    if not dead:
        return
    keep = [t for t in model.graph.initializer if t.name not in dead]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in dead)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
