"""Graph surgery shared by the rules: reading constants, fresh names, new nodes.

Rules call these; none of them knows about rules or the engine.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
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


def _fresh(taken: Container[str], base: str) -> str:
    """`base`, or `base_2`, `base_3`, ... : the first name not in `taken`."""
    if base not in taken:
        return base
    i = 2
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def fresh_node_name(graph: gs.Graph, base: str) -> str:
    return _fresh({n.name for n in graph.nodes}, base)


def fresh_tensor_name(graph: gs.Graph, base: str) -> str:
    return _fresh(graph.tensors().keys(), base)


def new_constant(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(fresh_tensor_name(graph, base), np.ascontiguousarray(values))


def new_variable(graph: gs.Graph, base: str, dtype: Any = None) -> gs.Variable:
    return gs.Variable(fresh_tensor_name(graph, base), dtype=dtype)


def add_node(
    graph: gs.Graph,
    op: str,
    name: str,
    inputs: Sequence[gs.Tensor],
    outputs: Sequence[gs.Tensor],
    attrs: dict[str, Any] | None = None,
) -> gs.Node:
    """Append a node; any previous producer of an output gives that output up."""
    for out in outputs:
        for old in list(out.inputs):
            detach_output(old, out)
    node = gs.Node(op=op, name=fresh_node_name(graph, name), attrs=dict(attrs or {}),
                   inputs=list(inputs), outputs=list(outputs))
    graph.nodes.append(node)
    return node


def detach_output(node: gs.Node, tensor: gs.Tensor) -> None:
    """`node` stops producing `tensor` (gs lists are synchronized: mutate them in place)."""
    for i in reversed(range(len(node.outputs))):
        if node.outputs[i] is tensor:
            del node.outputs[i]


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def redirect_consumers(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of `old` (nodes and graph outputs) read `new` instead."""
    for node in list(old.outputs):
        replace_input(node, old, new)
    for i, t in enumerate(graph.outputs):
        if t is old:
            graph.outputs[i] = new


def bypass(graph: gs.Graph, node: gs.Node, through: gs.Tensor) -> bool:
    """Remove a node whose output equals its input `through` (Identity, Add(t, 0), ...).

    The output keeps its name when it is a graph output: then the producer of `through`
    writes it directly. Returns False when the node cannot be removed without renaming a
    graph input or output (e.g. an Identity from a graph input to a graph output).
    """
    out = node.outputs[0]
    if is_graph_output(graph, out):
        src = producer(through)
        if src is None or is_graph_output(graph, through) or is_graph_input(graph, through):
            return False
        # The producer now writes `out`; other readers of `through` read `out`.
        for reader in list(through.outputs):
            if reader is not node:
                replace_input(reader, through, out)
        node.inputs.clear()
        node.outputs.clear()
        for i, t in enumerate(src.outputs):
            if t is through:
                src.outputs[i] = out
        return True
    redirect_consumers(graph, out, through)
    node.inputs.clear()
    node.outputs.clear()
    return True


def conv_attrs(node: gs.Node) -> dict[str, Any]:
    """strides, pads [begins..., ends...], dilations and group of a Conv, with ONNX defaults."""
    spatial = len(constant_value(node.inputs[1]).shape) - 2
    pads = list(node.attrs.get("pads", [0] * (2 * spatial)))
    return {
        "strides": list(node.attrs.get("strides", [1] * spatial)),
        "pads": [int(p) for p in pads],
        "dilations": list(node.attrs.get("dilations", [1] * spatial)),
        "group": int(node.attrs.get("group", 1)),
    }


def conv_weight_bias(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight and bias (None when the Conv has none) of a Conv with constant parameters."""
    weight = constant_value(node.inputs[1])
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        bias = constant_value(node.inputs[2])
    return weight, bias


def replace_with_conv(
    graph: gs.Graph,
    name: str,
    x: gs.Tensor,
    out: gs.Tensor,
    weight: np.ndarray,
    bias: np.ndarray,
    attrs: dict[str, Any],
    op: str = "Conv",
) -> gs.Node:
    """A new Conv (or ConvTranspose) on `x` that produces `out` (its old producer gives it up).
    The kernel_shape attribute is derived from the weight, never copied."""
    attrs = {k: v for k, v in attrs.items() if k != "kernel_shape"}
    attrs["kernel_shape"] = list(weight.shape[2:])
    w = new_constant(graph, f"{name}.weight", weight)
    b = new_constant(graph, f"{name}.bias", bias)
    return add_node(graph, op, name, [x, w, b], [out], attrs)


def retire(nodes: Sequence[gs.Node]) -> list[str]:
    """Disconnect nodes that a rewrite replaces (cleanup then drops them) and free their
    names, so the replacement can take the name of the node it stands for."""
    names = [n.name for n in nodes]
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
        node.name = ""
    return names
