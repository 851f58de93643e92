"""The engine's local check of each rewrite: a wrong rewrite is refused, naming its rule, and
the rest of the model still fuses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxrep import engine, local_check
from onnxrep import graph as graph_mod
from onnxrep.rule import Match, NewNode, NewWeight, Refusal, Replacement
from tests.helpers import chain, conv, make_model, node, rand


@dataclass
class Plan:
    node: gs.Node


class Rewrites:
    """A fake rule: every `op` node becomes what `build(node)` says."""

    summary = "test rule"
    opt_in = False

    def __init__(self, rule_id: str, op: str, build) -> None:
        self.id, self.anchors, self.build = rule_id, (op,), build

    def match(self, graph: gs.Graph, n: gs.Node) -> Match | None:
        return Match(anchor=n, nodes=[n])

    def check(self, graph: gs.Graph, m: Match) -> Plan | Refusal:
        return Plan(m.anchor)

    def rewrite(self, graph: gs.Graph, plan: Plan) -> Replacement:
        return Replacement([plan.node], [self.build(plan.node)], "test")


def relu_then_sigmoid(shape: list) -> gs.Graph:
    nodes, inits = chain(conv("conv", "x", rand(4, 3, 3, 3), rand(4), pads=[1, 1, 1, 1],
                              strides=[2, 2]))
    nodes += [node("Relu", ["conv_out"], ["r"], "relu"), node("Sigmoid", ["r"], ["y"], "sig")]
    return graph_mod.normalize(make_model(nodes, [("x", shape)], [("y", None)], inits))


def test_a_wrong_rewrite_is_refused_and_the_right_one_applied() -> None:
    """Relu -> Abs agrees on positive inputs only: the negative regime catches it."""
    graph = relu_then_sigmoid(["N", 3, "H", "W"])
    wrong = Rewrites("relu-to-abs", "Relu",
                     lambda n: NewNode("Abs", n.name, [n.inputs[0]], [n.outputs[0]]))
    result = engine.run(graph, [wrong], check_locally=True)
    assert result.applied == []
    (miss,) = result.misses
    assert miss.rule == "relu-to-abs"
    assert miss.reason.startswith("local check failed, rewrite not applied: r differs at")
    assert "a bug in rule relu-to-abs" in miss.reason
    assert [n.op for n in graph.nodes] == ["Conv", "Relu", "Sigmoid"]


def test_a_rewrite_wrong_only_at_odd_sizes_is_refused() -> None:
    """A stride-2 Conv with its end pads dropped agrees with the original at even sizes."""
    graph = relu_then_sigmoid(["N", 3, "H", "W"])

    def drop_end_pads(n: gs.Node) -> NewNode:
        return NewNode("Conv", n.name, list(n.inputs), [n.outputs[0]],
                       {**n.attrs, "pads": [1, 1, 0, 0]})

    result = engine.run(graph, [Rewrites("drop-pads", "Conv", drop_end_pads)],
                        check_locally=True)
    assert result.applied == []
    assert "local check failed" in result.misses[0].reason
    assert "fails at" in result.misses[0].reason or "differs at" in result.misses[0].reason


def test_an_exact_rewrite_is_checked_at_several_sizes_and_regimes() -> None:
    graph = relu_then_sigmoid(["N", 3, "H", "W"])

    relu = next(n for n in graph.nodes if n.op == "Relu")
    rule = Rewrites("relu-again", "Relu",
                    lambda n: NewNode("Relu", n.name, [n.inputs[0]], [n.outputs[0]]))
    check = local_check.check(graph, rule.rewrite(graph, Plan(relu)))
    assert check.passed and check.runs == 6, check
    assert check.detail == ("checked: 6 runs at conv_out[1, 4, 9, 8]; conv_out[2, 4, 12, 13]; "
                            "conv_out[1, 4, 17, 16]")


def test_a_size_agnostic_block_of_a_static_model_is_checked_at_small_sizes() -> None:
    """A Relu computes the same map at every size: checked at the small sizes, both
    parities, whatever the model fixes (a 224x224 layer would cost a full run per regime)."""
    graph = relu_then_sigmoid([1, 3, 10, 10])
    relu = next(n for n in graph.nodes if n.op == "Relu")
    rule = Rewrites("relu-again", "Relu",
                    lambda n: NewNode("Relu", n.name, [n.inputs[0]], [n.outputs[0]]))
    check = local_check.check(graph, rule.rewrite(graph, Plan(relu)))
    assert check.passed and check.runs == 6, check
    assert "conv_out[2, 4, 12, 13]" in check.detail


def test_a_size_bound_block_of_a_static_model_is_checked_at_its_own_size_only() -> None:
    nodes, inits = chain(conv("conv", "x", rand(4, 3, 3, 3), rand(4), pads=[1, 1, 1, 1]))
    nodes.append(node("Flatten", ["conv_out"], ["y"], "flat"))
    graph = graph_mod.normalize(make_model(nodes, [("x", [1, 3, 5, 5])], [("y", None)], inits))
    flat = next(n for n in graph.nodes if n.op == "Flatten")
    rule = Rewrites("flatten-again", "Flatten",
                    lambda n: NewNode("Flatten", n.name, [n.inputs[0]], [n.outputs[0]]))
    check = local_check.check(graph, rule.rewrite(graph, Plan(flat)))
    assert check.passed and check.runs == 4, check
    assert check.detail == "checked: 4 runs at conv_out[1, 4, 5, 5]"


@pytest.mark.parametrize("shape", [["N", 3, "H", "W"], [1, 3, 10, 10]])
def test_checks_are_reported_per_rewrite(shape: list) -> None:
    graph = relu_then_sigmoid(shape)
    rule = Rewrites("relu-to-max0", "Relu", lambda n: NewNode(
        "Max", n.name, [n.inputs[0], NewWeight("zero", np.zeros(1, np.float32))],
        [n.outputs[0]]))
    result = engine.run(graph, [rule], check_locally=True)
    (applied,) = result.applied
    assert applied.checked.startswith("checked: ")
    assert applied.as_dict()["checked"] == applied.checked


def _computed_view(shape: list) -> gs.Graph:
    """x -> Relu -> r -> Reshape(r, Concat(Shape(x)[0:1], [-1])) -> y -> Sigmoid: the
    dynamo export's flatten, whose shape input is an integer tensor computed from a shape."""
    import numpy as np

    nodes = [node("Relu", ["x"], ["r"], "relu"),
             node("Shape", ["x"], ["s0"], "shape_of", start=0, end=1),
             node("Concat", ["s0", "rest"], ["s"], "cat", axis=0),
             node("Reshape", ["r", "s"], ["y"], "view"),
             node("Sigmoid", ["y"], ["out"], "sig")]
    from tests.helpers import const

    model = make_model(nodes, [("x", shape)], [("out", None)],
                       [const("rest", np.array([-1]), np.int64)])
    return graph_mod.normalize(model)


def test_a_block_reading_a_computed_shape_is_checked_with_its_shape_computation() -> None:
    """The shape input is computed from Shape(x): the block is cut out with that computation
    (x becomes its input), not left unchecked for reading an integer tensor."""
    graph = _computed_view(["N", 4, 3, 3])
    right = Rewrites("view-to-flatten", "Reshape",
                     lambda n: NewNode("Flatten", n.name, [n.inputs[0]], [n.outputs[0]],
                                       {"axis": 1}))
    result = engine.run(graph, [right], check_locally=True)
    (applied,) = result.applied
    assert applied.checked.startswith("checked: "), applied.checked


def test_a_wrong_rewrite_of_a_computed_shape_block_is_refused() -> None:
    """Flatten(axis=2) keeps the batch for [N, 4, 3, 3] only by accident of nothing: the
    local check, now able to cut the block out, refuses it."""
    graph = _computed_view(["N", 4, 3, 3])
    wrong = Rewrites("view-to-flatten2", "Reshape",
                     lambda n: NewNode("Flatten", n.name, [n.inputs[0]], [n.outputs[0]],
                                       {"axis": 2}))
    result = engine.run(graph, [wrong], check_locally=True)
    assert result.applied == []
    (miss,) = result.misses
    assert miss.reason.startswith("local check failed, rewrite not applied"), miss.reason
