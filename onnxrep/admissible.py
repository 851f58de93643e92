"""Admissible values for the symbolic dims the user gave no size for (docs/DESIGN.md,
"Verification").

A value of the free symbols is *admissible* when the input model runs on onnxruntime at it.
A detector exported with dynamic height and width runs at multiples of its total stride only
(a skip connection meets an upsampled map), a classifier with a flatten into a Linear at one
size only; 1 is no good default for them. Batch symbols take 1 (then 2, past the sizes
below, up to 4); every other symbol takes one common size (square images), tried in this
order:

1. sizes the graph implies: a Reshape to a constant shape without -1 fixes the element count
   of its input, a Gemm or MatMul with a constant 2-D weight the reduced dim of its input,
   an elementwise op with a constant the dims the constant has (a position embedding). The
   constrained quantity grows with the size, so the sizes that meet it exactly are found by
   bisection on onnx shape inference (`graph.static_shapes`), no run needed;
2. multiples of the graph's stride alignment (the lcm over tensors of the product of the
   Conv / pool strides above them), then the common sizes 32*k up to 640;
3. 1 last: broadcasting lets a model run at 1 where it means to fail (an upsampled map
   added to a 1x1 one broadcasts), and a 3x3 conv at 1x1 shows only its centre tap. Where
   the model runs at 1 all the same, 1 is verified too, as a last variant: the fused model
   must agree at every size the input admits, and corner cases (a crop that empties a map)
   show there.

Candidates run cheapest first within each source, and the search stops after `MAX_RUNS` runs
or `MAX_SECONDS`. Once a first admissible assignment is found, a
second batch size and a second spatial size (the other parity first: stride-2 alignment
differs) are looked for, as `verify.shape_variants` does for given sizes, then size 1.

Not handled: symbols that must differ from each other (a non-square constant such as a
37x41 position embedding), sizes past 2048, constraints no shape inference can see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxrep.io import inline_constants

MAX_RUNS = 40  # onnxruntime runs of the input model, in all
MAX_SECONDS = 30.0
MAX_INFERENCES = 64  # onnx shape inference calls for the graph's implied sizes
COMMON_SIZES = tuple(32 * k for k in range(1, 21))  # up to 640
BATCHES = (1, 2, 3, 4)  # past 1, with the first few sizes only
_MAX_SOLVED = 2048  # bisection range for implied sizes
_MAX_CONSTRAINTS = 3  # constraints solved by bisection (the others are checked by running)
_STRIDED = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})

Assignment = dict[str, int]  # free symbol -> value
Shapes = dict[str, list[int]]  # tensor -> static dims


@dataclass
class Search:
    """What the search found: the assignments to verify at (the first is the main one; then
    another batch, then another size, where admissible ones were found), and how."""

    variants: list[Assignment] = field(default_factory=list)
    # assignments tried for a variant that found none admissible: (assignment, error)
    rejected: list[tuple[Assignment, str]] = field(default_factory=list)
    runs: int = 0
    seconds: float = 0.0
    implied: list[str] = field(default_factory=list)  # what the graph said, for the report
    tried: list[int] = field(default_factory=list)  # the sizes tried (at batch 1)
    batches: list[int] = field(default_factory=list)  # the batch sizes tried
    last_error: str = ""  # why the last candidate failed (when none was admissible)

    @property
    def found(self) -> bool:
        return bool(self.variants)

    def tried_text(self) -> str:
        """What the search for a first assignment tried, in a few words."""
        sizes = ", ".join(map(str, self.tried[:6])) + (", ..." if len(self.tried) > 6 else "")
        if self.tried and len(self.batches) > 1:
            return f"sizes {sizes} at batch 1, then batch {', '.join(map(str, self.batches[1:]))}"
        return f"sizes {sizes}" if self.tried else f"batch {', '.join(map(str, self.batches))}"


@dataclass
class _Constraint:
    """`value(dims of tensor) == target` must hold for the model to run."""

    tensor: str
    target: int
    value: Callable[[list[int]], int]
    what: str


def _ints(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The integer constants whose values the proto holds (initializers and Constant nodes)."""
    return inline_constants(model, (onnx.TensorProto.INT64, onnx.TensorProto.INT32))


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _reshape_count(target: list[int]) -> Callable[[list[int]], int]:
    """The element count a Reshape to `target` compares with its input's: the input dims
    that a 0 in the target copies cancel out."""
    def value(dims: list[int]) -> int:
        return math.prod(d for i, d in enumerate(dims) if not (i < len(target) and target[i] == 0))
    return value


def _axis(axis: int) -> Callable[[list[int]], int]:
    return lambda dims: dims[axis]


def constraints(model: onnx.ModelProto) -> list[_Constraint]:
    """Exact conditions on tensor dims that the model's constants impose (see the module doc)."""
    ints = _ints(model)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    found: list[_Constraint] = []
    for node in model.graph.node:
        op, name = node.op_type, node.name or node.output[0]
        if op == "Reshape" and len(node.input) > 1 and node.input[1] in ints:
            target = [int(v) for v in ints[node.input[1]].reshape(-1)]
            if -1 in target or (_attr(node, "allowzero") and 0 in target):
                continue
            found.append(_Constraint(node.input[0], math.prod(t for t in target if t),
                                     _reshape_count(target), f"Reshape '{name}' to {target}"))
        elif op in ("Gemm", "MatMul") and len(node.input) > 1 and \
                len(weights.get(node.input[1], [])) == 2:
            b = weights[node.input[1]]
            if op == "Gemm":
                k, axis = (b[1] if _attr(node, "transB") else b[0]), (0 if _attr(node, "transA")
                                                                      else 1)
            else:
                k, axis = b[0], -1
            found.append(_Constraint(node.input[0], k, _axis(axis),
                                     f"{op} '{name}' with a {b[0]}x{b[1]} weight"))
        elif op in _ELEMENTWISE and len(node.input) == 2:
            data, const = ((node.input[0], node.input[1]) if node.input[1] in weights
                           else (node.input[1], node.input[0]))
            dims = weights.get(const)
            if dims is None or data in weights or len(dims) < 2:
                continue
            for axis in range(-len(dims), 0):
                if dims[axis] > 1:
                    found.append(_Constraint(data, dims[axis], _axis(axis),
                                             f"{op} '{name}' with a constant of shape {dims}"))
    return found


def stride_alignment(model: onnx.ModelProto, cap: int = 1024) -> int:
    """The lcm over tensors of the product of the strides of the Conv / pool nodes above them
    (spatial sizes that are multiples of it reach every stride-s level whole). Nodes are in
    topological order in a valid model."""
    align: dict[str, int] = {}
    total = 1
    for node in model.graph.node:
        here = 1
        for name in node.input:
            here = math.lcm(here, align.get(name, 1))
        if node.op_type in _STRIDED:
            strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1])
            here *= max(strides, default=1)
        elif node.op_type == "SpaceToDepth":
            here *= max(_attr(node, "blocksize", 1), 1)
        here = min(here, cap)
        for name in node.output:
            align[name] = here
        total = min(math.lcm(total, here), cap)
    return total


def _solve(constraint: _Constraint, shapes_at: Callable[[int], Shapes | None]
           ) -> tuple[int, int] | None:
    """The range [lo, hi] of sizes at which `constraint` holds, by bisection (its value grows
    with the size); None when it holds everywhere (no information), nowhere, or shape
    inference cannot size the tensor."""
    def value(size: int) -> int | None:
        shapes = shapes_at(size)
        dims = None if shapes is None else shapes.get(constraint.tensor)
        try:
            return None if dims is None else constraint.value(dims)
        except IndexError:
            return None

    low, high = value(1), value(_MAX_SOLVED)
    if low is None or high is None or low == high or not low <= constraint.target <= high:
        return None

    def first(predicate: Callable[[int], bool]) -> int | None:
        """The smallest size in [1, _MAX_SOLVED] where `predicate` holds (it is monotone)."""
        lo, hi = 1, _MAX_SOLVED
        while lo < hi:
            mid = (lo + hi) // 2
            v = predicate(mid)
            if v is None:
                return None
            lo, hi = (lo, mid) if v else (mid + 1, hi)
        return lo

    def at_least(target: int) -> Callable[[int], bool | None]:
        def predicate(size: int) -> bool | None:
            v = value(size)
            return None if v is None else v >= target
        return predicate

    lo = first(at_least(constraint.target))
    past = first(at_least(constraint.target + 1))
    if lo is None or past is None or value(lo) != constraint.target:
        return None
    return lo, max(lo, past - 1)


def implied_sizes(model: onnx.ModelProto, shapes_at: Callable[[int], Shapes | None]
                  ) -> tuple[list[int], list[str]]:
    """Sizes the model's constraints imply (each range's smallest size, and the next one of
    the other parity when the range has it), and what implied them, in words."""
    sizes: list[int] = []
    notes: list[str] = []
    solved = 0
    for constraint in constraints(model):
        if solved >= _MAX_CONSTRAINTS:
            break
        found = _solve(constraint, shapes_at)
        if found is None:
            continue
        solved += 1
        lo, hi = found
        sizes += [lo] + ([lo + 1] if hi > lo else [])
        notes.append(f"{constraint.what}: size {lo}" + (f"..{hi}" if hi > lo else ""))
    return list(dict.fromkeys(sizes)), notes


def _unique(values: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(v for v in values if v >= 1))


def search(
    batch: set[str], sizes: set[str], model: onnx.ModelProto,
    run: Callable[[Assignment], str | None], infer: Callable[[Assignment], Shapes | None],
    max_runs: int = MAX_RUNS, max_seconds: float = MAX_SECONDS,
) -> Search:
    """Admissible assignments of the free `batch` and `sizes` symbols (see the module doc).
    `run(assignment)` runs the input model there: None, or why it failed. `infer(assignment)`
    gives the static dims onnx shape inference finds there, or None."""
    start = time.perf_counter()
    found = Search()

    def assign(b: int, s: int) -> Assignment:
        return {k: b for k in batch} | {k: s for k in sizes}

    inferred: dict[int, Shapes | None] = {}

    def shapes_at(size: int) -> Shapes | None:
        if size not in inferred:
            if len(inferred) >= MAX_INFERENCES or time.perf_counter() - start > max_seconds:
                return None
            inferred[size] = infer(assign(1, size))
        return inferred[size]

    def admits(values: Assignment) -> bool | None:
        """Does the model run at `values`? None: the budget is spent."""
        if found.runs >= max_runs or time.perf_counter() - start > max_seconds:
            return None
        found.runs += 1
        error = run(values)
        if error is not None:
            found.last_error = error
        return error is None

    candidates = [1]
    if sizes:
        implied, found.implied = implied_sizes(model, shapes_at)
        align = stride_alignment(model)
        if align > 1:
            found.implied.append(f"strides: sizes multiple of {align}")
        multiples = [align * k for k in range(1, max(640, align) // align + 1)] if align > 1 \
            else []
        candidates = _unique([*implied, *multiples, *COMMON_SIZES, 1])
    main: tuple[int, int] | None = None
    for b in (BATCHES if batch else [1]):
        for s in (candidates if b == 1 else candidates[:4] if sizes else [1]):
            if sizes and b == 1:
                found.tried.append(s)
            if batch and b not in found.batches:
                found.batches.append(b)
            ok = admits(assign(b, s))
            if ok is None:
                break
            if ok:
                main = (b, s)
                break
        if main is not None or found.runs >= max_runs:
            break
    found.seconds = time.perf_counter() - start
    if main is None:
        return found
    b0, s0 = main
    found.variants.append(assign(b0, s0))

    def second(options: list[Assignment], record: bool = True) -> None:
        """The first of `options` the model runs at becomes a variant; else the first one
        tried is recorded as rejected (with its error), if `record`."""
        rejected = None
        for values in options:
            before = found.last_error
            ok = admits(values)
            if ok:
                found.variants.append(values)
                return
            if ok is None:
                break
            if rejected is None:
                rejected = (values, found.last_error)
            found.last_error = before
        if rejected is not None and record:
            found.rejected.append(rejected)

    if batch:
        second([assign(b0 + k, s0) for k in (1, 2, 3)])
    if sizes:
        other = s0 + (1 if s0 % 2 == 0 else 2)  # the other parity (as shape_variants)
        # the ones before s0 failed; 1 only as a last resort (see the module doc)
        rest = [s for s in candidates[candidates.index(s0) + 1:] if s != 1]
        parity = [s for s in rest if s % 2 != s0 % 2]
        second([assign(b0, s) for s in _unique([other, *parity[:2], *rest[:3]])[:6]])
        if s0 != 1:  # where the model runs at 1, the fused one must too (and it is cheap)
            second([assign(b0, 1)], record=False)
    found.seconds = time.perf_counter() - start
    return found
