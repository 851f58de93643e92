"""Shared preconditions. Each fact returns None when it holds, else the reason it fails.

Reasons name the tensor or node at fault, so that `--explain` and the report can say
exactly why a rule did not fire ("conv_3x3 output has 2 consumers").
"""

from __future__ import annotations

from dataclasses import dataclass

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


# Non-negativity (the hard precondition of residual removal, RULES-SPEC §10). ---------------

_NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "Abs", "Exp"})
# y >= 0 whenever the data input (input 0) is: they select, average, move or copy values.
_SIGN_OF_DATA_OPS = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
    "Transpose", "Slice", "Squeeze", "Unsqueeze", "Identity",
})
_NONNEGATIVE_IF_ALL_OPS = frozenset({"Concat", "Add", "Mul", "Min"})  # every input >= 0
_MAX_PROOF_DEPTH = 64
_MAX_CHAIN_TEXT = 160

_Sign = tuple[bool, str]  # (proven, the chain that proves it or the first unknown link)


@dataclass(frozen=True)
class Proof:
    """Why `tensor` is >= 0 everywhere; `chain` reads from the tensor towards its sources."""

    tensor: str
    chain: str

    def __str__(self) -> str:
        return f"{self.tensor} >= 0 via {self.chain}"


def clip_bounds(node: gs.Node) -> tuple[float, float] | str:
    """(min, max) of a Clip, -inf/+inf for an absent bound (opset 11+ inputs or opset 6
    attributes), or the reason they are not constants."""
    if "min" in node.attrs or "max" in node.attrs:
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = [-np.inf, np.inf]
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i] is not None and node.inputs[i].name:
            value = constant_value(node.inputs[i])
            if value is None or value.size != 1:
                return f"{node.name} bound '{node.inputs[i].name}' is not a constant scalar"
            bounds[i - 1] = float(value.reshape(-1)[0])
    return bounds[0], bounds[1]


def nonnegative(
    graph: gs.Graph, tensor: gs.Tensor, memo: dict[int, _Sign] | None = None
) -> Proof | None:
    """A proof that `tensor` >= 0 for every input of the graph, or None (unknown means no).

    Conservative: sources are Relu, Sigmoid, Softmax, Abs, Exp, Clip with min >= 0, Max with
    an operand >= 0 and constants >= 0; MaxPool / AveragePool / GlobalAveragePool / Reshape /
    Flatten / Transpose / Slice / Squeeze / Unsqueeze / Pad (constant value >= 0, or
    reflect/edge/wrap) / Resize (nearest) of a tensor >= 0, and Concat / Add / Mul / Min of
    tensors >= 0, stay >= 0. `memo` (tensor id -> result) may be shared by calls that see the
    same, unmodified graph; without it each call memoises on its own.
    """
    proven, chain = _sign(graph, tensor, {} if memo is None else memo, 0)
    return Proof(tensor.name, chain) if proven else None


def not_nonnegative_reason(graph: gs.Graph, tensor: gs.Tensor) -> str | None:
    """None when `tensor` is provably >= 0, else why not, down to the first unknown link."""
    proven, chain = _sign(graph, tensor, {}, 0)
    return None if proven else f"'{tensor.name}' is not provably non-negative ({chain})"


def _sign(graph: gs.Graph, tensor: gs.Tensor, memo: dict[int, _Sign], depth: int) -> _Sign:
    key = id(tensor)
    if key not in memo:
        memo[key] = _sign_uncached(graph, tensor, memo, depth)
    return memo[key]


def _sign_uncached(graph: gs.Graph, tensor: gs.Tensor, memo: dict[int, _Sign],
                   depth: int) -> _Sign:
    value = constant_value(tensor)
    if value is not None:
        if value.dtype.kind in "fiu" and value.size and bool(np.all(value >= 0)):
            return True, f"constant {tensor.name} >= 0"
        return False, f"constant {tensor.name} has entries < 0 (or nan)"
    node = producer(tensor)
    if node is None:
        what = "a graph input" if any(t is tensor for t in graph.inputs) else "not computed"
        return False, f"{tensor.name} is {what}"
    label = f"{node.op}({node.name})"
    if depth >= _MAX_PROOF_DEPTH:
        return False, f"{label}: proof depth limit"
    if node.outputs[0] is not tensor:
        return False, f"{tensor.name} is a secondary output of {label}"

    def operand(t: gs.Tensor) -> _Sign:
        return _sign(graph, t, memo, depth + 1)

    def through(t: gs.Tensor) -> _Sign:
        proven, chain = operand(t)
        return proven, f"{label} <- {chain}"

    data = [t for t in node.inputs if t is not None and t.name]
    if node.op in _NONNEGATIVE_OPS:
        return True, label
    if node.op == "Clip":
        bounds = clip_bounds(node)
        if isinstance(bounds, str):
            return False, bounds
        if bounds[0] >= 0:
            return True, f"Clip({node.name}, min {bounds[0]:g})"
        if bounds[1] >= 0:
            return through(node.inputs[0])
        return False, f"{label} has max < 0"
    if node.op == "Max":
        failures = []
        for t in data:
            proven, chain = operand(t)
            if proven:
                return True, f"{label} <- {chain}"
            failures.append(chain)
        return False, f"{label} <- no operand >= 0 ({'; '.join(failures)})"
    if node.op in _SIGN_OF_DATA_OPS:
        return through(node.inputs[0])
    if node.op == "Pad":
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "constant" and len(node.inputs) > 2 and node.inputs[2].name:
            proven, chain = operand(node.inputs[2])
            if not proven:
                return False, f"{label} pad value: {chain}"
        elif mode == "constant" and float(node.attrs.get("value", 0.0)) < 0:
            return False, f"{label} pads with a value < 0"
        return through(node.inputs[0])
    if node.op == "Resize":
        mode = node.attrs.get("mode", "nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "nearest":
            return False, f"{label} interpolates ({mode})"
        return through(node.inputs[0])
    if node.op in _NONNEGATIVE_IF_ALL_OPS:
        chains = []
        for t in data:
            proven, chain = operand(t)
            if not proven:
                return False, f"{label} <- {chain}"
            # a DAG's chains would grow exponentially as text: long ones are named, not told
            chains.append(chain if len(chain) <= _MAX_CHAIN_TEXT else f"{t.name} >= 0")
        return True, f"{label} of ({'; '.join(chains)})"
    return False, f"{label} is not known to give >= 0"
