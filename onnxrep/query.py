"""Read-only questions about a graph: what rules, facts and the engine ask of it.

Nothing here changes the graph (graph changes live in `onnxrep.surgery`, which only the engine
and normalize use). Each small decoding job - an attribute that onnx may hand over as bytes,
an optional input that may be absent - is written once, here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.rule import Refusal


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or folded Constant), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs)


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input `index` of `node`, or None when it is absent (past the end, or an empty name:
    ONNX's way to skip an optional input)."""
    if index < len(node.inputs):
        tensor = node.inputs[index]
        if tensor is not None and tensor.name:
            return tensor
    return None


def data_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs that are present (optional ones skipped)."""
    return [t for t in node.inputs if t is not None and t.name]


def attr_str(node: gs.Node, name: str, default: str) -> str:
    """A string attribute (onnx may give it as bytes), or `default` when absent."""
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def attr_ints(node: gs.Node, name: str, default: list[int]) -> list[int]:
    return [int(v) for v in node.attrs.get(name, default)]


def conv_attrs(node: gs.Node) -> dict[str, Any]:
    """strides, pads [begins..., ends...], dilations and group of a Conv, with ONNX defaults.
    auto_pad=VALID pads nothing whatever the pads attribute says (onnxruntime ignores it)."""
    spatial = len(constant_value(node.inputs[1]).shape) - 2
    pads = attr_ints(node, "pads", [0] * (2 * spatial))
    if attr_str(node, "auto_pad", "NOTSET") == "VALID":
        pads = [0] * (2 * spatial)
    return {
        "strides": attr_ints(node, "strides", [1] * spatial),
        "pads": pads,
        "dilations": attr_ints(node, "dilations", [1] * spatial),
        "group": int(node.attrs.get("group", 1)),
    }


def reduce_axes(node: gs.Node) -> list[int] | None | Refusal:
    """The axes a Reduce* node lists (its constant input, else its attribute), None when it
    lists none; a Refusal when the input is not a constant."""
    given = optional_input(node, 1)
    if given is not None:
        value = constant_value(given)
        if value is None or value.dtype.kind not in "iu":
            return Refusal(f"{node.name} takes its axes from '{given.name}', not a constant "
                           "integer tensor")
        return [int(a) for a in np.ravel(value)]
    return attr_ints(node, "axes", []) if "axes" in node.attrs else None


def matmul_of_bias(add: gs.Node) -> tuple[gs.Node, gs.Tensor] | None:
    """Add(MatMul(x, W), bias) or Add(bias, MatMul(x, W)) -> (the MatMul, the bias tensor)."""
    if len(add.inputs) != 2:
        return None
    for i in (0, 1):
        mm = producer(add.inputs[i])
        if mm is not None and mm.op == "MatMul" and constant_value(add.inputs[1 - i]) is not None:
            return mm, add.inputs[1 - i]
    return None


def dims_of(tensor: gs.Tensor) -> list | None:
    """A tensor's inferred dims; for a GlobalAveragePool output without them (a pool that a
    rewrite wrote where shape inference saw no axes), its input's [N, C] and ones."""
    if tensor.shape is not None:
        return list(tensor.shape)
    pool = producer(tensor)
    if pool is not None and pool.op == "GlobalAveragePool" and pool.inputs[0].shape is not None:
        dims = list(pool.inputs[0].shape)
        return dims[:2] + [1] * (len(dims) - 2) if len(dims) >= 3 else None
    return None


def producers_first(nodes: list[gs.Node]) -> list[gs.Node]:
    """The nodes in an order where producers come first (the engine sorts the whole graph
    only at the end of a pass)."""
    inside = {id(n): n for n in nodes}
    done: set[int] = set()
    order: list[gs.Node] = []

    def visit(node: gs.Node) -> None:
        if id(node) in done:
            return
        done.add(id(node))
        for tensor in node.inputs:
            p = producer(tensor)
            if p is not None and id(p) in inside:
                visit(p)
        order.append(node)

    for node in nodes:
        visit(node)
    return order


def input_symbols(graph: gs.Graph) -> frozenset[str]:
    """The symbolic dim names of the graph inputs: the only names that prove two dims equal.
    onnx shape inference also invents names (unk__N), and has been seen to give one to dims
    of different sizes (the elements of an uneven split into a sequence)."""
    return frozenset(d for t in graph.inputs for d in (t.shape or []) if isinstance(d, str))


def conv_weight_bias(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight and bias (None when the Conv has none) of a Conv with constant parameters."""
    return constant_value(node.inputs[1]), constant_value(optional_input(node, 2))
