"""Property (hypothesis): a per-channel map (BN, constant Mul/Add/Sub/Div) before random layout
ops, pools and linear consumers, with fan-out, is fused into a model that computes the same -
or left alone. Random graphs exercise what the hand-built cases of test_propagate_affine.py
pick by hand: permutations that move the channel axis, reshapes that keep it or merge it,
pools that count padding, ceil mode, consumers that pad, a second path through a
nonlinearity.

Every drawn graph: onnxrep.fuse raises nothing and verifies; no near miss names a rule bug
("local check failed", "internal error"); our own onnxruntime run at batch 1 and 3 agrees
(relative L2 <= 1e-5). ONNXREP_FUZZ_EXAMPLES sets the count (default 60 here)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxrep
from onnxrep.verify import session

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("ONNXREP_AFFINE_FUZZ_EXAMPLES", "60"))
RULE_BUGS = ("local check failed", "internal error")


class Builder:
    def __init__(self, draw: st.DrawFn, channels: int, hw: tuple[int, int]) -> None:
        self.draw, self.nodes, self.inits, self.k = draw, [], [], 0
        self.channels, self.hw = channels, hw
        self.rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def name(self, hint: str) -> str:
        self.k += 1
        return f"{hint}{self.k}"

    def const(self, value: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.standard_normal(shape) * 0.5).astype(np.float32))

    def op(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info(
            "x", onnx.TensorProto.FLOAT, ["N", self.channels, *self.hw])],
            [helper.make_empty_tensor_value_info(o) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        return model

    def dims(self, tensor: str, outputs: list[str]) -> list | None:
        """Inferred dims of `tensor` (None if inference fails or leaves them unknown)."""
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model(outputs), strict_mode=True)
        except Exception:  # noqa: BLE001 - an invalid draw
            return None
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                        for d in vi.type.tensor_type.shape.dim]
                return None if any(isinstance(d, int) and d <= 0 for d in dims) else dims
        return None


def _map(b: Builder, x: str) -> str:
    c = b.channels
    kind = b.draw(st.sampled_from(["bn", "mul", "add", "sub_from", "div", "scalar"]))
    if kind == "bn":
        gamma, beta = b.rng.uniform(0.5, 1.5, c), b.rng.standard_normal(c)
        mean, var = b.rng.standard_normal(c), b.rng.uniform(0.5, 2.0, c)
        params = [b.const(v.astype(np.float32)) for v in (gamma, beta, mean, var)]
        return b.op("BatchNormalization", [x, *params], epsilon=1e-3)
    shape = b.draw(st.sampled_from([(c, 1, 1), (1, c, 1, 1)]))
    value = b.rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if kind == "scalar":
        return b.op("Mul", [x, b.const(np.array(1.7, np.float32))])
    if kind == "sub_from":
        return b.op("Sub", [b.const(value), x])
    return b.op({"mul": "Mul", "add": "Add", "div": "Div"}[kind], [x, b.const(value)])


def _layout(b: Builder, t: str, dims: list) -> str:
    rank = len(dims)
    choices = ["transpose", "reshape"] + (["reducemean"] if rank >= 2 else [])
    if rank == 4:
        choices += ["avgpool", "maxpool", "gap"]
    op = b.draw(st.sampled_from(choices))
    if op == "transpose":
        return b.op("Transpose", [t], perm=b.draw(st.permutations(list(range(rank)))))
    if op == "reshape":
        statics = [d for d in dims[1:] if isinstance(d, int)]
        total = int(np.prod(statics)) if len(statics) == rank - 1 else None
        targets = [[0, -1]]
        if rank >= 3:
            targets.append([0, *([0] * (rank - 3)), -1])  # merge the last two
            targets.append([-1, *[d if isinstance(d, int) else 0 for d in dims[-2:]]])
        if total is not None:
            targets.append([0, *sorted({1, total})][:2] + [-1] if total > 1 else [0, -1])
        target = b.draw(st.sampled_from(targets))
        return b.op("Reshape", [t, b.const(np.array(target, np.int64))])
    if op == "reducemean":
        axes = b.draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank - 1,
                               unique=True))
        return b.op("ReduceMean", [t, b.const(np.array(axes, np.int64))],
                    keepdims=b.draw(st.sampled_from([0, 1])))
    if op == "gap":
        return b.op("GlobalAveragePool", [t])
    k = b.draw(st.integers(1, 3))
    pad = b.draw(st.integers(0, min(1, k - 1)))
    attrs = {"kernel_shape": [k, k], "strides": [b.draw(st.integers(1, 2))] * 2,
             "pads": [pad] * 4, "ceil_mode": b.draw(st.sampled_from([0, 1]))}
    if op == "avgpool":
        attrs["count_include_pad"] = b.draw(st.sampled_from([0, 1]))
        return b.op("AveragePool", [t], **attrs)
    return b.op("MaxPool", [t], **attrs)


def _consumer(b: Builder, t: str, dims: list) -> str:
    kinds = ["relu"] if b.draw(st.integers(0, 3)) == 0 else []
    if isinstance(dims[-1], int):
        kinds.append("matmul")
    if len(dims) == 4 and isinstance(dims[1], int):
        kinds.append("conv")
    if len(dims) == 2 and isinstance(dims[1], int):
        kinds.append("gemm")
    assume(kinds)
    kind = b.draw(st.sampled_from(kinds))
    if kind == "relu":
        return b.op("Relu", [t])
    if kind == "matmul":
        return b.op("MatMul", [t, b.weight(dims[-1], 3)])
    if kind == "gemm":
        return b.op("Gemm", [t, b.weight(3, dims[1]), b.weight(3)], transB=1)
    k = b.draw(st.sampled_from([1, 3]))
    pad = b.draw(st.integers(0, k // 2))
    return b.op("Conv", [t, b.weight(3, dims[1], k, k), b.weight(3)], pads=[pad] * 4)


@st.composite
def affine_graphs(draw: st.DrawFn) -> onnx.ModelProto:
    b = Builder(draw, draw(st.integers(2, 4)), (draw(st.integers(4, 7)),
                                                  draw(st.integers(3, 7))))
    x = "x"
    if draw(st.integers(0, 3)) == 0:  # something to fold back into (else forward only)
        x = b.op("Conv", ["x", b.weight(b.channels, b.channels, 1, 1), b.weight(b.channels)])
    y = _map(b, x)
    outputs = []
    for _ in range(draw(st.integers(1, 2))):  # fan-out
        t = y
        for _ in range(draw(st.integers(0, 2))):
            dims = b.dims(t, [t])
            assume(dims is not None)
            t = _layout(b, t, dims)
        dims = b.dims(t, [t])
        assume(dims is not None)
        outputs.append(_consumer(b, t, dims))
    model = b.model(outputs)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        onnx.checker.check_model(model, full_check=True)
        ref = session(model)
        for n in (1, 3):
            ref.run(None, {"x": np.zeros((n, b.channels, *b.hw), np.float32)})
    except Exception:  # noqa: BLE001 - a graph onnxruntime does not run: not a case
        assume(False)
    return model


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(affine_graphs())
def test_random_affine_paths_fuse_exactly_or_stay(model: onnx.ModelProto) -> None:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = onnxrep.fuse(copy, input_shapes={"x": [2, *dims]})
    assert result.verified, result.report.verification
    fired = sorted({a.rule for a in result.report.applied})
    event(f"rules: {', '.join(fired) or 'none'}")
    bugs = [m for m in result.report.misses if any(w in m.reason for w in RULE_BUGS)]
    assert not bugs, bugs
    ref, fused = session(model), session(result.model)
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, *dims)).astype(np.float32)
        for a, c in zip(ref.run(None, {"x": x}), fused.run(None, {"x": x}), strict=True):
            a64, c64 = a.astype(np.float64), c.astype(np.float64)
            err = np.linalg.norm(a64 - c64) / max(np.linalg.norm(a64), 1e-30)
            assert err <= 1e-5 or np.max(np.abs(a64 - c64)) <= 1e-5, (err, result.report.applied)
