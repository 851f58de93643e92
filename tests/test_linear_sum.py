"""linear_sum on small hand-built gs graphs: which nodes expand, the coefficients and bias
they give, and which tensors stay leaves."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxrep.linear_sum import Expression, channels_and_rank, expand_sum
from tests.helpers import bn_params, rand, run

C = 3
SHAPE = [2, C, 4, 5]


class Tiny:
    """A gs graph under construction: leaves are graph inputs of SHAPE."""

    def __init__(self) -> None:
        self.nodes: list[gs.Node] = []
        self.inputs: list[gs.Variable] = []
        self.count = 0

    def leaf(self, name: str) -> gs.Variable:
        t = gs.Variable(name, np.float32, SHAPE)
        self.inputs.append(t)
        return t

    def op(self, op: str, *inputs: gs.Tensor, shape: list | None = SHAPE,
           **attrs: object) -> gs.Variable:
        self.count += 1
        out = gs.Variable(f"{op.lower()}{self.count}", np.float32, shape)
        self.nodes.append(gs.Node(op, f"{op.lower()}{self.count}", attrs, list(inputs), [out]))
        return out

    def const(self, value: np.ndarray) -> gs.Constant:
        self.count += 1
        return gs.Constant(f"k{self.count}", np.asarray(value, np.float32))

    def bn(self, x: gs.Tensor, **attrs: object) -> gs.Variable:
        params = [self.const(p) for p in bn_params(C, seed=5)]
        return self.op("BatchNormalization", x, *params, epsilon=1e-3, **attrs)

    def graph(self, *outputs: gs.Variable) -> gs.Graph:
        return gs.Graph(nodes=self.nodes, inputs=self.inputs, outputs=list(outputs), opset=18)


def expand(g: gs.Graph, root: gs.Tensor) -> Expression:
    return expand_sum(g, root.inputs[0], C, 4)


def coefs(expr: Expression) -> dict[str, np.ndarray]:
    return {t.leaf.name: t.coef for t in expr.terms}


def assert_computes(g: gs.Graph, root: gs.Tensor, expr: Expression) -> None:
    """onnxruntime's value of `root` == sum coef * leaf + bias, leaves fed at random."""
    feeds = {t.name: rand(*SHAPE, seed=i) for i, t in enumerate(g.inputs)}
    for t in expr.terms:  # every leaf must be an input here, so the formula can be evaluated
        assert t.leaf.name in feeds
    g.outputs = [root]
    model = gs.export_onnx(g)
    onnx.checker.check_model(model)
    (got,) = run(model, feeds)
    want = sum(t.coef.reshape(1, C, 1, 1) * feeds[t.leaf.name].astype(np.float64)
               for t in expr.terms) + expr.bias.reshape(1, C, 1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_add_sub_tree() -> None:
    t = Tiny()
    a, b, c = t.leaf("a"), t.leaf("b"), t.leaf("c")
    y = t.op("Sub", t.op("Add", a, b), c)
    g = t.graph(y)
    expr = expand(g, y)
    assert {k: v.tolist() for k, v in coefs(expr).items()} == {
        "a": [1.0] * C, "b": [1.0] * C, "c": [-1.0] * C}
    assert np.all(expr.bias == 0)
    assert [n.op for n in expr.internal] == ["Sub", "Add"]
    assert_computes(g, y, expr)


def test_scaled_leaves_and_constant_terms() -> None:
    """Mul / Div by per-channel constants scale; Add / Sub of constants go to the bias, on
    either side; a leaf reached twice sums its coefficients."""
    t = Tiny()
    a, b = t.leaf("a"), t.leaf("b")
    s = t.const(rand(1, C, 1, 1, seed=1))
    d = t.const(rand(C, 1, 1, seed=2, low=0.5, high=2.0))
    u, v = t.const(rand(1, C, 1, 1, seed=3)), t.const(np.float32(0.25))
    left = t.op("Add", t.op("Mul", s, a), t.op("Div", b, d))
    right = t.op("Sub", v, t.op("Add", a, u))
    y = t.op("Add", left, right)
    g = t.graph(y)
    expr = expand(g, y)
    got = coefs(expr)
    np.testing.assert_allclose(got["a"], s.values.reshape(-1) - 1.0)
    np.testing.assert_allclose(got["b"], 1.0 / d.values.reshape(-1).astype(np.float64))
    np.testing.assert_allclose(expr.bias, 0.25 - u.values.reshape(-1).astype(np.float64))
    assert len(expr.internal) == 6
    assert_computes(g, y, expr)


def test_batchnorm_inside_the_tree() -> None:
    t = Tiny()
    a, b = t.leaf("a"), t.leaf("b")
    y = t.op("Add", t.bn(a), b)
    g = t.graph(y)
    expr = expand(g, y)
    gamma, beta, mean, var = (p.astype(np.float64) for p in bn_params(C, seed=5))
    scale = gamma / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(coefs(expr)["a"], scale, rtol=1e-6)
    np.testing.assert_allclose(expr.bias, beta - mean * scale, rtol=1e-6, atol=1e-7)
    assert_computes(g, y, expr)


def test_partial_sum_read_outside_the_tree_stays_a_leaf() -> None:
    t = Tiny()
    a, b, c = t.leaf("a"), t.leaf("b"), t.leaf("c")
    part = t.op("Add", a, b)
    y = t.op("Add", part, c)
    extra = t.op("Relu", part)
    g = t.graph(y, extra)
    expr = expand(g, y)
    assert set(coefs(expr)) == {part.name, "c"}
    assert [n.op for n in expr.internal] == ["Add"]  # the root only


def test_partial_sum_that_is_a_graph_output_stays_a_leaf() -> None:
    t = Tiny()
    a, b, c = t.leaf("a"), t.leaf("b"), t.leaf("c")
    part = t.op("Add", a, b)
    y = t.op("Add", part, c)
    g = t.graph(y, part)
    assert set(coefs(expand(g, y))) == {part.name, "c"}


@pytest.mark.parametrize("case", ["vector_c", "spatial", "div_zero", "int", "variable"])
def test_non_linear_or_non_per_channel_nodes_are_leaves(case: str) -> None:
    """A [C] vector scales the last axis; a [1,1,4,1] constant varies over space; a zero
    divisor; an integer constant; a product of two tensors: none of them expands."""
    t = Tiny()
    a, b = t.leaf("a"), t.leaf("b")
    other = {
        "vector_c": t.const(rand(C, seed=1)),
        "spatial": t.const(rand(1, 1, 4, 1, seed=1)),
        "int": gs.Constant("ki", np.full((1, C, 1, 1), 2, np.int64)),
        "variable": t.leaf("z"),
    }.get(case)
    if case == "div_zero":
        inner = t.op("Div", a, t.const(np.array([1.0, 0.0, 2.0]).reshape(C, 1, 1)))
    else:
        inner = t.op("Mul", a, other)
    y = t.op("Add", inner, b)
    g = t.graph(y)
    expr = expand(g, y)
    assert set(coefs(expr)) == {inner.name, "b"}


def test_batchnorm_in_training_mode_is_a_leaf() -> None:
    t = Tiny()
    a, b = t.leaf("a"), t.leaf("b")
    norm = t.bn(a, training_mode=1)
    y = t.op("Add", norm, b)
    assert set(coefs(expand(t.graph(y), y))) == {norm.name, "b"}


def test_channels_and_rank() -> None:
    t = Tiny()
    x = t.leaf("x")
    w = t.const(rand(C, C, 3, 3, seed=1))
    conv = t.op("Conv", x, w, shape=None, pads=[1, 1, 1, 1])
    known = t.op("Add", conv, x)
    unknown = t.op("Add", t.op("Mul", conv, t.const(np.float32(2.0)), shape=None), x,
                   shape=None)
    nothing = t.op("Add", x, x, shape=None)
    t.graph(known, unknown, nothing)
    assert channels_and_rank(known.inputs[0]) == (C, 4)
    assert channels_and_rank(unknown.inputs[0]) == (C, 4)  # from the Conv below
    assert channels_and_rank(nothing.inputs[0]) is None
