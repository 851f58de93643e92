"""Non-negativity proofs: the hard precondition of residual removal (docs/RULES.md,
remove-residual). A proof follows the producers of a tensor back to ops that cannot give a
negative value; unknown means no. Same convention as onnxrep.facts: a Proof, or a Refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.query import attr_str, constant_value, data_inputs, optional_input, producer
from onnxrep.rule import Refusal

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


def clip_bounds(node: gs.Node) -> tuple[float, float] | Refusal:
    """(min, max) of a Clip, -inf/+inf for an absent bound (opset 11+ inputs or opset 6
    attributes), or the reason they are not constants."""
    if "min" in node.attrs or "max" in node.attrs:
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = [-np.inf, np.inf]
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i] is not None and node.inputs[i].name:
            value = constant_value(node.inputs[i])
            if value is None or value.size != 1:
                return Refusal(f"{node.name} bound '{node.inputs[i].name}' is not a constant "
                               "scalar")
            bounds[i - 1] = float(value.reshape(-1)[0])
    return bounds[0], bounds[1]


def nonnegative(
    graph: gs.Graph, tensor: gs.Tensor, memo: dict[int, _Sign] | None = None
) -> Proof | Refusal:
    """A proof that `tensor` >= 0 for every input of the graph, or None (unknown means no).

    Conservative: sources are Relu, Sigmoid, Softmax, Abs, Exp, Clip with min >= 0, Max with
    an operand >= 0 and constants >= 0; MaxPool / AveragePool / GlobalAveragePool / Reshape /
    Flatten / Transpose / Slice / Squeeze / Unsqueeze / Pad (constant value >= 0, or
    reflect/edge/wrap) / Resize (nearest) of a tensor >= 0, and Concat / Add / Mul / Min of
    tensors >= 0, stay >= 0. `memo` (tensor id -> result) may be shared by calls that see the
    same, unmodified graph; without it each call memoises on its own.
    """
    proven, chain = _sign(graph, tensor, {} if memo is None else memo, 0)
    if proven:
        return Proof(tensor.name, chain)
    return Refusal(f"'{tensor.name}' is not provably non-negative ({chain})")


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

    data = data_inputs(node)
    if node.op in _NONNEGATIVE_OPS:
        return True, label
    if node.op == "Clip":
        bounds = clip_bounds(node)
        if isinstance(bounds, Refusal):
            return False, bounds.reason
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
        mode = attr_str(node, "mode", "constant")
        if mode == "constant" and optional_input(node, 2) is not None:
            proven, chain = operand(node.inputs[2])
            if not proven:
                return False, f"{label} pad value: {chain}"
        elif mode == "constant" and float(node.attrs.get("value", 0.0)) < 0:
            return False, f"{label} pads with a value < 0"
        return through(node.inputs[0])
    if node.op == "Resize":
        mode = attr_str(node, "mode", "nearest")
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
