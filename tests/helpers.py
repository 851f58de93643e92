"""Builders for hand-made ONNX graphs, shared by every rule test (now and later).

A graph is built from nodes made here (each builder returns the node and the initializers it
owns) and `make_model`. Weights are seeded numpy (`rand`, `bn_params`). `fuse_model` runs
onnxrep on a ModelProto and always checks the output with the onnx checker; the small
readers (`applied_rules`, `misses_for`, `op_counts`) look into its result.

    node, inits = conv("conv", "x", rand(8, 3, 3, 3), rand(8), pads=[1, 1, 1, 1])
    norm, more = bn("bn", node.output[0], 8, out="y")
    model = make_model([node, norm], [("x", ["N", 3, 16, 16])], [("y", None)], inits + more)
    result = fuse_model(model)
    assert applied_rules(result) == Counter({"fold-bn": 1})
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep.api import Result
from onnxrep.rule import Match, NewNode, Refusal, Replacement

Shape = Sequence[int | str] | None
TensorSpec = tuple[str, Shape] | tuple[str, Shape, int] | onnx.ValueInfoProto
NodeAndInits = tuple[onnx.NodeProto, list[TensorProto]]

FLOAT = TensorProto.FLOAT
# the rules that write canonical plain ops (not re-parameterization): a plain export goes
# through them too before its op counts are compared with a fused training-time export
CANONICAL = ["global-pool", "flatten", "reshape-chain"]


def rand(*shape: int, seed: int = 0, dtype: Any = np.float32, low: float | None = None,
         high: float | None = None) -> np.ndarray:
    """Seeded random array: standard normal, or uniform in [low, high) when both are given."""
    rng = np.random.default_rng(seed)
    if low is not None and high is not None:
        return rng.uniform(low, high, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def const(name: str, value: np.ndarray | float, dtype: Any = np.float32) -> TensorProto:
    """An initializer named `name`."""
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    """(name, shape) or (name, shape, elem_type) -> ValueInfoProto; shape None = unknown.
    String dims are symbolic ("N")."""
    if isinstance(spec, onnx.ValueInfoProto):
        return spec
    name, shape, *rest = spec
    return helper.make_tensor_value_info(name, rest[0] if rest else FLOAT, shape)


def make_model(
    nodes: Iterable[onnx.NodeProto],
    inputs: Iterable[TensorSpec],
    outputs: Iterable[TensorSpec],
    initializers: Iterable[TensorProto] = (),
    opset: int = 18,
    ir_version: int = 9,
    check: bool = True,
) -> onnx.ModelProto:
    """A model of one graph; checked with the onnx checker unless `check=False`.
    Outputs given without a shape get the one onnx shape inference finds."""
    graph = helper.make_graph(list(nodes), "test", [value_info(s) for s in inputs],
                              [value_info(s) for s in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        inferred = onnx.shape_inference.infer_shapes(model)
        for out, found in zip(model.graph.output, inferred.graph.output, strict=True):
            if not out.type.tensor_type.HasField("shape"):
                out.CopyFrom(found)
    if check:
        onnx.checker.check_model(model)
    return model


def node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None,
         **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=name or outputs[0], **attrs)


def conv(name: str, x: str, weight: np.ndarray, bias: np.ndarray | None = None,
         out: str | None = None, op: str = "Conv", **attrs: Any) -> NodeAndInits:
    """A Conv (or ConvTranspose with op=) with initializers `<name>.W` and `<name>.b`."""
    inits = [const(f"{name}.W", weight, weight.dtype)]
    inputs = [x, f"{name}.W"]
    if bias is not None:
        inits.append(const(f"{name}.b", bias, bias.dtype))
        inputs.append(f"{name}.b")
    return node(op, inputs, [out or f"{name}_out"], name, **attrs), inits


def bn_params(channels: int, seed: int = 1, dtype: Any = np.float32
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random (gamma, beta, mean, var): gamma in [0.5, 1.5), var in [0.5, 2) - well scaled."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.standard_normal(channels) * 0.3
    mean = rng.standard_normal(channels) * 0.5
    var = rng.uniform(0.5, 2.0, channels)
    return tuple(a.astype(dtype) for a in (gamma, beta, mean, var))  # type: ignore[return-value]


def bn(name: str, x: str, channels: int, out: str | Sequence[str] | None = None, seed: int = 1,
       dtype: Any = np.float32, **attrs: Any) -> NodeAndInits:
    """A BatchNormalization with seeded parameters `<name>.{scale,bias,mean,var}` and
    epsilon 1e-3 (not ONNX's default: a rule must read it). `out` may list the running-stat
    outputs too (training_mode=1 needs all three)."""
    params = bn_params(channels, seed, dtype)
    names = [f"{name}.{p}" for p in ("scale", "bias", "mean", "var")]
    inits = [const(n, v, dtype) for n, v in zip(names, params, strict=True)]
    attrs.setdefault("epsilon", 1e-3)
    outs = [out or f"{name}_out"] if out is None or isinstance(out, str) else list(out)
    return node("BatchNormalization", [x, *names], outs, name, **attrs), inits


def binary(op: str, name: str, x: str, value: np.ndarray, out: str | None = None,
           const_first: bool = False) -> NodeAndInits:
    """`op(x, <name>.c)` (or `op(<name>.c, x)`) with a constant operand."""
    c = f"{name}.c"
    inputs = [c, x] if const_first else [x, c]
    return node(op, inputs, [out or f"{name}_out"], name), [const(c, value, value.dtype)]


def chain(*pieces: NodeAndInits) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Collect the nodes and initializers of several builders."""
    nodes, inits = [], []
    for n, i in pieces:
        nodes.append(n)
        inits.extend(i)
    return nodes, inits


def fuse_model(model: onnx.ModelProto, **kw: Any) -> Result:
    """`onnxrep.fuse` on a copy of `model` (the input is never touched); the fused model must
    pass the onnx checker whatever happened."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = onnxrep.fuse(copy, **kw)
    onnx.checker.check_model(result.model, full_check=True)
    return result


def applied_rules(result: Result) -> Counter[str]:
    return Counter(a.rule for a in result.report.applied)


def misses_for(result: Result, rule_id: str) -> list[str]:
    """The near-miss reasons a rule recorded at the fixed point."""
    return [m.reason for m in result.report.misses if m.rule == rule_id]


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """onnxrep's own session builder: CPU, graph optimizations off."""
    from onnxrep.verify import session as ort_session

    return ort_session(model)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime outputs (graph optimizations off)."""
    return session(model).run(None, feeds)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(a64), 1e-30))


def assert_same_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                        feeds: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    """Both models give the same outputs (relative L2) on `feeds`, by our own onnxruntime run."""
    for a, b in zip(run(reference, feeds), run(candidate, feeds), strict=True):
        assert a.shape == b.shape
        assert rel_l2(a, b) <= rtol, rel_l2(a, b)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def dims(info: onnx.ValueInfoProto) -> list[int | str]:
    """A graph input/output's dims, symbolic ones as their names."""
    return [d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in info.type.tensor_type.shape.dim]


def expect_fused(result: Result, ops: dict[str, int], rules: dict[str, int]) -> None:
    """Verified, exactly these op counts after, exactly these rules applied."""
    assert result.verified, result.report.verification
    assert op_counts(result.model) == Counter(ops), op_counts(result.model)
    assert applied_rules(result) == Counter(rules), result.report.applied


def expect_refused(result: Result, rule_id: str, *words: str) -> list[str]:
    """`rule_id` did not fire and one of its near-miss reasons contains every word."""
    assert applied_rules(result)[rule_id] == 0, result.report.applied
    reasons = misses_for(result, rule_id)
    assert any(all(w in r for w in words) for r in reasons), (words, reasons)
    return reasons


def onnxrep_command() -> list[str]:
    """The installed console script (next to this interpreter, else on PATH)."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / "onnxrep"
    found = str(beside) if beside.exists() else shutil.which("onnxrep")
    assert found, "the onnxrep console script is not installed (pip install -e .)"
    return [found]


def cli(*args: Any, cwd: Any = None, timeout: float = 300) -> Any:
    """Run `onnxrep ARGS...` in a subprocess; returns the CompletedProcess (text output)."""
    import subprocess

    return subprocess.run([*onnxrep_command(), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(returncode: int, stderr: str, code: int = 2) -> str:
    """Exit 2 (bad input; 3: internal error), exactly one line on stderr, an 'onnxrep: error:'
    ('onnxrep: internal error:') and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == code, (returncode, stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    prefix = "onnxrep: error: " if code == 2 else "onnxrep: internal error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@dataclass
class SwapPlan:
    node: gs.Node


class Swap:
    """A fake rule that replaces every `src` node by a `dst` node on the same tensors."""

    summary = "test rule"
    opt_in = False

    def __init__(self, rule_id: str, src: str, dst: str) -> None:
        self.id, self.anchors, self.dst = rule_id, (src,), dst

    def match(self, graph: gs.Graph, n: gs.Node) -> Match | None:
        return Match(anchor=n, nodes=[n])

    def check(self, graph: gs.Graph, m: Match) -> SwapPlan | Refusal:
        return SwapPlan(m.anchor)

    def rewrite(self, graph: gs.Graph, plan: SwapPlan) -> Replacement:
        n = plan.node
        return Replacement([n], [NewNode(self.dst, n.name, [n.inputs[0]], [n.outputs[0]])],
                           "swap")


def export_families(root: Any, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """family -> {form: training-time export, f"{form}-plain": plain export}, every family
    in `names` exported once per form it supports, into the folder `root` (needs torch)."""
    from models.export import export_forms
    from models.registry import FAMILIES

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        fam = FAMILIES[name]
        out[name] = dict(export_forms(fam.build_train(), fam.input_shape,
                                      {form: root / f"{name}-{form}.onnx" for form in fam.forms}))
        plain = export_forms(fam.build_plain(), fam.input_shape,
                             {form: root / f"{name}-{form}-plain.onnx" for form in fam.forms})
        out[name].update({f"{form}-plain": path for form, path in plain.items()})
    return out


# --- small graph builders shared by rule tests ------------------------------------------

C = 4


class G:
    """A tiny graph under construction: x[N, C, H, W] plus named pieces."""

    def __init__(self, cin: int = C, hw: tuple[int, int] = (9, 7)) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.cin, self.hw, self.seed = cin, hw, 10

    def add(self, piece: tuple) -> None:
        n, i = piece
        self.nodes.append(n)
        self.inits += i

    def conv(self, name: str, x: str, cout: int, k: tuple[int, int] | int, group: int = 1,
             cin: int | None = None, **attrs: object) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        cin = cin or self.cin
        self.seed += 2
        attrs.setdefault("pads", [kh // 2, kw // 2, kh // 2, kw // 2])
        self.add(conv(name, x, rand(cout, cin // group, kh, kw, seed=self.seed),
                      rand(cout, seed=self.seed + 1), out=f"{name}_out", group=group, **attrs))
        return f"{name}_out"

    def op(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(node(op, inputs, [f"{name}_out"], name, **attrs))
        return f"{name}_out"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(const(name, value, value.dtype))
        return name

    def model(self, *outputs: str) -> onnx.ModelProto:
        return make_model(self.nodes, [("x", ["N", self.cin, *self.hw])],
                          [(o, None) for o in outputs], self.inits)


def wt(*shape: int, seed: int) -> np.ndarray:
    """A seeded weight of standard deviation 0.5 (deep test chains stay well scaled)."""
    return rand(*shape, seed=seed) * np.float32(0.5)


def inverted_block(c: int = 4, t: int = 3, expand: bool = True, follow: bool = True,
                   scale: float = 1.0) -> onnx.ModelProto:
    """MobileNetV2: x (graph input: sign unknown) [-> 1x1 expand -> Clip(0, 6)] -> dw3x3 ->
    Clip(0, 6) -> 1x1 project -> Add(x) [-> 1x1 next]. No activation after the Add."""
    hidden = c * t if expand else c
    pieces = []
    src = "input"
    if expand:
        pieces += [conv("expand", "input", wt(hidden, c, 1, 1, seed=1) * np.float32(scale),
                        rand(hidden, seed=2), out="e"),
                   (node("Clip", ["e", "zero", "six"], ["e6"], "clip1"), [])]
        src = "e6"
    pieces += [
        conv("dw", src, wt(hidden, 1, 3, 3, seed=3), rand(hidden, seed=4), out="dwo",
             pads=[1, 1, 1, 1], group=hidden),
        (node("Clip", ["dwo", "zero", "six"], ["d6"], "clip2"), []),
        conv("project", "d6", wt(c, hidden, 1, 1, seed=5), rand(c, seed=6), out="p"),
        (node("Add", ["input", "p"], ["sum" if follow else "y"], "add"), []),
    ]
    if follow:
        pieces.append(conv("next", "sum", wt(5, c, 1, 1, seed=7), rand(5, seed=8), out="y"))
    nodes = [p[0] for p in pieces]
    inits = [i for p in pieces for i in p[1]] + [const("zero", 0.0), const("six", 6.0)]
    return make_model(nodes, [("input", ["N", c, 8, 8])], [("y", None)], inits)
