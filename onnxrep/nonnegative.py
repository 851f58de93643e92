"""Non-negativity proofs: the hard precondition of residual removal (docs/RULES.md,
remove-residual). A proof follows the producers of a tensor back to ops that cannot give a
negative value; unknown means no. Same convention as onnxrep.facts: a Proof, or a Refusal.

What "y >= 0" means here: every element of y is a number >= 0 whenever the graph's inputs are
finite (NaN >= 0 is false; an input holding inf or NaN is outside what any rewrite promises -
remove-residual's Dirac channels multiply by 0). An op is in the table only if its argument
holds for EVERY value of its attributes and every input size; an attribute the argument does
not cover (an unknown mode, a NaN) refuses.

Types: every op below has one type T for its output and for each input whose values it reads
(ONNX type constraints), so a proof started on a float tensor (a Conv input) walks float
tensors only. A tensor whose dtype is known and not floating point is refused anyway: in
integer arithmetic a sum or product of values >= 0 wraps below 0 (int8 100 + 100 = -56) and
|int8 -128| = -128.

The table (y the op's output, x its data input; each line the argument):
  sources, >= 0 whatever x is:
    Relu            max(x, 0) >= 0.
    Sigmoid         1 / (1 + exp(-x)) in [0, 1].
    Softmax         exp(x - max) / sum(exp(x - max)): a ratio of values >= 0 with a sum >= 1
                    (the max term is exp(0) = 1), for every axis and opset.
    Abs             |x| (floating point: no wrap-around).
    Exp             exp(x) >= 0 (underflows to 0, overflows to +inf).
    constant        every entry >= 0 (not NaN), at least one entry, floating point.
    Clip(lo, hi)    ONNX defines Clip as Min(hi, Max(x, lo)) - when lo > hi every output is
                    hi. So y >= 0 for every x iff lo >= 0 and hi >= 0. An absent bound is
                    -inf / +inf; a NaN bound refuses.
  y >= 0 when x >= 0:
    Clip(lo < 0, hi >= 0)   Max(x, lo) = x, then Min(x, hi) >= 0. hi < 0: y <= hi < 0, refused.
    Max             one operand >= 0 suffices: each output element is >= that operand's
                    (broadcast) element.
    Min, Add, Mul, Concat   every operand >= 0: min, sum, product (+inf on overflow) of values
                    >= 0, or a copy of one.
    Reshape, Flatten, Transpose, Slice, Squeeze, Unsqueeze, Identity   move or select
                    elements of x (their other inputs are shapes and indices).
    GlobalMaxPool, GlobalAveragePool   max / mean over the whole, non-empty, spatial extent.
    MaxPool, AveragePool    the max / mean of the window's input elements - but a window that
                    holds padding only gives the lowest float (MaxPool pads with -inf) or
                    0 / 0 (AveragePool, count_include_pad=0). With dilation 1 the window of
                    output o is [o*s - b, o*s - b + k - 1]; the first ends at -b + k - 1 >= 0
                    iff b <= k - 1; with ceil_mode 0 the last starts at most at L + e - k, an
                    input element iff e <= k - 1; with ceil_mode 1 at most at L + e - k + s - 1,
                    so e + s <= k is needed (whether or not the runtime drops a window that
                    starts in the end padding). Windows in between lie between the two. So:
                    dilations 1, begin and end pads <= k - 1, and with ceil_mode 1 end pad +
                    stride <= k; auto_pad SAME_* pads at most k - 1 a side (taken as k - 1),
                    VALID pads 0. A dilated window can straddle a small input (taps -1 and 2 of
                    a 2-pixel axis): refused. Then every window holds an input element, the
                    max is >= it and the mean has a positive divisor (padding counts as 0).
    Pad             constant mode: the pad value (the value input, else the opset < 11
                    attribute, default 0) must be >= 0 itself - proven like any tensor;
                    reflect, edge, wrap: copies of elements of x; any other mode refuses.
    Resize          nearest only: each output element is an element of x (coordinates outside
                    the input are clamped to its edge) - except with
                    coordinate_transformation_mode=tf_crop_and_resize, where an output whose
                    coordinate leaves the input is extrapolation_value (default 0): that value
                    must be >= 0. linear would be a convex combination only if every runtime
                    clamps the sampling coordinate (ONNX does not say so for every
                    coordinate_transformation_mode): not proven, refused. cubic overshoots
                    (negative lobes: Resize cubic of Relu(x) goes below 0): refused.
Everything else (Sub, Conv, BatchNormalization, LeakyRelu, Upsample, LpPool, Cast, ...) is
unknown, and unknown means no.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.query import (
    attr_ints,
    attr_str,
    constant_value,
    data_inputs,
    optional_input,
    producer,
)
from onnxrep.rule import Refusal

_NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "Abs", "Exp"})
# y >= 0 whenever the data input (input 0) is: they move or copy values, or reduce over a
# non-empty extent. (MaxPool / AveragePool, Pad and Resize have their own conditions.)
_SIGN_OF_DATA_OPS = frozenset({
    "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Slice",
    "Squeeze", "Unsqueeze", "Identity",
})
_POOLS = frozenset({"MaxPool", "AveragePool"})
_NONNEGATIVE_IF_ALL_OPS = frozenset({"Concat", "Add", "Mul", "Min"})  # every input >= 0
_COPYING_PAD_MODES = frozenset({"reflect", "edge", "wrap"})
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
    """A proof that `tensor` >= 0 for every finite input of the graph, or the Refusal that
    names the first link no argument covers (unknown means no; the table and each op's
    argument are in the module docstring). `memo` (tensor id -> result) may be shared by calls
    that see the same, unmodified graph; without it each call memoises on its own."""
    proven, chain = _sign(graph, tensor, {} if memo is None else memo, 0)
    if proven:
        return Proof(tensor.name, chain)
    return Refusal(f"'{tensor.name}' is not provably non-negative ({chain})")


def _sign(graph: gs.Graph, tensor: gs.Tensor, memo: dict[int, _Sign], depth: int) -> _Sign:
    key = id(tensor)
    if key not in memo:
        memo[key] = _sign_uncached(graph, tensor, memo, depth)
    return memo[key]


def _not_floating(tensor: gs.Tensor) -> str | None:
    """Why `tensor`'s known dtype rules a proof out (None when it is floating point or
    unknown: see "Types" in the module docstring)."""
    if tensor.dtype is None:
        return None
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError:
        return None  # a type numpy lacks (bfloat16, float8): ONNX has no such integer type
    if dtype.kind != "f":
        return f"{tensor.name} is {dtype}, not floating point (integer sums wrap)"
    return None


def _pool_window_reason(node: gs.Node) -> str | None:
    """Why a window of MaxPool / AveragePool `node` may hold padding only, for some input size
    (None when every window holds an input element; the argument is in the module docstring)."""
    kernel = attr_ints(node, "kernel_shape", [])
    spatial = len(kernel)
    if not spatial:
        return "has no kernel_shape"
    dilations = attr_ints(node, "dilations", [1] * spatial)
    if any(d != 1 for d in dilations):
        return f"has dilations {dilations}: a dilated window can straddle a small input"
    strides = attr_ints(node, "strides", [1] * spatial)
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = attr_ints(node, "pads", [0] * (2 * spatial))
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [k - 1 for k in kernel] * 2  # at most k - 1 on a side
    else:
        return f"has auto_pad={auto_pad}"
    if len(pads) != 2 * spatial or len(strides) != spatial:
        return f"has pads {pads} and strides {strides} for kernel {kernel}"
    begins, ends = pads[:spatial], pads[spatial:]
    if any(p > k - 1 for p, k in zip(begins + ends, kernel * 2, strict=True)):
        return (f"pads {pads} reach kernel {kernel}: a window may hold padding only "
                f"(auto_pad={auto_pad})")
    if int(node.attrs.get("ceil_mode", 0)) and any(
            e + s > k for e, s, k in zip(ends, strides, kernel, strict=True)):
        return (f"has ceil_mode=1 with strides {strides}, pads {pads} (auto_pad={auto_pad}) "
                f"and kernel {kernel}: the last window may start past the input")
    return None


def _sign_uncached(graph: gs.Graph, tensor: gs.Tensor, memo: dict[int, _Sign],
                   depth: int) -> _Sign:
    wrong_type = _not_floating(tensor)
    if wrong_type:
        return False, wrong_type
    value = constant_value(tensor)
    if value is not None:
        if value.dtype.kind == "f" and value.size and bool(np.all(value >= 0)):
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
        low, high = bounds
        if np.isnan(low) or np.isnan(high):
            return False, f"{label} has a nan bound"
        if high < 0:  # Min(hi, ...) <= hi < 0, whatever min is
            return False, f"{label} has max {high:g} < 0"
        if low >= 0:
            return True, f"Clip({node.name}, min {low:g})"
        return through(node.inputs[0])
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
    if node.op in _POOLS:
        reason = _pool_window_reason(node)
        if reason:
            return False, f"{label} {reason}"
        return through(node.inputs[0])
    if node.op == "Pad":
        mode = attr_str(node, "mode", "constant")
        if mode == "constant":
            if "value" in node.attrs:  # opset < 11
                fill = float(node.attrs["value"])
                if not fill >= 0:
                    return False, f"{label} pads with value {fill:g}, not >= 0"
            value_input = optional_input(node, 2)
            if value_input is not None:
                proven, chain = operand(value_input)
                if not proven:
                    return False, f"{label} pad value: {chain}"
        elif mode not in _COPYING_PAD_MODES:
            return False, f"{label} has mode '{mode}'"
        return through(node.inputs[0])
    if node.op == "Resize":
        mode = attr_str(node, "mode", "nearest")
        if mode != "nearest":
            return False, f"{label} interpolates ({mode})"
        if attr_str(node, "coordinate_transformation_mode", "half_pixel") == \
                "tf_crop_and_resize":
            fill = float(node.attrs.get("extrapolation_value", 0.0))
            if not fill >= 0:
                return False, (f"{label} extrapolates with {fill:g} outside its "
                               "tf_crop_and_resize roi")
        return through(node.inputs[0])
    if node.op in _NONNEGATIVE_IF_ALL_OPS and data:
        chains = []
        for t in data:
            proven, chain = operand(t)
            if not proven:
                return False, f"{label} <- {chain}"
            # a DAG's chains would grow exponentially as text: long ones are named, not told
            chains.append(chain if len(chain) <= _MAX_CHAIN_TEXT else f"{t.name} >= 0")
        return True, f"{label} of ({'; '.join(chains)})"
    return False, f"{label} is not known to give >= 0"
