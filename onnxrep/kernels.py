"""Pure numpy re-parameterization math. No graph objects here.

Everything is computed in float64; callers cast back to the model's dtype with `cast_like`.
Weights follow ONNX layouts: Conv W[O, I/g, *k]; ConvTranspose W[I, O/g, *k];
Gemm B[K, O] (or [O, K] with transB).
"""

from __future__ import annotations

import numpy as np


def f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Cast a float64 result back to the dtype of the tensor it replaces."""
    return np.ascontiguousarray(value.astype(like.dtype))


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BN as y = a*x + c: a = gamma/sqrt(var+eps), c = beta - mean*a."""
    a = f64(gamma) / np.sqrt(f64(var) + float(eps))
    return a, f64(beta) - f64(mean) * a


def scale_conv_output(
    weight: np.ndarray, bias: np.ndarray | None, a: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """a*conv(x)+c per output channel: W' = W*a[O,1,..], b' = a*b + c."""
    w = f64(weight)
    b = np.zeros(w.shape[0]) if bias is None else f64(bias)
    shape = (-1,) + (1,) * (w.ndim - 1)
    return w * f64(a).reshape(shape), f64(a) * b + f64(c)


def scale_conv_transpose_output(
    weight: np.ndarray, bias: np.ndarray | None, a: np.ndarray, c: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose W[I, O/g, *k]: output channel o = gi*(O/g) + j lives at W[gi*(I/g):, j]."""
    w = f64(weight)
    cin, cout_g = w.shape[:2]
    cout = cout_g * group
    b = np.zeros(cout) if bias is None else f64(bias)
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
    b = np.zeros(out_c) if bias is None else f64(bias)
    per_group_out = out_c // group
    a_g = f64(a).reshape(group, in_g)
    c_g = f64(c).reshape(group, in_g)
    gi = np.arange(out_c) // per_group_out
    spatial = (1,) * (w.ndim - 2)
    w_new = w * a_g[gi].reshape((out_c, in_g) + spatial)
    b_new = b + np.einsum("oi...,oi->o", w, c_g[gi])
    return w_new, b_new
