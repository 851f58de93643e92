"""Where a per-channel affine map's channel axis goes through a layout or pooling op.

A per-channel affine y = a*x + c along axis k of x commutes with some ops T: T(a*x + c) is
again a per-channel affine map of T(x), along an axis k' of T's output, with the same a and c
(docs/RULES.md, "propagate-affine"). This module says, for one op, whether that holds for
every input the model admits and what k' is, in either direction:

  forward   the affine sits before T:  axis of T's input  -> axis of T's output
  backward  the affine sits after T:   axis of T's output -> axis of T's input

`axis=None` stands for a uniform map (a and c scalars): it commutes with every op here that
keeps the shift exact, whatever the layout. Pure reasoning on attributes and inferred shapes;
no graph changes.

Reshape-like ops (Reshape, Flatten, Squeeze, Unsqueeze) keep the channel as one axis j of the
output when dim j is the channel count C and either the product of the dims before the channel
axis, or the product of the dims after it, is the same on both sides. Then the flat (row-major)
index f = p*C*S + ch*S + s has the same channel coordinate ch on both sides: equal suffix
products S give it directly, and equal prefix products give equal S because the element counts
are equal. Products compare as (integer, multiset of symbolic dim names); an unknown dim proves
nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.facts import explicit_padding
from onnxrep.query import attr_ints, constant_value, dims_of, reduce_axes
from onnxrep.rule import Refusal

RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
POOLS = ("GlobalAveragePool", "AveragePool", "GlobalMaxPool", "MaxPool")
LAYOUT_OPS = ("Identity", "Transpose", *RESHAPES, *POOLS, "ReduceMean")
SHAPE_READERS = ("Shape", "Size")  # read only a tensor's shape, which an affine map keeps

Dims = list[int | str | None]


def _static(d: object) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool)


def _product(dims: Dims, trusted: frozenset[str]) -> tuple[int, tuple[str, ...]] | None:
    """The product of `dims` as (integer, sorted symbol names), or None when a dim is unknown
    or a symbol is not `trusted`."""
    number, names = 1, []
    for d in dims:
        if _static(d):
            number *= int(d)
        elif isinstance(d, str) and d in trusted:
            names.append(d)
        else:
            return None
    return number, tuple(sorted(names))


def reshaped_axis(src: Dims, axis: int, channels: int, dst: Dims,
                  trusted: frozenset[str] = frozenset()) -> int | None:
    """The axis of `dst` that carries axis `axis` (of size `channels`) of `src` through a
    reshape, or None when the shapes do not prove one (module docstring). Symbolic dims count
    as equal only when they carry the same `trusted` name: the symbols of the graph inputs.
    onnx shape inference also invents names (unk__N) that it has been seen to give to dims of
    different sizes (the elements of an uneven split into a sequence), so those prove
    nothing."""
    src = list(src)
    src[axis] = channels
    before, after = _product(src[:axis], trusted), _product(src[axis + 1:], trusted)
    for j, d in enumerate(dst):
        if not _static(d) or int(d) != channels:
            continue
        if (before is not None and before == _product(list(dst[:j]), trusted)) or (
                after is not None and after == _product(list(dst[j + 1:]), trusted)):
            return j
    return None


def _known_output_dims(node: gs.Node, src: Dims) -> Dims | None:
    """The output dims as inferred, completed by what the op itself says (`_output_dims`)."""
    inferred = node.outputs[0].shape
    own = _output_dims(node, src)
    if inferred is None:
        return own
    if own is None or len(own) != len(inferred):
        return list(inferred)
    return [i if i is not None else o for i, o in zip(inferred, own, strict=True)]


def merged_axis(node: gs.Node, axis: int, channels: int, forward: bool,
                trusted: frozenset[str] = frozenset()) -> tuple[int, int] | None:
    """For a reshape-like op that merges the channel axis with the static dims right after
    it (BN -> pool to 2x2 -> Flatten -> Gemm): (j, S) when axis j of the other side has
    C*S elements made of channel `ch` at indices ch*S .. ch*S + S - 1, so that the map there
    is per-index along j with a and c each repeated S times (docs/RULES.md,
    "propagate-affine"); None when the shapes do not prove it. Proof: the prefix products
    before the channel axis and before j are equal (so the element counts after them are
    too), and dim j is C times the product of the static dims after the channel axis up to
    some m; then index i along j has ch = i // S."""
    if node.op not in RESHAPES:
        return None
    in_dims = dims_of(node.inputs[0])
    if in_dims is None:
        return None
    out_dims = _known_output_dims(node, list(in_dims))
    if out_dims is None:
        return None
    src, dst = (list(in_dims), out_dims) if forward else (out_dims, list(in_dims))
    src[axis] = channels
    before = _product(src[:axis], trusted)
    if before is None:
        return None
    for j, d in enumerate(dst):
        if not _static(d) or int(d) % channels or int(d) == channels:
            continue
        tail, merged = int(d) // channels, 1
        for m in range(axis + 1, len(src)):
            if not _static(src[m]) or merged * int(src[m]) > tail:
                break
            merged *= int(src[m])
            if merged == tail:
                if before == _product(list(dst[:j]), trusted):
                    return j, tail
                break
    return None


def _output_dims(node: gs.Node, src: Dims) -> Dims | None:
    """What the op's own attributes and constant inputs say of its output dims, given the
    input dims `src` (None where they do not say): Flatten's two products, a constant Reshape
    target's fixed entries and copied zeros."""
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        axis = axis + len(src) if axis < 0 else axis
        out: Dims = []
        for part in (src[:axis], src[axis:]):
            if len(part) == 1:
                out.append(part[0])
            else:
                out.append(int(np.prod(part)) if all(_static(d) for d in part) else None)
        return out
    if node.op == "Reshape" and len(node.inputs) > 1:
        target = constant_value(node.inputs[1])
        if target is None:
            return None
        keep_zero = int(node.attrs.get("allowzero", 0)) == 1
        out = []
        for i, v in enumerate(int(v) for v in target.reshape(-1)):
            if v == 0 and not keep_zero:
                out.append(src[i] if i < len(src) else None)
            else:
                out.append(v if v > 0 else None)
        return out
    return None


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _reduced_axes(node: gs.Node, rank: int) -> list[int] | Refusal:
    """ReduceMean's axes, normalized; every axis when they are absent (noop_with_empty_axes
    = 0), none when noop_with_empty_axes = 1."""
    axes = reduce_axes(node)
    if isinstance(axes, Refusal):
        return axes
    if not axes:
        return [] if int(node.attrs.get("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted({a + rank if a < 0 else a for a in axes})


def _pool_keeps_shift(node: gs.Node) -> Refusal | None:
    """Every window of the pool averages real values only, so mean(x + c) = mean(x) + c: no
    padding, or padding that is not counted; no ceil_mode window past the edge that counts."""
    if node.op in ("GlobalAveragePool", "GlobalMaxPool", "MaxPool"):
        return None  # no padding, or padding by -inf that max ignores
    if int(node.attrs.get("count_include_pad", 0)) == 0:
        return None
    pads = attr_ints(node, "pads", [])
    if explicit_padding(node) is None and not any(pads) and not int(
            node.attrs.get("ceil_mode", 0)):
        return None
    return Refusal(f"{node.name} counts padding in its averages (count_include_pad=1): the "
                   "border sees the shift scaled down")


def carried_axis(node: gs.Node, axis: int | None, channels: int, forward: bool,
                 shifted: bool, positive: bool, trusted: frozenset[str] = frozenset()
                 ) -> int | None | Refusal:
    """The channel axis on the other side of `node` (see the module docstring), or why the
    affine map does not pass it exactly. `shifted`: c is not all zero; `positive`: every a > 0
    (max pooling commutes with a positive scale only); `trusted`: the symbolic dim names that
    prove equal sizes (reshaped_axis)."""
    src, dst = (node.inputs[0], node.outputs[0]) if forward else (node.outputs[0],
                                                                   node.inputs[0])
    op = node.op
    if op in ("MaxPool", "GlobalMaxPool"):
        if not positive:
            return Refusal(f"{node.name} ({op}) commutes with a positive scale only")
        if op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
            return Refusal(f"{node.name} indices output is used")
    if op in POOLS:
        if shifted:
            refusal = _pool_keeps_shift(node)
            if refusal:
                return refusal
        if axis not in (None, 1):
            return Refusal(f"{node.name} ({op}) pools axis {axis}, the channel axis")
        return axis
    if op == "Identity":
        return axis
    if op == "Transpose":
        rank = _rank(node.inputs[0])
        if rank is None:
            return Refusal(f"{node.name} input rank is unknown")
        perm = attr_ints(node, "perm", list(range(rank))[::-1])
        if axis is None:
            return None
        return perm.index(axis) if forward else perm[axis]
    if op == "ReduceMean":
        rank = _rank(node.inputs[0])
        if rank is None:
            return Refusal(f"{node.name} input rank is unknown")
        axes = _reduced_axes(node, rank)
        if isinstance(axes, Refusal):
            return axes
        if axis is None:
            return None
        keep = int(node.attrs.get("keepdims", 1))
        if forward:
            if axis in axes:
                return Refusal(f"{node.name} averages over the channel axis {axis}")
            return axis if keep else axis - sum(1 for a in axes if a < axis)
        if keep:
            return None if axis in axes else axis  # a kept reduced axis has size 1
        kept = [a for a in range(rank) if a not in axes]
        return kept[axis]
    if op in RESHAPES:
        if axis is None:
            return None
        in_dims = dims_of(node.inputs[0])
        if in_dims is None:
            return Refusal(f"{node.name} ({op}) input shape is unknown: cannot prove the "
                           "channel axis stays one axis")
        out_dims = _known_output_dims(node, list(in_dims))
        if out_dims is None:
            return Refusal(f"{node.name} ({op}) output shape is unknown: cannot prove the "
                           "channel axis stays one axis")
        src_dims, dst_dims = (in_dims, out_dims) if forward else (out_dims, in_dims)
        found = reshaped_axis(list(src_dims), axis, channels, list(dst_dims), trusted)
        if found is None:
            return Refusal(f"{node.name} ({op}) {list(in_dims)} -> {list(out_dims)} does not "
                           f"provably keep the {channels} channels as one axis")
        return found
    return Refusal(f"{node.name} ({op}) is not a layout op an affine map passes")


__all__ = ["LAYOUT_OPS", "SHAPE_READERS", "carried_axis", "merged_axis", "reshaped_axis"]
