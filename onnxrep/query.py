"""Read-only questions about a graph: what rules, facts and the engine ask of it.

Nothing here changes the graph (graph changes live in `onnxrep.surgery`, which only the engine
and normalize use). Each small decoding job - an attribute that onnx may hand over as bytes,
an optional input that may be absent - is written once, here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


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


def conv_weight_bias(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight and bias (None when the Conv has none) of a Conv with constant parameters."""
    return constant_value(node.inputs[1]), constant_value(optional_input(node, 2))
