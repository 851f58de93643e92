"""The engine: fixed point, convergence guard, validation of replacements (the escaping-tensor
guard), transactional rewrites (a rule that raises changes nothing), the refusal cache, and
near misses."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxrep
from onnxrep import engine
from onnxrep import graph as graph_mod
from onnxrep.errors import InternalError, RulesDidNotConverge
from onnxrep.query import producer
from onnxrep.rule import Match, NewNode, NewValue, NewWeight, Refusal, Replacement
from tests.helpers import (
    Swap,
    SwapPlan,
    binary,
    bn,
    chain,
    conv,
    expect_fused,
    fuse_model,
    initializer,
    make_model,
    node,
    op_counts,
    rand,
)


def busy_model() -> onnx.ModelProto:
    """Conv-BN-Mul-Relu, BN -> 1x1 Conv, and a training-mode BN that must stay."""
    nodes, inits = chain(
        conv("conv1", "x", rand(8, 3, 3, 3, seed=1), None, pads=[1, 1, 1, 1]),
        bn("bn1", "conv1_out", 8, seed=2),
        binary("Mul", "scale", "bn1_out", rand(8, 1, 1, seed=3, low=0.5, high=2.0)),
        (node("Relu", ["scale_out"], ["r"], "relu"), []),
        bn("bn2", "r", 8, seed=4),
        conv("conv2", "bn2_out", rand(4, 8, 1, 1, seed=5), rand(4, seed=6)),
        bn("bn3", "conv2_out", 4, out=["y", "rm", "rv"], seed=7, training_mode=1))
    return make_model(nodes, [("x", ["N", 3, 10, 10])], [("y", None)], inits)


def test_busy_model_reaches_the_fixed_point() -> None:
    result = fuse_model(busy_model())
    expect_fused(result, {"Conv": 2, "Relu": 1, "BatchNormalization": 1},
                 {"fold-bn": 1, "fold-affine": 1, "fold-bn-forward": 1})


def test_fusing_the_output_again_applies_nothing() -> None:
    first = fuse_model(busy_model())
    second = fuse_model(first.model)
    assert second.report.applied == []
    assert op_counts(second.model) == op_counts(first.model)
    assert second.verified
    for a, b in zip(first.model.graph.node, second.model.graph.node, strict=True):
        assert (a.op_type, list(a.input), list(a.output)) == (b.op_type, list(b.input),
                                                              list(b.output))
    for tensor in first.model.graph.initializer:
        np.testing.assert_array_equal(initializer(second.model, tensor.name),
                                      onnx.numpy_helper.to_array(tensor))


def test_near_misses_are_recorded_once_with_rule_node_and_reason() -> None:
    result = fuse_model(busy_model())
    misses = [m for m in result.report.misses if m.node == "bn3" and m.rule == "fold-bn"]
    assert misses, result.report.misses
    (miss,) = misses  # the engine ran two iterations; only the fixed point's misses stay
    # propagate-affine explains the same BN once too, for the same reason
    (other,) = [m for m in result.report.misses if m.node == "bn3" and m.rule != "fold-bn"]
    assert other.rule == "propagate-affine" and "training_mode=1" in other.reason
    assert miss.as_dict() == {"rule": "fold-bn", "node": "bn3",
                              "reason": "bn3 has training_mode=1 (batch statistics, not a fixed "
                                        "affine map)"}
    assert result.report.as_dict()["near_misses"] == [m.as_dict() for m in result.report.misses]
    assert "bn3" in result.report.render(explain=True)


# --- fake rules ---------------------------------------------------------------------------


Plan = SwapPlan


class HidesEscape:
    """A fake rule that claims Conv -> Relu and says nothing about the Conv output's other
    readers: the engine must find them itself."""

    id = "hides-escape"
    summary = "test rule"
    anchors = ("Relu",)
    opt_in = False

    def match(self, graph: gs.Graph, n: gs.Node) -> Match | None:
        conv_node = producer(n.inputs[0])
        if conv_node is None or conv_node.op != "Conv":
            return None
        return Match(anchor=n, nodes=[conv_node, n])

    def check(self, graph: gs.Graph, m: Match) -> Plan | Refusal:
        return Plan(m.anchor)

    def rewrite(self, graph: gs.Graph, plan: Plan) -> Replacement:
        relu = plan.node
        conv_node = producer(relu.inputs[0])
        return Replacement([conv_node, relu], [
            NewNode("Abs", "abs", [conv_node.inputs[0]], [relu.outputs[0]])], "hides")


def relu_graph(extra_reader: bool = False, conv_is_output: bool = False) -> gs.Graph:
    nodes, inits = chain(conv("conv", "x", rand(4, 3, 1, 1), rand(4)))
    nodes.append(node("Relu", ["conv_out"], ["y"], "relu"))
    outputs = [("y", None)]
    if extra_reader:
        nodes.append(node("Sigmoid", ["conv_out"], ["z"], "sigmoid"))
        outputs.append(("z", None))
    if conv_is_output:
        outputs.append(("conv_out", None))
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], outputs, inits)
    return graph_mod.normalize(model)


def structure(graph: gs.Graph) -> list[tuple]:
    """Everything a rule could change: nodes in order with their op, name, attributes and
    the names and identities of the tensors they read and write, and the graph outputs."""
    return [(n.op, n.name, repr(n.attrs), [(t.name, id(t)) for t in n.inputs],
             [(t.name, id(t)) for t in n.outputs]) for n in graph.nodes] + [
        [(t.name, id(t)) for t in graph.outputs]]


def test_rules_that_undo_each_other_do_not_converge() -> None:
    graph = relu_graph()
    rules = [Swap("relu-to-abs", "Relu", "Abs"), Swap("abs-to-relu", "Abs", "Relu")]
    with pytest.raises(RulesDidNotConverge) as info:
        engine.run(graph, rules, max_iterations=5)
    message = str(info.value)
    assert "relu-to-abs" in message and "abs-to-relu" in message
    assert "5 iterations" in message
    assert isinstance(info.value, InternalError)


def test_non_convergence_through_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact rules (the local checks pass them) that rewrite forever."""
    rules = [Swap("relu-to-relu", "Relu", "Relu"), Swap("conv-to-conv", "Conv", "Conv")]
    monkeypatch.setattr("onnxrep.rules.RULES", rules)
    nodes, inits = chain(conv("conv", "x", rand(4, 3, 1, 1), rand(4)))
    nodes.append(node("Relu", ["conv_out"], ["y"], "relu"))
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", None)], inits)
    with pytest.raises(RulesDidNotConverge, match="relu-to-relu.*conv-to-conv|conv-to-conv.*relu"):
        onnxrep.fuse(model)


def test_a_rule_that_converges_runs_once_per_node() -> None:
    graph = relu_graph()
    result = engine.run(graph, [Swap("relu-to-abs", "Relu", "Abs")])
    assert [a.rule for a in result.applied] == ["relu-to-abs"]
    assert result.iterations == 2
    assert [n.op for n in graph.nodes] == ["Conv", "Abs"]
    assert [n.name for n in graph.nodes] == ["conv", "relu"]  # the new node keeps the name


@pytest.mark.parametrize(("extra_reader", "conv_is_output", "reason"), [
    (True, False, "conv_out (inside the match) is also read by sigmoid"),
    (False, True, "conv_out (inside the match) is a graph output"),
], ids=["other-reader", "graph-output"])
def test_escaping_tensor_blocks_a_rule_that_did_not_check(
        extra_reader: bool, conv_is_output: bool, reason: str) -> None:
    graph = relu_graph(extra_reader, conv_is_output)
    before = structure(graph)
    result = engine.run(graph, [HidesEscape()])
    assert result.applied == []
    assert [(m.rule, m.node, m.reason) for m in result.misses] == [
        ("hides-escape", "relu", reason)]
    assert structure(graph) == before


# --- transactional rewrites -----------------------------------------------------------------


class Raises(Swap):
    """Swap, except that it raises in `where` for the node named `victim`."""

    def __init__(self, where: str, victim: str = "relu") -> None:
        super().__init__("raises", "Relu", "Abs")
        self.where, self.victim = where, victim

    def _maybe_raise(self, stage: str, n: gs.Node) -> None:
        if stage == self.where and n.name == self.victim:
            raise RuntimeError(f"boom\nsecond line of {stage}")

    def match(self, graph: gs.Graph, n: gs.Node) -> Match | None:
        self._maybe_raise("match", n)
        return super().match(graph, n)

    def check(self, graph: gs.Graph, m: Match) -> Plan | Refusal:
        self._maybe_raise("check", m.anchor)
        return super().check(graph, m)

    def rewrite(self, graph: gs.Graph, plan: Plan) -> Replacement:
        replacement = super().rewrite(graph, plan)
        self._maybe_raise("rewrite", plan.node)
        return replacement


def two_relus() -> gs.Graph:
    nodes, inits = chain(conv("conv", "x", rand(4, 3, 1, 1), rand(4)))
    nodes += [node("Relu", ["conv_out"], ["r1"], "relu"), node("Sigmoid", ["r1"], ["s"], "sig"),
              node("Relu", ["s"], ["y"], "relu_2")]
    return graph_mod.normalize(make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", None)], inits))


@pytest.mark.parametrize("where", ["match", "check", "rewrite"])
def test_a_rule_that_raises_changes_nothing_and_the_rest_still_fuses(where: str) -> None:
    graph = two_relus()
    untouched = [n for n in graph.nodes if n.name in ("conv", "relu", "sig")]
    before = [(n.op, [id(t) for t in n.inputs], [id(t) for t in n.outputs]) for n in untouched]
    result = engine.run(graph, [Raises(where)])
    # the other Relu was rewritten
    assert [(a.rule, a.removed) for a in result.applied] == [("raises", ["relu_2"])]
    assert [n.op for n in graph.nodes] == ["Conv", "Relu", "Sigmoid", "Abs"]
    # the node whose rule raised is exactly as it was
    assert [(n.op, [id(t) for t in n.inputs], [id(t) for t in n.outputs])
            for n in untouched] == before
    (miss,) = result.misses
    assert (miss.rule, miss.node) == ("raises", "relu")
    assert miss.reason == "internal error in rule raises at node relu: RuntimeError: boom"


def test_an_internal_error_in_a_rule_is_reported_and_the_model_written(tmp_path) -> None:
    """Through the CLI: exit 0, the model written and verified, --explain names the failure."""
    import onnxrep.rules

    class Broken(Raises):
        id = "fold-bn"  # takes a real rule's place, so --rules/--skip still accept it

    nodes, inits = chain(conv("conv", "x", rand(4, 3, 3, 3), rand(4), pads=[1, 1, 1, 1]),
                         bn("bn", "conv_out", 4, out="y"))
    model = make_model(nodes, [("x", ["N", 3, 6, 6])], [("y", None)], inits)
    graph = graph_mod.normalize(model)
    fold_bn = next(r for r in onnxrep.rules.RULES if r.id == "fold-bn")

    class FoldBnThatRaisesInRewrite(type(fold_bn)):
        def rewrite(self, graph: gs.Graph, plan: object) -> Replacement:
            raise RuntimeError("injected")

    result = engine.run(graph, [FoldBnThatRaisesInRewrite()] + [
        r for r in onnxrep.rules.RULES if r.id != "fold-bn" and not r.opt_in])
    assert [n.op for n in graph.nodes] == ["Conv", "BatchNormalization"]
    assert any("internal error in rule fold-bn at node bn: RuntimeError: injected" == m.reason
               for m in result.misses), result.misses


def test_an_invalid_replacement_is_refused_not_applied() -> None:
    class ReadsRemoved(Swap):
        def rewrite(self, graph: gs.Graph, plan: Plan) -> Replacement:
            n = plan.node
            conv_node = producer(n.inputs[0])
            # reads the conv's output, but removes the conv without replacing its output
            return Replacement([conv_node, n], [
                NewNode("Abs", n.name, [conv_node.outputs[0]], [n.outputs[0]])], "bad")

    graph = relu_graph()
    before = structure(graph)
    result = engine.run(graph, [ReadsRemoved("reads-removed", "Relu", "Abs")])
    assert result.applied == []
    assert "conv_out, which a removed node computes" in result.misses[0].reason
    assert structure(graph) == before


def test_new_values_and_weights_get_fresh_names() -> None:
    class Doubles(Swap):
        """Sigmoid(t) -> Relu(t) * 2, naming its new tensors after ones that exist."""

        def rewrite(self, graph: gs.Graph, plan: Plan) -> Replacement:
            n = plan.node
            mid = NewValue("conv_out", np.float32)
            return Replacement([n], [
                NewNode("Relu", "relu", [n.inputs[0]], [mid]),
                NewNode("Mul", "sig", [mid, NewWeight("conv_out", np.array(2.0, np.float32))],
                        [n.outputs[0]])], "double")

    graph = two_relus()
    result = engine.run(graph, [Doubles("double", "Sigmoid", "Relu")])
    assert len(result.applied) == 1
    names = [t.name for t in graph.tensors().values()]
    assert len(names) == len(set(names)), names
    assert sorted(n.name for n in graph.nodes) == ["conv", "relu", "relu_2", "relu_3", "sig"]
    assert result.applied[0].removed == ["sig"]
    assert result.applied[0].added == ["relu_3", "sig"]


# --- the refusal cache ----------------------------------------------------------------------


class CountsChecks(Swap):
    """Refuses every Relu, counting how often check runs per node."""

    def __init__(self) -> None:
        super().__init__("counts", "Relu", "Relu")
        self.checks: dict[str, int] = {}

    def check(self, graph: gs.Graph, m: Match) -> Plan | Refusal:
        self.checks[m.anchor.name] = self.checks.get(m.anchor.name, 0) + 1
        return Refusal(f"{m.anchor.name} refused")


def test_a_refusal_is_checked_once_while_its_neighbourhood_stands() -> None:
    graph = two_relus()
    counting = CountsChecks()
    # sigmoid -> abs rewrites (twice: abs -> sigmoid? no: once) force a second iteration
    result = engine.run(graph, [counting, Swap("sig-to-tanh", "Sigmoid", "Tanh")])
    assert result.iterations == 2
    assert sorted(m.node for m in result.misses) == ["relu", "relu_2"]
    # relu's neighbourhood (conv_out, r1) was touched by the Sigmoid rewrite (it reads r1):
    # checked again; relu_2 reads s, also written by the rewrite: checked again too
    assert counting.checks == {"relu": 2, "relu_2": 2}
    # a third run over the fixed point checks nothing new
    again = engine.run(graph, [counting])
    assert counting.checks == {"relu": 3, "relu_2": 3}
    assert again.iterations == 1


def test_a_refusal_far_from_a_rewrite_is_not_checked_again() -> None:
    nodes, inits = chain(conv("conv", "x", rand(4, 3, 1, 1), rand(4)))
    nodes += [node("Relu", ["conv_out"], ["r1"], "relu"), node("Exp", ["r1"], ["e"], "exp"),
              node("Exp", ["e"], ["e2"], "exp2"), node("Sigmoid", ["e2"], ["y"], "sig")]
    graph = graph_mod.normalize(make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", None)], inits))
    counting = CountsChecks()
    result = engine.run(graph, [counting, Swap("sig-to-tanh", "Sigmoid", "Tanh")])
    assert result.iterations == 2
    assert counting.checks == {"relu": 1}
    assert [m.node for m in result.misses] == ["relu"]


def test_cli_exit_3_on_an_internal_error(tmp_path, monkeypatch) -> None:
    """An internal error that prevents any output exits 3 (bad input is 2), one line."""
    from click.testing import CliRunner

    from onnxrep import api
    from onnxrep import cli as cli_mod

    nodes, inits = chain(conv("conv", "x", rand(4, 3, 1, 1), rand(4)))
    src = tmp_path / "in.onnx"
    onnx.save(make_model(nodes, [("x", [1, 3, 4, 4])], [("conv_out", None)], inits), src)

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("injected\nsecond line")

    monkeypatch.setattr(api, "fuse", broken)
    done = CliRunner().invoke(cli_mod.main, ["fuse", str(src), str(tmp_path / "out.onnx")])
    assert done.exit_code == 3
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["onnxrep: internal error: ZeroDivisionError: injected (rerun with --debug "
                     "and report it)"]
    assert not (tmp_path / "out.onnx").exists()
