"""Graph changes: fresh names, new nodes, rewiring. Only the engine and normalize change a
graph, so only they import this module; rules describe their rewrites (onnxrep.rule) and read
the graph through onnxrep.query.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.query import is_graph_input, is_graph_output, producer
# TRANSITION: re-exports for rule files not yet on the new contract (removed when all are)
from onnxrep.query import constant_value, conv_attrs, conv_weight_bias  # noqa: F401, E402


def _fresh(taken: Container[str], base: str) -> str:
    """`base`, or `base_2`, `base_3`, ... : the first name not in `taken`."""
    if base not in taken:
        return base
    i = 2
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def fresh_namer(taken: Iterable[str]) -> Callable[[str], str]:
    """A function giving `base` or `base_2`, ... : names not in `taken` nor given before."""
    used = set(taken)

    def fresh(base: str) -> str:
        name = _fresh(used, base)
        used.add(name)
        return name

    return fresh


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
