"""Proof that a subgraph treats every batch element alike, whatever the batch size.

merge-sequential runs a border fill on onnxruntime at a few batch sizes; that says nothing
about the other sizes when the fill reads the batch size (a Shape node) and branches on it:
`Where(Shape(t)[0] > 3, other_fill, fill)` passes at batch 1, 2 and 3. `batchwise` proves from
the nodes alone that

    u[n] = F(t[n])    for every batch size N >= 1 and every element n < N, with one F,

so that the fill at batch 1 is the fill at every batch size. It runs the subgraph on abstract
values in which N is a symbol; each value is one of

  - data: t, or t's values moved by data-movement ops; its dims have the batch axis, and its
    element n is a function of t[n] alone (the same function for every N and n);
  - a*N + b, elementwise (integer arrays a and b of the value's shape, no batch axis): a
    shape vector [N, 16, 34, 34] is a = [1, 0, 0, 0], b = [0, 16, 34, 34]; a constant has
    a = 0;
  - a per-element value with a batch axis that does not come from t: element n is a*n + b
    (a and b have size 1 on the batch axis): Range(0, N) is a = 1, b = 0, a constant
    expanded to the batch is a = 0.

Each op in `_OPS` maps such values to such values exactly (its ONNX semantics at every N), or
the proof fails with a reason naming the node: a comparison of N whose outcome is not the
same for every N >= 1, a Range whose length is not N, a Slice/Gather/Squeeze/Pad that picks
or adds batch elements, a Reshape that mixes the batch axis with another, a ScatterND whose
indices do not send element n of the updates to element n of the data, a value that depends
on n or N written into the data. Any other op is not understood: not proven.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxrep.query import (
    attr_ints,
    attr_str,
    constant_value,
    optional_input,
    producer,
    producers_first,
)
from onnxrep.rule import Refusal


class _Batch:
    """The batch axis in a value's dims: an object of its own, which no dim name (a graph
    input's symbol may well be called "N") can equal."""

    def __repr__(self) -> str:
        return "N"


BATCH = _Batch()
_WHOLE = 2**62  # a Slice of the batch axis must end at or past this (torch writes INT64_MAX)

Dims = tuple  # ints, and BATCH at the batch axis (at most once)


class _Unproven(Exception):
    """The reason the proof fails (caught in `batchwise`)."""


@dataclass
class _Val:
    dims: Dims
    a: np.ndarray | None = None  # None: data (values of t)
    b: np.ndarray | None = None

    @property
    def axis(self) -> int | None:
        return self.dims.index(BATCH) if BATCH in self.dims else None

    @property
    def data(self) -> bool:
        return self.a is None

    @property
    def uniform(self) -> bool:
        """Not data, and the same for every N and n."""
        return self.a is not None and not np.any(self.a)


def _flat(dims: Dims) -> tuple[int, ...]:
    return tuple(1 if d == BATCH else int(d) for d in dims)


def _const(value: np.ndarray) -> _Val:
    value = np.asarray(value)
    return _Val(value.shape, np.zeros(value.shape, dtype=np.int64), value)


def _fail(node: gs.Node, what: str) -> _Unproven:
    return _Unproven(f"{node.name} ({node.op}) {what}")


def _known(v: _Val | None, node: gs.Node, what: str) -> np.ndarray:
    """The value of an input that must not depend on the batch."""
    if v is None or v.axis is not None or not v.uniform:
        raise _fail(node, f"takes its {what} from the batch size")
    return v.b


def _shape_dims(v: _Val, node: gs.Node) -> list:
    """A shape vector (no batch axis) as dims: ints, and BATCH where it is exactly N."""
    if v.data or v.axis is not None or len(v.dims) != 1:
        raise _fail(node, "reads a shape that is not a vector of sizes")
    dims: list = []
    for a, b in zip(v.a.tolist(), v.b.tolist(), strict=True):
        if a == 0 and b >= 0:
            dims.append(int(b))
        elif a == 1 and b == 0:
            dims.append(BATCH)
        else:
            raise _fail(node, f"uses {a}*N + {b} as a size")
    if dims.count(BATCH) > 1:
        raise _fail(node, "makes two axes of the batch size")
    return dims


def _broadcast(node: gs.Node, *all_dims: Dims) -> Dims:
    """Multidirectional broadcasting of dims; the batch axis meets only itself or 1."""
    rank = max(len(d) for d in all_dims)
    out: list = []
    for i in range(rank):
        column = [d[i - rank + len(d)] for d in all_dims if i - rank + len(d) >= 0]
        sizes = {c for c in column if c != 1}
        if len(sizes) > 1:
            raise _fail(node, f"broadcasts {sorted(map(str, sizes))} together")
        out.append(sizes.pop() if sizes else 1)
    if out.count(BATCH) > 1:
        raise _fail(node, "puts two batch axes together")
    return tuple(out)


def _arrays(node: gs.Node, dims: Dims, *values: _Val) -> list[tuple[np.ndarray, np.ndarray]]:
    """(a, b) of each non-data operand, ready to broadcast to `dims`. Where the result has a
    batch axis, an operand without one must not depend on N (its `a` counts N, not n)."""
    pairs = []
    for v in values:
        if BATCH in dims and v.axis is None and not v.uniform:
            raise _fail(node, "mixes a value of the batch size into per-element values")
        pairs.append((v.a, v.b))
    return pairs


def _axis(node: gs.Node, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise _fail(node, f"has axis {axis} out of range for rank {rank}")
    return axis % rank


def _slice_range(dim: int, start: int, end: int, step: int) -> np.ndarray:
    """The indices ONNX Slice takes along an axis of size `dim`."""
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return np.arange(start, end, step, dtype=np.int64)


# --- the ops: each takes the node and its inputs' values (None for an absent input) -------

def _shape(node: gs.Node, x: _Val) -> _Val:
    rank = len(x.dims)
    start = int(node.attrs.get("start", 0))
    end = int(node.attrs.get("end", rank))
    start, end = (min(max(s + rank if s < 0 else s, 0), rank) for s in (start, end))
    picked = x.dims[start:end]
    a = np.array([1 if d == BATCH else 0 for d in picked], dtype=np.int64)
    b = np.array([0 if d == BATCH else d for d in picked], dtype=np.int64)
    return _Val((len(picked),), a, b)


def _gather(node: gs.Node, x: _Val, indices: _Val) -> _Val:
    idx = np.asarray(_known(indices, node, "indices"), dtype=np.int64)
    ax = _axis(node, int(node.attrs.get("axis", 0)), len(x.dims))
    size = x.dims[ax]
    if size == BATCH:
        raise _fail(node, "picks batch elements")
    if np.any(idx < -size) or np.any(idx >= size):
        raise _fail(node, f"has indices out of range for size {size}")
    idx = np.where(idx < 0, idx + size, idx)
    dims = (*x.dims[:ax], *idx.shape, *x.dims[ax + 1:])
    if x.data:
        return _Val(dims)
    return _Val(dims, np.take(x.a, idx, axis=ax), np.take(x.b, idx, axis=ax))


def _cast(node: gs.Node, x: _Val) -> _Val:
    if x.data:
        return x
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if np.any(x.a) and (dtype.kind not in "iu" or x.b.dtype.kind not in "iu"):
        raise _fail(node, f"casts a value of the batch size to {dtype}")
    return _Val(x.dims, x.a, x.b.astype(dtype))


def _range(node: gs.Node, start: _Val, limit: _Val, delta: _Val) -> _Val:
    s = _known(start, node, "start")
    d = _known(delta, node, "step")
    if limit.data or limit.axis is not None or limit.dims != ():
        raise _fail(node, "has a limit that is not a scalar")
    if limit.uniform:
        return _const(np.arange(s, limit.b, d).astype(s.dtype))
    if (s.dtype.kind in "iu" and int(limit.a) == 1 and int(limit.b) == int(s)
            and int(d) == 1):
        return _Val((BATCH,), np.ones((1,), dtype=np.int64), np.full((1,), s, dtype=np.int64))
    raise _fail(node, "has a length that is not the batch size")


def _reshape(node: gs.Node, x: _Val, shape: _Val) -> _Val:
    if shape.data or shape.axis is not None or len(shape.dims) != 1:
        raise _fail(node, "reads a shape that is not a vector of sizes")
    allowzero = int(node.attrs.get("allowzero", 0))
    out: list = []
    for i, (a, b) in enumerate(zip(shape.a.tolist(), shape.b.tolist(), strict=True)):
        if a == 1 and b == 0:
            out.append(BATCH)
        elif a != 0 or b < -1:
            raise _fail(node, f"uses {a}*N + {b} as a size")
        elif b == 0 and not allowzero:
            if i >= len(x.dims):
                raise _fail(node, "copies a size its input does not have")
            out.append(x.dims[i])
        else:
            out.append(int(b))
    if out.count(-1) > 1 or out.count(BATCH) > 1:
        raise _fail(node, "has more than one inferred or batch-size dim")
    static_in = int(np.prod([d for d in x.dims if d != BATCH]))
    static_out = int(np.prod([d for d in out if d not in (BATCH, -1)]))
    batch_in, batch_out = x.dims.count(BATCH), out.count(BATCH)
    if -1 in out:
        at = out.index(-1)
        if batch_in == batch_out and static_out > 0 and static_in % static_out == 0:
            out[at] = static_in // static_out
        elif batch_in == 1 and batch_out == 0 and static_in == static_out:
            out[at] = BATCH
        else:
            raise _fail(node, "infers a size that is not a whole multiple of the batch size")
    elif batch_in != batch_out or static_in != static_out:
        raise _fail(node, f"reshapes {list(x.dims)} to {out}")
    if BATCH in out:
        k, j = x.dims.index(BATCH), out.index(BATCH)
        if int(np.prod(_flat(x.dims[:k]))) != int(np.prod(_flat(out[:j]))):
            raise _fail(node, f"mixes the batch axis with others ({list(x.dims)} -> {out})")
    dims = tuple(out)
    if x.data:
        return _Val(dims)
    return _Val(dims, x.a.reshape(_flat(dims)), x.b.reshape(_flat(dims)))


def _arith(node: gs.Node, x: _Val, y: _Val) -> _Val:
    if x.data or y.data:
        raise _fail(node, "computes on the values of the fill's input")
    dims = _broadcast(node, x.dims, y.dims)
    (ax, bx), (ay, by) = _arrays(node, dims, x, y)
    if node.op == "Add":
        return _Val(dims, ax + ay, bx + by)
    if node.op == "Sub":
        return _Val(dims, ax - ay, bx - by)
    if not np.any(ax):  # Mul: one factor must not depend on the batch
        return _Val(dims, bx * ay, bx * by)
    if not np.any(ay):
        return _Val(dims, ax * by, bx * by)
    raise _fail(node, "multiplies two values of the batch size")


_SIGN_TEST: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Equal": lambda s: s == 0, "Less": lambda s: s < 0, "Greater": lambda s: s > 0,
    "LessOrEqual": lambda s: s <= 0, "GreaterOrEqual": lambda s: s >= 0,
}


def _compare(node: gs.Node, x: _Val, y: _Val) -> _Val:
    """x - y = s*N + r per element: decided for every N >= 1 when s = 0, or when the sign at
    N = 1 is already the sign of s (a line keeps its sign from there on)."""
    if x.data or y.data:
        raise _fail(node, "compares the values of the fill's input")
    dims = _broadcast(node, x.dims, y.dims)
    (ax, bx), (ay, by) = _arrays(node, dims, x, y)
    if BATCH in dims and (np.any(ax) or np.any(ay)):
        raise _fail(node, "compares the batch index")
    s = np.broadcast_to(ax - ay, _flat(dims))
    r = np.broadcast_to(np.asarray(bx, dtype=np.float64) - np.asarray(by, dtype=np.float64),
                        _flat(dims))
    if np.any((s != 0) & (np.sign(s + r) != np.sign(s))):
        raise _fail(node, "compares the batch size: the outcome changes with the batch size")
    sign = np.where(s != 0, np.sign(s), np.sign(r))
    return _Val(dims, np.zeros(sign.shape, dtype=np.int64), _SIGN_TEST[node.op](sign))


def _logic(node: gs.Node, *xs: _Val) -> _Val:
    if any(not x.uniform for x in xs):
        raise _fail(node, "computes on a value that depends on the batch")
    dims = _broadcast(node, *(x.dims for x in xs))
    bs = [np.asarray(x.b, dtype=bool) for x in xs]
    value = {"Not": lambda: ~bs[0], "And": lambda: bs[0] & bs[1], "Or": lambda: bs[0] | bs[1],
             "Xor": lambda: bs[0] ^ bs[1]}[node.op]()
    return _Val(dims, np.zeros(value.shape, dtype=np.int64), value)


def _where(node: gs.Node, cond: _Val, x: _Val, y: _Val) -> _Val:
    if not cond.uniform:
        raise _fail(node, "chooses by a condition that depends on the batch")
    dims = _broadcast(node, cond.dims, x.dims, y.dims)
    if x.data or y.data:
        if not all(v.data or v.uniform for v in (x, y)):
            raise _fail(node, "writes a value that depends on the batch into the fill")
        return _Val(dims)
    (ax, bx), (ay, by) = _arrays(node, dims, x, y)
    c = np.asarray(cond.b, dtype=bool)
    return _Val(dims, np.where(c, ax, ay), np.where(c, bx, by))


def _expand(node: gs.Node, x: _Val, shape: _Val) -> _Val:
    dims = _broadcast(node, x.dims, tuple(_shape_dims(shape, node)))
    if x.data:
        return _Val(dims)
    ((a, b),) = _arrays(node, dims, x)
    return _Val(dims, np.broadcast_to(a, _flat(dims)).copy(),
                np.broadcast_to(b, _flat(dims)).copy())


def _axes_input(node: gs.Node, axes: _Val | None) -> list[int] | None:
    if axes is not None:
        return [int(a) for a in np.ravel(_known(axes, node, "axes"))]
    return attr_ints(node, "axes", []) if "axes" in node.attrs else None


def _unsqueeze(node: gs.Node, x: _Val, axes: _Val | None = None) -> _Val:
    picked = _axes_input(node, axes) or []
    rank = len(x.dims) + len(picked)
    dims = list(x.dims)
    for ax in sorted(_axis(node, a, rank) for a in picked):
        dims.insert(ax, 1)
    dims = tuple(dims)
    if len(dims) != rank:
        raise _fail(node, "has repeated axes")
    if x.data:
        return _Val(dims)
    return _Val(dims, x.a.reshape(_flat(dims)), x.b.reshape(_flat(dims)))


def _squeeze(node: gs.Node, x: _Val, axes: _Val | None = None) -> _Val:
    picked = _axes_input(node, axes)
    if picked is None:
        if BATCH in x.dims:
            raise _fail(node, "squeezes every size-1 axis: the batch axis too when N = 1")
        picked = [i for i, d in enumerate(x.dims) if d == 1]
    gone = {_axis(node, a, len(x.dims)) for a in picked}
    if any(x.dims[i] != 1 for i in gone):
        raise _fail(node, "squeezes an axis that is not of size 1 at every batch size")
    dims = tuple(d for i, d in enumerate(x.dims) if i not in gone)
    if x.data:
        return _Val(dims)
    return _Val(dims, x.a.reshape(_flat(dims)), x.b.reshape(_flat(dims)))


def _concat(node: gs.Node, *xs: _Val) -> _Val:
    rank = len(xs[0].dims)
    ax = _axis(node, int(node.attrs["axis"]), rank)
    if any(len(x.dims) != rank for x in xs):
        raise _fail(node, "concatenates values of different ranks")
    for i in range(rank):
        if i != ax and len({x.dims[i] for x in xs}) > 1:
            raise _fail(node, f"concatenates values whose axis {i} differs")
    if any(x.dims[ax] == BATCH for x in xs):
        raise _fail(node, "concatenates along the batch axis")
    dims = (*xs[0].dims[:ax], sum(x.dims[ax] for x in xs), *xs[0].dims[ax + 1:])
    if any(x.data for x in xs):
        if not all(x.data or x.uniform for x in xs):
            raise _fail(node, "writes a value that depends on the batch into the fill")
        return _Val(dims)
    return _Val(dims, np.concatenate([x.a for x in xs], axis=ax),
                np.concatenate([x.b for x in xs], axis=ax))


def _transpose(node: gs.Node, x: _Val) -> _Val:
    perm = attr_ints(node, "perm", list(range(len(x.dims)))[::-1])
    if sorted(perm) != list(range(len(x.dims))):
        raise _fail(node, f"has perm {perm} for rank {len(x.dims)}")
    dims = tuple(x.dims[p] for p in perm)
    if x.data:
        return _Val(dims)
    return _Val(dims, x.a.transpose(perm), x.b.transpose(perm))


def _identity(node: gs.Node, x: _Val) -> _Val:
    return x


def _constant_of_shape(node: gs.Node, shape: _Val) -> _Val:
    dims = tuple(_shape_dims(shape, node))
    fill = node.attrs.get("value")
    fill = constant_value(fill) if isinstance(fill, gs.Constant) else fill
    fill = np.zeros(1, dtype=np.float32) if fill is None else np.asarray(fill)
    b = np.full(_flat(dims), fill.reshape(-1)[0], dtype=fill.dtype)
    return _Val(dims, np.zeros(b.shape, dtype=np.int64), b)


def _slice(node: gs.Node, x: _Val, starts: _Val, ends: _Val, axes: _Val | None = None,
           steps: _Val | None = None) -> _Val:
    begin = np.ravel(_known(starts, node, "starts")).tolist()
    end = np.ravel(_known(ends, node, "ends")).tolist()
    rank = len(x.dims)
    picked = (list(range(len(begin))) if axes is None
              else np.ravel(_known(axes, node, "axes")).tolist())
    step = [1] * len(begin) if steps is None else np.ravel(_known(steps, node, "steps")).tolist()
    dims, a, b = list(x.dims), x.a, x.b
    for st, en, axis, sp in zip(begin, end, picked, step, strict=True):
        ax = _axis(node, int(axis), rank)
        if sp == 0:
            raise _fail(node, "has step 0")
        if dims[ax] == BATCH:
            if sp != 1 or st != 0 or en < _WHOLE:
                raise _fail(node, "slices the batch axis")
            continue
        idx = _slice_range(int(dims[ax]), int(st), int(en), int(sp))
        dims[ax] = len(idx)
        if not x.data:
            a, b = np.take(a, idx, axis=ax), np.take(b, idx, axis=ax)
    return _Val(tuple(dims), a, b)


def _pad(node: gs.Node, x: _Val, pads: _Val | None = None, value: _Val | None = None,
         axes: _Val | None = None) -> _Val:
    if not x.data:
        raise _fail(node, "pads a value computed from the batch size")
    if value is not None and not value.uniform:
        raise _fail(node, "pads with a value that depends on the batch")
    amounts = (attr_ints(node, "pads", []) if pads is None
               else np.ravel(_known(pads, node, "pads")).tolist())
    rank = len(x.dims)
    picked = (list(range(rank)) if axes is None
              else np.ravel(_known(axes, node, "axes")).tolist())
    if len(amounts) != 2 * len(picked):
        raise _fail(node, f"has {len(amounts)} pads for {len(picked)} axes")
    dims = list(x.dims)
    for i, axis in enumerate(picked):
        ax = _axis(node, int(axis), rank)
        lo, hi = int(amounts[i]), int(amounts[i + len(picked)])
        if dims[ax] == BATCH:
            if lo or hi:
                raise _fail(node, "pads the batch axis")
            continue
        dims[ax] = dims[ax] + lo + hi
        if dims[ax] < 0:
            raise _fail(node, "crops more than its input has")
    return _Val(tuple(dims))


def _scatter_nd(node: gs.Node, data: _Val, indices: _Val, updates: _Val) -> _Val:
    """data[indices[p]] = updates[p]. Element n of the result depends on element n alone
    when the indices do not reach the batch axis of the data (constant indices, the batch
    axis inside every update slice), or when the batch axis of the indices writes element n
    of the updates to element n of the data: component `axis` of the index is the batch
    index itself, the other components are the same for every n."""
    if attr_str(node, "reduction", "none") != "none":
        raise _fail(node, "combines the updates with the data")
    if data.axis is None or not (data.data or data.uniform):
        raise _fail(node, "scatters into a value that is not the same for each batch element")
    axis, rank_q = data.axis, len(indices.dims)
    depth = indices.dims[-1] if rank_q else BATCH
    if indices.data or depth == BATCH:
        raise _fail(node, "has indices that are not index tuples")
    if indices.axis is None:
        _known(indices, node, "indices")
        if depth > axis:
            raise _fail(node, "writes batch elements chosen by constant indices")
    else:
        if depth <= axis:
            raise _fail(node, "has indices that vary along the batch but do not address it")
        a, b = indices.a[..., axis], indices.b[..., axis]
        others = np.delete(indices.a, axis, axis=-1)
        if np.any(a != 1) or np.any(b != 0) or np.any(others):
            raise _fail(node, "does not write element n of its updates to element n of the "
                              "data")
    expected = (*indices.dims[:-1], *data.dims[depth:])
    if tuple(updates.dims) != expected:
        raise _fail(node, f"has updates {list(updates.dims)}, expected {list(expected)}")
    if not (updates.data or updates.uniform):
        raise _fail(node, "writes a value that depends on the batch into the fill")
    return _Val(data.dims)


_OPS: dict[str, Callable[..., _Val]] = {
    "Shape": _shape, "Gather": _gather, "Cast": _cast, "Range": _range, "Reshape": _reshape,
    "Add": _arith, "Sub": _arith, "Mul": _arith, **dict.fromkeys(_SIGN_TEST, _compare),
    "Not": _logic, "And": _logic, "Or": _logic, "Xor": _logic, "Where": _where,
    "Expand": _expand, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat,
    "Transpose": _transpose, "Identity": _identity, "ConstantOfShape": _constant_of_shape,
    "Slice": _slice, "Pad": _pad, "ScatterND": _scatter_nd,
}


def _evaluate(order: Sequence[gs.Node], env: dict[int, _Val], sources: dict[int, _Val]) -> None:
    """Run `order` on abstract values: `env` holds the values known so far (and gets each
    node's output), `sources` the dims of the tensors a Shape node may read."""

    def value(tensor: gs.Tensor | None, reader: gs.Node) -> _Val | None:
        if tensor is None:
            return None
        if id(tensor) in env:
            return env[id(tensor)]
        if reader.op == "Shape" and id(tensor) in sources:
            return sources[id(tensor)]
        const = constant_value(tensor)
        if const is None:
            raise _fail(reader, f"reads {tensor.name}, which is not computed before it")
        return _const(const)

    for node in order:
        step = _OPS.get(node.op)
        if step is None or len(node.outputs) != 1:
            raise _fail(node, "is not an op the batch-size proof knows")
        inputs = [value(optional_input(node, i), node) for i in range(len(node.inputs))]
        env[id(node.outputs[0])] = step(node, *inputs)


def batchwise(t: gs.Tensor, u: gs.Tensor, order: Sequence[gs.Node],
              shape_sources: Sequence[gs.Tensor]) -> Refusal | None:
    """None when `order` (the nodes computing u from t, producers first) computes u[n] from
    t[n] alone, the same way for every batch size; else the reason it is not proven.
    t has dims [batch, static...]; `shape_sources` are tensors outside the subgraph that it
    reads only the shape of (each static dim, or t's batch)."""
    shape = list(t.shape or [])
    if not shape or isinstance(shape[0], int) or not all(isinstance(d, int) for d in shape[1:]):
        return Refusal(f"{t.name} has no symbolic batch and static other dims: {shape}")
    env: dict[int, _Val] = {id(t): _Val((BATCH, *shape[1:]))}
    sources: dict[int, _Val] = {}
    for src in shape_sources:
        dims = [BATCH if d == shape[0] else d for d in (src.shape or [None])]
        if not all(d == BATCH or isinstance(d, int) for d in dims):
            return Refusal(f"the fill reads the shape of {src.name} {src.shape}, not tied to "
                           f"{t.name}'s batch")
        sources[id(src)] = _Val(tuple(dims))

    try:
        _evaluate(order, env, sources)
    except _Unproven as exc:
        return Refusal(f"the fill between {t.name} and {u.name} is not proven the same at "
                       f"every batch size: {exc}")
    except (TypeError, ValueError, IndexError) as exc:  # an input count or shape ONNX forbids
        return Refusal(f"the fill between {t.name} and {u.name} is not proven the same at "
                       f"every batch size: {type(exc).__name__}: {exc}")
    result = env.get(id(u))
    if result is None or not result.data or result.axis != 0:
        return Refusal(f"{u.name} is not {t.name}'s batch moved element by element")
    return None


def shape_in_batch(u: gs.Tensor, order: Sequence[gs.Node], batch: int | str,
                   shape_sources: Sequence[gs.Tensor]) -> list[int | str] | Refusal:
    """The value of the 1-D integer tensor `u` that `order` (producers first) computes from
    constants and the shapes of `shape_sources`: a list of ints, and BATCH where the entry is
    exactly `batch` (a static or symbolic dim the sources share at their axis 0), for every
    value `batch` takes. Each source's dims must be `batch` or static (the arithmetic is the
    proof's own: `a*N + b` per entry). Else the reason it is not known."""
    sources: dict[int, _Val] = {}
    for src in shape_sources:
        dims = [BATCH if d == batch else d for d in (src.shape or [None])]
        if not dims or dims[0] != BATCH or not all(d == BATCH or isinstance(d, int)
                                                   for d in dims):
            return Refusal(f"the shape of {src.name} {src.shape} is not [{batch}, static...]")
        sources[id(src)] = _Val(tuple(dims))
    env: dict[int, _Val] = {}
    try:
        _evaluate(order, env, sources)
    except _Unproven as exc:
        return Refusal(f"{u.name} is not known at every batch size: {exc}")
    except (TypeError, ValueError, IndexError) as exc:  # an input count or shape ONNX forbids
        return Refusal(f"{u.name} is not known at every batch size: {type(exc).__name__}: {exc}")
    result = env.get(id(u))
    if result is None or result.data or result.axis is not None or len(result.dims) != 1:
        return Refusal(f"{u.name} is not a vector computed from shapes and constants")
    entries: list[int | str] = []
    for a, b in zip(result.a.tolist(), result.b.tolist(), strict=True):
        if a == 0:
            entries.append(int(b))
        elif a == 1 and b == 0:
            entries.append(BATCH)
        else:
            return Refusal(f"{u.name} holds {a}*{batch} + {b}")
    return entries


MAX_SHAPE_NODES = 16  # a target shape computed by more nodes is not read


def shape_subgraph(shape: gs.Tensor) -> tuple[list[gs.Node], list[gs.Tensor]] | Refusal:
    """The nodes computing `shape` back to constants and Shape nodes (producers first), and
    the tensors those Shape nodes read."""
    nodes: dict[int, gs.Node] = {}
    sources: dict[int, gs.Tensor] = {}
    todo = [shape]
    while todo:
        tensor = todo.pop()
        if constant_value(tensor) is not None:
            continue
        node = producer(tensor)
        if node is None:
            return Refusal(f"the target shape '{shape.name}' reads '{tensor.name}', which is "
                           "not computed from shapes and constants")
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        if len(nodes) > MAX_SHAPE_NODES:
            return Refusal(f"the target shape '{shape.name}' takes more than "
                           f"{MAX_SHAPE_NODES} nodes to compute")
        if node.op == "Shape":
            sources[id(node.inputs[0])] = node.inputs[0]
            continue
        todo.extend(t for t in node.inputs if t is not None and t.name)
    order = producers_first(list(nodes.values()))
    return order, list(sources.values())
