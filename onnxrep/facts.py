"""Shared preconditions. Each fact returns None when it holds, else the reason it fails.

Reasons name the tensor or node at fault, so that `--explain` and the report can say
exactly why a rule did not fire ("conv_3x3 output has 2 consumers").
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.surgery import constant_value, is_graph_output, producer


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor, consumer: gs.Node) -> str | None:
    """`tensor` is read by `consumer` alone, once, and is not a graph output."""
    if is_graph_output(graph, tensor):
        return f"{tensor.name} is a graph output"
    readers = list(tensor.outputs)
    if len(readers) != 1 or readers[0] is not consumer:
        return f"{tensor.name} has {len(readers)} consumers"
    if sum(1 for t in consumer.inputs if t is tensor) != 1:
        return f"{tensor.name} is read twice by {consumer.name}"
    return None


def is_const(tensor: gs.Tensor, what: str) -> str | None:
    if constant_value(tensor) is None:
        return f"{what} '{tensor.name}' is not a constant"
    return None


def float_const(tensor: gs.Tensor, what: str) -> str | None:
    value = constant_value(tensor)
    if value is None:
        return f"{what} '{tensor.name}' is not a constant"
    if value.dtype.kind != "f":
        return f"{what} '{tensor.name}' is {value.dtype}, not floating point"
    if not np.all(np.isfinite(value)):
        return f"{what} '{tensor.name}' holds inf or nan"
    return None


def channel_vector(
    value: np.ndarray, channels: int, rank: int, channel_axis: int = 1
) -> np.ndarray | None:
    """The per-channel vector [channels] that `value` broadcasts to along `channel_axis` of a
    rank-`rank` tensor, or None if it broadcasts along any other axis or widens the output
    (a [C] vector against NCHW scales W, not C: numpy aligns trailing axes)."""
    if value.ndim > rank:
        return None
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    for axis, size in enumerate(full.shape):
        if axis == channel_axis:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    return np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float64)


def batchnorm_affine(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """An inference BatchNormalization as y = a * x + c per channel, or the reason it is not."""
    if node.op != "BatchNormalization":
        return f"{node.name} is {node.op}, not BatchNormalization"
    if int(node.attrs.get("training_mode", 0)) != 0:
        return f"{node.name} has training_mode=1 (batch statistics, not a fixed affine map)"
    if len(node.outputs) > 1 and any(len(t.outputs) for t in node.outputs[1:]):
        return f"{node.name} outputs running statistics that are used"
    params = node.inputs[1:5]
    if len(params) != 4:
        return f"{node.name} has {len(params)} parameter inputs, expected 4"
    for tensor, what in zip(params, ("scale", "bias", "mean", "var"), strict=True):
        reason = float_const(tensor, f"{node.name} {what}")
        if reason:
            return reason
    from onnxrep.kernels import bn_affine  # local: facts stays importable without kernels

    gamma, beta, mean, var = (constant_value(t) for t in params)
    eps = float(node.attrs.get("epsilon", 1e-5))
    if np.any(var.astype(np.float64) + eps <= 0):
        return f"{node.name} has var + epsilon <= 0"
    return bn_affine(gamma, beta, mean, var, eps)


def conv_params(node: gs.Node) -> str | None:
    """A Conv / ConvTranspose whose weight (and bias, if any) are float constants, 2-D
    spatial, with explicit padding (auto_pad NOTSET or VALID)."""
    reason = float_const(node.inputs[1], f"{node.name} weight")
    if reason:
        return reason
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        reason = float_const(node.inputs[2], f"{node.name} bias")
        if reason:
            return reason
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        return f"{node.name} uses auto_pad={auto_pad}"
    return None


def produced_by(tensor: gs.Tensor, op: str) -> gs.Node | None:
    node = producer(tensor)
    return node if node is not None and node.op == op else None
