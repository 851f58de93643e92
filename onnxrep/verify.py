"""Numerical proof that the fused model computes what the input model computes.

Two onnxruntime CPU sessions with graph optimizations disabled on both (we test our graph,
not onnxruntime's rewrite of it), fed the same seeded random inputs of the declared dtypes.
Symbolic dimensions take values from `input_shapes` (name -> dims) or 1. Per output: max
absolute error, relative L2 error, and pass/fail: an output passes when its relative L2
error is at most `rtol`, or its max absolute error at most `atol` (outputs near zero).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxrep.errors import OnnxrepError, first_line
from onnxrep.io import TWO_GB, SplitModel, save_atomic, serialize

ort.set_default_logger_severity(3)  # onnxruntime's optimizer warnings are not ours to print

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-6


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel_l2: float
    passed: bool


@dataclass
class Verification:
    passed: bool
    rtol: float
    atol: float
    outputs: list[OutputDiff] = field(default_factory=list)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def worst_rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    def as_dict(self) -> dict:
        return asdict(self) | {"worst_rel_l2": self.worst_rel_l2}


ModelRef = onnx.ModelProto | SplitModel | str | os.PathLike


def session(model: ModelRef, threads: int = 0, optimize: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session; in-memory models past 2 GB go through a temp file."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(model, onnx.ModelProto | SplitModel):
            split = model if isinstance(model, SplitModel) else SplitModel(model)
            if split.nbytes < TWO_GB:
                return ort.InferenceSession(serialize(split), options, providers=providers)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                save_atomic(split, path, external_data=True)
                return ort.InferenceSession(str(path), options, providers=providers)
        return ort.InferenceSession(str(model), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types; one line for users
        raise OnnxrepError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """`name:1,3,224,224` strings -> {name: dims}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise OnnxrepError(f"--input-shape '{spec}': expected name:d1,d2,...") from None
    return shapes


def random_inputs(
    sess: ort.InferenceSession, input_shapes: dict[str, list[int]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    input_shapes = input_shapes or {}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for arg in sess.get_inputs():
        if arg.name in input_shapes:
            dims = input_shapes[arg.name]
            if len(dims) != len(arg.shape):
                raise OnnxrepError(
                    f"--input-shape {arg.name}: {len(dims)} dims given, model has {len(arg.shape)}"
                )
        else:
            dims = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        feeds[arg.name] = _random_tensor(rng, arg.type, dims)
    unknown = set(input_shapes) - set(feeds)
    if unknown:
        raise OnnxrepError(f"--input-shape names unknown inputs: {', '.join(sorted(unknown))}")
    return feeds


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _random_tensor(rng: np.random.Generator, ort_type: str, dims: list[int]) -> np.ndarray:
    dtype = _ORT_TYPES.get(ort_type)
    if dtype is None:
        raise OnnxrepError(f"cannot make random inputs of type {ort_type}")
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype is np.bool_:
        return rng.integers(0, 2, dims).astype(np.bool_)
    return rng.integers(0, 10, dims).astype(dtype)


def compare_outputs(
    names: list[str], ref: list[np.ndarray], new: list[np.ndarray], rtol: float, atol: float
) -> list[OutputDiff]:
    diffs = []
    for name, a, b in zip(names, ref, new, strict=True):
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
        if a64.shape != b64.shape:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), False))
            continue
        if a64.size == 0:
            diffs.append(OutputDiff(name, 0.0, 0.0, True))
            continue
        # Positions equal in both (the same inf, or nan in both) count as zero error; an inf
        # or nan in only one of them is an infinite error.
        same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
        with np.errstate(invalid="ignore"):
            err = np.where(same, 0.0, a64 - b64)
        err = np.where(np.isnan(err), np.inf, err)
        max_abs = float(np.max(np.abs(err)))
        norm = float(np.linalg.norm(np.where(np.isfinite(a64), a64, 0.0)))
        rel = float(np.linalg.norm(err) / norm) if norm > 0 else (0.0 if max_abs == 0 else np.inf)
        passed = bool(np.isfinite(max_abs) and (rel <= rtol or max_abs <= atol))
        diffs.append(OutputDiff(name, max_abs, rel, passed))
    return diffs


def _run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], which: str) -> list:
    try:
        return sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - one line for users
        raise OnnxrepError(f"onnxruntime failed to run the {which} model: {first_line(exc)}"
                           ) from exc


def verify(
    reference: ModelRef,
    candidate: ModelRef,
    input_shapes: dict[str, list[int]] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> Verification:
    """Run both models on the same random inputs and compare every output."""
    ref_sess = session(reference)
    new_sess = session(candidate)
    ref_names = [o.name for o in ref_sess.get_outputs()]
    new_names = [o.name for o in new_sess.get_outputs()]
    if ref_names != new_names:
        raise OnnxrepError(f"the models' outputs differ: {ref_names} vs {new_names}")
    feeds = random_inputs(ref_sess, input_shapes, seed)
    new_inputs = {i.name for i in new_sess.get_inputs()}
    if new_inputs != set(feeds):
        raise OnnxrepError(f"the models' inputs differ: {sorted(feeds)} vs {sorted(new_inputs)}")
    ref_out = _run(ref_sess, feeds, "input")
    new_out = _run(new_sess, feeds, "fused")
    outputs = compare_outputs(ref_names, ref_out, new_out, rtol, atol)
    return Verification(
        passed=all(o.passed for o in outputs),
        rtol=rtol,
        atol=atol,
        outputs=outputs,
        input_shapes={k: list(v.shape) for k, v in feeds.items()},
    )
