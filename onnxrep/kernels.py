"""Pure numpy re-parameterization math. No graph objects here.

Everything is computed in float64; callers cast back to the model's dtype with `cast_like`.
Weights follow ONNX layouts: Conv W[O, I/g, *k]; ConvTranspose W[I, O/g, *k];
Gemm B[K, O] (or [O, K] with transB).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def bias_or_zeros(bias: np.ndarray | None, channels: int) -> np.ndarray:
    """A conv's bias in float64; zeros when it has none."""
    return np.zeros(channels) if bias is None else f64(bias)


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Cast a float64 result back to the dtype of the tensor it replaces."""
    return np.ascontiguousarray(value.astype(like.dtype, copy=False))


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BN as y = a*x + c: a = gamma/sqrt(var+eps), c = beta - mean*a."""
    a = f64(gamma) / np.sqrt(f64(var) + float(eps))
    return a, f64(beta) - f64(mean) * a


_BLOCK_ELEMENTS = 1 << 20  # float64 temporaries of 8 MB


def by_output_rows(rows: int, compute: Callable[[slice], np.ndarray], dtype: np.dtype
                   ) -> np.ndarray:
    """Evaluate a float64 computation whose output rows (output channels) are independent,
    a block of rows at a time, casting each block to `dtype` as it comes. The numbers are
    those of one float64 pass over the whole weight; the float64 temporaries stay a few MB
    instead of twice or four times a 0.2 GB layer (and the time with them)."""
    if rows == 0:
        return compute(slice(0, 0)).astype(dtype)
    head = compute(slice(0, 1))  # one row: its size sets the block
    step = max(1, _BLOCK_ELEMENTS // max(1, head.size))
    out = np.empty((rows,) + head.shape[1:], dtype=dtype)
    out[:1] = head
    for start in range(1, rows, step):
        block = slice(start, min(start + step, rows))
        out[block] = compute(block)
    return out


def scale_conv_weight(weight: np.ndarray, a: np.ndarray) -> np.ndarray:
    """W' = W * a[O, 1, ...] (float64; float32 weights widen exactly in the product)."""
    return np.multiply(weight, f64(a).reshape((-1,) + (1,) * (weight.ndim - 1)),
                       dtype=np.float64)


def scale_bias(bias: np.ndarray | None, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """b' = a*b + c (b = 0 when the conv has none)."""
    return f64(a) * (0.0 if bias is None else f64(bias)) + f64(c)


def scale_conv_output(
    weight: np.ndarray, bias: np.ndarray | None, a: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """a*conv(x)+c per output channel: W' = W*a[O,1,..], b' = a*b + c."""
    return scale_conv_weight(weight, a), scale_bias(bias, a, c)


def scale_conv_output_as(
    weight: np.ndarray, bias: np.ndarray | None, a: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`scale_conv_output` cast back to the weight's dtype, evaluated in blocks of rows."""
    a = f64(a)
    w = by_output_rows(weight.shape[0], lambda r: scale_conv_weight(weight[r], a[r]),
                       weight.dtype)
    return w, cast_like(scale_bias(bias, a, c), weight)


def scale_conv_transpose_output(
    weight: np.ndarray, bias: np.ndarray | None, a: np.ndarray, c: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose W[I, O/g, *k]: output channel o = gi*(O/g) + j lives at W[gi*(I/g):, j]."""
    w = f64(weight)
    cin, cout_g = w.shape[:2]
    cout = cout_g * group
    b = bias_or_zeros(bias, cout)
    grouped = w.reshape((group, cin // group, cout_g) + w.shape[2:])
    scale = f64(a).reshape((group, 1, cout_g) + (1,) * (w.ndim - 2))
    return (grouped * scale).reshape(w.shape), f64(a) * b + f64(c)


def scale_gemm_output(
    b_matrix: np.ndarray, c_bias: np.ndarray, trans_b: bool, alpha: float, beta: float,
    a: np.ndarray, c: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """a*(alpha*A@B + beta*C) + c per output feature -> B', C' with alpha kept and beta=1."""
    m = f64(b_matrix)
    m = m * f64(a)[:, None] if trans_b else m * f64(a)[None, :]
    return m, f64(a) * float(beta) * f64(c_bias) + f64(c)


def fold_input_affine(
    weight: np.ndarray, bias: np.ndarray | None, a: np.ndarray, c: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """conv(a*x + c) with per-input-channel a, c and zero padding never applied:
    W'[o,i] = W[o,i]*a[gi(o)*I/g + i], b'[o] = b[o] + sum_{i,k} W[o,i,k]*c[gi(o)*I/g + i]."""
    w = f64(weight)
    out_c, in_g = w.shape[:2]
    b = bias_or_zeros(bias, out_c)
    per_group_out = out_c // group
    a_g = f64(a).reshape(group, in_g)
    c_g = f64(c).reshape(group, in_g)
    gi = np.arange(out_c) // per_group_out
    spatial = (1,) * (w.ndim - 2)
    w_new = w * a_g[gi].reshape((out_c, in_g) + spatial)
    b_new = b + (w * c_g[gi].reshape((out_c, in_g) + spatial)).reshape(out_c, -1).sum(axis=1)
    return w_new, b_new


def identity_kernel(channels: int, group: int, spatial: int = 2,
                    rows: slice | None = None) -> np.ndarray:
    """The identity as a 1x1 grouped conv: K[o, o mod (C/g), 0, 0] = 1 (docs/RULES.md,
    "Identity as a kernel"), or its output channels `rows` only. Embed it into a larger kernel
    with `embed_kernel` at the offset `align_kernels` gives."""
    per_group = channels // group
    out = np.arange(channels)[rows if rows is not None else slice(None)]
    k = np.zeros((len(out), per_group) + (1,) * spatial)
    k[(np.arange(len(out)), out % per_group) + (0,) * spatial] = 1.0
    return k


def embed_kernel(
    weight: np.ndarray, kernel: tuple[int, ...], offsets: tuple[int, ...]
) -> np.ndarray:
    """Place a small kernel inside a zero kernel of spatial size `kernel` at `offsets`."""
    out = np.zeros(weight.shape[:2] + tuple(kernel))
    add_embedded(out, weight, offsets)
    return out


def add_embedded(total: np.ndarray, weight: np.ndarray, offsets: tuple[int, ...]) -> None:
    """total += embed_kernel(weight, total's kernel, offsets), in place (no zero kernel)."""
    index = (slice(None), slice(None)) + tuple(
        slice(o, o + s) for o, s in zip(offsets, weight.shape[2:], strict=True)
    )
    total[index] += weight


def align_kernels(
    kernels_: list[tuple[int, ...]],
    pads: list[tuple[list[int], list[int]]],
    dilations: tuple[int, ...],
) -> tuple[tuple[int, ...], list[int], list[tuple[int, ...]]] | str:
    """One kernel that holds every branch (same stride, same dilation).

    Branch j taps input positions i*s - begin_j + d*t, t in [0, k_j): per axis the merged
    kernel spans from -max(begin_j) to max(-begin_j + d(k_j-1)); branch j sits at offset
    (BEGIN - begin_j)/d, which must be a whole number; and every branch must give the same
    output size for every input size: begin_j + end_j - d(k_j-1) equal for all j (docs/RULES.md,
    "Kernel alignment"). Pads may be negative on input (a Slice crop); the merged pads may not.
    Returns (kernel shape, pads [begins..., ends...], offsets per branch) or a reason.
    """
    spatial = len(dilations)
    merged_kernel: list[int] = []
    begins: list[int] = []
    ends: list[int] = []
    offsets = [[0] * spatial for _ in kernels_]
    for axis in range(spatial):
        d = dilations[axis]
        ks = [k[axis] for k in kernels_]
        bs = [p[0][axis] for p in pads]
        es = [p[1][axis] for p in pads]
        deltas = {b + e - d * (k - 1) for k, b, e in zip(ks, bs, es, strict=True)}
        if len(deltas) != 1:
            return (f"branches give different output sizes on spatial axis {axis} "
                    f"(kernels {ks}, pads begin {bs} end {es})")
        begin = max(bs)
        if any((begin - b) % d for b in bs):
            return f"branch offsets on spatial axis {axis} are not multiples of dilation {d}"
        span_end = max(-b + d * (k - 1) for k, b in zip(ks, bs, strict=True))
        size = (begin + span_end) // d + 1
        end = deltas.pop() + d * (size - 1) - begin
        if begin < 0 or end < 0:
            return f"merged padding on spatial axis {axis} would be negative ({begin}, {end})"
        merged_kernel.append(size)
        begins.append(begin)
        ends.append(end)
        for j, b in enumerate(bs):
            offsets[j][axis] = (begin - b) // d
    return tuple(merged_kernel), begins + ends, [tuple(o) for o in offsets]


def fold_input_affine_gemm(
    b_matrix: np.ndarray, c_bias: np.ndarray, trans_b: bool, alpha: float, beta: float,
    a: np.ndarray, c: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm(a*x + c) with per-input-feature a, c: alpha*(a*x + c) @ B + beta*C
    = alpha * x @ (a[:, None] * B) + (beta*C + alpha * c @ B), B in [K, O] layout.
    Returns (B' in the Gemm's own layout, C') for beta' = 1."""
    b_ko = f64(b_matrix).T if trans_b else f64(b_matrix)
    scaled = f64(a)[:, None] * b_ko
    bias = float(beta) * f64(c_bias) + float(alpha) * (f64(c) @ b_ko)
    return (scaled.T if trans_b else scaled), bias


# Residual removal (RMNet Reserve-and-Merge; docs/RULES.md, remove-residual). A chain of convs
# is widened so that it also carries the block input x; `main` / `carry` index arrays say where
# a widened tensor keeps the chain's own channels and the carried copies of x's channels (in
# x's order). `tap` is the kernel position (pads_begin / dilation per axis) at which output i
# reads input i*stride: a Dirac there copies the input, subsampled by the stride.


def dirac_kernel(channels: int, kernel: tuple[int, ...], tap: tuple[int, ...]) -> np.ndarray:
    """The identity as a group-1 conv: K[c, c, *tap] = 1, zero elsewhere."""
    k = np.zeros((channels, channels) + tuple(kernel))
    k[(np.arange(channels), np.arange(channels)) + tuple(tap)] = 1.0
    return k


def widen_first_conv(
    weight: np.ndarray, bias: np.ndarray | None, group: int, tap: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """conv1 on x, widened with one Dirac output channel per input channel, bias 0 on them.

    Group gi's outputs become [its O/g conv channels, copies of its I/g input channels]
    (group 1: [W1; I]). Returns (W', b', main, carry)."""
    w = f64(weight)
    out_c, per_in = w.shape[:2]
    per_out = out_c // group
    width = per_out + per_in
    first = np.arange(group)[:, None] * width
    main = (first + np.arange(per_out)[None, :]).reshape(-1)
    carry = (first + per_out + np.arange(per_in)[None, :]).reshape(-1)
    w_new = np.zeros((group * width, per_in) + w.shape[2:])
    w_new[main] = w
    c = np.arange(group * per_in)
    w_new[(carry, c % per_in) + tuple(tap)] = 1.0
    b_new = np.zeros(group * width)
    if bias is not None:
        b_new[main] = f64(bias)
    return w_new, b_new, main, carry


def widen_middle_conv(
    weight: np.ndarray, bias: np.ndarray | None, group: int, main: np.ndarray,
    carry: np.ndarray, tap: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """A conv inside the chain, reading a widened tensor: its own channels from `main`, and
    the carried channels copied through by a Dirac. Output layout [own | carried].

    Group 1: W'[:O, main] = W, W'[O + c, carry[c], tap] = 1. Group g > 1 (caller checks: input
    laid out [own | carried], I/g == O/g =: k, k divides C): the carried channels become C/k
    extra groups of k channels with the identity inside each. Returns (W', b', group', main',
    carry')."""
    w = f64(weight)
    out_c, per_in = w.shape[:2]
    channels = len(carry)
    b_new = np.concatenate([bias_or_zeros(bias, out_c), np.zeros(channels)])
    c = np.arange(channels)
    if group == 1:
        w_new = np.zeros((out_c + channels, len(main) + channels) + w.shape[2:])
        w_new[:out_c, main] = w
        w_new[out_c:, carry] = dirac_kernel(channels, w.shape[2:], tap)
        new_group = 1
    else:
        ident = np.zeros((channels, per_in) + w.shape[2:])
        ident[(c, c % per_in) + tuple(tap)] = 1.0
        w_new = np.concatenate([w, ident])
        new_group = group + channels // per_in
    return w_new, b_new, new_group, np.arange(out_c), out_c + c


def widen_last_conv(
    weight: np.ndarray, bias: np.ndarray | None, main: np.ndarray, carry: np.ndarray,
    tap: tuple[int, ...], shortcut: np.ndarray | None = None,
    shortcut_bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The group-1 conv that ends the chain, summed with the shortcut: conv_n(h) + x becomes
    [W_n | Dirac] on [h | x]; conv_n(h) + conv1x1(x) becomes [W_n | embed(W_down)], bias
    b_n + b_down (the 1x1 shortcut's stride equals the chain's; docs/RULES.md, remove-residual)."""
    w = f64(weight)
    out_c = w.shape[0]
    w_new = np.zeros((out_c, len(main) + len(carry)) + w.shape[2:])
    w_new[:, main] = w
    if shortcut is None:
        w_new[:, carry] = dirac_kernel(out_c, w.shape[2:], tap)
    else:
        s = f64(shortcut).reshape(out_c, len(carry))
        w_new[(slice(None), carry) + tuple(tap)] = s
    b_new = bias_or_zeros(bias, out_c)
    if shortcut_bias is not None:
        b_new = b_new + f64(shortcut_bias)
    return w_new, b_new


def carried_bounds(
    width: int, main: np.ndarray, low: float, high: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) for Min(Max(t, low), high): Clip(low, high) on the chain's own
    channels, (-inf, +inf) on the carried ones, which pass unchanged (docs/RULES.md,
    remove-residual)."""
    lo = np.full(width, -np.inf)
    hi = np.full(width, np.inf)
    lo[main], hi[main] = low, high
    return lo, hi


def grouped_to_full(weight: np.ndarray, group: int) -> np.ndarray:
    """A grouped conv weight [O, I/g, *k] as the dense [O, I, *k] it stands for."""
    w = f64(weight)
    out_c, in_g = w.shape[:2]
    full = np.zeros((out_c, in_g * group) + w.shape[2:])
    per_out = out_c // group
    for gi in range(group):
        full[gi * per_out:(gi + 1) * per_out, gi * in_g:(gi + 1) * in_g] = w[gi * per_out:
                                                                             (gi + 1) * per_out]
    return full


def full_to_grouped(full: np.ndarray, group: int) -> np.ndarray | None:
    """The inverse of grouped_to_full, or None when `full` has weights outside the groups."""
    out_c, in_c = full.shape[:2]
    if out_c % group or in_c % group:
        return None
    per_out, per_in = out_c // group, in_c // group
    grouped = np.zeros((out_c, per_in) + full.shape[2:])
    mask = np.zeros(full.shape[:2], dtype=bool)
    for gi in range(group):
        rows, cols = slice(gi * per_out, (gi + 1) * per_out), slice(gi * per_in, (gi + 1) * per_in)
        grouped[rows] = full[rows, cols]
        mask[rows, cols] = True
    if np.any(full[~mask] != 0):
        return None
    return grouped


def compose_convs(
    w1: np.ndarray, b1: np.ndarray, g1: int, w2: np.ndarray, b2: np.ndarray, g2: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """conv2(conv1(x)) as one conv when one of the two is 1x1 (docs/RULES.md,
    merge-sequential):
    K[o, i] = sum_d W2[o, d] * W1[d, i] (the 1x1 factor is a matrix), b = b2 + sum W2 * b1.
    The result keeps the coarser group structure when one grouping refines the other."""
    f1, f2 = grouped_to_full(w1, g1), grouped_to_full(w2, g2)
    if f1.shape[2:] == (1,) * (f1.ndim - 2):  # 1x1 first: spatial from the second
        k = np.einsum("od...,di->oi...", f2, f1.reshape(f1.shape[:2]))
    else:  # 1x1 second
        k = np.einsum("od,di...->oi...", f2.reshape(f2.shape[:2]), f1)
    bias = f64(b2) + f2.reshape(f2.shape[0], f2.shape[1], -1).sum(axis=2) @ f64(b1)
    group = g1 if g2 % g1 == 0 else (g2 if g1 % g2 == 0 else 1)
    grouped = full_to_grouped(k, group)
    if grouped is None:  # cannot happen for refining groupings; dense is always exact
        group, grouped = 1, k
    return grouped, bias, group
