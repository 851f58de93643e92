"""Shared preconditions (docs/DESIGN.md, "Facts").

One convention: a fact returns its value when it holds - a predicate's value is None - and a
`Refusal` with the reason when it does not. Reasons name the tensor or node at fault, so that
`--explain` and the report can say exactly why a rule did not fire ("conv_3x3 output has 2
consumers"). Every rule that reads a BatchNormalization, a Conv's parameters or an
AveragePool as a convolution asks here, so each precondition is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import kernels
from onnxrep.query import (
    attr_ints,
    attr_str,
    constant_value,
    is_graph_output,
    optional_input,
)
from onnxrep.rule import Refusal


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor, consumer: gs.Node) -> Refusal | None:
    """`tensor` is read by `consumer` alone, once, and is not a graph output."""
    if is_graph_output(graph, tensor):
        return Refusal(f"{tensor.name} is a graph output")
    readers = list(tensor.outputs)
    if len(readers) != 1 or readers[0] is not consumer:
        return Refusal(f"{tensor.name} has {len(readers)} consumers")
    if sum(1 for t in consumer.inputs if t is tensor) != 1:
        return Refusal(f"{tensor.name} is read twice by {consumer.name}")
    return None


def float_const(tensor: gs.Tensor, what: str) -> np.ndarray | Refusal:
    """The value of a finite floating-point constant."""
    value = constant_value(tensor)
    if value is None:
        return Refusal(f"{what} '{tensor.name}' is not a constant")
    if value.dtype.kind != "f":
        return Refusal(f"{what} '{tensor.name}' is {value.dtype}, not floating point")
    if not np.all(np.isfinite(value)):
        return Refusal(f"{what} '{tensor.name}' holds inf or nan")
    return value


def channel_vector(
    value: np.ndarray, channels: int, rank: int, channel_axis: int = 1
) -> np.ndarray | None:
    """The per-channel vector [channels] that `value` broadcasts to along `channel_axis` of a
    rank-`rank` tensor, or None if it broadcasts along any other axis or widens the output
    (a [C] vector against NCHW scales W, not C: numpy aligns trailing axes). Pure arithmetic
    on shapes; callers word the refusal."""
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


def batchnorm_affine(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | Refusal:
    """An inference BatchNormalization as y = a * x + c per channel (float64), or why not.

    Owns every precondition of reading a BN as a fixed affine map: the op, spatial=1 (opset
    < 9's per-element statistics are not per channel), training_mode=0, running-statistics
    outputs unused, four finite float constant parameters of one length, var + eps > 0."""
    if node.op != "BatchNormalization":
        return Refusal(f"{node.name} is {node.op}, not BatchNormalization")
    if int(node.attrs.get("spatial", 1)) != 1:
        return Refusal(f"{node.name} has spatial=0 (per-element statistics)")
    if int(node.attrs.get("training_mode", 0)) != 0:
        return Refusal(f"{node.name} has training_mode=1 (batch statistics, not a fixed "
                       "affine map)")
    if len(node.outputs) > 1 and any(len(t.outputs) for t in node.outputs[1:]):
        return Refusal(f"{node.name} outputs running statistics that are used")
    params = node.inputs[1:5]
    if len(params) != 4:
        return Refusal(f"{node.name} has {len(params)} parameter inputs, expected 4")
    values = []
    for tensor, what in zip(params, ("scale", "bias", "mean", "var"), strict=True):
        value = float_const(tensor, f"{node.name} {what}")
        if isinstance(value, Refusal):
            return value
        values.append(value.reshape(-1))
    if len({v.shape for v in values}) != 1:
        return Refusal(f"{node.name} parameters differ in length")
    gamma, beta, mean, var = values
    eps = float(node.attrs.get("epsilon", 1e-5))
    if np.any(var.astype(np.float64) + eps <= 0):
        return Refusal(f"{node.name} has var + epsilon <= 0")
    return kernels.bn_affine(gamma, beta, mean, var, eps)


def explicit_padding(node: gs.Node) -> Refusal | None:
    """auto_pad NOTSET or VALID: the pads attribute says the padding for every input size."""
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return Refusal(f"{node.name} uses auto_pad={auto_pad}")
    return None


def conv_constants(node: gs.Node) -> Refusal | None:
    """A Conv / ConvTranspose whose weight (and bias, if any) are finite float constants.
    Enough for a fold on the output side (a per-output-channel scale and shift does not care
    where the padding goes, auto_pad SAME_* included); `conv_params` adds explicit padding."""
    checks = [float_const(node.inputs[1], f"{node.name} weight")]
    bias = optional_input(node, 2)
    if bias is not None:
        checks.append(float_const(bias, f"{node.name} bias"))
    for value in checks:
        if isinstance(value, Refusal):
            return value
    return None


def conv_group(node: gs.Node) -> int | Refusal:
    """The group of a Conv / ConvTranspose whose weight (a constant: ask `conv_constants`
    first) has a kernel (rank >= 3) and a first axis (Conv: O, ConvTranspose: I) that the
    group divides - what the per-group channel arithmetic of a fold relies on."""
    weight = constant_value(node.inputs[1])
    group = int(node.attrs.get("group", 1))
    if weight.ndim < 3:
        return Refusal(f"{node.name} weight is {weight.ndim}-D")
    if group < 1 or weight.shape[0] % group:
        return Refusal(f"{node.name} weight {list(weight.shape)} does not fit group {group}")
    return group


def conv_params(node: gs.Node) -> Refusal | None:
    """A Conv / ConvTranspose whose weight (and bias, if any) are finite float constants,
    with explicit padding (auto_pad NOTSET or VALID)."""
    return conv_constants(node) or explicit_padding(node)


def pool_as_depthwise(pool: gs.Node, channels: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | Refusal:
    """AveragePool(k, s, pads) as the depthwise conv K[c, 0] = 1/prod(k), bias 0 (docs/RULES.md,
    "AveragePool as a convolution"): exact when it pads nothing or counts the padding
    (count_include_pad=1), with ceil_mode 0 and explicit padding."""
    kernel = attr_ints(pool, "kernel_shape", [])
    if len(kernel) != 2:
        return Refusal(f"{pool.name} is not a 2-D pool")
    if int(pool.attrs.get("ceil_mode", 0)):
        return Refusal(f"{pool.name} has ceil_mode=1")
    refusal = explicit_padding(pool)
    if refusal:
        return refusal
    pads = attr_ints(pool, "pads", [0] * 2 * len(kernel))
    if any(pads) and not int(pool.attrs.get("count_include_pad", 0)):
        return Refusal(f"{pool.name} pads {pads} with count_include_pad=0: border averages "
                       "divide by fewer pixels than a conv does")
    weight = np.full((channels, 1, *kernel), 1.0 / float(np.prod(kernel)))
    attrs = {"strides": attr_ints(pool, "strides", [1] * len(kernel)), "pads": pads,
             "dilations": attr_ints(pool, "dilations", [1] * len(kernel)), "group": channels}
    return weight, np.zeros(channels), attrs


@dataclass
class GemmParams:
    """A Gemm's constant operands, in float64 where they are numbers: y = alpha*x@B + beta*C
    with B in the node's own layout (transB says which) and C as a per-output-feature vector
    (zeros and beta 0 when absent)."""

    matrix: np.ndarray  # B as stored (its dtype is the one to write back)
    trans_b: bool
    in_features: int
    out_features: int
    alpha: float
    beta: float
    c_bias: np.ndarray


def gemm_params(gemm: gs.Node) -> GemmParams | Refusal:
    """A Gemm's finite float constant B and per-output-feature constant C (transA is the
    caller's: it matters only to a fold on the Gemm's input side)."""
    matrix = float_const(gemm.inputs[1], f"{gemm.name} B")
    if isinstance(matrix, Refusal):
        return matrix
    if matrix.ndim != 2:
        return Refusal(f"{gemm.name} B is {matrix.ndim}-D")
    trans_b = bool(gemm.attrs.get("transB", 0))
    k, out = (matrix.shape[1], matrix.shape[0]) if trans_b else matrix.shape
    c_tensor = optional_input(gemm, 2)
    c_bias, beta = np.zeros(out), 0.0
    if c_tensor is not None:
        value = float_const(c_tensor, f"{gemm.name} C")
        if isinstance(value, Refusal):
            return value
        c_bias = channel_vector(value, out, rank=2)
        if c_bias is None:
            return Refusal(f"{gemm.name} C {list(value.shape)} is not per output feature")
        beta = float(gemm.attrs.get("beta", 1.0))
    return GemmParams(matrix, trans_b, int(k), int(out), float(gemm.attrs.get("alpha", 1.0)),
                      beta, c_bias)
