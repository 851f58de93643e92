"""Graph changes: fresh names, new nodes, rewiring. Only the engine and normalize change a
graph, so only they import this module; rules describe their rewrites (onnxrep.rule) and read
the graph through onnxrep.query.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

import onnx_graphsurgeon as gs

from onnxrep.query import is_graph_input, is_graph_output, producer


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
