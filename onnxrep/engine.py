"""The rule loop: match -> check -> rewrite, until a fixed point.

Each iteration offers every node of a snapshot of the graph to every rule in order and
rewrites at once (matches overlap, so they are never collected and applied later). The
loop stops when an iteration changes nothing; a cap on iterations turns a pair of rules
that keep undoing each other into an error that names them. Near misses of the last
iteration (the ones still standing at the fixed point) are kept for `--explain`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.errors import OnnxrepError, RulesDidNotConverge
from onnxrep.rule import Applied, Match, Miss, Rule
from onnxrep.surgery import is_graph_output

MAX_ITERATIONS = 64


@dataclass
class EngineResult:
    applied: list[Applied] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    iterations: int = 0


def escaping_tensors(graph: gs.Graph, match: Match) -> str | None:
    """No tensor computed inside a match may be read outside it, except its output."""
    inside = {id(n) for n in match.nodes}
    for node in match.nodes:
        for tensor in node.outputs:
            if tensor is match.output:
                continue
            if is_graph_output(graph, tensor):
                return f"{tensor.name} (inside the match) is a graph output"
            for reader in tensor.outputs:
                if id(reader) not in inside:
                    return f"{tensor.name} (inside the match) is also read by {reader.name}"
    return None


def _weights_read_by(nodes: Sequence[gs.Node]) -> list[gs.Constant]:
    return [t for n in nodes for t in n.inputs if isinstance(t, gs.Constant)]


def _release_dead(graph: gs.Graph, weights: list[gs.Constant]) -> None:
    """Free the arrays of weights that a rewrite left without readers, now: a gs tensor sits
    in a reference cycle with its own input/output lists, so it would otherwise wait for
    Python's cycle collector, and a 0.5 GB model would hold old and new weights at once."""
    for tensor in weights:
        if tensor.outputs or is_graph_output(graph, tensor):
            continue
        try:
            dtype = np.dtype(tensor.dtype)
        except TypeError:
            continue  # still an unread proto (a type numpy lacks): nothing big to free
        tensor.values = np.zeros((0,), dtype=dtype)


def run(
    graph: gs.Graph, rules: Sequence[Rule], max_iterations: int = MAX_ITERATIONS
) -> EngineResult:
    result = EngineResult()
    for iteration in range(1, max_iterations + 1):
        result.iterations = iteration
        fired: Counter[str] = Counter()
        misses: list[Miss] = []
        for rule in rules:
            alive = {id(n) for n in graph.nodes}
            for node in list(graph.nodes):
                if node.op not in rule.anchors or id(node) not in alive:
                    continue
                try:
                    match = rule.match(node, graph)
                    reasons = [] if match is None else list(rule.check(match))
                except Exception as exc:  # a rule bug must not pass for a near miss
                    raise OnnxrepError(
                        f"internal error in rule {rule.id} at node {node.name}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                if match is None:
                    continue
                if not reasons:
                    escape = escaping_tensors(graph, match)
                    if escape:
                        reasons.append(escape)
                if reasons:
                    misses.extend(Miss(rule.id, node.name, r) for r in reasons)
                    continue
                weights = _weights_read_by(match.nodes)
                try:
                    result.applied.append(rule.rewrite(graph, match))
                except Exception as exc:  # the graph may be half-rewritten: stop here
                    raise OnnxrepError(
                        f"internal error in rule {rule.id} rewriting {node.name}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                # cleanup drops the retired nodes at once (a dead reader would look like a
                # second consumer to the next match); ordering waits for the end of the pass
                graph.cleanup()
                _release_dead(graph, weights)
                alive = {id(n) for n in graph.nodes}
                fired[rule.id] += 1
            if fired[rule.id]:
                graph.toposort()
        result.misses = misses
        if not fired:
            return result
    names = ", ".join(f"{r} ({n}x)" for r, n in fired.most_common())
    raise RulesDidNotConverge(
        f"rules still rewriting after {max_iterations} iterations: {names}; "
        "rerun with --skip for one of them and report the model"
    )
